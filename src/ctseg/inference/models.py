"""What `--model FOLDER` may name, and loading it for inference.

A model folder is one of (checked in this order):

- a training run: `run.json` + `model_best.pt` (`ctseg train`);
- a cross-validation fold: `fold_<k>/` holding `model/` (a training run);
- a cross-validation run: `cv.json` + `fold_<k>/model/` for every fold: the ensemble of all its folds, as
  nnU-Net predicts with all folds by default;
- a stacked ensemble: `stack.json` + `fold_<k>/meta.pt` (`ctseg stack`, `ctseg experiment`'s `stack/<aug>/`):
  its members (cross-validation runs, each the ensemble of its folds) and its meta-models.

Several folders form one ensemble of all their networks (`ctseg.inference.predict`); a stack is used alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

from ctseg.errors import CtsegError
from ctseg.runs import CVRun, StackMember, StackRun, fold_dir

if TYPE_CHECKING:
    import torch

    from ctseg.inference.predict import Models, StackedModel

ModelKind = Literal["run", "fold", "cv", "stack"]

KINDS_HELP = ("a training run (run.json), a cross-validation fold (fold_<k>/ with model/), a cross-validation "
              "run (cv.json: all its folds) or a stacked ensemble (stack.json)")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model folder. run_dirs: the training runs whose networks see the image (a stack: every fold
    of every member, member by member); members: a stack's members, each its fold runs; metas: a stack's
    meta-model files, one per fold."""

    path: Path
    kind: ModelKind
    run_dirs: tuple[Path, ...]
    members: tuple[tuple[Path, ...], ...] = ()
    metas: tuple[Path, ...] = ()
    name: str = ""


def _model_folders_below(path: Path) -> list[Path]:
    """Model folders one or two levels below `path` (an experiment's runs/<name>, stack/<aug>), for the hint."""
    found = []
    for marker in ("run.json", "cv.json", "stack.json"):
        found += [p.parent for p in path.glob(f"*/{marker}")] + [p.parent for p in path.glob(f"*/*/{marker}")]
    return sorted(set(found))


def _cv_folds(cv_dir: Path) -> tuple[Path, ...]:
    """The fold model folders of a cross-validation run; CtsegError naming the first unfinished fold."""
    n_folds = CVRun.read(cv_dir).n_folds
    runs = []
    for k in range(n_folds):
        model = fold_dir(cv_dir, k) / "model"
        if not (model / "model_best.pt").is_file():
            raise CtsegError(f"fold {k} of {n_folds} has no trained model (model_best.pt): finish the "
                             "cross-validation, or give the finished fold folders (fold_<k>) instead", model)
        runs.append(model)
    return tuple(runs)


def _stack_member_dir(stack_dir: Path, member: StackMember) -> Path:
    """A member's CV folder: its recorded path, else `runs/<name>` of the experiment holding the stack (an
    experiment folder moved or copied elsewhere)."""
    if (member.path / "cv.json").is_file():
        return member.path
    moved = stack_dir.parent.parent / "runs" / member.name
    if (moved / "cv.json").is_file():
        return moved
    raise CtsegError(f"stack member {member.name!r} not found at {member.path} nor at {moved}",
                     stack_dir / "stack.json")


def _resolve_stack(path: Path) -> ModelSource:
    info = StackRun.read(path)
    n_folds = info.n_folds
    metas = tuple(info.fold_dir(k) / "meta.pt" for k in range(n_folds))
    for k, meta in enumerate(metas):
        if not meta.is_file():
            raise CtsegError(f"fold {k} of {n_folds} has no meta-model (meta.pt): finish the stack (`ctseg stack` or "
                             "`ctseg experiment`) first", meta)
    groups = tuple(_cv_folds(_stack_member_dir(path, m)) for m in info.members)
    return ModelSource(path, "stack", tuple(d for g in groups for d in g), groups, metas, name=f"stacked-{info.aug}")


def resolve_model(path: str | Path) -> ModelSource:
    """What the model folder `path` is (see the module docstring); CtsegError naming it otherwise."""
    path = Path(path).absolute()
    if not path.exists():
        raise CtsegError("model folder not found", path)
    if not path.is_dir():
        raise CtsegError(f"expected a model folder: {KINDS_HELP}", path)
    if (path / "run.json").is_file():
        return ModelSource(path, "run", (path,), name=path.name)
    if (path / "model" / "run.json").is_file():
        return ModelSource(path, "fold", (path / "model",), name=path.name)
    if (path / "cv.json").is_file():
        return ModelSource(path, "cv", _cv_folds(path), name=path.name)
    if (path / "stack.json").is_file():
        return _resolve_stack(path)
    below = _model_folders_below(path)
    hint = ""
    if below:
        listed = ", ".join(str(p) for p in below[:4]) + (" ..." if len(below) > 4 else "")
        hint = f"; model folders below it: {listed}"
    raise CtsegError(f"not a model folder: expected {KINDS_HELP}{hint}", path)


def _load_stack(source: ModelSource, device: torch.device) -> StackedModel:
    from ctseg.models.stacking import load_meta_model
    from ctseg.inference.predict import StackedModel, check_members
    from ctseg.inference.trained import load_trained

    members = [[load_trained(d, device) for d in group] for group in source.members]
    channels = 0
    for group in members:
        _, classes = check_members(group)
        channels += len(classes)
    metas = []
    for path in source.metas:
        try:
            meta = load_meta_model(path, device)
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as err:
            raise CtsegError(f"cannot read the meta-model ({type(err).__name__}: {str(err).splitlines()[0]})",
                             path) from None
        if meta.in_channels != channels:
            raise CtsegError(f"the meta-model takes {meta.in_channels} channels but the members give {channels}",
                             path)
        metas.append(meta)
    ds_classes, _ = check_members([m for g in members for m in g])
    if metas[0].num_classes != len(ds_classes):
        raise CtsegError(f"the meta-model predicts {metas[0].num_classes} classes but the members' dataset has "
                         f"{len(ds_classes)}", source.metas[0])
    return StackedModel(members, metas, source.path)


def load_models(paths: Sequence[str | Path] | str | Path, device: str | torch.device = "cpu") -> Models:
    """The model(s) of one or more model folders, ready for `ctseg.inference.predict.predict_volume`: one network, an
    ensemble of every network the folders hold, or a stacked ensemble (which must be the only folder)."""
    from ctseg.inference.trained import load_trained
    from ctseg.runtime import resolve_device

    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise CtsegError("no model folder given")
    dev = resolve_device(device)
    sources = [resolve_model(p) for p in paths]
    stacks = [s for s in sources if s.kind == "stack"]
    if stacks and len(sources) > 1:
        raise CtsegError("a stacked ensemble is used alone: give its folder as the only --model", stacks[0].path)
    if stacks:
        return _load_stack(stacks[0], dev)
    models = [load_trained(d, dev) for s in sources for d in s.run_dirs]
    return models[0] if len(models) == 1 else models
