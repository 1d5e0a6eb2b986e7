"""One typed experiment configuration: YAML in, validated, saved beside every result.

Every section is a pydantic model with defaults from the paper (`docs/PAPER_FIDELITY.md`);
unknown keys, and a key given twice in one mapping, are refused so that a typo never silently falls back to
a default or to the last value. Load with `load_config(path)` (which remembers the file in `cfg.source`, for
messages about it), save with `save_config(cfg, path)` (atomic).

The sections live beside this module, one module per part (`ctseg.config.augment`, `.sections`, `.experiment`);
a registered component (`ctseg.registry`) brings its own section, held under its name in the owning section:
the built-in ones too (`augment.ctia` is `ctseg.augment.ctia_config.CTIAConfig`, `model.unet`
`ctseg.models.unet.UNetConfig`, ...), so that this package, below the components, never imports them.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from ctseg.config.augment import BUILTIN_ARMS, ArmConfig, ArmStep, AugmentConfig, components, family_augs
from ctseg.config.base import MAX_SEED, Section, _Section, validation_lines
from ctseg.config.experiment import ExperimentMatrixConfig, SelectionConfig, StressConfig
from ctseg.config.sections import (CVConfig, DataConfig, ModelConfig, PredictConfig, PreprocessConfig, StackConfig,
                                   StackMemberSetConfig, TrainConfig)
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text

__all__ = ["BUILTIN_ARMS", "ArmConfig", "ArmStep", "AugmentConfig", "CVConfig", "DataConfig", "ExperimentConfig",
           "ExperimentMatrixConfig", "ModelConfig", "PredictConfig", "PreprocessConfig", "Section",
           "SelectionConfig", "StackConfig", "StackMemberSetConfig", "MAX_SEED", "StressConfig", "TrainConfig",
           "check_aug_names", "components", "config_to_dict", "family_augs", "load_config", "load_yaml",
           "parse_config", "save_config"]


class ExperimentConfig(_Section):
    name: str = "ctseg"
    seed: int = Field(0, ge=0, le=MAX_SEED, description="numpy and torch seeds derive from it")
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    stack: StackConfig = Field(default_factory=StackConfig)
    experiment: ExperimentMatrixConfig = Field(default_factory=ExperimentMatrixConfig)
    stress: StressConfig = Field(default_factory=StressConfig)
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The YAML file this config was loaded from (None when made in code)."""
        return self._source

    @model_validator(mode="after")
    def _check_augs(self) -> ExperimentConfig:
        sel = self.experiment.selection
        unknown = [a for a in [*self.experiment.augs, *(sel.candidates or [])] if a not in self.augment.known_names()]
        if unknown:
            raise ValueError(f"experiment.augs / selection.candidates {unknown} are neither the paper's arms nor keys of augment.arms; "
                             f"choose from {self.augment.known_names()}")
        if sel.enabled:
            missing = sorted(set(sel.axes) - set(self.stress.axes))
            if not self.stress.enabled or missing:
                raise ValueError(f"experiment.selection needs the stress test on (stress.enabled) with its axes "
                                 f"{sorted(sel.axes)}; missing from stress.axes: {missing}")
        return self


def check_aug_names(aug: AugmentConfig, names: list[str], source: str | Path | None = None) -> list[str]:
    """`names` if every one is an augmentation `aug` can run (paper arm, built-in or configured arm), else a
    `CtsegError` listing the choices (for `--aug` options)."""
    unknown = [n for n in names if n not in aug.known_names()]
    if unknown:
        raise CtsegError(f"unknown augmentation(s) {unknown}; this config knows {aug.known_names()}", source)
    return names


def _format_validation_error(err: ValidationError) -> str:
    return "invalid configuration:\n" + "\n".join(f"  {line}" for line in validation_lines(err))


def parse_config(data: dict, source: str | Path | None = None) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data or {})
    except ValidationError as err:
        raise CtsegError(_format_validation_error(err), source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping holding one key twice (PyYAML would keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader refuses it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> object:
    """YAML text as Python data; a key given twice in a mapping is a `yaml.YAMLError`."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise CtsegError("config file not found", path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CtsegError("not a text (UTF-8 YAML) file", path) from None
    except yaml.YAMLError as err:
        raise CtsegError(f"not valid YAML: {err}", path) from None
    if data is not None and not isinstance(data, dict):
        raise CtsegError(f"expected a mapping at the top level, got {type(data).__name__}", path)
    cfg = parse_config(data or {}, path)
    cfg._source = path
    return cfg


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
