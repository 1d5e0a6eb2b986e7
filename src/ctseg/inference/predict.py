"""Whole-volume inference in the input's own geometry, for one model or an ensemble.

Pipeline (`predict_volume`):

1. `to_canonical(copy=False)` (axis 0 axial, direction ~ identity; permutations and flips only, no
   resampling): a strided view of the input, no copy;
2. `preprocess_volume` with the models' intensity plan and in-plane size, exactly as in training
   (window + z-score, crop to the windowed region, area resize to S x S), giving (z, S, S) float32;
3. forward passes under `torch.inference_mode`, batched, on the GPU when present:
   2D models slice by slice; 3D models on stacks of `num_slices` (16) slices with the z-context they were
   trained with (`softmax_3d`, `cfg.predict.z_context`, stacks from `ctseg.preprocess.zstacks`): by default
   a strided pass over all slices finds the foreground slices, then stacks drawn from them as training
   draws them (random, sorted, training's gap distribution), averaged; or interleaved strided stacks at
   training's mean gap; or contiguous sliding windows. Strided and contiguous stacks overlap by `overlap`,
   each stack's softmax weighted over its positions (gaussian, sigma = window/8, as nnU-Net's patch
   blending, or linear "tent" weights) and the weighted sum normalised; volumes shorter than the window
   are padded by edge replication and cropped back;
4. member probabilities combined (see "Ensembles");
5. back to the canonical in-plane grid (`ctseg.inference.restore.restore_label`: `restore_in_plane`, bilinear
   into the crop box, background outside it, and argmax; without `return_probabilities` only the box is
   restored, and on the CPU only the pixels whose class is not already sure at network resolution are
   interpolated), chunk by chunk along z so that only ~64 MiB of float32
   probabilities exist at full resolution at any time, written through a canonical view into a uint8
   label map in the input's own voxel order: the label has the input's exact grid (shape, spacing,
   origin, direction).

Memory on a 512 x 512 x z volume: the input, the uint8 label map, network-resolution probabilities
(C x z x S x S float32) and one resampling chunk (benchmarks/bench_memory.py: 1.76 GiB peak for
`ctseg predict` of a 1059-slice case). Full-resolution probabilities (C x z x 512 x 512 float16) are
only kept when `return_probabilities=True`.

Ensembles: members must share the dataset classes, the in-plane crop mode and size
(else CtsegError). Members with different intensity plans (the folds of a CV) are each normalised with their
own plan, and must crop the volume to the same box (else CtsegError). A member may be "multiclass" (all
dataset classes) or "foreground" (background vs the union of all foreground classes, e.g. the paper's 3D MS-D Nets for kidney+tumour). They are
combined hierarchically at network resolution:

    P(background)   = mean over all members of their background probability
    P(class c > 0)  = (1 - P(background)) * q_c / sum_c' q_c',   q_c = mean over multiclass members of p_c

i.e. every member votes on background vs foreground, the multiclass members split the foreground
among the classes. With only multiclass members this is exactly the mean of their probabilities.
With only foreground members the output has two classes, background and foreground (the dataset's
single foreground class when it has one). Disagreement: each member's foreground mask (argmax != 0
at network resolution); `agreement` is the mean pairwise Dice between members (1.0 = identical),
a per-volume quality flag (low values deserve a human look; `ctseg.evaluate.quality`).

A stacked ensemble (`StackedModel`) combines each member's folds by this rule, concatenates the members'
maps in `stack.json` order and averages the softmax of its fold meta-models; `agreement` is then between
its members (CV runs). Every network output is checked to be finite (`check_finite_output`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence, Union

import numpy as np
import torch

from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_path
from ctseg.inference.restore import restore_label
from ctseg.inference.trained import FOREGROUND_NAME, TrainedModel
from ctseg.inference.windows import (ZContext, argmax_uint8, check_finite_output, first_pass_stacks, softmax_2d,
                                     softmax_3d)
from ctseg.io import Volume
from ctseg.models.stacking import StackingMetaModel, combine_members
from ctseg.preprocess.zstacks import Blend
from ctseg.runtime import release_free_memory, resolve_device

log = logging.getLogger(__name__)


@dataclass
class StackedModel:
    """The stacked ensemble (`ctseg.cv.run_stack`) ready for inference: each member is a cross-validation run
    whose fold models are averaged (`members[i]`, one list of fold models per member, in `stack.json` order),
    the members' maps are concatenated and every fold's meta-model is applied; their softmax is averaged (as
    nnU-Net averages its folds). source: the stack folder (for messages)."""

    members: list[list[TrainedModel]]
    metas: list[StackingMetaModel]
    source: Path | None = None

    @property
    def models(self) -> list[TrainedModel]:
        """Every fold model of every member, in order."""
        return [m for group in self.members for m in group]


#: One trained model, an ensemble of them (`ctseg.inference.load_models`), or a stacked ensemble.
Models = Union[TrainedModel, list[TrainedModel], tuple[TrainedModel, ...], StackedModel]

@dataclass
class PredictionResult:
    """Output of `predict_volume`.

    label: uint8 label map on the input grid (same shape, spacing, origin, direction, meta).
    classes: label value -> name. probabilities: (C, z, y, x) float16 on the same grid, or None.
    agreement: mean pairwise Dice of the members' foreground masks (None for one model);
    member_dice: (M, M) pairwise Dice matrix. seconds: time per stage.
    """

    label: Volume
    classes: dict[int, str]
    probabilities: np.ndarray | None = None
    agreement: float | None = None
    member_dice: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _dataset_classes(model: TrainedModel) -> dict[int, str]:
    classes = getattr(model, "dataset_classes", None) or model.classes
    return {int(k): str(v) for k, v in classes.items()}


def _in_plane_size(model: TrainedModel) -> int:
    return int(model.cfg.preprocess.in_plane_size)


def flat_models(models: Models) -> list[TrainedModel]:
    """The networks that see the image: the members of an ensemble, or every fold model of a stack's members."""
    if isinstance(models, StackedModel):
        return models.models
    return list(models) if isinstance(models, (list, tuple)) else [models]


