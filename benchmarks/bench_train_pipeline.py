"""Whole training pipeline vs the model alone: does the data side keep the network busy?

Figure: steps/s (median of interleaved rounds) of the real trainer (`ctseg.train.trainer.train_model`: cache memmaps -> 16-slice sampling ->
augmentation (CTIA by default) -> forward + Tanimoto/CE loss + backward + Adam), timed over the second
epoch (loader workers and cudnn warmed up, no validation, checkpoint writes outside the timed span).
Anchor (same run): the same network, loss, optimizer and precision fed one ready batch from device memory
over and over. Ratio = pipeline / model alone; target on GPU >= 0.90 (shared/design/ANCHORS.md).

Data: phantom kidney cases (`ctseg.datasets.phantom.generate_case`) preprocessed into a temporary cache.

    python benchmarks/bench_train_pipeline.py --quick                       # CPU, tiny U-Net, 64 x 64
    python benchmarks/bench_train_pipeline.py --device cuda --amp bf16      # full 2D U-Net, 128 x 128, batch 28
    ... [--steps 200] [--workers 6] [--aug ctia|mia|none] [--compile] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctseg.config import ExperimentConfig
from ctseg.datasets.phantom import generate_case
from ctseg.models import build_model
from ctseg.preprocess.cache import CaseCache, build_cache
from ctseg.train.data import TrainStream
from ctseg.train.losses import TanimotoCELoss
from ctseg.train.trainer import train_model


class PhantomSet:
    classes = {0: "background", 1: "kidney", 2: "tumour"}
    root = None

    def __init__(self, n: int, in_plane: int, num_slices: int):
        self.ids = [f"phantom{i:03d}" for i in range(n)]
        self.in_plane, self.num_slices = in_plane, num_slices

    def case_ids(self):
        return list(self.ids)

    def load(self, case_id):
        return generate_case(self.ids.index(case_id), "kidney", "small", in_plane=self.in_plane,
                             num_slices=self.num_slices, case_id=case_id)

    def __iter__(self):
        return (self.load(c) for c in self.ids)

    def __len__(self):
        return len(self.ids)


def make_config(args) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.preprocess.in_plane_size = args.size
    cfg.preprocess.subset_size = min(4, args.cases)
    cfg.augment.name = args.aug
    cfg.model.unet.n_stages, cfg.model.unet.base_features = args.stages, args.features
    t = cfg.train
    t.batch_size_2d, t.epochs, t.steps_per_epoch = args.batch, 2, args.steps
    t.num_workers, t.device, t.amp, t.compile = args.workers, args.device, args.amp, args.compile
    return cfg


def model_alone(cfg: ExperimentConfig, cache: CaseCache, device: torch.device, steps: int, warmup: int) -> float:
    """Steps/s of forward + loss + backward + Adam on one fixed, already augmented batch on `device`."""
    batch = next(iter(TrainStream(cache, cache.case_ids(), cfg, rank=0, start=0, stop=1, augment_here=True,
                                  augmenter=None)))
    image, label = batch["image"].to(device), batch["label"].to(device)
    if device.type == "cpu":  # as the trainer runs on CPU (bit-reproducible)
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, 1, len(cache.classes)).to(device)
    step_model = torch.compile(model) if cfg.train.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    loss_fn = TanimotoCELoss(cfg.train.loss_tanimoto_weight, cfg.train.loss_ce_weight, cfg.train.loss_smooth)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = step_model(image)
        loss = loss_fn(logits.float(), label)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        total += step()
    total.item()  # synchronise
    return steps / (time.perf_counter() - t0)


def loader_side_ms(cfg: ExperimentConfig, cache: CaseCache, device: torch.device, n: int) -> float:
    """Mean ms per batch of what one loader worker does (load + sample, and CPU augmentation unless the
    trainer augments on the device, as it does by default on CUDA)."""
    from ctseg.augment import build_augmenter

    on_device = cfg.train.augment_on == "device" or (cfg.train.augment_on == "auto" and device.type == "cuda")
    aug = None if on_device else build_augmenter(cfg.augment, cfg.model.dim, intensity_plan=cache.plan)
    stream = TrainStream(cache, cache.case_ids(), cfg, rank=0, start=0, stop=n, augment_here=not on_device,
                         augmenter=aug)
    t0 = time.perf_counter()
    for _ in stream:
        pass
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU setting: 3-stage U-Net, 8 features, 64 x 64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--aug", choices=["ctia", "mia", "none"], default="ctia")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 200, --quick 20)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (default 6; --quick 0: on 2 cores a worker competes with the model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the main process")
    p.add_argument("--batch", type=int, default=28)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--stages", type=int, default=6)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.size, args.stages, args.features, args.cases = 64, 3, 8, 4
    args.steps = args.steps or (10 if args.quick else 200)
    args.workers = args.workers if args.workers is not None else (0 if args.quick else 6)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = make_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        build_cache(PhantomSet(args.cases, args.size, 48), tmp / "cache", cfg, np.random.default_rng(0),
                    progress=False)
        cache = CaseCache(tmp / "cache")
        prep = time.perf_counter() - t0
        device = torch.device(args.device if args.device != "cuda" else "cuda:0")
        pipe_rates, alone_rates = [], []
        for r in range(args.rounds):  # interleaved: a shared machine's load drifts
            result = train_model(cfg, cache, cache.case_ids(), [], tmp / f"run{r}", progress=False)
            pipe_rates.append(args.steps / result.history[1]["seconds"])
            alone_rates.append(model_alone(cfg, cache, device, args.steps, warmup=max(3, args.steps // 10)))
        pipeline, alone = statistics.median(pipe_rates), statistics.median(alone_rates)
        data_ms = loader_side_ms(cfg, cache, device, args.steps)

    ratio = pipeline / alone
    samples = pipeline * args.batch
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} torch threads"
    print(f"2D U-Net {args.stages} stages x {args.features} features, batch {args.batch} x {args.size}^2, "
          f"aug {args.aug}, amp {args.amp}, workers {args.workers}, {where}")
    print(f"cache: {args.cases} phantom cases in {prep:.1f} s")
    print(f"whole pipeline : {pipeline:8.2f} steps/s ({samples:.0f} slices/s)")
    print(f"model alone    : {alone:8.2f} steps/s ({1000 / alone:.1f} ms/step)")
    who = f"each of {args.workers} loader workers" if args.workers else "the main process, serially"
    print(f"loader side    : {data_ms:8.1f} ms/batch (load + sample + CPU augmentation; done by {who})")
    print(f"ratio          : {ratio:8.3f}   (target on GPU >= 0.90; medians of {args.rounds} interleaved rounds)")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "train_pipeline", "pipeline_steps_per_s": pipeline, "model_alone_steps_per_s": alone,
            "ratio": ratio, "slices_per_s": samples, "loader_ms_per_batch": data_ms, "device": where, "settings": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
