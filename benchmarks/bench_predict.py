"""Whole-volume inference cost: `predict_volume` vs the network's forward passes alone.

A synthetic 512 x 512 x Z CT (int16 HU) is segmented by an (untrained) 2D U-Net and by an
ensemble of such U-Nets. Anchor, measured in the same run: the bare forward passes of the same
network(s) over the same preprocessed slices (batched, inference mode), i.e. what any
predictor must pay. The ratio (predict / forward) is the overhead of everything else:
canonicalisation, windowing + resize, softmax, blending, bilinear restore to 512 x 512, argmax,
reorientation. nnU-Net v2's predictor is not installed, so it is not the anchor.

    python benchmarks/bench_predict.py [--slices 300] [--features 32] [--stages 6] [--members 3]
                                       [--device cpu|cuda] [--threads N] [--repeats 2]
"""
from __future__ import annotations

import argparse
import math
import platform
import resource
import time

import numpy as np
import torch


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _forward_only(models, image: np.ndarray, device: torch.device, batch_size: int) -> float:
    x = torch.from_numpy(image).to(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for m in models:
            module = m.module.to(device).eval()
            for z0 in range(0, x.shape[0], batch_size):
                module(x[z0:z0 + batch_size, None])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    from ctseg.config import ExperimentConfig
    from ctseg.io import Volume
    from ctseg.models import build_model
    from ctseg.inference.predict import predict_volume
    from ctseg.preprocess.slices import preprocess_volume
    from ctseg.preprocess.windowing import IntensityPlan
    from ctseg.runtime import resolve_device
    from ctseg.inference.trained import TrainedModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=128, help="network in-plane size")
    ap.add_argument("--features", type=int, default=32, help="U-Net base features")
    ap.add_argument("--stages", type=int, default=6, help="U-Net stages")
    ap.add_argument("--members", type=int, default=3, help="ensemble size (0: skip the ensemble)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for both figures")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)

    rng = np.random.default_rng(0)
    hu = np.full((args.slices, 512, 512), -1000, np.int16)
    hu[:, 40:470, 60:450] = rng.integers(-100, 100, (args.slices, 430, 390), dtype=np.int16)
    hu[:, 200:300, 150:260] += 250
    volume = Volume(hu, (1.5, 0.78, 0.78), direction=np.diag([1.0, 1.0, 1.0]))

    cfg = ExperimentConfig()
    cfg.preprocess.in_plane_size = args.size
    cfg.model.unet.n_stages = args.stages
    cfg.model.unet.base_features = args.features
    plan = IntensityPlan(mode="organ", lower=-160.0, upper=240.0, mean=50.0, std=60.0)
    classes = {0: "background", 1: "kidney", 2: "tumour"}
    models = [TrainedModel(build_model(cfg.model, 1, 3).to(device).eval(), cfg, plan, classes, "multiclass", None,
                           classes) for _ in range(max(args.members, 1))]
    n_params = sum(p.numel() for p in models[0].module.parameters())
    image = preprocess_volume(hu, plan, args.size)

    _forward_only(models, image[:args.batch_size], device, args.batch_size)  # warm-up
    rows = []
    for label, members in [("single", models[:1])] + ([("ensemble", models)] if args.members > 1 else []):
        t_fwd, t_pred = math.inf, math.inf
        for _ in range(args.repeats):  # interleaved, best of N: the machine may be shared
            t_fwd = min(t_fwd, _forward_only(members, image, device, args.batch_size))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            res = predict_volume(volume, members, device=device, batch_size=args.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if time.perf_counter() - t0 < t_pred:
                t_pred, stage_seconds = time.perf_counter() - t0, res.seconds
        assert res.label.same_geometry(volume)
        gpu = f", GPU peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        rows.append((label, len(members), t_pred, t_fwd, stage_seconds, gpu))

    machine = f"{platform.machine()} {torch.get_num_threads()} threads, {device}"
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(device)})"
    print(f"volume 512x512x{args.slices} int16 ({hu.nbytes / 2**20:.0f} MiB), 2D U-Net {args.stages} stages "
          f"x {args.features} features ({n_params / 1e6:.2f} M params) at {args.size}x{args.size}; {machine}")
    for label, n, t_pred, t_fwd, sec, gpu in rows:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sec.items())
        print(f"{label:8s} ({n} model{'s' if n > 1 else ''}): predict_volume {t_pred:.1f} s  vs  forward alone "
              f"{t_fwd:.1f} s  ratio {t_pred / t_fwd:.2f}  [{stages}]{gpu}")
    print(f"peak RSS of the process {_peak_rss_gib():.2f} GiB (input volume {hu.nbytes / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