def check_members(models: Sequence[TrainedModel]) -> tuple[dict[int, str], dict[int, str]]:
    """Validate an ensemble; returns (dataset classes, output classes). CtsegError names the odd member."""
    if not models:
        raise CtsegError("no model given")
    ref = models[0]
    ds_classes = _dataset_classes(ref)
    for m in models:
        where = getattr(m, "run_dir", None)
        if m.target not in ("multiclass", "foreground"):
            raise CtsegError(f"unknown model target {m.target!r}", where)
        if _dataset_classes(m) != ds_classes:
            raise CtsegError(f"ensemble members disagree on classes: {_dataset_classes(m)} vs {ds_classes} "
                             f"({getattr(ref, 'run_dir', 'first model')})", where)
        if m.cfg.preprocess.crop != ref.cfg.preprocess.crop:
            raise CtsegError(f"ensemble members disagree on the in-plane crop: {m.cfg.preprocess.crop} vs "
                             f"{ref.cfg.preprocess.crop}", where)
        if _in_plane_size(m) != _in_plane_size(ref):
            raise CtsegError(f"ensemble members disagree on the in-plane size: {_in_plane_size(m)} vs "
                             f"{_in_plane_size(ref)}", where)
        if m.cfg.model.dim not in ("2d", "3d"):
            raise CtsegError(f"unknown model dim {m.cfg.model.dim!r}", where)
    if any(m.target == "multiclass" for m in models):
        out = ds_classes
    else:
        fg = [v for k, v in ds_classes.items() if k != 0]
        out = {0: ds_classes.get(0, "background"), 1: fg[0] if len(fg) == 1 else FOREGROUND_NAME}
    return ds_classes, out


