"""A trained network ready for inference, loaded from its training-run folder (`ctseg.runs.TrainingRun`).

`load_trained(run_dir)` checks what run.json says against the network and the data (classes, strides, the
task), the memory the network needs, and that the weights are finite, and gives back a `TrainedModel` in eval
mode: the network, its config, its intensity plan and its classes, what `ctseg.inference.predict` needs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ctseg.config import ExperimentConfig, parse_config
from ctseg.errors import CtsegError
from ctseg.models.unet import UNetConfig
from ctseg.models.weights import load_state_dict_file
from ctseg.runs import TrainingRun
from ctseg.runtime import resolve_device

if TYPE_CHECKING:
    from ctseg.preprocess.windowing import IntensityPlan

log = logging.getLogger(__name__)

#: Name of the output class of a "foreground" model: the union of the dataset's foreground classes.
FOREGROUND_NAME = "foreground"


@dataclass
class TrainedModel:
    """A trained network ready for inference (eval mode, best weights).

    classes: output channel -> name (multiclass: the dataset's classes; foreground: background/foreground);
    dataset_classes: label value -> name of the training data.
    """

    module: nn.Module
    cfg: ExperimentConfig
    plan: IntensityPlan
    classes: dict[int, str]
    target: str
    run_dir: Path
    dataset_classes: dict[int, str] = field(default_factory=dict)


_TASK_ORGANS = {"kidney": "kidney", "liver": "liver"}


def _check_model_metadata(cfg: ExperimentConfig, classes: dict[int, str], info_path: Path) -> None:
    """Refuse run.json settings that contradict the network or the data: a U-Net whose in-plane size (or 3D
    stack) is not divisible by its total stride, or a liver config (data.task) whose classes hold the kidney
    but no liver (a liver config trained on kidney labels)."""
    m = cfg.model
    if m.arch == "unet":
        unet = m.section("unet", UNetConfig)
        stride = 2 ** (unet.n_stages - 1)
        if cfg.preprocess.in_plane_size % stride:
            raise CtsegError(f"in_plane_size {cfg.preprocess.in_plane_size} is not divisible by the U-Net's stride "
                             f"{stride} ({unet.n_stages} stages): these weights were not trained at this size",
                             info_path)
        z_stride = 2 ** min(unet.z_pool_stages, unet.n_stages - 1)
        if m.dim == "3d" and cfg.preprocess.num_slices % z_stride:
            raise CtsegError(f"num_slices {cfg.preprocess.num_slices} is not divisible by the 3D U-Net's z stride "
                             f"{z_stride}", info_path)
    names = {str(v).lower() for v in classes.values()}
    own = _TASK_ORGANS[cfg.data.task]
    others = {o for t, o in _TASK_ORGANS.items() if t != cfg.data.task}
    # only the non-default task is checked: "kidney" is the default, also left in configs of other datasets
    if cfg.data.task != "kidney" and own not in names and names & others:
        raise CtsegError(f"config says data.task {cfg.data.task!r} but the classes are {sorted(names)}: a "
                         f"{cfg.data.task} config trained on other labels", info_path)


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The best model of a finished (or running) training folder, in eval mode on `device`. A CV fold folder
    (`fold_<k>/` holding `model/`) stands for its training run; cross-validation and stack folders are loaded
    by `ctseg.inference.load_models`."""
    from ctseg.models import build_model
    from ctseg.preprocess.windowing import IntensityPlan
    from ctseg.resources import check_memory, parameter_count

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CtsegError("model folder not found", run_dir)
    if not (run_dir / "run.json").is_file() and (run_dir / "model" / "run.json").is_file():
        run_dir = run_dir / "model"
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        hint = (": a cross-validation or stack folder; load it with ctseg.inference.load_models"
                if (run_dir / "cv.json").is_file() or (run_dir / "stack.json").is_file() else "")
        raise CtsegError(f"not a ctseg model folder: run.json is missing{hint}", run_dir)
    run = TrainingRun.read(run_dir)
    try:
        cfg = parse_config(run.config, info_path)
        plan = IntensityPlan.from_dict(run.intensity_plan, info_path)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CtsegError(f"run.json unreadable ({type(err).__name__}: {err})", info_path) from None
    classes, dataset_classes = run.classes, run.dataset_classes
    in_channels, num_classes = run.in_channels, run.num_classes
    weights_path = run_dir / "model_best.pt"
    if not weights_path.is_file():
        raise CtsegError("model_best.pt is missing (training stopped before its first epoch ended?)", run_dir)
    if num_classes != len(classes) or num_classes < 2:
        raise CtsegError(f"run.json declares num_classes {num_classes} but {len(classes)} classes {classes}",
                         info_path)
    if dataset_classes and run.target == "multiclass" and dataset_classes != classes:
        raise CtsegError(f"run.json: a multiclass model's classes {classes} differ from its dataset classes "
                         f"{dataset_classes}", info_path)
    _check_model_metadata(cfg, dataset_classes or classes, info_path)
    if run.status not in ("completed", "finished"):
        log.warning("%s: the training run's status is %r, not 'completed': its weights may be unfinished",
                    run_dir, run.status)
    check_memory(4 * parameter_count(cfg.model, num_classes, in_channels), resolve_device(device),
                 "the model described in run.json", "nothing: run.json is not a plausible model", info_path)
    weights = load_state_dict_file(weights_path)
    bad = [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise CtsegError(f"weights contain NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]}): the training "
                         "diverged", weights_path)
    module = build_model(cfg.model, in_channels, num_classes)
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        raise CtsegError(f"weights do not fit the model described in run.json ({str(err).splitlines()[0]})",
                         weights_path) from None
    module.to(resolve_device(device)).eval()
    return TrainedModel(module, cfg, plan, classes, run.target, run_dir, dataset_classes)
