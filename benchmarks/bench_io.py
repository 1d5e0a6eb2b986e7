"""Read time of a 512 x 512 x 600 int16 .nii.gz: `ctseg.io.read_volume` vs plain nibabel and SimpleITK.

Each reader returns a numpy array of the voxels (nibabel: `np.asanyarray(img.dataobj)`, SimpleITK:
`GetArrayFromImage(ReadImage)`); timings are the best of `--repeats` interleaved runs in this process.
Prints the figure, the anchor (the faster plain reader) and their ratio.

    .venv/bin/python benchmarks/bench_io.py [--slices 600] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ctseg.io import read_volume


def make_ct(slices: int, rng: np.random.Generator) -> np.ndarray:
    """CT-like int16 (x, y, z) data: air, a body ellipse of soft tissue with noise, so gzip works as on real CT."""
    y, x = np.ogrid[:512, :512]
    body = ((x - 256) / 200.0) ** 2 + ((y - 256) / 150.0) ** 2 < 1
    data = np.full((512, 512, slices), -1000, np.int16)
    for k in range(slices):
        plane = np.where(body, 40, -1000) + rng.normal(0, 15, size=(512, 512))
        data[:, :, k] = plane.astype(np.int16)
    return data


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        del out
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        affine = np.diag([-0.8, -0.8, 1.5, 1.0])
        nib.save(nib.Nifti1Image(make_ct(args.slices, rng), affine), str(path))
        print(f"file: 512 x 512 x {args.slices} int16, {path.stat().st_size / 1e6:.0f} MB gzipped")
        readers = {
            "ctseg read_volume": lambda: read_volume(path).array,
            "nibabel": lambda: np.asanyarray(nib.load(str(path)).dataobj),
            "SimpleITK": lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
        }
        times = {name: [] for name in readers}
        for _ in range(args.repeats):  # interleaved so that machine noise hits every reader alike
            for name, fn in readers.items():
                times[name].append(best_of(fn, 1))
    best = {name: min(t) for name, t in times.items()}
    for name, t in best.items():
        print(f"{name:>18}: {t:.3f} s (runs {', '.join(f'{x:.3f}' for x in times[name])})")
    anchor_name = min(("nibabel", "SimpleITK"), key=best.get)
    figure, anchor = best["ctseg read_volume"], best[anchor_name]
    print(f"figure {figure:.3f} s | anchor ({anchor_name}, same run) {anchor:.3f} s | ratio {figure / anchor:.3f}")


if __name__ == "__main__":
    main()
