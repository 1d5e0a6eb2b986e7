"""`ctseg inspect DIR`: what is in a dataset folder, and what is wrong with it."""
from __future__ import annotations

import argparse
import logging

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ctseg.datasets import LAYOUTS, open_dataset
from ctseg.errors import CtsegError

HELP = "table of a dataset's cases (slices, spacing, thickness, label volumes, HU range) and its problems"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="dataset folder (KiTS19, CHAOS CT or nnU-Net raw layout)")
    parser.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="dataset layout (default: detect)")


def run(args: argparse.Namespace) -> int:
    console = Console()
    dataset = open_dataset(args.path, args.layout)
    classes = {k: v for k, v in dataset.classes.items() if k != 0}
    table = Table(title=f"{dataset.layout} dataset {escape(str(dataset.root))} ({len(dataset)} cases)")
    table.add_column("case", no_wrap=True)
    for column in ("shape z×y×x", "spacing mm", "thickness mm", "HU range"):
        table.add_column(column, justify="right")
    for name in classes.values():
        table.add_column(f"{name} mL", justify="right")
    problems: list[str] = []
    failed = 0
    library_log = logging.getLogger("ctseg")
    level = library_log.level
    library_log.setLevel(logging.ERROR)  # warnings are collected into `problems` instead
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("reading cases", total=len(dataset))
            for case_id in dataset.case_ids():
                try:
                    case = dataset.load(case_id)
                except CtsegError as exc:
                    failed += 1
                    problems.append(f"[red]{case_id}: failed to load: {escape(str(exc))}[/]")
                    table.add_row(case_id, *["[red]error[/]"] * (4 + len(classes)))
                    progress.advance(task)
                    continue
                image, meta = case.image, case.metadata
                problems += [f"[yellow]{case_id}: {escape(w)}[/]" for w in meta["warnings"]]
                voxel_ml = float(np.prod(image.spacing)) / 1000.0
                if case.label is not None:
                    counts = np.bincount(case.label.array.reshape(-1), minlength=max(classes, default=0) + 1)
                    volumes = [f"{counts[k] * voxel_ml:.1f}" for k in classes]
                else:
                    volumes = ["-"] * len(classes)
                table.add_row(case_id, "×".join(map(str, image.shape)), "/".join(f"{s:.3g}" for s in meta["spacing"]),
                              f"{meta['slice_thickness']:.3g}{'' if meta['slice_thickness_source'] == 'dicom' else '*'}",
                              f"{image.array.min():.0f}..{image.array.max():.0f}", *volumes)
                progress.advance(task)
    finally:
        library_log.setLevel(level)
    console.print(table)
    console.print("* thickness unknown in the file: slice spacing shown", style="dim")
    if problems:
        console.print(f"[bold]{len(problems)} problem(s):[/]")
        for line in problems:
            console.print(f"  {escape(str(line))}", highlight=False)
    else:
        console.print("[green]no problems found[/]")
    if failed:
        console.print(f"[bold red]{failed} of {len(dataset)} case(s) failed to load[/]")
        return 1
    return 0
