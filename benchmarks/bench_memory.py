"""Peak memory of `ctseg preprocess` and `ctseg predict` on a long volume, beside a plain `np.load`.

Builds, in a temporary folder, a KiTS19-geometry case of 1059 x 512 x 512 int16 HU (phantom-like: air,
an elliptic body with organs, a vertebra, two kidneys with a tumour; labels 0/1/2) stored as KiTS19 stores
it (`imaging.nii.gz`, slice axis first, inferior-posterior-left affine, so reading it needs a reorientation),
plus the same array as `.npy`. The dataset holds the case twice (a second case folder of links to the
same files), so that the intensity statistics read two such cases in turn. A tiny 2D U-Net is trained
for one step on a small phantom set (`ctseg train`) for `ctseg predict`, its output layers then set to
answer background (see `_background_only`).

Each command runs in its own subprocess, which reports its peak resident memory (VmHWM of
/proc/self/status); the anchor, measured in the same run the same way, is a process that only does
`np.load` of the `.npy` (the array alone: 530 MiB, plus the interpreter with numpy).

    python benchmarks/bench_memory.py [--slices 1059] [--keep DIR] [--only folder] [--src OTHER/src]

Target (issue 11): <= 2 GB (1.86 GiB) for both commands. `--only folder` (issue 19.2) measures `ctseg predict`
of a folder holding the long case and then a second case of `--second` slices, beside the long case alone:
the folder run must stay within the one-file peak (the second case is read during the first only if that
fits). `--src` runs the commands with another checkout's sources (e.g. the code before a change).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(argv: list[str]) -> None:
    """`--child npload FILE` or `--child ctseg ARGS...`: do it, then print {"peak": bytes} as the last line."""
    if argv[0] == "npload":
        array = np.load(argv[1])
        assert array.dtype == np.int16
    else:
        from ctseg.cli import main

        status = main(argv[1:])
        if status != 0:
            raise SystemExit(status)
    print(json.dumps({"peak": _peak_rss_bytes()}))


def _measure(what: list[str], env: dict) -> tuple[int, float]:
    """Peak RSS (bytes) and wall seconds of `_child(what)` in a fresh interpreter."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *what], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{' '.join(what[:2])} failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak"], seconds


