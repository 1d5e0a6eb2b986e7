"""Figures of the report (matplotlib, Agg backend, PNG): Dice box plots, overlays, training curves,
ensemble agreement vs Dice.

Every function writes one PNG and returns its path. Inputs are `ctseg.evaluate.records.VolumeResult`
records; overlays read the small `.npz` written by `save_overlay_slice` during cross-validation.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ctseg.evaluate.records import ENSEMBLES, models_in_order, present_thickness_groups, thickness_group_of  # noqa: E402
from ctseg.fileutil import atomic_path  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from numpy.typing import NDArray

    from ctseg.evaluate.records import VolumeResult

COLORS = {"mia": "#e08a1e", "nnunet": "#8a3fb3", "ctia": "#2f6fde", "ensemble": "#2e9e5b", "none": "#777777"}
CLASS_COLORS = ["#00c853", "#ff1744", "#ffd600", "#00b0ff", "#d500f9"]  # label 1, 2, ...
CLASS_COLOR_NAMES = ["green", "red", "yellow", "blue", "magenta"]
DISPLAY_WINDOW_HU = (-160.0, 240.0)


def _color(r: VolumeResult) -> str:
    return COLORS["ensemble"] if r.arch in ENSEMBLES else COLORS.get(r.aug, COLORS["none"])


def _save(fig: Figure, path: str | Path) -> Path:
    """Atomic PNG write."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", facecolor="white")
    finally:
        plt.close(fig)
    return path


def _values(records: Sequence[VolumeResult], metric: str, cls: str) -> NDArray[np.float64]:
    v = np.array([getattr(r, metric).get(cls, math.nan) for r in records], dtype=float)
    return v[np.isfinite(v)]


def _boxes(ax: Axes, data: list[NDArray[np.float64]], positions: list[float], colors: list[str],
           rng: np.random.Generator, width: float = 0.6) -> None:
    keep = [i for i, d in enumerate(data) if d.size]
    if not keep:
        return
    bp = ax.boxplot([data[i] for i in keep], positions=[positions[i] for i in keep], widths=width,
                    patch_artist=True, showfliers=False, medianprops={"color": "black"})
    for patch, i in zip(bp["boxes"], keep):
        patch.set_facecolor(colors[i])
        patch.set_alpha(0.35)
        patch.set_edgecolor(colors[i])
    for i in keep:
        x = positions[i] + rng.uniform(-width / 4, width / 4, size=data[i].size)
        ax.scatter(x, data[i], s=12, color=colors[i], alpha=0.85, zorder=3, linewidths=0)


def dice_boxplot(records: Sequence[VolumeResult], metric: str, classes: Sequence[str], path: str | Path) -> Path:
    """One panel per class, one box per model (paper row order), volumes as points."""
    models = models_in_order(records)
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, len(classes), figsize=(max(4.5, 0.55 * len(models) + 1.5) * len(classes) / 1.4, 4.6),
                             squeeze=False)
    for ax, cls in zip(axes[0], classes):
        data = [_values([r for r in records if r.model == m.model], metric, cls) for m in models]
        _boxes(ax, data, list(range(len(models))), [_color(m) for m in models], rng)
        ax.set_xticks(range(len(models)), [m.display for m in models], rotation=55, ha="right", fontsize=8)
        ax.set_title(cls)
        ax.set_ylabel("Dice")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def thickness_boxplot(records: Sequence[VolumeResult], metric: str, cls: str, edges_mm: Sequence[float],
                      path: str | Path) -> Path:
    """Boxes per slice-thickness group (x) and model (colour/offset)."""
    models = models_in_order(records)
    groups = present_thickness_groups(records, edges_mm)
    n = len(models)
    step = 0.8 / max(n, 1)
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(groups) * max(n, 3) * 0.45), 4.6))
    for j, m in enumerate(models):
        recs = [r for r in records if r.model == m.model]
        data = [_values([r for r in recs if thickness_group_of(r.slice_thickness, edges_mm) == g], metric, cls)
                for g in groups]
        pos = [gi - 0.4 + step * (j + 0.5) for gi in range(len(groups))]
        _boxes(ax, data, pos, [_color(m)] * len(groups), rng, width=step * 0.85)
        ax.text(pos[0], 1.0, str(j + 1), transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
    counts = [len({r.case_id for r in records if thickness_group_of(r.slice_thickness, edges_mm) == g}) for g in groups]
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={c})" for g, c in zip(groups, counts)])
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel(f"Dice ({cls})")
    ax.set_xlabel("slice thickness")
    ax.grid(axis="y", alpha=0.3)
    legend = "\n".join(f"{j + 1}: {m.display}" for j, m in enumerate(models))
    ax.text(1.01, 0.5, legend, transform=ax.transAxes, va="center", fontsize=7.5, family="monospace")
    fig.tight_layout()
    return _save(fig, path)


