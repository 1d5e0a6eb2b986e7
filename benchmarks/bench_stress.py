"""Stress-test cost: seconds per volume per severity (perturbation + whole-volume inference) on the CPU.

Demo-sized data: small phantom kidney cases (128 x 128 in-plane, 16-60 slices) and the demo config's 2D U-Net
(untrained weights: inference time does not depend on them). Anchor, measured in the same run: the model's own
`predict_volume` time on the clean volume. Prints one line per axis and the total for a run of the demo's
stress settings (its `stress:` block; models x volumes x severities).

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_stress.py [--cases 3] [--models 3]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ctseg.config import load_config
from ctseg.datasets.phantom import iter_phantom_cases
from ctseg.experiment import apply_profile
from ctseg.models import build_model
from ctseg.inference.predict import predict_volume
from ctseg.preprocess.windowing import IntensityPlan
from ctseg.stress.perturb import AXES, estimate_noise_hu
from ctseg.inference.trained import TrainedModel

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--models", type=int, default=3, help="run configurations the demo stress-tests")
    p.add_argument("--profile", default=None, help="demo.yaml profile (default: the base settings, = `cpu`)")
    args = p.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
    cfg = apply_profile(load_config(REPO / "configs" / "demo.yaml"), args.profile)
    classes = {0: "background", 1: "kidney", 2: "tumour"}
    module = build_model(cfg.model, 1, 3)
    plan = IntensityPlan("percentile", -200.0, 300.0, 40.0, 80.0)
    model = TrainedModel(module.eval(), cfg, plan, classes, "multiclass", Path("bench"), classes)
    axes = {a: [float(s) for s in cfg.stress.severities.get(a, AXES[a].severities)] for a in cfg.stress.axes}
    cases = list(iter_phantom_cases("kidney", args.cases, seed=5, size="small"))
    anchor, per_axis = [], {a: [] for a in axes}
    for case in cases:
        image = case.image.with_array(case.image.array.astype(np.float32))
        predict_volume(image, [model], device="cpu")                      # warm-up
        t0 = time.perf_counter()
        predict_volume(image, [model], device="cpu")
        anchor.append(time.perf_counter() - t0)
        noise = estimate_noise_hu(image)
        for a, sev in axes.items():
            axis = AXES[a]
            for s in sev:
                if s == axis.clean or axis.apply is None:
                    continue
                t0 = time.perf_counter()
                try:
                    pert = axis.apply(image, case.label, s, rng=np.random.default_rng(0), classes=classes,
                                      noise_hu=noise)
                except ValueError:
                    continue
                t1 = time.perf_counter()
                predict_volume(pert.image, [model], device="cpu")
                per_axis[a].append((t1 - t0, time.perf_counter() - t1))
    slices = [c.image.shape[0] for c in cases]
    print(f"{len(cases)} small phantom cases ({min(slices)}-{max(slices)} slices, 128x128), demo 2D U-Net "
          f"(in-plane {cfg.preprocess.in_plane_size}), {torch.get_num_threads()} threads")
    print(f"anchor: predict_volume on the clean volume {np.mean(anchor):.3f} s/volume")
    total_sev = 0.0
    for a, t in per_axis.items():
        if not t:
            continue
        tp, ti = np.mean([x[0] for x in t]), np.mean([x[1] for x in t])
        total_sev += (len(axes[a]) - 1) * (tp + args.models * ti)
        print(f"  {a:17s} perturb {tp:.3f} s + predict {ti:.3f} s per volume per severity")
    n_vol = cfg.stress.max_volumes or 18
    est = n_vol * (total_sev + args.models * np.mean(anchor))
    print(f"demo stress section estimate: {n_vol} volumes x {sum(len(s) - 1 for s in axes.values())} shifted "
          f"severities (+ clean) x {args.models} models = {est:.0f} s")


if __name__ == "__main__":
    main()
