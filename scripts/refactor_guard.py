"""Refactor guard (issue 18): the same demo gives the same results with two source trees.

Runs `ctseg demo --profile PROFILE` once with each tree's `src/` on PYTHONPATH (one thread, so the arithmetic is
deterministic), predicts the first case with every cross-validation run (all folds) of each, and compares:

- `results.json`: every number except timings (Dice per volume, means, CIs ...);
- the stress test's `rows.csv` Dice columns, where the profile runs one;
- every cached array (`cache/**/*.npy`): same files, same dtype, shape and bytes;
- every predicted label map: same voxels and affine.

    python scripts/refactor_guard.py --base-src /work/main/src --head-src /work/wt-x/src --out /tmp/guard

Exit 0 when everything is identical, 1 with the differences listed otherwise. An existing `--out` is reused
(finished demos are continued by ctseg itself), so a second run compares quickly.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

#: JSON keys whose values are timings, paths or versions: allowed to differ between two runs
VOLATILE = ("second", "time", "wall", "duration", "date", "created", "version", "path", "dir", "data", "out",
            "python", "torch", "host")


def run_demo(src: Path, out: Path, profile: str) -> None:
    """`ctseg demo` with `src` first on the path, then `ctseg predict` of the first case with each CV run."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ctseg"]
    subprocess.run([*cmd, "demo", "--profile", profile, "--out", str(out), "--no-progress"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    first = sorted(p for p in (out / "data").iterdir() if p.is_dir())[0]
    image = first / "imaging.nii.gz"
    for run in sorted(p for p in (out / "runs").iterdir() if (p / "cv.json").is_file()):
        target = out / "guard-predictions" / f"{run.name}.nii.gz"
        if not target.is_file():
            target.parent.mkdir(exist_ok=True)
            subprocess.run([*cmd, "predict", "-i", str(image), "--model", str(run), "-o", str(target),
                            "--threads", "1"], env=env, check=True, stdout=subprocess.DEVNULL)


def numbers(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, value) of every number and string leaf, timings and paths left out."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not any(word in str(k).lower() for word in VOLATILE):
                yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")
    else:
        yield path, obj


def compare_json(a: Path, b: Path) -> list[str]:
    left, right = dict(numbers(json.loads(a.read_text()))), dict(numbers(json.loads(b.read_text())))
    diffs = [f"{a.name}{k}: {left.get(k)!r} != {right.get(k)!r}" for k in sorted(set(left) | set(right))
             if left.get(k) != right.get(k)]
    return diffs


def compare_rows(a: Path, b: Path) -> list[str]:
    def dice(p: Path) -> dict[tuple[str, ...], dict[str, str]]:
        with p.open(newline="") as f:
            return {(r["model"], r["case_id"], r["axis"], r["severity"]): {k: v for k, v in r.items()
                                                                           if k.startswith("dice_")}
                    for r in csv.DictReader(f)}
    left, right = dice(a), dice(b)
    return [f"{a.relative_to(a.parents[1])} {k}: {left.get(k)} != {right.get(k)}"
            for k in sorted(set(left) | set(right)) if left.get(k) != right.get(k)]


def compare_arrays(base: Path, head: Path) -> list[str]:
    files = {p.relative_to(base) for p in base.glob("cache/**/*.npy")} | {p.relative_to(head)
                                                                         for p in head.glob("cache/**/*.npy")}
    diffs = []
    for rel in sorted(files):
        if not (base / rel).is_file() or not (head / rel).is_file():
            diffs.append(f"{rel}: only in {'head' if (head / rel).is_file() else 'base'}")
            continue
        x, y = np.load(base / rel, mmap_mode="r"), np.load(head / rel, mmap_mode="r")
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            diffs.append(f"{rel}: {x.dtype}{x.shape} != {y.dtype}{y.shape} or values differ")
    return diffs if files else ["no cached arrays found under cache/"]


def compare_labels(base: Path, head: Path) -> list[str]:
    import nibabel as nib

    names = sorted({p.name for p in (base / "guard-predictions").glob("*.nii.gz")}
                   | {p.name for p in (head / "guard-predictions").glob("*.nii.gz")})
    diffs = []
    for name in names:
        a, b = base / "guard-predictions" / name, head / "guard-predictions" / name
        if not a.is_file() or not b.is_file():
            diffs.append(f"prediction {name}: missing on one side")
            continue
        x, y = nib.load(a), nib.load(b)
        if not np.array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj)) or not np.allclose(x.affine,
                                                                                                      y.affine):
            diffs.append(f"prediction {name}: voxels or affine differ")
    return diffs if names else ["no predictions made (no cross-validation run under runs/)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-src", type=Path, required=True, help="the old tree's src/ folder")
    parser.add_argument("--head-src", type=Path, required=True, help="the new tree's src/ folder")
    parser.add_argument("--out", type=Path, required=True, help="work folder (base/ and head/ demos)")
    parser.add_argument("--profile", default="ci", help="demo profile (default ci; `cpu` is make demo's)")
    args = parser.parse_args()
    base, head = args.out / "base", args.out / "head"
    for src, out in ((args.base_src, base), (args.head_src, head)):
        print(f"demo ({args.profile}) with {src} -> {out}", flush=True)
        run_demo(src.resolve(), out, args.profile)
    diffs = compare_json(base / "results.json", head / "results.json")
    for rows in sorted(base.glob("**/rows.csv")):
        other = head / rows.relative_to(base)
        diffs += compare_rows(rows, other) if other.is_file() else [f"{other}: missing"]
    diffs += compare_arrays(base, head) + compare_labels(base, head)
    for d in diffs:
        print("DIFF", d)
    print("identical" if not diffs else f"{len(diffs)} difference(s)")
    return 0 if not diffs else 1


if __name__ == "__main__":
    raise SystemExit(main())
