"""`ctseg phantom --task kidney|liver --cases N --out DIR`: write a synthetic abdominal CT dataset."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ctseg.commands._output import stdout_console
from ctseg.commands._types import int_range, seed_int
from ctseg.errors import CtsegError
from ctseg.fileutil import output_lock, removed_on_failure

if TYPE_CHECKING:
    from ctseg.datasets.base import Case

#: More cases than any public CT dataset holds (KiTS19: 300); a larger count is a typo, not a dataset.
MAX_CASES = 10_000

HELP = "write a synthetic abdominal CT dataset (KiTS19, CHAOS or nnU-Net raw layout) with labels"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ctseg.datasets.phantom import writable_layouts

    parser.add_argument("--task", choices=["kidney", "liver"], default="kidney",
                        help="kidney: labels kidney + tumour (KiTS19); liver: liver mask (CHAOS)")
    parser.add_argument("--cases", type=int_range(1, MAX_CASES), default=10,
                        help=f"number of cases (default 10, at most {MAX_CASES})")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    parser.add_argument("--layout", choices=writable_layouts(),
                        help="default: kits19 for --task kidney, chaos for --task liver")
    parser.add_argument("--seed", type=seed_int, default=0, help="dataset seed (case i uses SeedSequence([seed, i]))")
    parser.add_argument("--size", choices=["small", "full"], default="small",
                        help="small: 128 x 128 in-plane, tens of slices; full: 512 x 512, 20..600 slices")
    parser.add_argument("--population", type=_population, default=None, metavar="SHIFT=V[,SHIFT=V]",
                        help="draw the cases from a shifted population (a held-out test set), e.g. habitus=1.3,phase=1; "
                        "shifts: habitus, fov, kidney_size, tumour_size, phase, kernel (docs/ABLATION.md)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _population(text: str) -> dict[str, float]:
    """'habitus=1.3,phase=1' -> {'habitus': 1.3, 'phase': 1.0}, checked by `Population`."""
    from ctseg.datasets.phantom import Population

    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected SHIFT=VALUE, got {part!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"expected SHIFT=VALUE, got {part!r}")
    try:
        Population.of(out)
    except CtsegError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return out


def check_dataset_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, an unwritable folder, or (without --overwrite) a folder that already holds files:
    writing there would overwrite cases or mix datasets and layouts."""
    if out.exists() and not out.is_dir():
        raise CtsegError("--out is a file; give a folder for the dataset", out)
    if out.is_dir():
        existing = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if existing and not overwrite:
            listing = ", ".join(sorted(existing)[:5]) + (" ..." if len(existing) > 5 else "")
            raise CtsegError(f"folder is not empty ({listing}): writing would overwrite or mix with what is there; "
                             "choose an empty folder or pass --overwrite", out)
        if not os.access(out, os.W_OK | os.X_OK):
            raise CtsegError("folder is not writable", out)


def run(args: argparse.Namespace) -> int:
    with output_lock(args.out):
        check_dataset_out(args.out, args.overwrite)  # under the lock: a run that just finished has filled it
        with removed_on_failure(args.out):
            return _write(args)


def _write(args: argparse.Namespace) -> int:
    """Write the dataset and print its table (under the lock of `run`)."""
    from ctseg.datasets.phantom import CLASSES, write_phantom_dataset

    console = stdout_console()
    table = Table(title=f"phantom {args.task} dataset: {escape(str(args.out))}")
    for col in ("case", "slices", "spacing z/y/x mm", "thick mm", "region", "noise HU",
                *(f"{name} mL" for v, name in CLASSES[args.task].items() if v)):
        table.add_column(col, justify="right" if col != "region" else "left")
    progress = Progress(TextColumn("[bold]phantom[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=args.no_progress, transient=True)

    def on_case(case: Case) -> None:
        m, acq = case.metadata, case.metadata["acquisition"]
        table.add_row(case.case_id, str(m["num_slices"]), "/".join(f"{s:.2f}" for s in m["spacing"]),
                      f"{m['slice_thickness']:g}", acq["region"], f"{acq['noise_sigma']:.1f}",
                      *(f"{v:.1f}" for v in m["label_volumes_ml"].values()))
        progress.advance(task_id)

    with progress:
        task_id = progress.add_task("cases", total=args.cases)
        out = write_phantom_dataset(args.out, task=args.task, n_cases=args.cases, layout=args.layout,
                                    seed=args.seed, size=args.size, on_case=on_case,
                                    **({"population": args.population} if args.population else {}))
    console.print(table)
    console.print(f"wrote {args.cases} cases to {escape(str(out))}")
    return 0
