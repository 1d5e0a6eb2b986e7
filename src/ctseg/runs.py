"""Run folders: the record files that say what a folder holds, read, written and validated here only.

Three kinds of folder (docs/ARCHITECTURE.md, "Run folders"):

- a training run (`ctseg train`; a CV fold's `fold_<k>/model/`): `run.json` (`TrainingRun`), `model_best.pt`,
  `model_last.pt`, `checkpoint.pt`, `log.csv`;
- a cross-validation run (`ctseg cv`): `cv.json` (`CVRun`), `config.yaml`, and per fold `fold_<k>/model/` (a
  training run), `oof/`, `overlays/`, `provenance.json` and `results.json` (written last: the fold is done);
- a stacked ensemble (`ctseg stack`): `stack.json` (`StackRun`), and per fold `meta.pt`, `meta_training.json`,
  `heldout/`, `overlays/`, `provenance.json`, `results.json`.

The records keep the field names their writers have always used. Fields older writers did not write take
defaults (a cv.json before data signatures: `sources` None; a stack.json before per-fold selection: no
`candidates` / `folds`; a run.json before provenance records: `provenance` None), so old folders still load.
A record that is missing, not JSON, not an object, of another format, or lacks a field every writer wrote is
a CtsegError naming the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text

RUN_FORMAT = "ctseg.run"
CV_FORMAT = "ctseg.cv"
STACK_FORMAT = "ctseg.stack"
#: Version of the provenance records in run folders (run.json, fold_<k>/provenance.json, stack.json,
#: meta_training.json), which `ctseg.evaluate.provenance` checks.
PROVENANCE_VERSION = 1


def fold_dir(run_dir: str | Path, k: int) -> Path:
    """Fold k's folder of a CV or stack run."""
    return Path(run_dir) / f"fold_{k}"


def _read_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; OSError / ValueError / TypeError for the callers to word."""
    info = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(info, dict):
        raise TypeError(f"expected a JSON object, got a {type(info).__name__}")
    return info


def _check_format(info: dict, expected: str) -> None:
    if info.get("format") != expected:
        raise ValueError(f"format {info.get('format')!r}, expected {expected!r}")


R = TypeVar("R")


def _read_record(path: Path, expected: str, parse: Callable[[dict[str, Any]], R], unreadable: str) -> R:
    """`parse` of the record in `path` (a JSON object of format `expected`); a CtsegError naming `path`,
    '<unreadable> (<error>)', when it cannot be read, is another format or lacks what `parse` needs."""
    try:
        info = _read_object(path)
        _check_format(info, expected)
        return parse(info)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CtsegError(f"{unreadable} ({type(err).__name__}: {err})", path) from None


def _classes(d: dict) -> dict[int, str]:
    return {int(k): str(v) for k, v in d.items()}


# -------------------------------------------------------------------------------------------- training run
@dataclass
class TrainingRun:
    """`run.json` of a training run (written by `ctseg.train.trainer` at every epoch end).

    config: the `ExperimentConfig` as a dict (`config_to_dict`); intensity_plan: `IntensityPlan.to_dict()`;
    classes: output channel -> name; dataset_classes: label value -> name of the training data ({} from
    writers before it existed); train_ids / val_ids: the cases the weights were fitted / the checkpoint chosen
    on; best_metric: mean foreground validation Dice of the best epoch (None without validation); status:
    running, completed, diverged, interrupted or failed ('finished' from old writers).
    """

    status: str | None
    config: dict
    intensity_plan: dict
    classes: dict[int, str]
    target: str
    num_classes: int
    in_channels: int
    dataset_classes: dict[int, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    dataset_fingerprint: str | None = None
    train_ids: list[str] = field(default_factory=list)
    val_ids: list[str] = field(default_factory=list)
    epochs_run: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    world_size: int = 1
    device: str = ""
    provenance: dict | None = None
    error: str | None = None

    @classmethod
    def read(cls, run_dir: str | Path) -> TrainingRun:
        """The record of the training run `run_dir`; CtsegError naming run.json when unreadable."""
        return _read_record(Path(run_dir) / "run.json", RUN_FORMAT, cls._parse, "run.json unreadable")

    @classmethod
    def _parse(cls, info: dict[str, Any]) -> TrainingRun:
        if not isinstance(info["config"], dict) or not isinstance(info["intensity_plan"], dict):
            raise TypeError("config and intensity_plan must be objects")
        best = info.get("best_metric")
        return cls(
            status=info.get("status"), config=info["config"], intensity_plan=info["intensity_plan"],
            classes=_classes(info["classes"]), target=str(info["target"]),
            num_classes=int(info["num_classes"]), in_channels=int(info["in_channels"]),
            dataset_classes=_classes(info.get("dataset_classes") or {}), versions=dict(info.get("versions") or {}),
            dataset_fingerprint=info.get("dataset_fingerprint"),
            train_ids=[str(c) for c in info.get("train_ids") or []],
            val_ids=[str(c) for c in info.get("val_ids") or []],
            epochs_run=int(info.get("epochs_run") or 0), global_step=int(info.get("global_step") or 0),
            best_metric=None if best is None else float(best), best_epoch=info.get("best_epoch"),
            world_size=int(info.get("world_size") or 1), device=str(info.get("device") or ""),
            provenance=info.get("provenance"), error=info.get("error"))

    def to_json(self) -> dict:
        info = {"format": RUN_FORMAT, "status": self.status, "config": self.config,
                "intensity_plan": self.intensity_plan, "classes": {str(k): v for k, v in self.classes.items()},
                "dataset_classes": {str(k): v for k, v in self.dataset_classes.items()}, "target": self.target,
                "num_classes": self.num_classes, "in_channels": self.in_channels, "versions": self.versions,
                "dataset_fingerprint": self.dataset_fingerprint, "train_ids": self.train_ids,
                "val_ids": self.val_ids, "epochs_run": self.epochs_run, "global_step": self.global_step,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch, "world_size": self.world_size,
                "device": self.device, "provenance": self.provenance}
        if self.error:
            info["error"] = self.error
        return info

    def write(self, run_dir: str | Path) -> None:
        atomic_write_text(Path(run_dir) / "run.json", json.dumps(self.to_json(), indent=1))

    def lineage(self) -> dict[str, list[str]]:
        """What the model was fitted and chosen on: weights, checkpoint selection, intensity plan (sorted ids)."""
        return {"weights_fitted_on": sorted(self.train_ids), "checkpoint_selected_on": sorted(self.val_ids),
                "intensity_plan_fitted_on": sorted(self.intensity_plan.get("subset_ids") or [])}

    def trained_on(self) -> frozenset[str]:
        """The cases the model has seen in any way (weights, checkpoint selection, intensity plan)."""
        return frozenset().union(*(set(v) for v in self.lineage().values()))


def training_completed(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a completed training (run.json says so and model_best.pt exists); False when
    run.json is missing or unreadable."""
    try:
        return TrainingRun.read(run_dir).status == "completed" and (Path(run_dir) / "model_best.pt").is_file()
    except CtsegError:
        return False