def _n_batches(model: TrainedModel, z: int, batch_size: int | None, overlap: float,
               z_context: ZContext | None = None) -> int:
    """Forward passes of `model` on a z-slice volume (3D: the first pass's stacks, and as many again for a
    second pass: an estimate, its size depends on the foreground found)."""
    if model.cfg.model.dim == "2d":
        return -(-z // (batch_size or 32))
    zc = z_context or model.cfg.predict.z_context
    first = len(first_pass_stacks(z, int(model.cfg.preprocess.num_slices), zc, overlap, "gaussian"))
    return (1 if zc == "contiguous" else 2) * -(-first // (batch_size or 2))


def _member_softmax(model: TrainedModel, image: torch.Tensor, device: torch.device, batch_size: int | None,
                    overlap: float, blend: Blend, tick: Callable[[], None], z_context: ZContext | None = None
                    ) -> torch.Tensor:
    """One member's softmax (K, z, S, S) float32 on `device` for the network input (z, S, S); a 3D member with
    its own `cfg.predict` z-context unless `z_context` overrides it."""
    module = model.module.to(device).eval()
    where = getattr(model, "run_dir", None)
    out = torch.empty((len(model.classes), *image.shape), dtype=torch.float32, device=device)
    with torch.inference_mode():
        if model.cfg.model.dim == "2d":
            softmax_2d(module, image, batch_size or 32, out, where, tick)
        else:
            pc = model.cfg.predict
            softmax_3d(module, image, int(model.cfg.preprocess.num_slices), out, z_context=z_context or pc.z_context,
                       draws=pc.z_draws, seed=pc.z_seed, overlap=overlap, blend=blend, batch_size=batch_size or 2,
                       where=where, tick=tick)
    return out


def _ensemble_softmax(models: Sequence[TrainedModel], xs: Sequence[torch.Tensor], out_classes: dict[int, str],
                      dev: torch.device, batch_size: int | None, overlap: float, blend: Blend,
                      tick: Callable[[], None], z_context: ZContext | None) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Combined probabilities (C, z, S, S) of an ensemble (the rule of the module docstring), and each
    member's foreground mask (argmax != 0)."""
    if len(models) == 1:
        p = _member_softmax(models[0], xs[0], dev, batch_size, overlap, blend, tick, z_context)
        return p, [(argmax_uint8(p) != 0).cpu().numpy()]
    n_fg = len(out_classes) - 1
    bg = torch.zeros(xs[0].shape, dtype=torch.float32, device=dev)
    fg = torch.zeros((n_fg, *xs[0].shape), dtype=torch.float32, device=dev) if \
        any(m.target == "multiclass" for m in models) else None
    fg_masks = []
    for m, xm in zip(models, xs):
        p = _member_softmax(m, xm, dev, batch_size, overlap, blend, tick, z_context)
        bg += p[0]
        if m.target == "multiclass" and fg is not None:  # fg exists when any member is multiclass
            fg += p[1:]
        fg_masks.append((argmax_uint8(p) != 0).cpu().numpy())
        del p
    bg /= len(models)
    return combine_members(bg, fg, len(out_classes)), fg_masks


def _stacked_softmax(stack: StackedModel, xs: Sequence[torch.Tensor], dev: torch.device, batch_size: int | None,
                     overlap: float, blend: Blend, tick: Callable[[], None], z_context: ZContext | None
                     ) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The stack's probabilities (K, z, S, S): each member's folds averaged, maps concatenated in member order,
    the meta-models' softmax averaged; and each member's foreground mask."""
    maps, masks, i = [], [], 0
    for group in stack.members:
        _, group_classes = check_members(group)
        p, _ = _ensemble_softmax(group, xs[i:i + len(group)], group_classes, dev, batch_size, overlap, blend, tick,
                                 z_context)
        i += len(group)
        masks.append((argmax_uint8(p) != 0).cpu().numpy())
        maps.append(p)
    x = torch.cat(maps)
    del maps
    n_cls = stack.metas[0].num_classes
    out = torch.zeros((n_cls, *x.shape[1:]), dtype=torch.float32, device=dev)
    step = batch_size or 32
    with torch.inference_mode():
        for meta in stack.metas:
            meta.to(dev).eval()
            for z0 in range(0, x.shape[1], step):
                logits = meta(x[:, z0:z0 + step].movedim(1, 0))
                check_finite_output(logits, stack.source)
                out[:, z0:z0 + step] += torch.softmax(logits.float(), dim=1).movedim(0, 1)
    out /= len(stack.metas)
    return out, masks


def predict_network(image: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor], models: Models,
                    device: str | torch.device = "auto", batch_size: int | None = None, overlap: float = 0.5,
                    blend: Literal["gaussian", "linear"] = "gaussian", progress: bool = False,
                    z_context: ZContext | None = None) -> tuple[torch.Tensor, dict[int, str], np.ndarray | None]:
    """Combined class probabilities at network resolution.

    image: (z, S, S) preprocessed network input (e.g. `CachedCase.image` or `preprocess_volume`), or one
    such input per network of `flat_models(models)` (members normalised with their own intensity plans,
    e.g. the folds of a CV). z_context: how 3D members see z (`softmax_3d`); None: each member's own
    `cfg.predict.z_context`. Returns (probabilities (C, z, S, S) float32 tensor on `device`, output classes,
    member Dice matrix (M, M) or None for a single model; a stack's members are its CV runs).
    """
    flat = flat_models(models)
    ds_classes, out_classes = check_members(flat)
    if isinstance(models, StackedModel):
        out_classes = ds_classes
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    inputs = list(image) if isinstance(image, (list, tuple)) else [image] * len(flat)
    if len(inputs) != len(flat):
        raise ValueError(f"{len(inputs)} inputs for {len(flat)} models")
    as_tensor = {}  # id -> tensor on the device: members sharing an input share one copy
    for img in inputs:
        if id(img) not in as_tensor:
            t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.asarray(img, dtype=np.float32))
            as_tensor[id(img)] = t.to(device=dev, dtype=torch.float32)
    xs = [as_tensor[id(img)] for img in inputs]
    if any(t.shape != xs[0].shape for t in xs):
        raise ValueError(f"member inputs differ in shape: {sorted({tuple(t.shape) for t in xs})}")
    total = sum(_n_batches(m, xs[0].shape[0], batch_size, overlap, z_context) for m in flat)
    with _Progress(progress, total, f"inference ({len(flat)} model{'s' if len(flat) > 1 else ''})") as tick:
        if isinstance(models, StackedModel):
            probs, fg_masks = _stacked_softmax(models, xs, dev, batch_size, overlap, blend, tick, z_context)
        else:
            probs, fg_masks = _ensemble_softmax(flat, xs, out_classes, dev, batch_size, overlap, blend, tick,
                                                z_context)
    if len(fg_masks) == 1:
        return probs, out_classes, None
    from ctseg.evaluate.quality import member_dice_matrix

    return probs, out_classes, member_dice_matrix(fg_masks)


class _Progress:
    """Context manager yielding a `tick()` callable: a rich progress bar when enabled, else a no-op."""

    def __init__(self, enabled: bool, total: int, what: str):
        self.bar = None
        if enabled:
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(what, total=total)

    def __enter__(self) -> Callable[[], None]:
        bar = self.bar
        if bar is None:
            return lambda: None
        bar.start()
        return lambda: bar.advance(self.task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def predict_volume(volume: Volume, models: Models, device: str | torch.device = "auto", return_probabilities: bool = False,
                   batch_size: int | None = None, overlap: float = 0.5,
                   blend: Literal["gaussian", "linear"] = "gaussian", progress: bool = False,
                   z_context: ZContext | None = None) -> PredictionResult:
    """Segment a CT volume (HU) with one model or an ensemble; the label comes back on the input grid.

    volume: HU, any orientation. models: a TrainedModel, a list (see module docstring for the
    ensemble rule) or a `StackedModel`. batch_size: slices (2D) or stacks (3D) per forward pass (default 32 / 2).
    overlap: fraction of a 3D window shared with the next (contiguous and strided stacks). z_context: how 3D
    models see z (`softmax_3d`); None: each model's own `cfg.predict.z_context`. Modules are moved to `device`.
    """
    from ctseg.io import to_canonical
    from ctseg.preprocess.slices import network_grid, preprocess_volume

    flat = flat_models(models)
    check_members(flat)
    dev = resolve_device(device)
    seconds = {}
    t0 = time.perf_counter()
    # canonical views, no copies: the network input is made slab by slab from the input's voxels, and
    # the label (and probabilities) are written through canonical views into arrays in the input's order
    canon = to_canonical(volume, copy=False)[0]
    # one crop box for all members (the first one's plan decides it), each member's own normalisation; a member
    # whose plan would crop this volume to another box (e.g. another fold's window) is named in a warning
    # (docs/PAPER_FIDELITY.md §8)
    grid = network_grid(canon.array, flat[0].plan, _in_plane_size(flat[0]), flat[0].cfg.preprocess.crop)
    for m in flat[1:]:
        if m.plan != flat[0].plan:
            box = network_grid(canon.array, m.plan, _in_plane_size(m), m.cfg.preprocess.crop).box
            if box != grid.box:
                log.warning("ensemble member %s: its plan would crop this volume to %s, the ensemble uses %s "
                            "(window lower bounds %g / %g HU)", getattr(m, "run_dir", "?"), box, grid.box,
                            m.plan.lower, flat[0].plan.lower)
    by_plan: dict = {}
    for m in flat:
        if m.plan not in by_plan:
            by_plan[m.plan] = preprocess_volume(canon.array, m.plan, _in_plane_size(m), box=grid.box)
    image = [by_plan[m.plan] for m in flat]
    z, h, w = canon.shape
    del canon
    label = np.empty(volume.shape, dtype=np.uint8)
    label_view = to_canonical(volume.with_array(label), copy=False)[0].array
    seconds["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    probs, classes, member_dice = predict_network(image, models, dev, batch_size, overlap, blend, progress,
                                                  z_context)
    del image, by_plan
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds["forward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    full = np.empty((probs.shape[0], *volume.shape), dtype=np.float16) if return_probabilities else None
    full_views = [] if full is None else [to_canonical(volume.with_array(f), copy=False)[0].array for f in full]
    restore_label(probs, (h, w), label_view, full_views, box=grid.box)
    del probs, label_view, full_views
    release_free_memory()
    out_label = volume.with_array(label)
    seconds["restore"] = time.perf_counter() - t0
    agreement = None
    if member_dice is not None:
        from ctseg.evaluate.quality import mean_pairwise

        agreement = mean_pairwise(member_dice)
    return PredictionResult(label=out_label, classes=classes, probabilities=full, agreement=agreement,
                            member_dice=member_dice, seconds=seconds)


def write_probabilities(result: PredictionResult, path: str | Path) -> Path:
    """Write `result.probabilities` as a 4D NIfTI (x, y, z, class) on the label's grid, atomically.

    Values are stored as uint8 with scl_slope = 1/255 (readers get probabilities back within
    1/510); the affine (and, for NIfTI input, the qform/sform codes) are the input's.
    """
    import nibabel as nib

    from ctseg.io import NIFTI_SUFFIXES

    path = Path(path)
    if result.probabilities is None:
        raise ValueError("the prediction was made without return_probabilities=True")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise CtsegError("probability maps are written as NIfTI: use a .nii.gz or .nii name", path)
    probs = result.probabilities
    quantised = np.empty(probs.shape, dtype=np.uint8)
    for c in range(probs.shape[0]):
        quantised[c] = np.rint(probs[c].astype(np.float32) * 255.0)
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ result.label.affine_lps
    img = nib.Nifti1Image(quantised.transpose(3, 2, 1, 0), affine_ras)
    header = result.label.meta.get("nifti_header")
    codes = (int(header["qform_code"]), int(header["sform_code"])) if isinstance(header, nib.Nifti1Header) else (1, 1)
    img.header.set_qform(affine_ras, code=codes[0] or 1)
    img.header.set_sform(affine_ras, code=codes[1] or 1)
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    img.header["intent_name"] = b"class probs"
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
