"""`ctseg stress (--model RUN... | --cv-dir RUN...) [--data DIR] --out DIR`: the acquisition-shift stress test.

Trained models (or ensembles) are scored on labelled volumes under one acquisition shift at a time (slice
thickness, dose, HU calibration, contrast phase, patient rotation, field of view, phantom re-acquisition),
each swept over its severities; see docs/STRESS.md. With --cv-dir every volume is predicted by the fold
model that did not train on it. Output: settings.json, rows.csv (per volume), summary.json, curves.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from ctseg.commands._choices import layout_choices
from ctseg.commands._output import stdout_console
from ctseg.commands._types import add_threads_argument, positive_int, seed_int
from ctseg.errors import CtsegError
from ctseg.fileutil import output_lock

if TYPE_CHECKING:
    from ctseg.config import StressConfig

HELP = "score trained models under acquisition shifts (slice thickness, dose, calibration, contrast, position)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ctseg.inference.models import KINDS_HELP
    from ctseg.stress.perturb import AXES

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, nargs="+", action="append", metavar="MODEL",
                     help=f"model folder(s): {KINDS_HELP}; several after one --model form an ensemble (a stack "
                          "stands alone); repeat --model to compare models")
    src.add_argument("--cv-dir", type=Path, nargs="+", metavar="CV_RUN",
                     help="cross-validation run folder(s) (cv.json), e.g. OUT/runs/unet-2d-ctia: out-of-fold, "
                          "one model per run")
    parser.add_argument("--data", type=Path, help="labelled dataset folder (any layout ctseg reads; default with "
                        "--cv-dir: the runs' own data)")
    parser.add_argument("--layout", default="auto", choices=layout_choices(),
                        help="dataset layout of --data (default: detected)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder; an existing one is continued if its settings match, else refused")
    parser.add_argument("--config", type=Path, help="config whose `stress:` section sets the defaults below")
    parser.add_argument("--profile", help="profile of --config to merge over it: ci, cpu or full (the config's "
                        "experiment.profiles)")
    parser.add_argument("--axes", nargs="+", metavar="AXIS", help=f"axes to run, from: {', '.join(AXES)}")
    parser.add_argument("--severity", action="append", default=[], metavar="AXIS=V1,V2,...",
                        help="severities of one axis (the clean value is added), e.g. dose=2,4; repeatable")
    parser.add_argument("--max-volumes", type=positive_int, help="at most this many volumes, drawn by --seed")
    parser.add_argument("--seed", type=seed_int, help="volume choice and noise seed")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=positive_int, help="slices (2D) or windows (3D) per forward pass")
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _stress_config(args: argparse.Namespace) -> StressConfig:
    from ctseg.config import ExperimentConfig, StressConfig, load_config

    if args.config is not None:
        from ctseg.experiment import apply_profile

        base = apply_profile(load_config(args.config), args.profile).stress
    elif args.profile:
        raise CtsegError("--profile needs --config")
    else:
        base = ExperimentConfig().stress
    d = base.model_dump()
    if args.axes:
        d["axes"] = list(args.axes)
    sev = dict(d["severities"])
    for item in args.severity:
        name, _, values = item.partition("=")
        try:
            sev[name.strip()] = [float(v) for v in values.split(",")]
        except ValueError:
            raise CtsegError(f"--severity {item!r}: expected AXIS=V1,V2,... with numbers (no empty items)") from None
        if name.strip() not in d["axes"]:
            raise CtsegError(f"--severity {item!r}: axis {name.strip()!r} is not among the axes to run "
                             f"({', '.join(d['axes'])}); add it to --axes")
    d["severities"] = sev
    if args.max_volumes is not None:
        d["max_volumes"] = args.max_volumes
    if args.seed is not None:
        d["seed"] = args.seed
    from pydantic import ValidationError

    try:
        return StressConfig.model_validate(d)
    except ValidationError as err:
        raise CtsegError(f"invalid stress settings: {err.errors()[0]['msg']}", args.config) from None


def run(args: argparse.Namespace) -> int:
    from ctseg.runtime import set_threads
    from ctseg.stress.runner import model_specs_from_cv, model_specs_from_dirs, run_stress

    set_threads(args.threads)
    cfg = _stress_config(args)
    case_ids, layout = None, args.layout
    if args.cv_dir:
        specs, manifest = model_specs_from_cv(args.cv_dir)
        data = args.data or Path(manifest.data)
        if args.data is None:
            layout = manifest.layout
        from ctseg.evaluate.folds import load_folds

        case_ids = [cid for fold in load_folds(manifest.folds_file).folds for cid in fold]
    else:
        if args.data is None:
            raise CtsegError("--model needs --data DIR (labelled volumes)")
        specs = model_specs_from_dirs(args.model)
        data = args.data
    messages: list[str] = []
    with output_lock(args.out):
        summary = run_stress(specs, data, args.out, cfg, layout=layout, case_ids=case_ids, device=args.device,
                             batch_size=args.batch_size, progress=not args.no_progress, messages=messages)
    console = stdout_console()
    head = summary["headline_structure"]
    table = Table(title=f"robustness gap, Dice {head} (clean − mean shifted) [95% CI]; "
                        "failure rate clean → shifted")
    table.add_column("axis")
    for m in summary["models"]:
        table.add_column(m["display"], justify="right")
    from ctseg.stress.summary import _gap_text

    for axis, a in summary["axes"].items():
        cells = []
        for m in summary["models"]:
            e = a["models"].get(m["name"], {})
            fr = e.get("failure_rate_shifted")
            cells.append(f"{_gap_text(e.get('gap', {}).get(head))}\n"
                         f"{100 * (e.get('failure_rate_clean') or 0):.0f}% → "
                         f"{'–' if fr is None else f'{100 * fr:.0f}%'}")
        table.add_row(axis, *cells)
    console.print(table)
    for msg in summary.get("skipped", []):
        Console(stderr=True).print(f"[yellow]skipped:[/] {msg}", highlight=False)
    console.print(f"stress test written to [bold]{args.out}[/] (rows.csv, summary.json, curves.png)")
    return 0
