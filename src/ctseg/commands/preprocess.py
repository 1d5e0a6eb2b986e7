"""`ctseg preprocess DATASET --out CACHE`: window, z-score and resize every case once into a cache."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table

from ctseg.commands._choices import layout_choices
from ctseg.commands._output import stdout_console
from ctseg.commands._types import seed_int
from ctseg.config import ExperimentConfig, load_config, save_config
from ctseg.errors import CtsegError
from ctseg.fileutil import output_lock, refuse_overlap

log = logging.getLogger(__name__)

HELP = "window, z-score (statistics from a random subset) and resize a dataset into a training cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset folder (KiTS19, CHAOS CT or nnU-Net raw layout)")
    parser.add_argument("--out", type=Path, required=True, help="cache folder to create or update")
    parser.add_argument("--config", type=Path, help="experiment config YAML (default: built-in defaults)")
    parser.add_argument("--seed", type=seed_int, help="seed for the random subset (default: the config's seed)")
    parser.add_argument("--layout", choices=layout_choices(),
                        help="dataset layout (default: the config's data.layout)")
    parser.add_argument("--train-ids", type=Path, metavar="FILE",
                        help="text file, one case id per line: draw the intensity subset only from these")
    parser.add_argument("--force", action="store_true", help="recompute the plan and rebuild every case")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="cases preprocessed in parallel processes (default 1; each holds one case in memory)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_ids(path: Path) -> list[str]:
    """Case ids of a text file, one a line (a UTF-8 byte-order mark, blank lines and '#' comments ignored); an id
    listed twice counts once, with a warning."""
    if not path.is_file():
        raise CtsegError("training id list not found", path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CtsegError("not a UTF-8 text file of case ids", path) from None
    lines = [line.strip() for line in text.splitlines()]
    ids = [line for line in lines if line and not line.startswith("#")]
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        log.warning("%s: %d duplicate line(s) ignored (%s): each case counts once", path, len(ids) - len(unique),
                    ", ".join(twice[:5]))
    if not unique:
        raise CtsegError("no case ids in the file", path)
    return unique


def run(args: argparse.Namespace) -> int:
    from ctseg.datasets import open_dataset
    from ctseg.preprocess.cache import build_cache

    if args.out.exists() and not args.out.is_dir():
        raise CtsegError("--out is a file; give a folder for the cache", args.out)
    refuse_overlap(args.out, args.dataset, "--out")
    cfg = load_config(args.config) if args.config else ExperimentConfig()
    if args.seed is not None:
        cfg.seed = args.seed
    if args.layout is not None:
        cfg.data.layout = args.layout
    cfg.data.path = str(args.dataset)
    train_ids = read_ids(args.train_ids) if args.train_ids else None
    dataset = open_dataset(args.dataset, layout=cfg.data.layout)
    with output_lock(args.out):
        report = build_cache(dataset, args.out, cfg, np.random.default_rng(cfg.seed), train_ids=train_ids,
                             progress=not args.no_progress, force=args.force, workers=args.workers)
        save_config(cfg, args.out / "config.yaml")

    plan = report.plan
    table = Table(title=f"preprocessed cache {escape(str(args.out))}", show_header=False)
    table.add_row("cases", f"{len(report.built)} built, {len(report.skipped)} up to date"
                  + (f", {len(report.repaired)} corrupted and rebuilt" if report.repaired else "")
                  + (f", {len(report.changed)} rebuilt as their files changed" if report.changed else ""))
    window = f"{plan.mode} [{plan.lower:.1f}, {plan.upper:.1f}] HU"
    if plan.percentiles is not None:
        window += f" ({plan.percentiles[0]:g}th / {plan.percentiles[1]:g}th percentile of foreground)"
    table.add_row("window", window)
    table.add_row("z-score", f"mean {plan.mean:.2f} HU, std {plan.std:.2f} HU from {plan.n_voxels} voxels"
                  + (" (plan reused)" if report.plan_reused else ""))
    table.add_row("subset", ", ".join(plan.subset_ids))
    table.add_row("in-plane size", f"{cfg.preprocess.in_plane_size} x {cfg.preprocess.in_plane_size}, "
                  f"{cfg.preprocess.cache_dtype}")
    table.add_row("time", f"{report.seconds:.1f} s")
    stdout_console().print(table)
    return 0
