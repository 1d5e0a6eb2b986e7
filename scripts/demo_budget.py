"""What the demo's 2D U-Net learns for a given data and training budget: fold 0 of the demo's sorted CV.

    python scripts/demo_budget.py --cases 54 --epochs 24 --out /tmp/demo-budget [--aug ctia] [--in-plane 72]

The demo (`configs/demo.yaml`, cpu profile) trains nine models in about ten CPU minutes; this script runs one
of them (fold 0, one augmentation) with more phantom cases, more steps or a finer in-plane grid, and prints the
paper-protocol Dice per class on the fold's test volumes (mean ± std, and each volume) with the training time.
It answers "what would the demo need to learn tumours", measured rather than guessed (docs/DEMO_BUDGET.md).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml

from ctseg.config import parse_config
from ctseg.cv import run_cv
from ctseg.datasets.phantom import write_phantom_dataset
from ctseg.experiment import apply_profile

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=18, help="phantom cases (demo: 18)")
    parser.add_argument("--epochs", type=int, help="epochs of the demo's steps_per_epoch (demo: 8)")
    parser.add_argument("--in-plane", type=int, help="network in-plane size (demo: 72)")
    parser.add_argument("--aug", default="ctia", choices=["ctia", "mia", "nnunet", "none"])
    parser.add_argument("--out", type=Path, required=True, help="work folder (data, cache and run are kept)")
    args = parser.parse_args()

    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["augment"]["name"] = args.aug
    if args.epochs:
        raw["train"]["epochs"] = args.epochs
    if args.in_plane:
        raw["preprocess"]["in_plane_size"] = args.in_plane
    cfg = apply_profile(parse_config(raw, DEMO_CONFIG), None)

    data = args.out / f"phantom-{args.cases}"
    if not (data / "phantom.json").exists():
        write_phantom_dataset(data, "kidney", args.cases, size="small")
    run = args.out / f"run-{args.cases}cases-{cfg.train.epochs}ep-{cfg.preprocess.in_plane_size}px-{args.aug}"
    start = time.perf_counter()
    records = run_cv(cfg, data, run, folds=[0], cache_dir=args.out / f"cache-{args.cases}",
                     folds_file=args.out / f"folds-{args.cases}.json", progress=False)
    seconds = time.perf_counter() - start
    steps = cfg.train.epochs * cfg.train.steps_per_epoch
    print(f"{args.cases} cases, {steps} steps, {cfg.preprocess.in_plane_size} px, {args.aug}: fold 0 "
          f"({len(records)} test volumes), {seconds:.0f} s")
    for cls in records[0].dice_paper:
        values = np.array([r.dice_paper[cls] for r in records])
        print(f"  {cls:8s} {values.mean():.3f} ± {values.std():.3f}   " + " ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
