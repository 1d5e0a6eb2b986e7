"""Stacked ensemble on the demo's ci data, before and after the leak fixes of issue 17.

The demo's ci profile (configs/demo.yaml: 6 small phantom kidney CTs, 2 slice-sorted folds, tiny networks) with
the stack switched on: the demo's member sets (3D MS-D Nets, 2D U-Nets, multiclass), CTIA, 3 seeds per set and
top_k 1 (a real selection), training a little longer than ci (epochs x steps below) so that the members differ.
Prints per fold and pooled mean paper-protocol Dice (kidney, tumour, total) of the stacked CNN and the plain
average. Run with the code to measure on PYTHONPATH:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/stack_leak.py --out /tmp/stack-leak [--meta-training oof]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--meta-training", default=None, help="stack.meta_training (after the fix only): nested | oof")
    p.add_argument("--stack-dir", default="stack", help="name of the stack folder under --out")
    p.add_argument("--val-slices", default=None, help="train.val_slices (after the fix only): foreground | all")
    p.add_argument("--meta-epochs", type=int, default=None, help="stack.meta_epochs (default: the ci profile's 1)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from ctseg.config import config_to_dict, load_config, parse_config
    from ctseg.cv import RunIdentity, run_cv, run_stack
    from ctseg.cv.run import load_cv_records
    from ctseg.datasets.phantom import write_phantom_dataset
    from ctseg.experiment import apply_profile, run_configs

    cfg = apply_profile(load_config(REPO / "configs" / "demo.yaml"), "ci")
    d = config_to_dict(cfg)
    d["experiment"].update(stack=True, augs=["ctia"], stack_seeds=[1, 2])
    d["stress"]["enabled"] = False
    d["train"].update(epochs=args.epochs, steps_per_epoch=args.steps)
    d["stack"].update(top_k=1)
    if args.val_slices:
        d["train"]["val_slices"] = args.val_slices
    if args.meta_epochs:
        d["stack"]["meta_epochs"] = args.meta_epochs
    if args.meta_training:
        d["stack"]["meta_training"] = args.meta_training
    cfg = parse_config(d)
    data = args.out / "data"
    if not (data / "phantom.json").is_file():
        write_phantom_dataset(data, task="kidney", n_cases=6, layout="kits19", seed=0, size="small")
    table, extra = run_configs(cfg)
    t0 = time.perf_counter()
    dirs = []
    for rc in table + extra:
        run_dir = args.out / "runs" / RunIdentity.of(rc).name
        run_cv(rc, data, run_dir, cache_dir=args.out / "cache", folds_file=args.out / "folds.json", progress=False)
        dirs.append(run_dir)
    t_cv = time.perf_counter() - t0
    run_stack(dirs, args.out / args.stack_dir, cfg.stack, seed=cfg.seed, distances=False, progress=False)
    t_stack = time.perf_counter() - t0 - t_cv
    recs = load_cv_records(args.out / args.stack_dir, require_all=True)
    out = {}
    for model in sorted({r.model for r in recs}):
        mine = [r for r in recs if r.model == model]
        row = {}
        for c in ("kidney", "tumour", "total"):
            row[c] = round(float(np.mean([r.dice_paper[c] for r in mine if c in r.dice_paper])), 4)
            for k in sorted({r.fold for r in mine}):
                row[f"{c}_fold{k}"] = round(float(np.mean([r.dice_paper[c] for r in mine if r.fold == k])), 4)
        out[model] = row
    runs = {}
    for run_dir in dirs:
        mine = load_cv_records(run_dir, require_all=True)
        best = [json.loads((run_dir / f"fold_{k}" / "model" / "run.json").read_text()).get("best_epoch")
                for k in range(cfg.cv.n_folds)]
        runs[run_dir.name] = {"total": round(float(np.mean([r.dice_paper["total"] for r in mine])), 4),
                              "kidney": round(float(np.mean([r.dice_paper["kidney"] for r in mine])), 4),
                              "best_epochs": best}
    stack = json.loads((args.out / args.stack_dir / "stack.json").read_text())
    print(json.dumps({"results": out, "runs": runs, "cv_seconds": round(t_cv), "stack_seconds": round(t_stack),
                      "members": stack.get("members"), "folds": stack.get("folds")}, indent=1, default=str))


if __name__ == "__main__":
    main()
