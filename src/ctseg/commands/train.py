"""`ctseg train --data DIR --out RUN [--fold K] ...`: train one network (paper Algorithm 1).

--data is a raw dataset (preprocessed into --cache, default `<out>/../cache`, reusing what is up to date)
or a cache folder made by `ctseg preprocess`. With --fold K the folds file `folds.json` beside the cache
(`<cache>/../folds.json`, as `ctseg cv` lays it out) is read or made (`cfg.cv`): fold K's cases are held out,
the rest train, and on a raw dataset the cache is fold K's (`<cache>/plan-<digest>/`, intensity plan from the
fold's training cases only, shared with `ctseg cv`). Without --fold the plan of a cache built here comes from
a random subset of all its cases (no test fold); `ctseg preprocess --train-ids` restricts it. Multi-GPU:
`torchrun --nproc_per_node N -m ctseg train ...`.
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.markup import escape
from rich.table import Table

from ctseg.commands._choices import arch_choices, aug_help
from ctseg.commands._output import stdout_console
from ctseg.commands._types import add_threads_argument, nonnegative_int, positive_int, seed_int
from ctseg.config import ExperimentConfig, load_config
from ctseg.errors import CtsegError
from ctseg.fileutil import output_lock, refuse_overlap

if TYPE_CHECKING:
    from ctseg.evaluate.folds import Folds
    from ctseg.preprocess.cache import CaseCache
    from ctseg.train.distributed import DistContext

HELP = "train a U-Net or MS-D Net (2D/3D) with CTIA, the paper's MIA, nnU-Net's augmentation or none"
FOLDS_FILE = "folds.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder, or a cache from `ctseg preprocess`")
    parser.add_argument("--out", type=Path, required=True, help="run folder (weights, checkpoint, logs)")
    parser.add_argument("--config", type=Path, help="experiment config YAML (default: built-in defaults)")
    parser.add_argument("--arch", choices=arch_choices(), help="network (default: the config's model.arch)")
    parser.add_argument("--dim", choices=["2d", "3d"], help="2D slices or 3D stacks (default: model.dim)")
    parser.add_argument("--aug", help=f"augmentation: {aug_help()} (default: augment.name)")
    parser.add_argument("--target", choices=["multiclass", "foreground"], help="classes to learn (model.target)")
    parser.add_argument("--fold", type=nonnegative_int, metavar="K", help="hold out test fold K of the folds file")
    parser.add_argument("--epochs", type=positive_int, metavar="N", help="epochs (train.epochs)")
    parser.add_argument("--steps", type=positive_int, metavar="N", help="steps per epoch (train.steps_per_epoch)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out after its last epoch")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (train.device)")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], help="mixed precision on GPU (train.amp)")
    parser.add_argument("--workers", type=nonnegative_int, metavar="N",
                        help="data loader processes (train.num_workers)")
    parser.add_argument("--seed", type=seed_int, help="seed (default: the config's seed)")
    parser.add_argument("--cache", type=Path, help="cache folder for a raw --data (default: <out>/../cache)")
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _apply_overrides(cfg: ExperimentConfig, args: argparse.Namespace) -> ExperimentConfig:
    pairs = [(cfg.model, "arch", args.arch), (cfg.model, "dim", args.dim), (cfg.augment, "name", args.aug),
             (cfg.model, "target", args.target), (cfg.train, "epochs", args.epochs),
             (cfg.train, "steps_per_epoch", args.steps), (cfg.train, "device", args.device),
             (cfg.train, "amp", args.amp), (cfg.train, "num_workers", args.workers), (cfg, "seed", args.seed)]
    try:
        for section, name, value in pairs:
            if value is not None:
                setattr(section, name, value)
    except ValueError as err:  # pydantic validation of the assignment
        raise CtsegError(f"invalid option: {err}") from None
    return cfg


def _open_cache(args: argparse.Namespace, cfg: ExperimentConfig, ctx: DistContext) -> tuple[CaseCache, Path]:
    """(CaseCache, folds file) for --data: the folder itself if it is a cache (folds file beside it), else
    build/refresh one (rank 0 builds). With --fold on a raw dataset the cache is fold K's: its intensity plan
    comes from the fold's training cases only (`ctseg.cv.run.fold_cache`, the cache `ctseg cv` uses)."""
    from ctseg.preprocess.cache import PLAN_FILE, CaseCache, build_cache
    from ctseg.train import distributed as D

    if not args.data.exists():
        raise CtsegError("data folder not found", args.data)
    if (args.data / PLAN_FILE).is_file():
        return CaseCache(args.data, expected=cfg), args.data.resolve().parent / FOLDS_FILE
    cache_dir = args.cache or args.out.resolve().parent / "cache"
    refuse_overlap(args.out, args.data, "--out")
    refuse_overlap(cache_dir, args.data, "--cache" if args.cache else "the cache (default <out>/../cache)")
    folds_file = Path(cache_dir).resolve().parent / FOLDS_FILE
    cfg.data.path = str(args.data)
    if args.fold is not None:
        from ctseg.cv.run import fold_cache, fold_cache_dir, prepare_data
        from ctseg.evaluate.folds import load_folds

        _check_fold(args, cfg)
        if ctx.is_main:
            dataset, folds = prepare_data(cfg, args.data, folds_file, not args.no_progress)
            fold_cache(dataset, cfg, cache_dir, folds, args.fold, not args.no_progress)
        D.barrier(ctx)
        return CaseCache(fold_cache_dir(cfg, cache_dir, load_folds(folds_file), args.fold), expected=cfg), folds_file
    if ctx.is_main:
        from ctseg.datasets import open_dataset

        dataset = open_dataset(args.data, layout=cfg.data.layout)
        # no test fold: one plan from a subset of all cases
        build_cache(dataset, cache_dir, cfg, np.random.default_rng([cfg.seed, 0xCAC4E]),
                    progress=not args.no_progress)
    D.barrier(ctx)
    return CaseCache(cache_dir, expected=cfg), folds_file


