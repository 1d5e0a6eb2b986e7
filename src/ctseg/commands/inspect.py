"""`ctseg inspect DIR`: what is in a dataset folder, and what is wrong with it."""
from __future__ import annotations

import argparse
import logging

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ctseg.commands._choices import layout_choices
from ctseg.commands._output import stdout_console, write_rows
from ctseg.datasets import open_dataset
from ctseg.datasets.base import Case, count_labels
from ctseg.errors import CtsegError

HELP = "table of a dataset's cases (slices, spacing, thickness, label volumes, HU range) and its problems"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="dataset folder (KiTS19, CHAOS CT or nnU-Net raw layout)")
    parser.add_argument("--layout", default="auto", choices=layout_choices(), help="dataset layout (default: detect)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json",
                     help="print the cases and problems as JSON instead of a table")
    fmt.add_argument("--csv", dest="fmt", action="store_const", const="csv",
                     help="print one CSV line per case instead of a table (problems go to stderr)")


def _case_row(case: Case, classes: dict[int, str]) -> dict:
    """One case as a flat record: shape (z, y, x), spacing mm, thickness mm, HU range, label volumes mL."""
    image, meta = case.image, case.metadata
    row = {"case_id": case.case_id, "error": None,
           **{f"shape_{a}": int(n) for a, n in zip("zyx", image.shape)},
           **{f"spacing_{a}_mm": float(s) for a, s in zip("zyx", meta["spacing"])},
           "thickness_mm": float(meta["slice_thickness"]), "thickness_source": meta["slice_thickness_source"],
           "hu_min": float(image.array.min()), "hu_max": float(image.array.max())}
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    counts = None
    if case.label is not None:
        counts = count_labels(case.label.array, max(classes, default=0) + 1)
    for k, name in classes.items():
        row[f"{name}_ml"] = None if counts is None else round(float(counts[k] * voxel_ml), 3)
    return row


def _error_row(case_id: str, message: str, classes: dict[int, str]) -> dict:
    empty = dict.fromkeys([*(f"shape_{a}" for a in "zyx"), *(f"spacing_{a}_mm" for a in "zyx"), "thickness_mm",
                           "thickness_source", "hu_min", "hu_max"])
    return {"case_id": case_id, "error": message, **empty, **{f"{name}_ml": None for name in classes.values()}}


def _table(title: str, rows: list[dict], classes: dict[int, str]) -> Table:
    table = Table(title=title)
    table.add_column("case", no_wrap=True)
    for column in ("shape z×y×x", "spacing mm", "thickness mm", "HU range"):
        table.add_column(column, justify="right")
    for name in classes.values():
        table.add_column(f"{name} mL", justify="right")
    for row in rows:
        if row["error"] is not None:
            table.add_row(row["case_id"], *["[red]error[/]"] * (4 + len(classes)))
            continue
        volumes = ["-" if row[f"{n}_ml"] is None else f"{row[f'{n}_ml']:.1f}" for n in classes.values()]
        table.add_row(row["case_id"], "×".join(str(row[f"shape_{a}"]) for a in "zyx"),
                      "/".join(f"{row[f'spacing_{a}_mm']:.3g}" for a in "zyx"),
                      f"{row['thickness_mm']:.3g}{'' if row['thickness_source'] == 'dicom' else '*'}",
                      f"{row['hu_min']:.0f}..{row['hu_max']:.0f}", *volumes)
    return table


def run(args: argparse.Namespace) -> int:
    dataset = open_dataset(args.path, args.layout)
    classes = {k: v for k, v in dataset.classes.items() if k != 0}
    rows: list[dict] = []
    problems: list[str] = []
    failed = 0
    library_log = logging.getLogger("ctseg")
    level = library_log.level
    library_log.setLevel(logging.ERROR)  # warnings are collected into `problems` instead
    try:
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("reading cases", total=len(dataset))
            for case_id in dataset.case_ids():
                try:
                    case = dataset.load(case_id)
                except CtsegError as exc:
                    failed += 1
                    problems.append(f"{case_id}: failed to load: {exc}")
                    rows.append(_error_row(case_id, str(exc), classes))
                    progress.advance(task)
                    continue
                problems += [f"{case_id}: {w}" for w in case.metadata["warnings"]]
                rows.append(_case_row(case, classes))
                progress.advance(task)
    finally:
        library_log.setLevel(level)
    status = 1 if failed else 0
    if args.fmt == "json":
        write_rows(rows, "json", {"layout": dataset.layout, "root": str(dataset.root), "problems": problems})
        return status
    if args.fmt == "csv":
        write_rows(rows, "csv")
        err = Console(stderr=True)
        for line in problems:
            err.print(escape(line), highlight=False)
        return status
    console = stdout_console()
    console.print(_table(f"{dataset.layout} dataset {escape(str(dataset.root))} ({len(dataset)} cases)", rows, classes))
    console.print("* thickness unknown in the file: slice spacing shown", style="dim")
    if problems:
        console.print(f"[bold]{len(problems)} problem(s):[/]")
        for line in problems:
            colour = "red" if ": failed to load: " in line else "yellow"
            console.print(f"  [{colour}]{escape(line)}[/]", highlight=False)
    else:
        console.print("[green]no problems found[/]")
    if failed:
        console.print(f"[bold red]{failed} of {len(dataset)} case(s) failed to load[/]")
    return status
