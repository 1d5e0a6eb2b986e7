"""Segmentation metrics: Dice (the paper's definition), HD95 and surface Dice (MONAI), summaries.

Dice (paper, Evaluation):  D(p, y) = 2 * sum(p * y) / (sum(p^2) + sum(y^2)).
For binary masks p^2 = p, so this is the usual 2|P ∩ Y| / (|P| + |Y|); for probabilities it is the
soft Dice. Convention: a structure absent from both prediction and reference scores 1.0 (nothing to
find, nothing found); absent from one only scores 0.0. KiTS19 reports tumour Dice on every volume
this way; callers who prefer to drop such volumes can filter on `ref_empty` in the records.

Per-class structures (`structures(classes)`): every non-zero class by name, plus "total" (the union
of all non-zero classes) when there are two or more, e.g. KiTS {1: kidney, 2: tumour} -> kidney,
tumour, total; CHAOS {1: liver} -> liver.

Two protocols:
- `evaluate_volume`: full volume in original geometry (ours, beyond the paper): label maps on the
  input grid, HD95 / surface Dice in mm with the voxel spacing.
- `dice_paper_protocol`: the paper's numbers: network resolution (e.g. 128 x 128 in-plane) and only
  the slices whose reference contains foreground.

Summaries work on flat records (one dict per volume x structure, see `evaluate_volume`):
`summarize(records, by=None | "fold" | "thickness_group")` -> mean ± std over volumes, and
`fold_mean_std` -> mean ± std of per-fold means (how the paper's tables read).
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from ctseg.evaluate.folds import thickness_group


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Paper Dice 2*sum(p*y) / (sum(p^2) + sum(y^2)) of two same-shape arrays (binary or in [0, 1]).

    Both empty -> 1.0 (convention, see module docstring).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    if pred.dtype == bool and ref.dtype == bool:
        inter = float(np.count_nonzero(pred & ref))
        denom = float(np.count_nonzero(pred) + np.count_nonzero(ref))
    else:
        p = pred.astype(np.float64, copy=False)
        y = ref.astype(np.float64, copy=False)
        inter = float(np.sum(p * y))
        denom = float(np.sum(p * p) + np.sum(y * y))
    if denom == 0:
        return 1.0
    return float(2.0 * inter / denom)


def structures(classes: dict[int, str]) -> dict[str, tuple[int, ...]]:
    """Structure name -> label values it covers: each non-zero class, plus "total" (their union) if >= 2."""
    fg = {int(k): str(v) for k, v in classes.items() if int(k) != 0}
    out: dict[str, tuple[int, ...]] = {name: (k,) for k, name in sorted(fg.items())}
    if len(fg) >= 2:
        out["total"] = tuple(sorted(fg))
    return out


def _mask(label: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    return label == values[0] if len(values) == 1 else np.isin(label, values)


_CONFUSION_CHUNK = 1 << 22  # voxels per bincount chunk (4 MiB of uint8 pair codes, 32 MiB as int64)


def label_confusion(pred_label: np.ndarray, ref_label: np.ndarray) -> np.ndarray | None:
    """Voxel counts (K, K) int64 of (prediction value, reference value) pairs of two same-shape label maps
    holding values 0..K-1 (K = 1 + the largest value, at most 256), or None for other values (negative, larger,
    non-integer). Counted in chunks along axis 0: a few tens of MiB of work memory at any volume size.

    Each pair is coded as pred * K + ref; for K <= 16 the codes fit in uint8 and are counted by `torch.bincount`
    without widening them (several times faster than numpy's bincount, which converts to intp first)."""
    kinds = (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_ for a in (pred_label, ref_label))
    if not all(kinds) or pred_label.size == 0:
        return None
    lo = min(int(pred_label.min()), int(ref_label.min()))
    k = 1 + max(int(pred_label.max()), int(ref_label.max()))
    if lo < 0 or k > 256:
        return None
    p, r = pred_label.reshape(pred_label.shape[0], -1), ref_label.reshape(ref_label.shape[0], -1)
    step = max(1, _CONFUSION_CHUNK // max(1, p.shape[1]))
    counts = np.zeros(k * k, dtype=np.int64)
    small = k * k <= 256
    if small:
        import torch
    for z0 in range(0, p.shape[0], step):
        if small:  # codes < 256: uint8 arithmetic is exact
            code = np.multiply(p[z0:z0 + step], k, dtype=np.uint8, casting="unsafe")
            code += r[z0:z0 + step].astype(np.uint8, copy=False)
            counts += torch.bincount(torch.from_numpy(code.reshape(-1)), minlength=k * k).numpy()
            continue
        index = p[z0:z0 + step].astype(np.intp)
        index *= k
        index += r[z0:z0 + step]
        counts += np.bincount(index.ravel(), minlength=k * k)
    return counts.reshape(k, k)


def dice_from_confusion(counts: np.ndarray, classes: dict[int, str]) -> dict[str, float]:
    """Dice per structure (see `structures`) from `label_confusion` counts: the same numbers as the masks."""
    out = {}
    k = counts.shape[0]
    for name, vals in structures(classes).items():
        v = [x for x in vals if 0 <= x < k]
        inter = float(counts[np.ix_(v, v)].sum())
        denom = float(counts[v, :].sum() + counts[:, v].sum())
        out[name] = 1.0 if denom == 0 else float(2.0 * inter / denom)
    return out


def dice_per_class(pred_label: np.ndarray, ref_label: np.ndarray, classes: dict[int, str]) -> dict[str, float]:
    """Dice per structure (see `structures`) of two integer label maps of the same shape (label values 0..255:
    one chunked count of value pairs, `label_confusion`; other values: one mask per structure)."""
    if pred_label.shape != ref_label.shape:
        raise ValueError(f"shape mismatch: prediction {pred_label.shape} vs reference {ref_label.shape}")
    counts = label_confusion(pred_label, ref_label)
    if counts is not None:
        return dice_from_confusion(counts, classes)
    return {name: dice(_mask(pred_label, vals), _mask(ref_label, vals))
            for name, vals in structures(classes).items()}


def dice_paper_protocol(pred: np.ndarray, ref_label: np.ndarray, classes: dict[int, str]) -> dict[str, float]:
    """The paper's Dice: network resolution, foreground slices only.

    pred: label map (z, S, S) integer, or class probabilities (C, z, S, S) float (soft Dice; a
    structure's probability is the sum over its classes). ref_label: (z, S, S) integer reference at
    the same network resolution (e.g. the training cache's label). Slices whose reference is all
    background are dropped before computing Dice (paper: "foreground slices only").
    """
    if ref_label.ndim != 3:
        raise ValueError(f"reference must be (z, y, x), got {ref_label.shape}")
    keep = np.flatnonzero(ref_label.reshape(ref_label.shape[0], -1).any(axis=1))
    ref = ref_label[keep]
    out = {}
    if pred.ndim == ref_label.ndim + 1:
        if pred.shape[1:] != ref_label.shape:
            raise ValueError(f"probabilities {pred.shape} do not match reference {ref_label.shape}")
        probs = pred[:, keep].astype(np.float32)
        for name, vals in structures(classes).items():
            out[name] = dice(probs[list(vals)].sum(axis=0), _mask(ref, vals).astype(np.float32))
        return out
    if pred.shape != ref_label.shape:
        raise ValueError(f"prediction {pred.shape} does not match reference {ref_label.shape}")
    return dice_per_class(pred[keep], ref, classes)


def _crop_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop two masks to the bounding box of their union plus one voxel (surface distances unchanged)."""
    union = a | b
    sl = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        sl.append(slice(max(idx[0] - 1, 0), min(idx[-1] + 2, union.shape[axis])))
    return a[tuple(sl)], b[tuple(sl)]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two binary masks (MONAI).

    spacing: voxel size per array axis (mm). Both empty -> 0.0; exactly one empty -> inf.
    """
    pred, ref = pred.astype(bool, copy=False), ref.astype(bool, copy=False)
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return 0.0
    if has_p != has_r:
        return math.inf
    import torch
    from monai.metrics import compute_hausdorff_distance

    p, r = _crop_pair(pred, ref)
    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        value = compute_hausdorff_distance(torch.from_numpy(np.ascontiguousarray(p))[None, None],
                                           torch.from_numpy(np.ascontiguousarray(r))[None, None],
                                           include_background=True, percentile=95,
                                           spacing=[float(s) for s in spacing])
    return float(value.item())


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice at `tolerance_mm` (Nikolov et al. 2021) between two binary masks (MONAI).

    Both empty -> 1.0; exactly one empty -> 0.0.
    """
    pred, ref = pred.astype(bool, copy=False), ref.astype(bool, copy=False)
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return 1.0
    if has_p != has_r:
        return 0.0
    import torch
    from monai.metrics import compute_surface_dice

    p, r = _crop_pair(pred, ref)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        value = compute_surface_dice(torch.from_numpy(np.ascontiguousarray(p))[None, None],
                                     torch.from_numpy(np.ascontiguousarray(r))[None, None],
                                     class_thresholds=[float(tolerance_mm)], include_background=True,
                                     spacing=[float(s) for s in spacing])
    return float(value.item())


def evaluate_volume(pred_label: np.ndarray, ref_label: np.ndarray, classes: dict[int, str],
                    spacing: Sequence[float], *, case_id: str = "", fold: int | None = None,
                    slice_thickness: float | None = None, distances: bool = True,
                    tolerance_mm: float = 2.0) -> list[dict]:
    """Metrics of one volume in original geometry, one record per structure.

    pred_label, ref_label: (z, y, x) integer label maps on the same grid; spacing (z, y, x) mm.
    Returns records {"case_id", "fold", "slice_thickness", "thickness_group", "structure", "dice",
    "hd95" (mm), "surface_dice", "ref_empty", "pred_empty"}; distances only when `distances`.
    """
    if pred_label.shape != ref_label.shape:
        raise ValueError(f"prediction {pred_label.shape} and reference {ref_label.shape} are not on the same grid")
    records = []
    for name, vals in structures(classes).items():
        p, r = _mask(pred_label, vals), _mask(ref_label, vals)
        rec = {"case_id": case_id, "fold": fold, "slice_thickness": slice_thickness,
               "thickness_group": thickness_group(slice_thickness), "structure": name,
               "dice": dice(p, r), "ref_empty": not r.any(), "pred_empty": not p.any()}
        if distances:
            rec["hd95"] = hd95(p, r, spacing)
            rec["surface_dice"] = surface_dice(p, r, spacing, tolerance_mm)
        records.append(rec)
    return records


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """{"mean", "std" (population, ddof=0 as numpy), "n"} of the finite values; inf values counted in "n_inf"."""
    arr = np.asarray(list(values), dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    out = {"mean": float(finite.mean()) if finite.size else math.nan,
           "std": float(finite.std()) if finite.size else math.nan, "n": int(finite.size)}
    if finite.size != arr.size:
        out["n_inf"] = int(np.count_nonzero(np.isinf(arr)))
    return out


def summarize(records: Iterable[dict], metric: str = "dice", by: str | None = None) -> dict:
    """Mean ± std over volumes of `metric` per structure, optionally per group.

    by: None -> {structure: stats}; a record key such as "fold" or "thickness_group" ->
    {group: {structure: stats}}. stats as `mean_std`.
    """
    groups: dict = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if metric in rec:
            groups[rec.get(by) if by else None][rec["structure"]].append(rec[metric])
    out = {g: {s: mean_std(v) for s, v in per.items()} for g, per in groups.items()}
    return out.get(None, {}) if by is None else dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def fold_mean_std(records: Iterable[dict], metric: str = "dice") -> dict[str, dict[str, float]]:
    """Mean ± std over folds of the per-fold mean of `metric`, per structure ({"mean", "std", "n" folds})."""
    per_fold = summarize(records, metric, by="fold")
    by_structure: dict[str, list[float]] = defaultdict(list)
    for stats in per_fold.values():
        for s, st in stats.items():
            by_structure[s].append(st["mean"])
    return {s: mean_std(v) for s, v in by_structure.items()}