# ------------------------------------------------------------------------------------------------- CV run
@dataclass(frozen=True)
class CVRun:
    """`cv.json` of a cross-validation run (written by `ctseg.cv.run_cv` before its first fold).

    name ... variant: the run's identity (`ctseg.cv.RunIdentity`); data / cache / folds_file: absolute paths
    of the dataset, the shared cache root and the folds file; sources: case id -> signature of its files
    (`ctseg.datasets.base.dataset_sources`; None from writers before it existed). path: the run folder.
    """

    name: str
    arch: str
    dim: str
    target: str
    aug: str
    data: str
    layout: str
    cache: str
    folds_file: str
    n_folds: int
    seed: int = 0
    variant: str = ""
    sources: dict[str, str | None] | None = None
    path: Path = Path(".")

    @classmethod
    def read(cls, run_dir: str | Path) -> CVRun:
        """The record of the CV run `run_dir`; CtsegError naming cv.json (or the folder, without one)."""
        path = Path(run_dir) / "cv.json"
        if not path.is_file():
            raise CtsegError("not a cross-validation folder (no cv.json); run `ctseg cv` first", run_dir)
        return _read_record(path, CV_FORMAT, lambda info: cls._parse(info, Path(run_dir)),
                            "not a readable cv.json of ctseg")

    @classmethod
    def _parse(cls, info: dict[str, Any], run_dir: Path) -> CVRun:
        sources = info.get("sources")
        return cls(name=str(info["name"]), arch=str(info["arch"]), dim=str(info["dim"]),
                   target=str(info["target"]), aug=str(info["aug"]), data=str(info["data"]),
                   layout=str(info.get("layout", "auto")), cache=str(info["cache"]),
                   folds_file=str(info["folds_file"]), n_folds=int(info["n_folds"]),
                   seed=int(info.get("seed", 0)), variant=str(info.get("variant") or ""),
                   sources=dict(sources) if isinstance(sources, dict) else None, path=run_dir)

    def to_json(self) -> dict:
        return {"format": CV_FORMAT, "name": self.name, "arch": self.arch, "dim": self.dim, "target": self.target,
                "aug": self.aug, "seed": self.seed, "variant": self.variant, "data": self.data,
                "layout": self.layout, "cache": self.cache, "folds_file": self.folds_file, "n_folds": self.n_folds,
                "sources": self.sources}

    def write(self) -> None:
        atomic_write_text(self.path / "cv.json", json.dumps(self.to_json(), indent=1))

    def fold_dir(self, k: int) -> Path:
        return fold_dir(self.path, k)

    def model_dir(self, k: int) -> Path:
        """Fold k's training run."""
        return fold_dir(self.path, k) / "model"

    def fold_run(self, k: int) -> TrainingRun:
        """Fold k's training record."""
        return TrainingRun.read(self.model_dir(k))