def agreement_scatter(records: Sequence[VolumeResult], flagged: set[str], threshold: float, cls: str, metric: str,
                      title: str, path: str | Path) -> Path:
    """Ensemble member agreement (x) vs Dice (y, `metric` of `cls`), one point per volume (records with
    `agreement`); flagged case ids in red and labelled, the flag threshold as a dashed vertical line."""
    pts = [(r.agreement, getattr(r, metric).get(cls, math.nan), r.case_id) for r in records
           if r.agreement is not None and math.isfinite(r.agreement)]
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for is_flagged, color, marker, label in ((False, COLORS["ensemble"], "o", "not flagged"),
                                             (True, "#d62728", "X", "flagged")):
        sel = [(a, d, c) for a, d, c in pts if (c in flagged) == is_flagged and math.isfinite(d)]
        if sel:
            ax.scatter([a for a, _, _ in sel], [d for _, d, _ in sel], s=36 if is_flagged else 18, color=color,
                       marker=marker, alpha=0.9, linewidths=0, label=label, zorder=3)
        if is_flagged:
            for a, d, c in sel:
                ax.annotate(c, (a, d), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    if math.isfinite(threshold):
        ax.axvline(threshold, color="#d62728", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("agreement between members (mean pairwise Dice)")
    ax.set_ylabel(f"Dice ({cls})")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ overlays
def overlay_slice_index(gt_zyx: np.ndarray, pred_zyx: np.ndarray) -> int:
    """Axial slice with the most ground-truth foreground (else the most predicted foreground, else the middle)."""
    for lab in (gt_zyx, pred_zyx):
        area = (lab > 0).reshape(lab.shape[0], -1).sum(axis=1)
        if area.max() > 0:
            return int(area.argmax())
    return gt_zyx.shape[0] // 2


def save_overlay_slice(path: str | Path, image_zyx: np.ndarray, gt_zyx: np.ndarray, pred_zyx: np.ndarray,
                       spacing_zyx: Sequence[float]) -> Path:
    """Keep one axial slice (HU image, ground truth, prediction: all (z, y, x) on one grid) for the overlays."""
    if not (image_zyx.shape == gt_zyx.shape == pred_zyx.shape):
        raise ValueError(f"shapes differ: image {image_zyx.shape}, gt {gt_zyx.shape}, pred {pred_zyx.shape}")
    z = overlay_slice_index(gt_zyx, pred_zyx)
    path = Path(path)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, image=np.asarray(image_zyx[z], dtype=np.float32), gt=np.asarray(gt_zyx[z], np.uint8),
                            pred=np.asarray(pred_zyx[z], np.uint8), z=z, spacing=np.asarray(spacing_zyx, float))
    return path


def _crop_box(gt: np.ndarray, pred: np.ndarray, margin: int = 12, min_size: int = 64) -> tuple[slice, slice]:
    fg = (gt > 0) | (pred > 0)
    if not fg.any():
        return slice(None), slice(None)
    ys, xs = np.nonzero(fg)
    out = []
    for lo, hi, n in ((ys.min(), ys.max(), gt.shape[0]), (xs.min(), xs.max(), gt.shape[1])):
        c, half = (lo + hi) / 2, max((hi - lo) / 2 + margin, min_size / 2)
        a, b = int(max(0, c - half)), int(min(n, c + half + 1))
        out.append(slice(a, b))
    return out[0], out[1]


def overlay_figure(records: Sequence[VolumeResult], cls: str, base_dir: str | Path, path: str | Path,
                   window_hu: tuple[float, float] = DISPLAY_WINDOW_HU) -> Path:
    """Best, median and worst volume of one model by Dice (paper protocol) of `cls`: slice with contours.

    records: of one model, each with an `overlay` (`ctseg.evaluate.report.files` passes only those)."""
    scored = sorted((r for r in records if math.isfinite(r.dice_paper.get(cls, math.nan))),
                    key=lambda r: r.dice_paper[cls]) or list(records)
    picks = [("best", scored[-1]), ("median", scored[len(scored) // 2]), ("worst", scored[0])]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, (tag, r) in zip(axes, picks):
        p = Path(cast(str, r.overlay))  # records with an overlay only (see the docstring)
        data = np.load(p if p.is_absolute() else Path(base_dir) / p)
        img, gt, pred = data["image"], data["gt"], data["pred"]
        sy, sx = _crop_box(gt, pred)
        sp = data["spacing"]
        ax.imshow(np.clip(img[sy, sx], *window_hu), cmap="gray", vmin=window_hu[0], vmax=window_hu[1],
                  aspect=float(sp[1] / sp[2]), interpolation="bilinear")
        labels = sorted(set(np.unique(gt)) | set(np.unique(pred)) - {0})
        for k in labels:
            color = CLASS_COLORS[(int(k) - 1) % len(CLASS_COLORS)]
            for lab, style in ((gt, "solid"), (pred, "dashed")):
                m = (lab[sy, sx] == k).astype(float)
                if m.any() and not m.all():
                    ax.contour(m, levels=[0.5], colors=[color], linestyles=style, linewidths=1.4)
        d = r.dice_paper.get(cls, math.nan)
        th = f", {r.slice_thickness:g} mm" if r.slice_thickness else ""
        ax.set_title(f"{tag}: {r.case_id}\nDice {d:.3f}{th}, slice {int(data['z'])}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------- training curves
def read_log_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Numeric columns of a training log (header row; empty cells -> NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, np.ndarray] = {}
    for name in (rows[0].keys() if rows else []):
        try:
            cols[name] = np.array([float(r[name]) if r[name] not in ("", None) else math.nan for r in rows])
        except ValueError:
            continue
    return cols


def training_curves(log_csvs: Sequence[str | Path], name: str, path: str | Path) -> Path | None:
    """Loss columns (left) and validation/score columns (right) against epoch, one line style per fold."""
    logs = [read_log_csv(p) for p in log_csvs]
    logs = [c for c in logs if c]
    if not logs:
        return None
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, cols in enumerate(logs):
        x_name = next((k for k in ("epoch", "step") if k in cols), None)
        x = cols[x_name] if x_name else np.arange(len(next(iter(cols.values()))))
        scores = ["val_dice_mean"] if "val_dice_mean" in cols else [k for k in cols if k.startswith("val_")]
        for k, v in cols.items():
            if not ("loss" in k or k in scores) or not np.isfinite(v).any():
                continue
            ax = ax_l if "loss" in k else ax_r
            ok = np.isfinite(v)
            ax.plot(x[ok], v[ok], marker="." if ok.sum() < 30 else None, alpha=0.85,
                    label=f"fold {i} {k}" if len(logs) > 1 else k)
    for ax, t in ((ax_l, "loss"), (ax_r, "validation")):
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(name, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
