"""Scoring a test volume of cross-validation or stacking from its network-resolution probabilities.

`score_volume` restores the probabilities (C, z, S, S) into the volume's own in-plane grid (`network_label`:
bilinear into the crop box, argmax, as `ctseg predict` does), and scores the label against the reference: Dice
per structure on the full volume and HD95 (`evaluate_volume`), and the paper's protocol (`dice_paper_protocol`:
network resolution, foreground slices). `eval_classes` says which classes a model's output is scored with.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ctseg.errors import CtsegError
from ctseg.evaluate.metrics import dice_paper_protocol, evaluate_volume
from ctseg.evaluate.records import ModelIdentity, VolumeResult
from ctseg.inference.predict import restore_label
from ctseg.preprocess.slices import InPlaneResize

if TYPE_CHECKING:
    from ctseg.datasets.base import Case
    from ctseg.preprocess.cache import CachedCase


def eval_classes(target: str, dataset_classes: dict[int, str]) -> tuple[dict[int, str], bool]:
    """Classes to score a model's output with, and whether the reference must be merged to foreground.

    A 'foreground' model of a multi-class dataset is scored on 'total' (the union of the classes) only.
    """
    fg = [k for k in dataset_classes if k != 0]
    if target == "foreground" and len(fg) > 1:
        return {0: dataset_classes.get(0, "background"), 1: "total"}, True
    return dict(dataset_classes), False


def network_label(probs: np.ndarray | torch.Tensor, original_yx: tuple[int, int],
                  box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(C, z, S, S) network-resolution probabilities -> uint8 (z, H, W) label: bilinear in-plane (into the
    crop `box`, background outside), argmax.

    Chunked along z (`ctseg.inference.predict.restore_label`, as `ctseg predict` does).
    """
    out = np.empty((probs.shape[1], *original_yx), dtype=np.uint8)
    restore_label(probs, original_yx, out, box=box)
    return out


def score_volume(identity: ModelIdentity, case: Case, cached: CachedCase, probs: np.ndarray, fold: int,
                 dataset_classes: dict[int, str], target: str, overlay_path: Path | None,
                 distances: bool = True) -> VolumeResult:
    """Score one test volume. probs: (C, z, S, S) at network resolution; case: the dataset's Case (HU,
    label on the image grid); cached: its `CachedCase` (network-resolution label). distances: HD95."""
    if case.label is None:
        raise CtsegError(f"case {case.case_id} has no label: test volumes must be labelled to be scored",
                         case.metadata.get("image_path"))
    from ctseg.evaluate.plots import save_overlay_slice  # matplotlib: imported when scoring

    classes, merge = eval_classes(target, dataset_classes)
    ref_full = case.label.array
    ref_net = np.asarray(cached.label)
    if merge:
        ref_full, ref_net = (ref_full > 0).astype(np.uint8), (ref_net > 0).astype(np.uint8)
    pred = network_label(probs, case.image.shape[1:], InPlaneResize.from_dict(cached.meta["in_plane"]).box)
    recs = evaluate_volume(pred, ref_full, classes, case.image.spacing, case_id=case.case_id, fold=fold,
                           slice_thickness=cached.meta.get("slice_thickness"), distances=distances)
    paper = dice_paper_protocol(np.asarray(probs).argmax(0).astype(np.uint8), ref_net, classes)
    if overlay_path is not None:
        save_overlay_slice(overlay_path, case.image.array, ref_full, pred, case.image.spacing)
    th = cached.meta.get("slice_thickness")
    return VolumeResult(
        case_id=case.case_id, fold=fold, model=identity.name, arch=identity.arch, dim=identity.dim, aug=identity.aug,
        dice={r["structure"]: float(r["dice"]) for r in recs},
        dice_paper={k: float(v) for k, v in paper.items()},
        hd95={r["structure"]: float(r["hd95"]) for r in recs if "hd95" in r},
        slice_thickness=None if th is None else float(th), num_slices=int(cached.meta["num_slices"]),
        variant=identity.variant, overlay=str(overlay_path) if overlay_path is not None else None)