def previous_sources(run_dir: str | Path) -> dict[str, str | None] | None:
    """The `sources` a CV folder's cv.json records, None when it has none (or no readable cv.json)."""
    try:
        return CVRun.read(run_dir).sources
    except CtsegError:
        return None


# ---------------------------------------------------------------------------------------------- stack run
@dataclass(frozen=True)
class StackMember:
    """A member of a stacked ensemble (a CV run). folds: the test folds it was selected for."""

    name: str
    path: Path
    arch: str = ""
    dim: str = ""
    target: str = ""
    val_score: float | None = None
    folds: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "arch": self.arch, "dim": self.dim,
                "target": self.target, "val_score": self.val_score, "folds": list(self.folds)}


@dataclass(frozen=True)
class StackRun:
    """`stack.json` of a stacked ensemble (written by `ctseg.cv.run_stack` before its first fold).

    members: every CV run selected for some fold; candidates / folds: every candidate and, per test fold, the
    selection and the cases it was made on (`ctseg.evaluate.provenance` checks them); stack: the `StackConfig`
    as a dict. path: the stack folder.
    """

    aug: str
    n_folds: int
    members: tuple[StackMember, ...]
    top_k: int | None = None
    selection: str = ""
    meta_training: str = ""
    folds_file: str | None = None
    provenance: dict | None = None
    candidates: tuple[dict, ...] = ()
    folds: tuple[dict, ...] = ()
    stack: dict = field(default_factory=dict)
    path: Path = Path(".")

    @classmethod
    def read(cls, stack_dir: str | Path) -> StackRun:
        """The record of the stack folder `stack_dir`; CtsegError naming stack.json."""
        return _read_record(Path(stack_dir) / "stack.json", STACK_FORMAT,
                            lambda info: cls._parse(info, Path(stack_dir)), "not a readable stack.json of ctseg")

    @classmethod
    def _parse(cls, info: dict[str, Any], stack_dir: Path) -> StackRun:
        members = info.get("members")
        if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
            raise ValueError("no members listed")
        top_k = info.get("top_k")
        return cls(aug=str(info.get("aug", stack_dir.name)), n_folds=int(info["n_folds"]),
                   members=tuple(StackMember(str(m.get("name", "")), Path(str(m.get("path", ""))),
                                             str(m.get("arch", "")), str(m.get("dim", "")),
                                             str(m.get("target", "")), m.get("val_score"),
                                             tuple(int(k) for k in m.get("folds") or ())) for m in members),
                   top_k=None if top_k is None else int(top_k), selection=str(info.get("selection") or ""),
                   meta_training=str(info.get("meta_training") or ""), folds_file=info.get("folds_file"),
                   provenance=info.get("provenance"), candidates=tuple(info.get("candidates") or ()),
                   folds=tuple(info.get("folds") or ()), stack=dict(info.get("stack") or {}), path=stack_dir)

    def to_json(self) -> dict:
        return {"format": STACK_FORMAT, "aug": self.aug, "n_folds": self.n_folds, "top_k": self.top_k,
                "selection": self.selection, "meta_training": self.meta_training, "folds_file": self.folds_file,
                "provenance": self.provenance, "members": [m.to_json() for m in self.members],
                "candidates": list(self.candidates), "folds": list(self.folds), "stack": self.stack}

    def write(self) -> None:
        atomic_write_text(self.path / "stack.json", json.dumps(self.to_json(), indent=1))

    def fold_dir(self, k: int) -> Path:
        return fold_dir(self.path, k)
