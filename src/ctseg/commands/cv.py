"""`ctseg cv --data DIR --config CFG --out DIR [--fold K]`: slice-sorted cross-validation of one configuration."""
from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from rich.markup import escape

from ctseg.commands._choices import aug_help
from ctseg.commands._output import stdout_console
from ctseg.commands._types import nonnegative_int
from ctseg.fileutil import output_lock, refuse_overlap

HELP = "cross-validate one configuration (slice-sorted folds); folds can run as separate jobs with --fold"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (KiTS19, CHAOS CT or nnU-Net raw)")
    parser.add_argument("--config", type=Path, help="experiment config YAML (default: built-in defaults)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (created; an existing one is continued)")
    parser.add_argument("--fold", type=nonnegative_int, action="append", metavar="K",
                        help="run only fold K (repeatable; default: all folds)")
    parser.add_argument("--cache", type=Path, help="preprocessed cache folder to share (default: OUT/cache)")
    parser.add_argument("--folds-file", type=Path, help="folds JSON to share or reuse (default: OUT/folds.json)")
    parser.add_argument("--aug", help=f"augmentation: {aug_help()} (default: augment.name)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the config's train.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ctseg.commands.report import summary_table
    from ctseg.config import ExperimentConfig, check_aug_names, load_config
    from ctseg.cv import RunIdentity, run_cv

    cfg = load_config(args.config) if args.config else ExperimentConfig()
    if args.aug:
        cfg.augment.name = check_aug_names(cfg.augment, [args.aug], args.config)[0]
    console = stdout_console()
    ident = RunIdentity.of(cfg)
    console.print(f"cross-validating [bold]{ident.name}[/] on {escape(str(args.data))} -> {escape(str(args.out))}")
    for option, path in (("--out", args.out), ("--cache", args.cache), ("--folds-file", args.folds_file)):
        if path is not None:
            refuse_overlap(path, args.data, option)
    folds = sorted(set(args.fold)) if args.fold else list(range(cfg.cv.n_folds))
    with ExitStack() as locks:  # a lock per fold: separate jobs may run other folds of the same run at once
        for k in folds:
            locks.enter_context(output_lock(args.out / f"fold_{k}"))
        records = run_cv(cfg, args.data, args.out, args.fold, cache_dir=args.cache, folds_file=args.folds_file,
                         device=args.device, progress=not args.no_progress)
    folds = sorted({r.fold for r in records})
    console.print(summary_table(records, f"{ident.name}: folds {folds}, Dice (paper protocol)"))
    out = escape(str(args.out))
    console.print(f"per-fold results: {out}/fold_*/results.json; report: `ctseg report {out} --out DIR`")
    return 0
