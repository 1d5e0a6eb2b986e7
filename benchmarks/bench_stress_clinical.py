"""Stress test at clinical size: peak memory beside `ctseg predict`, and the time per prediction that is not the
network's forward passes, beside those forward passes (issue 19.2).

Builds, in a work folder, a KiTS19-layout dataset of one phantom-like case of `--slices` x 512 x 512 int16 HU with
a kidney + tumour label (`bench_memory.phantom_like`, stored as KiTS19 stores it) and a 2D U-Net of the demo's
architecture at the demo's 72 x 72 (trained for `--steps` steps: it predicts something, not only background).
Then, each in its own subprocess, which reports its peak resident memory (VmHWM):

- `ctseg predict` of the case (the anchor of the memory figure);
- `ctseg stress` of the same case, one model, axes thickness-factor, dose, contrast, rotation, one shifted
  severity each (and the clean one); the forward passes are timed by wrapping `ctseg.inference.predict.predict_network`
  (`ctseg.predict.predict_network` in code from before the inference package, e.g. d99f7eb: the forward passes,
  softmax and ensemble combination at network resolution), the whole prediction by the rows' `seconds_predict`
  (preprocess, forward, restore to 512 x 512, argmax, resample, Dice). The figure is
  (sum of seconds_predict - forward) / forward: the non-forward time per prediction against the forward time
  of the same run. The load average (/proc/loadavg) before and after is printed: on a shared machine the
  ratio moves with it.

`--src OTHER/src` measures another checkout's code (e.g. the code before a change) on the same data and model;
`--compare ROWS.csv` then asserts that this run's Dice columns equal that file's (the results must not change).
The data and model are made once per `--keep` folder (with this checkout's code), so runs of several
checkouts on one folder measure the same thing; each run replaces the folder's `stress/` output.

    python benchmarks/bench_stress_clinical.py [--slices 611] [--keep DIR] [--src OTHER/src] [--compare ROWS.csv]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_memory import _peak_rss_bytes, phantom_like, write_kits_case  # noqa: E402

AXES = ["thickness-factor", "dose", "contrast", "rotation"]
SEVERITIES = ["thickness-factor=2", "dose=2", "contrast=1", "rotation=15"]
MODEL = {"seed": 0, "data": {"layout": "kits19", "task": "kidney"},
         "preprocess": {"subset_size": 2, "in_plane_size": 72, "crop": "window"},
         "augment": {"name": "none"},
         "model": {"arch": "unet", "dim": "2d", "unet": {"n_stages": 4, "base_features": 12, "max_features": 48}},
         "train": {"batch_size_2d": 4, "epochs": 1, "steps_per_epoch": 4, "val_fraction": 0.0, "device": "cpu"}}


def _child(argv: list[str]) -> None:
    """`--child ARGS...`: `ctseg ARGS` with the forward passes timed; prints {"peak", "forward"} last."""
    try:
        import ctseg.inference.predict as predict
    except ImportError:  # code before the inference package (e.g. d99f7eb): ctseg.predict
        import ctseg.predict as predict  # type: ignore[no-redef]

    forward = [0.0]
    inner = predict.predict_network

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            forward[0] += time.perf_counter() - t0

    predict.predict_network = timed
    from ctseg.cli import main

    status = main(argv)
    if status != 0:
        raise SystemExit(status)
    print(json.dumps({"peak": _peak_rss_bytes(), "forward": forward[0]}))


def _measure(argv: list[str], env: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"ctseg {argv[0]} failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def _dice_rows(path: Path) -> list[tuple]:
    with path.open(newline="") as f:
        return sorted((r["model"], r["case_id"], r["axis"], r["severity"], r["skipped"],
                       *(v for k, v in sorted(r.items()) if k.startswith("dice_"))) for r in csv.DictReader(f))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=611)
    ap.add_argument("--steps", type=int, default=40, help="training steps of the model")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the ctseg sources to measure")
    ap.add_argument("--compare", type=Path, help="rows.csv of another run: assert the same Dice per row")
    args = ap.parse_args()
    import yaml

    work = args.keep or Path(tempfile.mkdtemp(prefix="ctseg-bench-stress-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.src), str(REPO / "benchmarks")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    data = work / "kits"
    if not (data / "case_00000" / "imaging.nii.gz").is_file():
        image, label = phantom_like(args.slices)
        write_kits_case(data / "case_00000", image, label, 0.78, 0.8)
        del image, label
    run = work / "run"
    if not (run / "run.json").is_file():
        MODEL["train"]["steps_per_epoch"] = args.steps
        (work / "model.yaml").write_text(yaml.safe_dump(MODEL))
        sys.path.insert(0, str(REPO / "src"))
        from ctseg.datasets.phantom import write_phantom_dataset

        small = write_phantom_dataset(work / "small", task="kidney", n_cases=2, layout="kits19", seed=0,
                                      size="small", in_plane=96, num_slices=16)
        subprocess.run([sys.executable, "-m", "ctseg", "train", "--data", str(small), "--out", str(run), "--config",
                        str(work / "model.yaml"), "--cache", str(work / "small-cache"), "--no-progress"],
                       check=True, env={**env, "PYTHONPATH": str(REPO / "src")}, capture_output=True)
    load = [open("/proc/loadavg").read().split()[:3]]
    predict, t_predict = _measure(["predict", "-i", str(data / "case_00000" / "imaging.nii.gz"), "-o",
                                   str(work / "pred.nii.gz"), "--model", str(run), "--device", "cpu", "--overwrite",
                                   "--no-progress"], env)
    out = work / "stress"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    stress, t_stress = _measure(["stress", "--model", str(run), "--data", str(data), "--out", str(out), "--axes",
                                 *AXES, *(a for s in SEVERITIES for a in ("--severity", s)), "--device", "cpu",
                                 "--no-progress"], env)
    load.append(open("/proc/loadavg").read().split()[:3])
    with (out / "rows.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    predicted = {(r["severity"], r["axis"]) if r["clean"] == "0" else "clean": float(r["seconds_predict"])
                 for r in rows if r["seconds_predict"]}
    total = sum(predicted.values())
    non_forward = total - stress["forward"]
    gib = 2**30
    print(f"case {args.slices} x 512 x 512 int16, demo 2D U-Net at 72 x 72, sources {args.src}")
    print(f"ctseg predict: peak {predict['peak'] / gib:.2f} GiB ({t_predict:.0f} s)")
    print(f"ctseg stress:  peak {stress['peak'] / gib:.2f} GiB ({t_stress:.0f} s): "
          f"{stress['peak'] / gib - predict['peak'] / gib:+.2f} GiB vs predict (target <= +0.28 GiB = 0.3 GB)")
    print(f"stress predictions: {len(predicted)}, {total:.1f} s in all, forward {stress['forward']:.1f} s, "
          f"non-forward {non_forward:.1f} s: non-forward / forward = {non_forward / stress['forward']:.2f}")
    print(f"load average before / after: {' '.join(load[0])} / {' '.join(load[1])}; rows: {out / 'rows.csv'}")
    if args.compare is not None:
        same = _dice_rows(args.compare) == _dice_rows(out / "rows.csv")
        print(f"Dice per row equal to {args.compare}: {same}")
        if not same:
            raise SystemExit("the Dice per row differ")
    if args.keep is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
