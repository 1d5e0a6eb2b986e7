"""`ctseg report RUN... --out DIR`: tables, plots and the HTML report from finished runs."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from ctseg.commands._output import stdout_console
from ctseg.commands._types import positive_float
from ctseg.errors import CtsegError
from ctseg.fileutil import output_lock, removed_on_failure

if TYPE_CHECKING:
    from ctseg.evaluate.records import VolumeResult

HELP = "write results tables, plots and report/index.html from finished cross-validation / stack / experiment folders"


_AUG_STYLES = {"ctia": "blue", "mia": "dark_orange", "nnunet": "magenta"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path,
                        help="folders of `ctseg cv`, `ctseg stack` or `ctseg experiment`, or results.json files")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.* , plots/ and report/")
    parser.add_argument("--title", default="ctseg results")
    parser.add_argument("--thickness-groups", type=positive_float, nargs="+", metavar="MM",
                        help="upper edges of the slice-thickness groups in mm (default 1.5 3)")


def collect(paths: list[Path]) -> tuple[list[VolumeResult], dict[str, list[Path]]]:
    """Records and training-log paths from run folders or results files."""
    from ctseg.cv.run import cv_log_csvs, load_cv_records

    records, curves = [], {}
    for p in paths:
        if p.is_file():
            records += _load_results_file(p)
        elif (p / "cv.json").is_file() or (p / "stack.json").is_file():
            recs = load_cv_records(p)
            records += recs
            if recs and (p / "cv.json").is_file():
                curves[recs[0].display] = cv_log_csvs(p)
        elif (p / "results.json").is_file():
            records += _load_results_file(p / "results.json")
        else:
            raise CtsegError("neither a run folder (cv.json / stack.json) nor a results folder (results.json)", p)
    if not records:
        raise CtsegError("no finished folds in " + ", ".join(str(p) for p in paths))
    return records, curves


def _load_results_file(path: Path) -> list[VolumeResult]:
    """Records of a results JSON file; CtsegError naming it when it is not one (a NIfTI, another JSON)."""
    from ctseg.evaluate.report import load_results

    try:
        return load_results(path)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CtsegError(f"not a ctseg results file (results.json or a per-fold results list): "
                         f"{type(exc).__name__}: {str(exc)[:200]}", path) from None


def summary_table(records: list[VolumeResult], title: str = "Dice, paper protocol (mean ± std over volumes)") -> Table:
    """Table 2 as a rich table."""
    from ctseg.evaluate.records import ENSEMBLES, models_in_order
    from ctseg.evaluate.report import class_names, summary_table as summarize

    classes = class_names(records)
    t = summarize(records, "dice_paper", classes)
    names = {m.model: (m.display, m.aug, m.arch) for m in models_in_order(records)}
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for c in classes:
        table.add_column(c, justify="right")
    table.add_column("n", justify="right")
    for model, row in t.items():
        display, aug, arch = names[model]
        style = "green" if arch in ENSEMBLES else _AUG_STYLES.get(aug)
        table.add_row(display, *(row[c].fmt() for c in classes), str(max(s.n for s in row.values())), style=style)
    return table


def run(args: argparse.Namespace) -> int:
    from ctseg.evaluate.report import DEFAULT_THICKNESS_EDGES_MM, write_report

    console = stdout_console()
    records, curves = collect(args.runs)
    with output_lock(args.out), removed_on_failure(args.out):
        html = write_report(records, args.out, log_csvs=curves, title=args.title,
                            thickness_edges_mm=args.thickness_groups or DEFAULT_THICKNESS_EDGES_MM)
    console.print(summary_table(records))
    console.print(f"report: [bold]{escape(str(html))}[/]")
    return 0
