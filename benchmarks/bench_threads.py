"""Whole-volume inference time with 1 vs N torch threads (issue 19.1: the `--threads` default).

`predict_volume` of a Z x 512 x 512 int16 volume with the demo's 2D U-Net (configs/demo.yaml base = cpu
profile: 72², 4 stages x 12 features; random weights: the cost does not depend on them), a warm-up, then
`--repeats` timed runs per setting, settings alternating so that both see the same background load. Prints
every time and the load average before each setting: on a shared machine the load is part of the result.

    python benchmarks/bench_threads.py [--slices 120] [--threads 1 2] [--rounds 3] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(threads: int, slices: int, repeats: int) -> None:
    import numpy as np
    import torch

    from ctseg.config import load_config
    from ctseg.io import Volume
    from ctseg.models import build_model
    from ctseg.inference.predict import predict_volume
    from ctseg.preprocess.windowing import IntensityPlan
    from ctseg.inference.trained import TrainedModel

    torch.set_num_threads(threads)
    cfg = load_config(REPO / "configs" / "demo.yaml")
    torch.manual_seed(0)
    classes = {0: "background", 1: "kidney", 2: "tumour"}
    model = TrainedModel(build_model(cfg.model, 1, 3).eval(), cfg,
                         IntensityPlan(mode="custom", lower=-200.0, upper=300.0, mean=50.0, std=100.0), classes,
                         "multiclass", Path("random"), classes)
    hu = np.random.default_rng(0).integers(-1000, 1000, (slices, 512, 512)).astype(np.int16)
    volume = Volume(hu, (2.0, 0.8, 0.8))
    predict_volume(volume, model, device="cpu")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict_volume(volume, model, device="cpu")
        times.append(time.perf_counter() - t0)
    print(" ".join(f"{t:.2f}" for t in times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _child(args.child, args.slices, args.repeats)
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("OMP_NUM_THREADS", None)
    print(f"predict_volume of {args.slices} x 512 x 512, demo 2D U-Net; seconds per run")
    for r in range(args.rounds):
        for n in args.threads:
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--slices", str(args.slices),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True, env=env,
                                 check=True).stdout.strip().splitlines()[-1]
            print(f"round {r}: {n} thread(s): {out}   (load average before: {load:.2f})", flush=True)
    print(f"machine: {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
