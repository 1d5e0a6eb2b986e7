"""The sections of the experiment matrix (`ctseg experiment`), its augmentation selection rule and the stress test."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from ctseg.config.base import MAX_SEED, _Section
from ctseg.config.sections import check_arch
from ctseg.registry import STRESS_AXES


# typed default factories: a lambda's list literal would be a list[str] to the type checker
def _paper_archs() -> list[str]:
    return ["unet", "msd"]


def _paper_dims() -> list[Literal["2d", "3d"]]:
    return ["2d", "3d"]


def _paper_augs() -> list[str]:
    return ["mia", "ctia"]


def _population_axes() -> list[str]:
    return ["pop-habitus", "pop-fov", "pop-kidney-size", "pop-tumour-size", "pop-phase", "pop-kernel"]


class SelectionConfig(_Section):
    """The pre-registered rule that picks the recommended augmentation from an ablation (`ctseg.evaluate.ablation`,
    docs/ABLATION.md). The stress test's volumes are split, within each CV fold, into validation and test
    volumes by `seed`; the rule is applied on the validation volumes and the winner reported on the test ones:

    score = mean Dice (headline structure, seeds averaged) over every non-clean severity of `axes`; the arm
    with the highest score wins; arms within `tie_margin` of it are tied, and the tie goes to the smallest
    robustness gap (clean minus score), then to the fewest transform steps, then to the name."""
    enabled: bool = False
    axes: list[str] = Field(default_factory=_population_axes, min_length=1,
                            description="stress axes the score averages (default: the population shifts)")
    validation_fraction: float = Field(0.5, gt=0, lt=1, description="share of each fold's volumes for validation")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    tie_margin: float = Field(0.005, ge=0, le=1)
    candidates: list[str] | None = Field(None, description="arms the rule may pick (default: all experiment.augs)")
    n_boot: int = Field(2000, ge=100, le=100000, description="bootstrap resamples of the paired CIs")


class ExperimentMatrixConfig(_Section):
    """The paper's experiment (`ctseg experiment`): every combination of archs x dims x augs (x seeds) is
    cross-validated, then a stacked ensemble per augmentation. `profiles` are named partial configs
    (same nesting as this file) merged over the config by `--profile NAME`, in every shipped config: ci (tiny smoke run), cpu (2-core CPU size), full (paper size)."""
    archs: list[str] = Field(default_factory=_paper_archs, min_length=1, description="registered networks")
    dims: list[Literal["2d", "3d"]] = Field(default_factory=_paper_dims, min_length=1)
    augs: list[str] = Field(default_factory=_paper_augs, min_length=1,
                            description="augmentation arms: the paper's (mia, nnunet, ctia, none) or `augment.arms` keys")
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=lambda: [0], min_length=1,
                             description="one run per seed and combination; more seeds give top_k more candidates")
    stack_seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=list, description="extra seeds trained only for the stack's "
                                   "member sets, so that stack.top_k picks among more candidates than it keeps")
    exclude: list[str] = Field(default_factory=list, description="combinations to leave out, as 'arch-dim', "
                               "e.g. ['unet-3d']")
    overrides: dict[str, dict] = Field(default_factory=dict, description="partial configs merged into the runs of "
                                       "one 'arch-dim', e.g. {'msd-3d': {'train': {'epochs': 2}}}")
    variants: dict[str, dict] = Field(default_factory=dict, description="extra arms: name -> partial config merged "
                                      "into every table run, e.g. {'nowindow': {'preprocess': {'window': 'none'}}}; "
                                      "runs named '<run>-<name>', reported beside the table, not stacked")
    variant: str = Field("", description="set by the experiment on a variant arm's runs (its name); empty otherwise")
    stack: bool = True
    thickness_groups_mm: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1.5, 3.0], min_length=1,
        description="upper edges of the slice-thickness groups in the report")
    profiles: dict[str, dict] = Field(default_factory=dict)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)

    @field_validator("archs")
    @classmethod
    def _archs(cls, value: list[str]) -> list[str]:
        return [check_arch(a) for a in value]

    @model_validator(mode="after")
    def _check_variants(self) -> ExperimentMatrixConfig:
        import re

        for name, over in self.variants.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", name):
                raise ValueError(f"experiment.variants name {name!r}: use lower-case letters, digits and _")
            if "experiment" in over:
                raise ValueError(f"experiment.variants.{name} may not change the experiment section")
        return self


class StressConfig(_Section):
    """Acquisition-shift stress test (`ctseg stress`, `ctseg.stress`): axes from `ctseg.registry.STRESS_AXES`,
    each with its default severities unless `severities` gives them (the clean value is always added first).
    `ctseg experiment` runs it out-of-fold on the table runs when `enabled`."""
    enabled: bool = False
    axes: list[str] = Field(default_factory=lambda: ["thickness-factor", "dose", "hu-offset", "hu-gain", "contrast",
                                                     "rotation", "pixel-spacing"], min_length=1)
    severities: dict[str, list[float]] = Field(default_factory=dict, description="axis -> severities")
    max_volumes: int | None = Field(None, ge=1, description="volumes drawn by `seed` (None: all)")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    failure_dice: float = Field(0.5, ge=0, le=1, description="a volume fails below this headline Dice")
    n_boot: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples for the CIs")

    @model_validator(mode="after")
    def _check(self) -> StressConfig:
        unknown = sorted((set(self.axes) | set(self.severities)) - set(STRESS_AXES))
        if unknown:
            raise ValueError(f"unknown stress axes {unknown}; choose from {list(STRESS_AXES)}")
        for axis, values in self.severities.items():
            text, valid = STRESS_AXES[axis].valid
            bad = [v for v in values if not valid(v)]
            if bad:
                raise ValueError(f"{axis} severities must be {text}, got {', '.join(f'{v:g}' for v in bad)}")
        return self