def phantom_like(slices: int, pixel_mm: float = 0.78, slice_mm: float = 0.5, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, label uint8) of shape (slices, 512, 512), canonical (z, y, x), built slab by slab."""
    rng = np.random.default_rng(seed)
    image = np.empty((slices, 512, 512), np.int16)
    label = np.zeros((slices, 512, 512), np.uint8)
    y, x = np.ogrid[:512, :512]
    body = ((y - 256) / 190.0) ** 2 + ((x - 256) / 230.0) ** 2 < 1
    fat = body & (((y - 256) / 170.0) ** 2 + ((x - 256) / 210.0) ** 2 >= 1)
    spine = ((y - 360) / 28.0) ** 2 + ((x - 256) / 30.0) ** 2 < 1
    z_mid = slices / 2
    for z0 in range(0, slices, 64):
        for z in range(z0, min(z0 + 64, slices)):
            sl = np.full((512, 512), -1000, np.int16)
            sl[body] = 40
            sl[fat] = -90
            sl[spine] = 700
            r = 1 - ((z - z_mid) / (0.12 * slices)) ** 2  # kidneys over ~24 % of the slices
            if r > 0:
                for cx in (170, 342):
                    kidney = ((y - 300) / (45 * np.sqrt(r))) ** 2 + ((x - cx) / (30 * np.sqrt(r))) ** 2 < 1
                    sl[kidney] = 160
                    label[z][kidney] = 1
                tumour = ((y - 290) / (18 * np.sqrt(r))) ** 2 + ((x - 160) / (15 * np.sqrt(r))) ** 2 < 1
                sl[tumour] = 90
                label[z][tumour] = 2
            image[z] = sl
        image[z0:z0 + 64] += rng.integers(-12, 13, size=image[z0:z0 + 64].shape, dtype=np.int16)
    return image, label


def write_kits_case(folder: Path, image: np.ndarray, label: np.ndarray, pixel_mm: float, slice_mm: float) -> None:
    """KiTS19 storage: nibabel axis 0 = slices (canonical z reversed: inferior first), affine I-P-L."""
    import nibabel as nib

    folder.mkdir(parents=True)
    affine = np.array([[0.0, 0.0, -pixel_mm, 0.0], [0.0, -pixel_mm, 0.0, 0.0], [-slice_mm, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 1.0]])
    for name, array in (("imaging.nii.gz", image), ("segmentation.nii.gz", label)):
        # canonical (z up, y posterior, x left) -> KiTS (i inferior, j posterior, k left)
        img = nib.Nifti1Image(np.ascontiguousarray(array[::-1]), affine)
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        nib.save(img, str(folder / name))


def _background_only(checkpoint: Path) -> None:
    """Make the one-step model answer "background" everywhere (output layers: weights 0, bias favours class 0).

    An untrained network labels noise; measuring `ctseg predict`'s per-structure statistics of noise
    (thousands of components, or one the size of the volume) is not what a trained model costs. The
    pipeline measured is the same: read, preprocess, forward passes, restore, argmax, write.
    """
    import torch

    state = torch.load(checkpoint, weights_only=True)
    for key, value in state.items():
        if ".seg_layers." in key:
            value.zero_()
            if key.endswith(".bias"):
                value[0] = 10.0
    torch.save(state, checkpoint)


TINY = {"seed": 0, "data": {"layout": "kits19", "task": "kidney"},
        "preprocess": {"subset_size": 2, "in_plane_size": 128},
        "augment": {"name": "none"},
        "model": {"arch": "unet", "dim": "2d", "unet": {"n_stages": 3, "base_features": 4, "max_features": 16}},
        "train": {"batch_size_2d": 2, "epochs": 1, "steps_per_epoch": 1, "val_fraction": 0.0, "device": "cpu"}}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=1059)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    ap.add_argument("--only", choices=["preprocess", "predict", "folder"],
                    help="measure only this command (and np.load)")
    ap.add_argument("--second", type=int, default=611, help="slices of the folder's second case (--only folder)")
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the ctseg sources to measure")
    args = ap.parse_args()
    import yaml

    work = args.keep or Path(tempfile.mkdtemp(prefix="ctseg-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.src), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    data = work / "kits"
    t0 = time.perf_counter()
    if not (data / "case_00000" / "imaging.nii.gz").is_file():
        image, label = phantom_like(args.slices)
        write_kits_case(data / "case_00000", image, label, 0.78, 0.5)
        np.save(work / "imaging.npy", image)
        del image, label
        (data / "case_00001").mkdir()
        for name in ("imaging.nii.gz", "segmentation.nii.gz"):
            os.link(data / "case_00000" / name, data / "case_00001" / name)
    array_bytes = args.slices * 512 * 512 * 2
    print(f"data: 2 cases of {args.slices} x 512 x 512 int16 ({array_bytes / 2**20:.0f} MiB each) in {work} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = work / "run"
    if not (run / "run.json").is_file():
        sys.path.insert(0, str(REPO / "src"))
        from ctseg.datasets.phantom import write_phantom_dataset

        small = write_phantom_dataset(work / "small", task="kidney", n_cases=2, layout="kits19", seed=0, size="small",
                                      in_plane=64, num_slices=12)
        subprocess.run([sys.executable, "-m", "ctseg", "train", "--data", str(small), "--out", str(run), "--config",
                        str(work / "tiny.yaml"), "--cache", str(work / "small-cache"), "--no-progress"],
                       check=True, env=env, capture_output=True)
        _background_only(run / "model_best.pt")

    rows = [("np.load of the int16 array (.npy)", ["npload", str(work / "imaging.npy")])]
    rows.append(("ctseg preprocess (2 cases, plan from both)",
                 ["ctseg", "preprocess", str(data), "--out", str(work / "cache"), "--config", str(work / "tiny.yaml"),
                  "--force", "--no-progress"]))
    rows.append(("ctseg predict (1 case, 2D U-Net at 128 x 128)",
                 ["ctseg", "predict", "-i", str(data / "case_00000" / "imaging.nii.gz"), "-o",
                  str(work / "pred.nii.gz"), "--model", str(run), "--device", "cpu", "--overwrite", "--no-progress"]))
    if args.only == "folder":
        folder = work / "folder"
        if not (folder / "b.nii.gz").is_file():
            folder.mkdir(exist_ok=True)
            os.link(data / "case_00000" / "imaging.nii.gz", folder / "a.nii.gz")
            second, _ = phantom_like(args.second, seed=1)
            write_kits_case(work / "second", second, np.zeros(second.shape, np.uint8), 0.78, 0.8)
            os.link(work / "second" / "imaging.nii.gz", folder / "b.nii.gz")
            del second
        rows.append((f"ctseg predict folder: {args.slices} then {args.second} slices",
                     ["ctseg", "predict", "-i", str(folder), "-o", str(work / "folder-out"), "--model", str(run),
                      "--device", "cpu", "--overwrite", "--no-progress"]))
    rows = [r for r in rows if args.only is None or r[1][0] == "npload" or r[1][1] == args.only
            or (args.only == "folder" and r[1][1] == "predict")]
    print(f"{'what':48s} {'peak RSS':>10s} {'/ np.load':>9s} {'wall':>7s}")
    anchor = None
    for what, argv in rows:
        peak, seconds = _measure(argv, env)
        anchor = anchor or peak
        print(f"{what:48s} {peak / 2**30:8.2f} GiB {peak / anchor:8.2f}x {seconds:6.1f} s", flush=True)
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, load average {open('/proc/loadavg').read().split()[:3]}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.keep is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
