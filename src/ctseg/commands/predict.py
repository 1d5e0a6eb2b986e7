"""`ctseg predict -i CT -o SEG --model MODEL [MODEL ...]`: segment one CT in its own geometry.

`ctseg predict -i DIR -o OUT_DIR --model ...` (an output without an image suffix) segments every case of DIR:
a dataset in any layout ctseg reads (KiTS19, CHAOS, nnU-Net raw), or a folder of NIfTI / NRRD / MHA files and
DICOM series sub-folders; outputs are named by case id. MODEL is a training run, a CV fold folder, a whole CV
run (all its folds) or a stacked ensemble (`ctseg.inference.models`). The work is done by
`ctseg.inference.predict_file` / `predict_folder`; this module parses the options and prints.

Every output path, suffix and option is checked before any inference; outputs are written to temporaries
and renamed together, so an error, Ctrl-C or SIGTERM leaves none of them. The label map overlays the input
exactly (same size, spacing, origin, direction). Single-slice input is refused by the reader: a one-slice
"CT" is nearly always a scout / localiser or an export mistake, and its measurements would be meaningless.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctseg.commands._output import stdout_console
from ctseg.commands._types import add_threads_argument, overlap_fraction, positive_int
from ctseg.errors import CtsegError

if TYPE_CHECKING:
    from ctseg.inference.api import PredictOptions
    from ctseg.inference.folder import CaseOutcome, FolderResult
    from ctseg.inference.cases import CaseInput

HELP = "segment a CT volume (NIfTI / NRRD / MHA file or DICOM folder) or a folder of cases with trained model(s)"

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ctseg.inference.models import KINDS_HELP

    parser.add_argument("-i", "--input", type=Path, required=True,
                        help="CT volume (.nii.gz / .nii / .nrrd / .mha file or a DICOM series folder), or a folder of "
                        "cases: a KiTS19 / CHAOS / nnU-Net raw dataset or a folder of image files and DICOM folders")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="label map to write (.nii.gz / .nrrd / .mha; .dcm for dicom-seg / rtstruct), or a "
                        "folder when the input is a folder of cases (outputs named by case id)")
    parser.add_argument("--model", type=Path, nargs="+", required=True, metavar="MODEL",
                        help=f"model folder(s): {KINDS_HELP}; several = one ensemble (a stack is used alone)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    add_threads_argument(parser)
    parser.add_argument("--probabilities", type=Path, metavar="FILE",
                        help="also write class probabilities (4D NIfTI on the input grid)")
    parser.add_argument("--stats", type=Path, metavar="FILE",
                        help="write measurements per structure (volume mL, axial diameter, components, HU): .json "
                        "report or .csv table; for a folder of cases one .csv with a row per case and structure")
    parser.add_argument("--output-type", choices=["nifti", "dicom-seg", "rtstruct"], default="nifti",
                        help="nifti (default; also .nrrd/.mha by suffix), dicom-seg or rtstruct (DICOM input only)")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID when the DICOM folder holds several")
    parser.add_argument("--batch-size", type=positive_int, help="slices (2D) or windows (3D) per forward pass")
    parser.add_argument("--overlap", type=overlap_fraction, default=0.5,
                        help="3D: overlap of neighbouring contiguous or strided stacks along z (0..1)")
    parser.add_argument("--z-context", choices=["sampled", "strided", "contiguous"],
                        help="3D: how the model sees z (default: each model's own predict.z_context, 'sampled' "
                        "unless configured: stacks drawn as in training; see docs/PAPER_FIDELITY.md point 5)")
    parser.add_argument("--force", action="store_true", help="predict even if the input does not look like CT")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _is_folder_mode(args: argparse.Namespace) -> bool:
    """A folder of cases in, a folder out: the input is a folder and the output has no file suffix."""
    from ctseg.io import WRITE_SUFFIXES

    name = args.output.name.lower()
    return args.input.is_dir() and not name.endswith(WRITE_SUFFIXES + (".dcm",)) and args.output_type == "nifti"


def _options(args: argparse.Namespace) -> PredictOptions:
    from ctseg.inference import PredictOptions

    return PredictOptions(device=args.device, batch_size=args.batch_size, overlap=args.overlap,
                          z_context=args.z_context, output_type=args.output_type, force=args.force,
                          overwrite=args.overwrite, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from ctseg.runtime import set_threads

    set_threads(args.threads)
    if _is_folder_mode(args):
        return _run_folder(args)
    from ctseg.inference import predict_file

    done = predict_file(args.input, args.output, args.model, _options(args), probabilities=args.probabilities,
                        stats=args.stats, series=args.series)
    err = Console(stderr=True)
    for warning in done.warnings:
        err.print(f"[yellow]warning:[/] {escape(str(args.input))}: {escape(warning)}", highlight=False, soft_wrap=True)
    out = stdout_console()
    if done.stats is not None:
        out.print(_stats_table(done.stats, f"{escape(str(args.output))} ({args.output_type})"))
        out.print(f"measurements in {escape(str(args.stats))}", highlight=False)
    else:
        out.print(f"wrote {escape(str(args.output))} ({args.output_type}); measurements with --stats FILE",
                  highlight=False)
    if done.result.agreement is not None:
        flag = "[yellow]low: check this volume[/]" if done.result.agreement < 0.8 else "ok"
        n = len(done.result.member_dice) if done.result.member_dice is not None else done.n_models
        out.print(f"ensemble agreement (mean pairwise Dice of {n} members): {done.result.agreement:.3f} {flag}")
    out.print("times: " + ", ".join(f"{k} {v:.1f}s" for k, v in done.result.seconds.items()), highlight=False)
    return 0


def _stats_table(stats: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("structure", "volume mL", "axial diameter mm", "components", "mean HU", "cut off"):
        table.add_column(col, justify="left" if col == "structure" else "right")
    for struct, m in stats.items():
        if not m["present"]:
            table.add_row(struct, "0", "-", "0", "-", "-")
            continue
        table.add_row(struct, f"{m['volume_ml']:.1f}", f"{m['largest_axial_diameter_mm']:.1f}",
                      str(m["n_components"]), f"{m['mean_hu']:.0f}", "yes" if m["touches_border"] else "no")
    return table


def _run_folder(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ctseg.inference import predict_folder

    console = Console(stderr=True)
    for option, name in ((args.probabilities, "--probabilities"), (args.series, "--series")):
        if option is not None:
            raise CtsegError(f"{name} applies to one input file; not supported for a folder of cases",
                             args.probabilities if name == "--probabilities" else args.input)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=args.no_progress, transient=True)
    with progress as bar:
        task = bar.add_task("cases", total=None)

        def start(case: CaseInput) -> None:
            bar.update(task, description=escape(case.case_id))

        def finished(outcome: CaseOutcome) -> None:
            if outcome.status == "failed":
                console.print(f"[bold red]failed:[/] {escape(outcome.case.case_id)}: {escape(outcome.detail)}",
                              highlight=False, soft_wrap=True)
            bar.advance(task)

        result = predict_folder(
            args.input, args.output, args.model, _options(args), stats=args.stats, on_start=start, on_case=finished,
            on_skipped_file=lambda p: console.print(f"skipped {escape(str(p))}: not a NIfTI / NRRD / MHA file or a "
                                                    "folder", highlight=False, soft_wrap=True),
            on_warning=lambda p, w: console.print(f"[yellow]warning:[/] {escape(str(p))}: {escape(w)}",
                                                  highlight=False, soft_wrap=True))
    return _summary(result)


def _summary(result: FolderResult) -> int:
    kind = f" ({result.layout} dataset)" if result.layout else ""
    table = Table(title=f"{escape(str(result.input))}{kind} -> {escape(str(result.output))}")
    for col in ("case", "status", "detail"):
        table.add_column(col)
    for o in result.outcomes:
        colour = {"done": "green", "skipped": "yellow", "failed": "red"}[o.status]
        table.add_row(escape(o.case.case_id), f"[{colour}]{o.status}[/]", escape(o.detail))
    out = stdout_console()
    out.print(table)
    line = f"{result.count('done')} segmented, {result.count('skipped')} skipped, {result.count('failed')} failed"
    if result.stats is not None:
        line += f"; measurements of every case in {escape(str(result.stats))}"
        if result.measured_existing:
            line += f" ({result.measured_existing} measured from their existing outputs)"
    out.print(line, highlight=False)
    return 1 if result.count("failed") else 0
