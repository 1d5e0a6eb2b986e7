"""3D inference z-context: contiguous windows vs strided vs sampled stacks, on thin- and thick-slice phantoms.

A 3D model trained on 16 random sorted slices (the paper's sampler, `sample_slices`) is run over held-out
phantom volumes with every `predict.z_context` (`ctseg.inference.windows.softmax_3d`, through `predict_network` on the
cached network input, as `ctseg cv` does), and Dice is measured at network resolution against the cached
label: kidney, tumour, total (kidney + tumour). The same anatomies are rendered twice, with 1.25 mm slices
(thin, ~100-250 slices) and 5 mm slices (thick, ~25-60 slices), so thin and thick differ only in acquisition.

Training set: `--train-cases` phantom kidney cases (size "small", 128 x 128, cropped to the window and
resized to `--size`), slice thickness cycling 1.25 / 2.5 / 3.75 / 5 mm, or the demo's phantom (`--train-set
demo`: thickness drawn, coarsened ~4x). Tiny 3D U-Net (4 stages, 8 base features), CTIA, poly lr, batch 2,
`--epochs` x `--steps`, no validation (last epoch kept), one thread. `--sampler contiguous` trains instead on
16 *adjacent* slices around a random foreground slice ("train on what inference sees"; experiment only:
the sampler is swapped in this script, not in the library).

    python benchmarks/z_context_3d.py [--seeds 0 1] [--sampler paper contiguous] [--test-cases 6]
                                      [--epochs 8] [--steps 40] [--work /tmp/z3d] [--json out.json]

Cost on 1 busy CPU thread: ~3 min per trained model, ~1-2 min of inference per model (12 volumes x 3 modes).
Results and the choice they support: docs/PAPER_FIDELITY.md, point 5.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from ctseg.config import ExperimentConfig
from ctseg.datasets.phantom import CLASSES, generate_case
from ctseg.preprocess.cache import CaseCache, build_cache
from ctseg.preprocess.slices import foreground_slices

MODES = ("contiguous", "strided", "sampled")
THICKNESS = {"thin": 1.25, "thick": 5.0}


class Phantoms:
    """In-memory phantom dataset: case id -> (seed, slice thickness in mm or None for the drawn one)."""

    classes = CLASSES["kidney"]
    root = None

    def __init__(self, specs: list[tuple[str, int, float | None]]):
        self.specs = {cid: (seed, th) for cid, seed, th in specs}

    def case_ids(self) -> list[str]:
        return list(self.specs)

    def load(self, cid: str):
        seed, th = self.specs[cid]
        return generate_case(np.random.SeedSequence([seed]), "kidney", "small", thickness=th, case_id=cid, workers=1)

    def __iter__(self):
        return (self.load(c) for c in self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def train_config(args, seed: int) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.seed = seed
    cfg.preprocess.in_plane_size, cfg.preprocess.subset_size = args.size, 4
    cfg.model.arch, cfg.model.dim = "unet", "3d"
    u = cfg.model.unet
    u.n_stages, u.base_features, u.max_features, u.z_pool_stages = 4, 8, 32, 1
    cfg.augment.name = "ctia"
    t = cfg.train
    t.batch_size_3d, t.epochs, t.steps_per_epoch = 2, args.epochs, args.steps
    t.lr, t.lr_schedule, t.oversample_foreground, t.device = 2e-3, "poly", 0.33, "cpu"
    return cfg


@contextlib.contextmanager
def contiguous_sampler():
    """Training stacks of 16 adjacent slices around a random foreground slice (class-oversampled like the
    paper sampler), also on CTIA's simulated acquisitions. Restores the library's samplers on exit."""
    import ctseg.augment.acquisition as acquisition
    import ctseg.preprocess.slices as slices

    def window(foreground: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        z = foreground.size
        if z <= n:
            return np.arange(z)
        eligible = np.flatnonzero(foreground)
        centre = int(rng.choice(eligible)) if eligible.size else int(rng.integers(z))
        start = int(np.clip(centre - rng.integers(0, n), 0, z - n))
        return np.arange(start, start + n)

    def sample(label, n, rng, exclude_background=True, *, num_slices=None, oversample=0.0):
        lab = np.asarray(label)
        z = lab.shape[0]
        fg = lab.reshape(z, -1).max(axis=1) > 0
        if oversample > 0 and fg.any() and rng.random() < oversample:
            present = [int(v) for v in np.unique(lab[fg]) if v > 0]
            fg = (lab == present[int(rng.integers(len(present)))]).reshape(z, -1).any(axis=1)
        return window(fg, n, rng)

    saved = slices.sample_slices, acquisition.choose_slices
    slices.sample_slices, acquisition.choose_slices = sample, window
    try:
        yield
    finally:
        slices.sample_slices, acquisition.choose_slices = saved


def dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out = {}
    for name, sel in (("kidney", lambda a: a == 1), ("tumour", lambda a: a == 2), ("total", lambda a: a > 0)):
        p, t = sel(pred), sel(truth)
        d = int(p.sum()) + int(t.sum())
        out[name] = 1.0 if d == 0 else 2.0 * int((p & t).sum()) / d
    return out


def evaluate(trained, cache, test_ids: list[str]) -> list[dict]:
    from ctseg.inference.predict import predict_network

    rows = []
    for cid in test_ids:
        case = cache.load(cid)
        image, label = np.asarray(case.image, dtype=np.float32), np.asarray(case.label)
        for mode in MODES:
            t0 = time.perf_counter()
            probs, _, _ = predict_network(image, trained, "cpu", z_context=mode)
            seconds = time.perf_counter() - t0
            rows.append({"case": cid, "group": cid.split("_")[0], "mode": mode, "slices": int(image.shape[0]),
                         "foreground_slices": int(foreground_slices(label).size), "seconds": seconds,
                         **dice(probs.argmax(0).numpy(), label)})
    return rows


def summarise(rows: list[dict]) -> str:
    """Mean Dice and time per (model, volume group, mode); time also as a ratio to the contiguous anchor of the
    same model and group, measured in the same run."""
    lines = ["| model | volumes | mode | kidney | tumour | total | s / volume | time / contiguous |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["model"], r["group"]) for r in rows}, key=lambda k: (k[0], k[1] != "thin"))
    for model, group in keys:
        anchor = [r["seconds"] for r in rows if r["model"] == model and r["group"] == group
                  and r["mode"] == "contiguous"]
        for mode in MODES:
            sel = [r for r in rows if r["model"] == model and r["group"] == group and r["mode"] == mode]
            if not sel:
                continue
            m = {k: np.mean([r[k] for r in sel]) for k in ("kidney", "tumour", "total", "seconds")}
            ratio = f"{m['seconds'] / np.mean(anchor):.2f}x" if anchor else "-"
            lines.append(f"| {model} | {group} {THICKNESS[group]} mm (n={len(sel)}, "
                         f"{int(np.mean([r['slices'] for r in sel]))} slices) | {mode} | {m['kidney']:.3f} | "
                         f"{m['tumour']:.3f} | {m['total']:.3f} | {m['seconds']:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/z3d"))
    ap.add_argument("--train-cases", type=int, default=16)
    ap.add_argument("--train-set", choices=["mixed", "demo"], default="mixed")
    ap.add_argument("--test-cases", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sampler", nargs="+", choices=["paper", "contiguous"], default=["paper"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ctseg.inference.trained import load_trained
    from ctseg.train.trainer import train_model

    ths = [1.25, 2.5, 3.75, 5.0]
    train = [(f"train_{i:03d}", 1000 + i, ths[i % 4] if args.train_set == "mixed" else None)
             for i in range(args.train_cases)]
    test = [(f"{g}_{i:03d}", 5000 + i, th) for i in range(args.test_cases) for g, th in THICKNESS.items()]
    work = args.work / args.train_set
    cfg = train_config(args, 0)
    t0 = time.perf_counter()
    build_cache(Phantoms(train + test), work / "cache", cfg, np.random.default_rng(0),
                train_ids=[c for c, _, _ in train], progress=False)
    cache = CaseCache(work / "cache")
    print(f"cache ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for sampler in args.sampler:
        for seed in args.seeds:
            run = work / f"{sampler}-e{args.epochs}x{args.steps}-seed{seed}"
            done = (run / "run.json").is_file() and json.loads((run / "run.json").read_text())["status"] == "completed"
            if not done:
                t0 = time.perf_counter()
                with contiguous_sampler() if sampler == "contiguous" else contextlib.nullcontext():
                    train_model(train_config(args, seed), cache, [c for c, _, _ in train], [], run, progress=False)
                print(f"trained {run.name} ({time.perf_counter() - t0:.0f} s)", flush=True)
            trained = load_trained(run)
            for r in evaluate(trained, cache, [c for c, _, _ in test]):
                rows.append({"model": f"{sampler} sampler, seed {seed}", **r})
            print(summarise([r for r in rows if r["model"] == f"{sampler} sampler, seed {seed}"]), flush=True)
    print(f"\n{date.today()}, {platform.node()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s); train set {args.train_set}, "
          f"{args.train_cases} cases, {args.epochs} x {args.steps} steps")
    print(summarise(rows))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
