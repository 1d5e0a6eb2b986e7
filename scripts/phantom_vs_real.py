"""Make docs/phantom_vs_real.png: a full-size phantom slice beside the real CT fixture, plus HU histograms.

Usage: .venv/bin/python scripts/phantom_vs_real.py [--seed S] [--out docs/phantom_vs_real.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ctseg.datasets.phantom import generate_case  # noqa: E402
from ctseg.io import read_volume, to_canonical  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "data" / "real-ct-liver" / "DICOM_anon"
WINDOW = (-160, 240)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--task", default="liver", choices=["kidney", "liver"])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "phantom_vs_real.png")
    args = parser.parse_args()

    real, _ = to_canonical(read_volume(REAL))
    real_hu = real.array.astype(np.float32)
    case = generate_case(args.seed, task=args.task, size="full")
    ph = case.image.array.astype(np.float32)
    # a slice at the height of the real series: much liver (upper abdomen), through a vertebral body
    area = (case.label.array > 0).sum(axis=(1, 2))
    bone = (ph > 300).sum(axis=(1, 2))
    k = int(np.argmax(np.where(area > 0.5 * area.max(), bone, -1)))
    acq = case.metadata["acquisition"]

    fig = plt.figure(figsize=(12, 8.4), dpi=72)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.3])
    for col, (img, title) in enumerate([
        (ph[k], f"phantom seed {args.seed} ({args.task}), slice {k}/{ph.shape[0]}: "
                f"{acq['pixel_spacing']:.2f} mm px, {acq['slice_thickness']} mm thick, noise {acq['noise_sigma']:.0f} HU"),
        (real_hu[real_hu.shape[0] // 2], "real CT fixture (Siemens, portal venous), mid slice"),
    ]):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="lanczos")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    bins = np.arange(-1100, 1300, 10)
    for hu, name in ((ph, "phantom (whole volume)"), (real_hu, "real CT (whole series)")):
        h, _ = np.histogram(hu, bins=bins, density=True)
        ax.plot(bins[:-1] + 5, h, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("HU")
    ax.set_ylabel("density")
    for x, name in ((-100, "fat"), (50, "soft tissue"), (250, "bone"), (-1000, "air")):
        ax.axvline(x, color="grey", lw=0.5, ls="--")
        ax.text(x + 8, ax.get_ylim()[1] * 0.3, name, fontsize=8, color="grey")
    ax.legend(fontsize=9)
    fig.suptitle(f"window [{WINDOW[0]}, {WINDOW[1]}] HU", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
