"""`ctseg demo [--profile ci|cpu|full] --out DIR`: the whole method on phantom data, ending in a report.

Phantom kidney CTs (KiTS19 layout) -> slice-sorted cross-validation of a 2D U-Net with no augmentation, MIA
and CTIA -> out-of-fold acquisition-shift stress test -> results tables, stress curves and report/index.html.
Settings: `configs/demo.yaml` (its profiles); `cpu` (the default, the config's base settings; `small` is its
old name) fits a 2-core CPU in about twelve minutes, `ci` is a
smoke run of a minute or two, `full` is the paper's matrix (U-Net and MS-D Net, 2D and 3D, MIA, nnU-Net DA,
CTIA and none, stacked top-5 ensembles) on full-size phantoms for a GPU.
An existing output folder is continued (finished parts are skipped).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from ctseg.commands._output import stdout_console
from ctseg.commands._types import jobs_arg, positive_int, seed_int
from ctseg.errors import CtsegError

if TYPE_CHECKING:
    from ctseg.config import ExperimentConfig

log = logging.getLogger(__name__)

HELP = "phantom data -> none / MIA / CTIA cross-validation -> stress test -> report (the README's first command)"

#: profile -> (phantom cases, phantom size)
PHANTOM = {"ci": (6, "small"), "cpu": (18, "small"), "full": (60, "full")}
#: old profile names that still work -> today's
DEPRECATED = {"small": "cpu"}


def default_config_path() -> Path:
    """`configs/demo.yaml` of the source checkout this package runs from."""
    import ctseg

    return Path(ctseg.__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo_config(path: Path, profile: str) -> tuple[ExperimentConfig, str]:
    """The demo's configuration for `profile` and the profile's current name (`small` -> `cpu`, with a warning).
    The config's base settings are the cpu size."""
    from ctseg.config import load_config
    from ctseg.experiment import apply_profile

    if profile in DEPRECATED:
        log.warning("--profile %s is deprecated: it is now called %s", profile, DEPRECATED[profile])
        profile = DEPRECATED[profile]
    return apply_profile(load_config(path), None if profile == "cpu" else profile), profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=[*PHANTOM, *DEPRECATED], default="cpu",
                        help="cpu: 2-core CPU, ~12 min (default; the base settings of the config); ci: 1-2 min smoke "
                        "run; full: the paper's matrix on a GPU; small: old name of cpu. The profiles are "
                        "experiment.profiles in configs/demo.yaml (or --config)")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    parser.add_argument("--config", type=Path, help="demo config (default: configs/demo.yaml of this checkout)")
    parser.add_argument("--cases", type=positive_int, help="number of phantom cases (default: by profile)")
    parser.add_argument("--seed", type=seed_int, default=0, help="phantom seed")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--jobs", type=jobs_arg, default="auto",
                        help="cross-validations (and stress-test parts) run in N processes that share the CPUs; "
                        "auto (default): one per CPU on a CPU, 1 on a GPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _phantom(out: Path, n_cases: int, size: str, seed: int, progress: bool, console: Console) -> Path:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ctseg.datasets.phantom import write_phantom_dataset

    data = out / "data"
    stamp = data / "phantom.json"
    if stamp.is_file():
        try:
            info = json.loads(stamp.read_text())
        except ValueError:
            info = None
        cases = info.get("cases") if isinstance(info, dict) else None
        if cases is not None and len(cases) == n_cases:
            console.print(f"phantom data: reusing {n_cases} cases in {escape(str(data))}")
            return data
        raise CtsegError(f"holds another phantom dataset; delete it or choose another --out", data)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress) as bar:
        task = bar.add_task(f"phantom kidney CTs ({size})", total=n_cases)
        write_phantom_dataset(data, task="kidney", n_cases=n_cases, layout="kits19", seed=seed, size=size,
                              on_case=lambda case: bar.advance(task))
    return data


def run(args: argparse.Namespace) -> int:
    from ctseg.commands.report import summary_table
    from ctseg.evaluate.report import load_results
    from ctseg.experiment import experiment_jobs, run_experiment

    from ctseg.datasets import LAYOUTS

    own_data = (args.out / "data" / "phantom.json").is_file()  # an earlier demo's phantom data, continued
    if args.out.is_dir() and not own_data and any(layout.matches(args.out) for layout in LAYOUTS.values()):
        raise CtsegError("--out is a dataset folder: the demo would write its phantom data and runs into it; give "
                         "an empty or new folder", args.out)
    console = stdout_console()
    cfg_path = args.config or default_config_path()
    if not cfg_path.is_file():
        raise CtsegError("demo config not found (run from a source checkout, or pass --config)", cfg_path)
    cfg, args.profile = demo_config(cfg_path, args.profile)
    n_cases, size = PHANTOM[args.profile]
    n_cases = args.cases or n_cases
    if n_cases < 2 * cfg.cv.n_folds:
        raise CtsegError(f"--cases {n_cases} is too few for {cfg.cv.n_folds}-fold cross-validation "
                         f"(need at least {2 * cfg.cv.n_folds})")
    progress = not args.no_progress
    from ctseg.evaluate.records import arch_display, aug_display

    e = cfg.experiment
    augs = " vs ".join(aug_display(a) for a in e.augs)
    models = ", ".join(f"{arch_display(a)} {d.upper()}" for a in e.archs for d in e.dims
                       if f"{a}-{d}" not in e.exclude)
    console.print(Panel.fit(
        f"[bold]ctseg demo[/] ({args.profile}): {n_cases} phantom kidney CTs -> slice-sorted {cfg.cv.n_folds}-fold "
        f"cross-validation of {augs}\n{models}{' -> stacked ensemble' if cfg.experiment.stack else ''}"
        f"{' -> stress test' if cfg.stress.enabled else ''} -> report in {escape(str(args.out))}",
        border_style="cyan"))
    jobs = experiment_jobs(cfg, args.jobs, args.device)
    t0 = time.perf_counter()
    data = _phantom(args.out, n_cases, size, args.seed, progress, console)
    t_data = time.perf_counter() - t0
    html = run_experiment(cfg, data, args.out, device=args.device, progress=progress, jobs=jobs,
                          title=f"ctseg demo ({args.profile}): {augs} on phantom kidney CTs",
                          intro=f"synthetic phantom data ({n_cases} cases, {size} size); networks shrunk to fit "
                                "the profile, so absolute Dice is far below the paper's")
    total = time.perf_counter() - t0
    results = json.loads((args.out / "results.json").read_text())
    console.print(summary_table(load_results(args.out / "results.json")))
    console.print(Panel.fit(f"[bold]{results['headline']['text']}[/]\n\n"
                        f"report:  [bold cyan]{html.resolve()}[/]\n"
                        f"tables:  {(args.out / 'results.md').resolve()}\n"
                        f"time:    {total:.0f} s (phantom data {t_data:.0f} s; {jobs} process{'es' if jobs > 1 else ''})",
                        title="demo finished", border_style="green"))
    return 0
