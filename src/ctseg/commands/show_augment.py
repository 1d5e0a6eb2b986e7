"""`ctseg show-augment`: see what the augmentation does to real data before training on it.

Top: n slices of one case, original vs augmented by the chosen pipeline (CTIA, MIA or nnU-Net DA, 2D mode), with
label contours. Below (CTIA): one row per CTIA transform applied alone, at its configured magnitude
(noise, rotation and slice skipping at their maximum, interpolation at its minimum factor, CWVRS drawn
from its configured ranges), so each can be checked by eye;
the z transforms are shown as coronal reformats, CWVRS with its intensity mapping in HU.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from rich.markup import escape
from torch import Tensor

from ctseg.augment import build_augmenter
from ctseg.augment.acquisition import INTERP, SKIP, grid_centres, linear_weights, slab_weights
from ctseg.augment.ctia import (
    CTIAConfig,
    add_noise,
    cwvrs_map,
    preset_knots,
    random_window,
    resample_z,
    rotate_inplane,
    sample_cwvrs,
    sample_random_window,
    sample_rotation,
)
from ctseg.commands._choices import layout_choices
from ctseg.commands._output import stdout_console
from ctseg.commands._types import positive_int, seed_int
from ctseg.config import ExperimentConfig, load_config
from ctseg.datasets import open_dataset
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_path
from ctseg.registry import AUGMENTERS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ctseg.datasets.base import Case
    from ctseg.preprocess.windowing import IntensityPlan

#: One panel of a row: image (y, x), label (y, x) or None (no contours), title, and `_show` options
#: ("vrange", "aspect", "cmap") overriding the row's defaults.
Panel = tuple[NDArray[np.float32], NDArray[np.int64] | None, str, dict[str, Any]]

HELP = "PNG grid of original vs augmented slices (CTIA, MIA or nnU-Net DA) with label contours, one panel per CTIA transform"

_CONTOUR_COLOURS = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#bf5af2"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset folder (KiTS19, CHAOS CT or nnU-Net raw layout)")
    parser.add_argument("--layout", default="auto", choices=layout_choices())
    parser.add_argument("--aug", default="ctia", choices=[n for n in AUGMENTERS if n != "none"],
                        help="pipeline to show (default ctia)")
    parser.add_argument("--out", required=True, help="output PNG file")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed for the case choice and the augmentation")
    parser.add_argument("--n", type=positive_int, default=4, help="number of slices in the original/augmented grid")
    parser.add_argument("--case", default=None, help="case id (default: one drawn with --seed)")
    parser.add_argument("--slices", type=positive_int, default=16, help="contiguous slices in the stack (default 16)")
    parser.add_argument("--config", default=None, help="experiment YAML (preprocess and augment sections are used)")


def _contours(ax: Axes, label2d: NDArray[np.int64], classes: dict[int, str]) -> None:
    for i, k in enumerate(sorted(c for c in classes if c != 0)):
        mask = (label2d == k).astype(float)
        if mask.any():
            ax.contour(mask, levels=[0.5], colors=_CONTOUR_COLOURS[i % len(_CONTOUR_COLOURS)], linewidths=0.8)


def _show(ax: Axes, img2d: NDArray[np.float32], lab2d: NDArray[np.int64] | None, classes: dict[int, str],
          title: str, vrange: tuple[float, float], aspect: float = 1.0, cmap: str = "gray") -> None:
    ax.imshow(img2d, cmap=cmap, vmin=vrange[0], vmax=vrange[1], aspect=aspect, interpolation="nearest")
    if lab2d is not None:
        _contours(ax, lab2d, classes)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _load_stack(args: argparse.Namespace, cfg: ExperimentConfig, rng: np.random.Generator
                ) -> tuple[Case, dict[int, str], IntensityPlan, NDArray[np.float32], NDArray[np.uint8], float]:
    """The case, its classes, its intensity plan, and `--slices` preprocessed slices (z, S, S) around the label
    centre with their label; aspect: z mm per in-plane mm at the network's in-plane size."""
    from ctseg.preprocess.slices import preprocess_label, preprocess_volume
    from ctseg.preprocess.windowing import compute_intensity_plan

    dataset = open_dataset(args.dataset, args.layout)
    ids = list(dataset.case_ids())
    if not ids:
        raise CtsegError("dataset has no cases", args.dataset)
    if args.case is not None and args.case not in ids:
        raise CtsegError(f"no case {args.case!r} in this dataset (cases: {', '.join(ids[:5])}...)", args.dataset)
    case = dataset.load(args.case if args.case is not None else ids[int(rng.integers(len(ids)))])
    if case.label is None:
        raise CtsegError(f"case {case.case_id} has no label: contours need one", args.dataset)
    plan = compute_intensity_plan([case], cfg.preprocess, rng)
    size = cfg.preprocess.in_plane_size
    image = preprocess_volume(case.image.array, plan, size)
    label = preprocess_label(case.label.array, size)
    fg = np.flatnonzero(label.reshape(label.shape[0], -1).max(axis=1) > 0)
    centre = int(fg.mean()) if fg.size else label.shape[0] // 2
    n = min(args.slices, image.shape[0])
    z0 = int(np.clip(centre - n // 2, 0, image.shape[0] - n))
    sl = slice(z0, z0 + n)
    spacing = case.image.spacing
    aspect = spacing[0] / (spacing[2] * case.image.shape[2] / size)  # z mm per in-plane mm after resizing
    return case, dataset.classes, plan, image[sl], label[sl], aspect


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    console = stdout_console()
    if args.n < 1 or args.slices < 2:
        raise CtsegError("--n must be >= 1 and --slices >= 2")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CtsegError("output must be a .png file", out)
    cfg = load_config(args.config) if args.config else ExperimentConfig()
    rng = np.random.default_rng(args.seed)
    case, classes, plan, image, label, aspect = _load_stack(args, cfg, rng)
    z = image.shape[0]
    img_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    lab_t = torch.from_numpy(label.astype(np.int64))[None, None]
    aug_cfg = cfg.augment.model_copy(update={"name": args.aug})
    augmenter = build_augmenter(aug_cfg, "2d", plan)
    gen = torch.Generator().manual_seed(args.seed)
    aug_img, aug_lab = augmenter(img_t, lab_t, gen)
    vrange = (float(image.min()), float(image.max()))

    fg = [k for k in range(z) if label[k].any()] or list(range(z))
    shown = [fg[int(i)] for i in np.linspace(0, len(fg) - 1, min(args.n, len(fg)))]
    ctia_rows = 6 if args.aug == "ctia" and cfg.augment.section("ctia", CTIAConfig).random_window_p > 0 else 5
    rows = 2 + (ctia_rows if args.aug == "ctia" else 0)
    cols = max(len(shown), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, k in enumerate(shown):
        for r, (im, lb, name) in enumerate([(img_t, lab_t, "original"), (aug_img, aug_lab, AUGMENTERS[args.aug].display)]):
            axes[r, j].axis("on")
            _show(axes[r, j], im[0, 0, k].numpy(), lb[0, 0, k].numpy(), classes, f"{name}, slice {k}", vrange)

    if args.aug == "ctia":
        _ctia_panels(axes[2:], img_t, lab_t, classes, plan, cfg, gen, shown[len(shown) // 2], vrange, aspect)
    fig.suptitle(f"{case.case_id}: {AUGMENTERS[args.aug].display} (seed {args.seed}); window [{plan.lower:.0f}, {plan.upper:.0f}] "
                 f"HU, z-scored", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    console.print(f"wrote {escape(str(out))}")
    return 0


def _simulated_acquisition(img_t: Tensor, lab_t: Tensor, mode: int, factor: float, phase: float
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """The stack (1, 1, Z, Y, X) as `ctseg.augment.acquisition` simulates it (every grid slice), shown on the
    source rows: row i shows the simulated slice whose centre is nearest to i. Returns image, label, and the
    (1, Z) centre (source position) shown on each row."""
    z = img_t.shape[2]
    centres = grid_centres(z, factor, phase)
    w = slab_weights(centres, factor, z) if mode == SKIP else linear_weights(centres, z)
    sim = torch.from_numpy((w.astype(np.float32) @ img_t[0, 0].reshape(z, -1).numpy()).reshape(-1, *img_t.shape[3:]))
    nearest_src = np.clip(np.rint(centres).astype(np.int64), 0, z - 1)
    row = np.abs(np.arange(z)[:, None] - centres[None, :]).argmin(axis=1)
    image = sim[row][None, None]
    label = lab_t[0, 0][torch.from_numpy(nearest_src[row])][None, None]
    return image, label, torch.from_numpy(centres[row]).float()[None]


def _ctia_panels(axes: NDArray[np.object_], img_t: Tensor, lab_t: Tensor, classes: dict[int, str],
                 plan: IntensityPlan, cfg: ExperimentConfig, gen: torch.Generator, k: int,
                 vrange: tuple[float, float], aspect: float) -> None:
    """One row per CTIA transform alone, at its configured magnitude. axes: (rows, cols) of matplotlib Axes;
    img_t, lab_t: the stack (1, 1, Z, Y, X); k: the slice shown."""
    c = cfg.augment.section("ctia", CTIAConfig)
    _, _, z, h, w = img_t.shape
    x = img_t[0, 0, k].reshape(1, -1)
    hu = lambda v: v * plan.std + plan.mean  # noqa: E731 (normalised -> HU, for labels)
    sl = lambda t: t[0, 0, k].numpy()  # noqa: E731

    def row(r: int, panels: list[Panel]) -> None:
        for j, (im, lb, title, kw) in enumerate(panels):
            axes[r, j].axis("on")
            _show(axes[r, j], im, lb, classes, title, kw.get("vrange", vrange), kw.get("aspect", 1.0),
                  kw.get("cmap", "gray"))

    # noise at the largest configured sigma
    sigma = torch.tensor([c.noise_sigma[1]])
    noisy = add_noise(x, sigma, gen).view(h, w).numpy()
    d = float(np.abs(noisy - sl(img_t)).max()) or 1.0
    row(0, [(sl(img_t), sl(lab_t), "original", {}), (noisy, sl(lab_t), f"noise sigma {sigma.item():.3f}", {}),
            (noisy - sl(img_t), None, "difference", {"vrange": (-d, d), "cmap": "coolwarm"})])

    # CWVRS: image, difference and the mapping in HU
    knots = preset_knots(plan, c.cwvrs_tissue_ranges_hu)
    _, new = sample_cwvrs(1, 1.0, knots, c.cwvrs_shift, c.cwvrs_stretch, gen)
    mapped = cwvrs_map(x, knots, new).view(h, w).numpy()
    d = float(np.abs(mapped - sl(img_t)).max()) or 1.0
    row(1, [(sl(img_t), sl(lab_t), "original", {}), (mapped, sl(lab_t), "CWVRS", {}),
            (mapped - sl(img_t), None, "CWVRS - original", {"vrange": (-d, d), "cmap": "coolwarm"})])
    ax = axes[1, 3]
    ax.axis("on")
    grid = torch.linspace(float(knots[0]) - 0.3, float(knots[-1]) + 0.3, 400)[None]
    curve = cwvrs_map(grid, knots, new)[0]
    ax.plot(hu(grid[0]).numpy(), (hu(curve) - hu(grid[0])).numpy(), "k-", lw=1)
    for kn, nk in zip(hu(knots).tolist(), hu(new[0]).tolist()):
        ax.axvline(kn, color="0.6", lw=0.6, ls="--")
        ax.plot([kn], [nk - kn], "o", color="#ff3b30", ms=3)
    ax.set_xlabel("input HU", fontsize=7)
    ax.set_ylabel("output - input HU", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_title("CWVRS map (knots: tissue ranges)", fontsize=8)

    # slice skipping / interpolation on a coronal reformat through the label centre
    ys = np.nonzero(lab_t[0, 0].numpy().any(axis=(0, 2)))[0]
    y0 = int(ys.mean()) if ys.size else h // 2
    cor = lambda t: t[0, 0, :, y0, :].numpy()  # noqa: E731
    f = c.slice_skip_max_factor
    phase = float(torch.rand(1, generator=gen)) * f
    i = torch.arange(z, dtype=torch.float32)
    if c.z_mode == "volume":  # the simulated thick-slab acquisition, each source row showing the slab it lies in
        s_img, s_lab, src_skip = _simulated_acquisition(img_t, lab_t, SKIP, f, phase)
    else:
        kk = torch.round((i - phase) / f).clamp(min=0, max=max(0.0, float(np.floor((z - 1 - phase) / f))))
        src_skip = torch.round(phase + kk * f).clamp(0, z - 1)[None]
        s_img, s_lab = resample_z(img_t, lab_t, src_skip)
    stretch = w / z / aspect  # display the z axis stretched to a square panel, as stated in the title
    co = {"aspect": w / z}
    row(2, [(cor(img_t), cor(lab_t), f"coronal (row {y0}, z x{stretch:.1f}), original", co),
            (cor(s_img), cor(s_lab), f"slice skipping f={f:.2f}" + (" (slab means)" if c.z_mode == "volume" else ""),
             co)])
    axes[2, 2].axis("on")
    axes[2, 2].step(np.arange(z), src_skip[0].numpy(), where="mid")
    axes[2, 2].plot([0, z - 1], [0, z - 1], color="0.7", lw=0.6)
    axes[2, 2].set_title("slab centre per row" if c.z_mode == "volume" else "source slice per output slice",
                         fontsize=8)
    axes[2, 2].tick_params(labelsize=6)
    f = c.slice_interp_min_factor
    src_int = (float(torch.rand(1, generator=gen)) * (z - 1) * (1 - f) + i * f)[None]
    if c.z_mode == "volume":  # intermediate positions of a shifted acquisition, nearest one per source row
        t_img, t_lab, src_int = _simulated_acquisition(img_t, lab_t, INTERP, f, float(src_int[0, 0]) % f)
    else:
        t_img, t_lab = resample_z(img_t, lab_t, src_int)
    row(3, [(cor(img_t), cor(lab_t), f"coronal (row {y0}, z x{stretch:.1f}), original", co),
            (cor(t_img), cor(t_lab), f"slice interpolation f={f:.2f}", co)])
    axes[3, 2].axis("on")
    axes[3, 2].plot(np.arange(z), src_int[0].numpy(), ".-", ms=3)
    axes[3, 2].plot([0, z - 1], [0, z - 1], color="0.7", lw=0.6)
    axes[3, 2].set_title("source position per output slice", fontsize=8)
    axes[3, 2].tick_params(labelsize=6)

    # rotation at the largest configured angle, random sign
    angle = torch.sign(sample_rotation(1, 1.0, c.rotation_max_deg, gen)) * np.radians(c.rotation_max_deg)
    air = (plan.lower - plan.mean) / plan.std
    r_img, r_lab = rotate_inplane(img_t[0, :, k:k + 1], lab_t[0, :, k:k + 1], angle, torch.tensor([air]))
    row(4, [(sl(img_t), sl(lab_t), "original", {}),
            (r_img[0, 0].numpy(), r_lab[0, 0].numpy(), f"rotation {np.degrees(angle.item()):+.1f} deg", {})])

    if axes.shape[0] > 5:  # random window (extra), only when switched on
        _, shift, scale = sample_random_window(1, 1.0, c.random_window_level, c.random_window_width, gen)
        lo, hi = (plan.lower - plan.mean) / plan.std, (plan.upper - plan.mean) / plan.std
        win = random_window(x, lo, hi, shift, scale).view(h, w).numpy()
        row(5, [(sl(img_t), sl(lab_t), "original", {}),
                (win, sl(lab_t), f"random window: level {shift.item():+.2f} W, width x{scale.item():.2f}", {})])
