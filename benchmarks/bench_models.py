"""Training-step throughput and memory of the four networks; efficient vs naive MS-D Net (the anchor).

A step is forward + TanimotoCE loss + backward + Adam, at the paper's batch sizes (2D 28 x 1 x 128 x 128,
3D 1 x 1 x 16 x 128 x 128; U-Nets at nnU-Net's full size, MS-D Nets at depth 100), in fp32 and bf16
autocast on CUDA. Reports steps/s, peak CUDA memory (torch.cuda.max_memory_allocated) and the bytes
autograd saves for backward in one forward (device-independent). The anchor is the naive MS-D Net
(torch.cat per layer) measured in the same run: ANCHORS.md targets >= 3x its steps/s at <= 1/3 of
its memory. steps/s is 1 / median step time. One failing case is reported, the others still run.

    python benchmarks/bench_models.py --device cuda [--compile] [--json out.json]
    python benchmarks/bench_models.py --device cpu --quick
    python benchmarks/bench_models.py --device cpu --quick --msd-depth 12 --msd-max-dilation 6 --z3d 16 \
        --only "msd-3d efficient"  # 3D on CPU: slice_major (auto) vs sample_major (native conv3d)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from dataclasses import dataclass, field

import torch

from ctseg.config import ModelConfig
from ctseg.models import build_model
from ctseg.resources import saved_activation_bytes
from ctseg.train.losses import TanimotoCELoss


@dataclass
class Case:
    name: str
    arch: str
    dim: str
    shape: tuple[int, ...]
    classes: int
    msd: dict = field(default_factory=dict)
    unet: dict = field(default_factory=dict)
    layout: str = "auto"


def make_cases(quick: bool, device: str, msd_depth: int | None, max_dilation: int | None = None,
               z3d: int | None = None) -> list[Case]:
    if quick:
        s2, s3 = (4, 1, 64, 64), (1, 1, z3d or 8, 64, 64)
        unet = {"n_stages": 4, "base_features": 8}
        depth = msd_depth or 30
    else:
        s2, s3 = (28, 1, 128, 128), (1, 1, z3d or 16, 128, 128)
        unet = {}
        depth = msd_depth or 100
    cases = [Case("unet-2d", "unet", "2d", s2, 3, unet=unet), Case("unet-3d", "unet", "3d", s3, 2, unet=unet)]
    msd = {"depth": depth, **({"max_dilation": max_dilation} if max_dilation else {})}
    for dim, shape, k in (("2d", s2, 3), ("3d", s3, 2)):
        cases.append(Case(f"msd-{dim} efficient", "msd", dim, shape, k, msd=msd))
        if (dim == "2d" and device == "cuda") or (dim == "3d" and device == "cpu"):  # the other layout
            cases.append(Case(f"msd-{dim} efficient sample_major", "msd", dim, shape, k, msd=msd,
                              layout="sample_major"))
        cases.append(Case(f"msd-{dim} naive", "msd", dim, shape, k, msd={**msd, "implementation": "naive"}))
    return cases


def run_case(case: Case, device: torch.device, amp: str, steps: int, warmup: int, compile_: bool) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    cfg = ModelConfig(arch=case.arch, dim=case.dim, unet=case.unet, msd=case.msd)
    model = build_model(cfg, case.shape[1], case.classes).to(device)
    if case.layout != "auto":
        model.layout = case.layout
    x = torch.randn(case.shape, generator=gen).to(device)
    target = torch.randint(0, case.classes, (case.shape[0], *case.shape[2:]), generator=gen).to(device)
    loss_fn = TanimotoCELoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fwd = torch.compile(model) if compile_ else model
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else torch.enable_grad
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = loss_fn(fwd(x), target)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):  # per-step times; the median resists other load on a shared machine
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times) * steps
    with ctx():
        saved = saved_activation_bytes(model, x)
    return {
        "case": case.name, "amp": amp, "shape": list(case.shape), "steps": steps,
        "steps_per_s": steps / dt, "samples_per_s": steps * case.shape[0] / dt, "warmup_s": warm_s,
        "step_s_min": min(times), "step_s_median": statistics.median(times),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "saved_for_backward_gib": saved / 2**30,
        "params": sum(p.numel() for p in model.parameters()), "loss": loss.item(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small inputs, MS-D depth 30, tiny U-Nets (CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models")
    ap.add_argument("--amp", choices=["fp32", "bf16", "both"], default=None,
                    help="default: both on CUDA, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; quick: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; quick: 1)")
    ap.add_argument("--msd-depth", type=int, default=None)
    ap.add_argument("--msd-max-dilation", type=int, default=None, help="default: the config's (10)")
    ap.add_argument("--z3d", type=int, default=None, help="slices of the 3D input (default 16; quick: 8)")
    ap.add_argument("--only", nargs="*", default=None, help="run only cases whose name starts with one of these")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amps = {"fp32": ["fp32"], "bf16": ["bf16"], "both": ["fp32", "bf16"],
            None: ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]}[args.amp]
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    cases = make_cases(args.quick, device.type, args.msd_depth, args.msd_max_dilation, args.z3d)
    if args.only:
        cases = [c for c in cases if any(c.name.startswith(o) for o in args.only)]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# bench_models on {machine}, torch {torch.__version__}, compile={args.compile}, quick={args.quick}")
    results = []
    for amp in amps:
        for case in cases:
            try:
                r = run_case(case, device, amp, steps, warmup, args.compile)
                mem = f"{r['peak_mem_gib']:.2f} GiB peak" if r["peak_mem_gib"] is not None else ""
                print(f"{case.name:32s} {amp:5s} {r['steps_per_s']:8.2f} steps/s {r['samples_per_s']:8.1f} samples/s "
                      f"saved {r['saved_for_backward_gib']:.3f} GiB {mem}", flush=True)
            except Exception as err:  # noqa: BLE001 -- one failing network must not stop the others
                r = {"case": case.name, "amp": amp, "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc(limit=3)}
                print(f"{case.name:32s} {amp:5s} FAILED {r['error'][:300]}", flush=True)
            results.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    ratios = []
    by = {(r["case"], r["amp"]): r for r in results if "error" not in r}
    for amp in amps:
        for dim in ("2d", "3d"):
            eff, naive = by.get((f"msd-{dim} efficient", amp)), by.get((f"msd-{dim} naive", amp))
            if not (eff and naive):
                continue
            mem_key = "peak_mem_gib" if device.type == "cuda" else "saved_for_backward_gib"
            rr = {"dim": dim, "amp": amp, "speed_ratio": eff["steps_per_s"] / naive["steps_per_s"],
                  "memory_ratio": eff[mem_key] / naive[mem_key], "memory_measure": mem_key}
            ratios.append(rr)
            print(f"ANCHOR msd-{dim} {amp}: efficient {eff['steps_per_s']:.2f} vs naive {naive['steps_per_s']:.2f} "
                  f"steps/s = {rr['speed_ratio']:.2f}x (target >= 3); memory ({mem_key}) "
                  f"{rr['memory_ratio']:.3f} of naive (target <= 0.33)")
    if device.type == "cpu":  # 3D on CPU: slices folded into conv2d (auto) vs native dilated conv3d
        for amp in amps:
            new, old = by.get(("msd-3d efficient", amp)), by.get(("msd-3d efficient sample_major", amp))
            if new and old:
                print(f"CPU msd-3d {amp}: slice_major {new['steps_per_s']:.2f} vs sample_major (conv3d) "
                      f"{old['steps_per_s']:.2f} steps/s = {new['steps_per_s'] / old['steps_per_s']:.2f}x")
    if args.json:
        out = {"machine": machine, "torch": torch.__version__, "device": device.type, "compile": args.compile,
               "quick": args.quick, "results": results, "msd_ratios": ratios}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