def _check_fold(args: argparse.Namespace, cfg: ExperimentConfig) -> None:
    if not 0 <= args.fold < cfg.cv.n_folds:
        raise CtsegError(f"--fold {args.fold} out of range: folds are 0..{cfg.cv.n_folds - 1} (cv.n_folds)")


def _split(args: argparse.Namespace, cfg: ExperimentConfig, cache: CaseCache, folds_file: Path, ctx: DistContext
           ) -> tuple[list[str], list[str]]:
    """(training ids, held-out test ids) for --fold, or (all labelled ids, [])."""
    from ctseg.cv.run import folds_of_cache
    from ctseg.evaluate.folds import load_folds
    from ctseg.train import distributed as D

    ids = cache.case_ids()
    test: list[str] = []
    if args.fold is not None:
        _check_fold(args, cfg)
        path = folds_file
        folds: Folds
        if ctx.is_main:
            folds = folds_of_cache(cache, cfg, path)
        D.barrier(ctx)
        if not ctx.is_main:
            folds = load_folds(path)
        test = folds.test_ids(args.fold)
    train = [cid for cid in ids if cid not in set(test) and cache.meta(cid).get("has_label", True)]
    if not train:
        unlabelled = sum(1 for cid in ids if not cache.meta(cid).get("has_label", True))
        raise CtsegError(f"no training cases: of the cache's {len(ids)} case(s), {unlabelled} have no label "
                         f"(test cases) and {len(test)} are held out by --fold", cache.root)
    return train, test


def run(args: argparse.Namespace) -> int:
    from ctseg.train import distributed as D
    from ctseg.train.trainer import train_model

    from ctseg.runtime import set_threads

    set_threads(args.threads)
    cfg = _apply_overrides(load_config(args.config) if args.config else ExperimentConfig(), args)
    ctx = D.init_distributed(cfg.train.device)
    try:
        with output_lock(args.out) if ctx.is_main else nullcontext():  # the other ranks write into rank 0's run
            cache, folds_file = _open_cache(args, cfg, ctx)
            train_ids, test_ids = _split(args, cfg, cache, folds_file, ctx)
            val_ids = None  # without --fold: val_fraction of the cases, drawn with the model seed
            if args.fold is not None:  # the fold's validation split, the one `ctseg cv` uses (seeded by the fold)
                from ctseg.train.splits import fold_validation_split

                train_ids, val_ids = fold_validation_split(train_ids, cfg.train.val_fraction, args.fold)
            result = train_model(cfg, cache, train_ids, val_ids, args.out, resume=args.resume,
                                 progress=not args.no_progress, device=cfg.train.device)
    finally:
        D.shutdown(ctx)
    if ctx.is_main:
        table = Table(title=f"training run {escape(str(args.out))}", show_header=False)
        table.add_row("model", f"{cfg.model.arch} {cfg.model.dim}, {cfg.model.target}, augmentation {cfg.augment.name}")
        table.add_row("cases", f"{len(train_ids) + len(val_ids or [])} (training + validation)"
                      + (f", fold {args.fold} held out: {len(test_ids)}" if args.fold is not None else ""))
        table.add_row("epochs", f"{result.epochs_run} x {cfg.train.steps_per_epoch} steps")
        last = result.history[-1] if result.history else {}
        table.add_row("last train loss", f"{last.get('train_loss', float('nan')):.4f}")
        table.add_row("best val Dice", f"{result.best_metric:.4f}")
        table.add_row("files", ", ".join(sorted(p.name for p in Path(args.out).iterdir() if p.is_file())))
        stdout_console().print(table)
    return 0
