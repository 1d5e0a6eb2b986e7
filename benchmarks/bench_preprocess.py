"""Preprocessing one 300 x 512 x 512 CT case into the cache: wall time and peak memory.

Input: a full-size kidney phantom case (`ctseg.datasets.phantom.generate_case`, 300 slices of
512 x 512, HU as drawn), written once as .npy so every run starts from the same file.
Figure:  `build_cache` on a one-case dataset that np.loads that file: intensity plan (percentile
         window, subset of 1), clip + z-score, area resize to 128 x 128, majority-vote label,
         float16/uint8 .npy writes, CRC-32 checksums, JSON records.
Anchor:  the plain route: np.load + SimpleITK linear resample of the image (nearest for the
         label) to 128 x 128 x 300 + np.save of both, no windowing and no statistics.
Also:    a re-run of `build_cache` on the finished cache (skip path: checksum verification only).
Each measurement runs in a fresh subprocess; peak memory = VmHWM minus the RSS before loading.

    python benchmarks/bench_preprocess.py [--threads 2] [--slices 300]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_mib(key: str) -> float:
    """VmRSS / VmHWM of this process (Linux; unlike ru_maxrss, VmHWM is not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class _NpyDataset:
    root = "bench"
    classes = {0: "background", 1: "kidney", 2: "tumour"}

    def __init__(self, folder: Path):
        self.folder = folder

    def case_ids(self):
        return ["case_00000"]

    def load(self, case_id):
        from ctseg.datasets.base import Case
        from ctseg.io import Volume

        image = np.load(self.folder / "image.npy")
        label = np.load(self.folder / "label.npy")
        spacing = tuple(json.loads((self.folder / "spacing.json").read_text()))
        return Case(case_id, Volume(image, spacing, slice_thickness=spacing[0]), Volume(label, spacing),
                    {"num_slices": image.shape[0], "spacing": spacing, "slice_thickness": spacing[0]})

    def __iter__(self):
        return (self.load(i) for i in self.case_ids())

    def __len__(self):
        return 1


def child(mode: str, folder: Path, threads: int) -> dict:
    import SimpleITK as sitk
    import torch

    from ctseg.config import ExperimentConfig
    from ctseg.preprocess.cache import build_cache

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    if mode in ("ours", "rerun"):
        cfg = ExperimentConfig.model_validate({"preprocess": {"subset_size": 1}})
        report = build_cache(_NpyDataset(folder), folder / "cache", cfg, np.random.default_rng(0), progress=False)
        assert (mode == "rerun") == bool(report.skipped)
    else:
        out = folder / "anchor"
        out.mkdir(exist_ok=True)
        for name, interp in (("image", sitk.sitkLinear), ("label", sitk.sitkNearestNeighbor)):
            img = sitk.GetImageFromArray(np.load(folder / f"{name}.npy"))
            img.SetSpacing(tuple(json.loads((folder / "spacing.json").read_text()))[::-1])
            size = img.GetSize()
            new_size = (128, 128, size[2])
            new_spacing = tuple(sp * n / m for sp, n, m in zip(img.GetSpacing(), size, new_size))
            origin = tuple(o + 0.5 * (ns - s) for o, ns, s in zip(img.GetOrigin(), new_spacing, img.GetSpacing()))
            out_img = sitk.Resample(img, new_size, sitk.Transform(), interp, origin, new_spacing, img.GetDirection(),
                                    0, sitk.sitkFloat32 if name == "image" else sitk.sitkUInt8)
            arr = sitk.GetArrayFromImage(out_img)
            np.save(out / f"{name}.npy", arr.astype(np.float16) if name == "image" else arr)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mib": _status_mib("VmHWM") - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--child", choices=["ours", "rerun", "anchor"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.threads)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        folder = Path(tmp)
        from ctseg.datasets.phantom import generate_case

        case = generate_case(0, "kidney", "full", num_slices=args.slices)
        np.save(folder / "image.npy", case.image.array)
        np.save(folder / "label.npy", case.label.array)
        (folder / "spacing.json").write_text(json.dumps(list(case.image.spacing)))
        raw = f"{case.image.array.dtype} ({case.image.array.nbytes / 2**20:.0f} MiB)"
        del case

        def run(mode):
            cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--threads", str(args.threads)]
            return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

        anchor = run("anchor")
        ours = run("ours")
        rerun = run("rerun")
    print(f"{platform.machine()} {platform.processor() or ''}, {args.threads} threads; case {args.slices} x 512 x 512 "
          f"phantom {raw} -> {args.slices} x 128 x 128")
    print(f"anchor  np.load + SimpleITK resample + np.save: {anchor['seconds']:6.2f} s, "
          f"peak +{anchor['peak_mib']:6.0f} MiB")
    print(f"ctseg   build_cache (plan, window, z-score, area/majority resize, checksums): "
          f"{ours['seconds']:6.2f} s, peak +{ours['peak_mib']:6.0f} MiB   "
          f"time ratio {ours['seconds'] / anchor['seconds']:.2f}x, "
          f"memory ratio {ours['peak_mib'] / anchor['peak_mib']:.2f}x")
    print(f"ctseg   build_cache re-run (up to date, checksums verified): {rerun['seconds']:6.3f} s")


if __name__ == "__main__":
    main()
