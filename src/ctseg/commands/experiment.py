"""`ctseg experiment --config CFG [--profile P] --data DIR --out DIR`: the paper's whole experiment."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.markup import escape

from ctseg.commands._choices import aug_help
from ctseg.commands._output import stdout_console
from ctseg.commands._types import jobs_arg
from ctseg.errors import CtsegError

HELP = "run the paper's matrix {U-Net, MS-D} x {2D, 3D} x augmentations (MIA, nnU-Net DA, CTIA, none) x folds + stacking, and write the report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="experiment config, e.g. configs/paper-kits19.yaml")
    parser.add_argument("--profile", help="named profile of the config to merge over it: ci (tiny smoke run), "
                        "cpu (2-core CPU size), full (paper size, GPU); a config lists its own under "
                        "experiment.profiles")
    parser.add_argument("--data", type=Path, help="dataset folder (default: the config's data.path)")
    parser.add_argument("--out", type=Path, required=True, help="experiment folder (an existing one is continued)")
    parser.add_argument("--aug", action="append",
                        help="augmentation(s) to run instead of experiment.augs (repeat: --aug mia --aug ctia); "
                        f"{aug_help()}")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the config's train.device)")
    parser.add_argument("--jobs", type=jobs_arg, default=1,
                        help="cross-validations (and stress-test parts) run in N processes that share the CPUs; "
                        "auto: one per CPU on a CPU, 1 on a GPU (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ctseg.commands.report import summary_table
    from ctseg.config import check_aug_names, load_config
    from ctseg.evaluate.report import load_results
    from ctseg.experiment import apply_profile, experiment_jobs, run_experiment

    cfg = apply_profile(load_config(args.config), args.profile)
    if args.aug:
        cfg.experiment.augs = check_aug_names(cfg.augment, list(dict.fromkeys(args.aug)), args.config)
    data = args.data or (Path(cfg.data.path) if cfg.data.path else None)
    if data is None:
        raise CtsegError("no dataset: pass --data DIR or set data.path in the config", args.config)
    console = stdout_console()
    t0 = time.perf_counter()
    html = run_experiment(cfg, data, args.out, device=args.device, progress=not args.no_progress,
                          jobs=experiment_jobs(cfg, args.jobs, args.device))
    console.print(summary_table(load_results(args.out / "results.json")))
    console.print(f"finished in {time.perf_counter() - t0:.0f} s; report: [bold]{escape(str(html))}[/]")
    return 0
