"""`ctseg predict -i CT -o SEG --model RUN_DIR [RUN_DIR ...]`: segment one CT in its own geometry.

The label map overlays the input exactly (same size, spacing, origin, direction; NIfTI input keeps
its own orientation, affine and qform/sform codes). Several --model folders form an ensemble
(see `ctseg.predict`); their disagreement is reported. Single-slice input is refused by the reader:
a 2D model could segment it, but a one-slice "CT" is nearly always a scout / localiser or an
export mistake, and its measurements (volumes) would be meaningless.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctseg.commands._types import overlap_fraction, positive_int
from ctseg.errors import CtsegError

HELP = "segment a CT volume (NIfTI / NRRD / MHA file or DICOM folder) with trained model(s)"

_NIFTI_LIKE = (".nii.gz", ".nii", ".nrrd", ".mha")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", type=Path, required=True,
                        help="CT volume: .nii.gz / .nii / .nrrd / .mha file or a DICOM series folder")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="label map to write (.nii.gz / .nrrd / .mha; .dcm for dicom-seg / rtstruct)")
    parser.add_argument("--model", type=Path, nargs="+", required=True, metavar="RUN_DIR",
                        help="trained model folder(s) (run.json + model_best.pt); several = ensemble")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--probabilities", type=Path, metavar="FILE",
                        help="also write class probabilities (4D NIfTI on the input grid)")
    parser.add_argument("--stats", type=Path, metavar="FILE",
                        help="write measurements per structure (volume mL, axial diameter, components, HU) as JSON")
    parser.add_argument("--output-type", choices=["nifti", "dicom-seg", "rtstruct"], default="nifti",
                        help="nifti (default; also .nrrd/.mha by suffix), dicom-seg or rtstruct (DICOM input only)")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID when the DICOM folder holds several")
    parser.add_argument("--batch-size", type=positive_int, help="slices (2D) or windows (3D) per forward pass")
    parser.add_argument("--overlap", type=overlap_fraction, default=0.5, help="3D sliding-window overlap along z (0..1)")
    parser.add_argument("--force", action="store_true", help="predict even if the input does not look like CT")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise CtsegError("output is a folder; give a file name", path)
    if path.exists() and not overwrite:
        raise CtsegError("output exists; pass --overwrite to replace it", path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CtsegError(f"cannot create the output folder ({err.strerror})", parent) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CtsegError("output folder is not writable", parent)


def _read_input(args: argparse.Namespace):
    from ctseg.io import list_dicom_series, read_dicom_series, read_volume

    path = args.input
    if path.is_dir():
        series = list_dicom_series(path)
        if not series:
            raise CtsegError("no DICOM image files in this folder", path)
        if len(series) > 1 and args.series is None:
            listing = "\n".join(f"  {s}" for s in series)
            raise CtsegError(f"{len(series)} DICOM series in this folder; choose one with --series UID:\n{listing}",
                             path)
        return read_dicom_series(path, args.series)
    if args.series is not None:
        raise CtsegError("--series applies to a DICOM folder only", path)
    return read_volume(path)


def _looks_like_mr(volume) -> str | None:
    """A reason why the intensities cannot be CT in HU (no negative values, or a tiny range), else None."""
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if lo >= 0:
        return f"no negative intensities (range {lo:g}..{hi:g}): MR, or CT without rescale to HU"
    if hi - lo < 200:
        return f"intensity range {lo:g}..{hi:g} is far too narrow for CT (normalised data?)"
    return None


def run(args: argparse.Namespace) -> int:
    from ctseg.config import atomic_write_text
    from ctseg.evaluate.measure import measure_structures
    from ctseg.io import check_hu_plausibility, write_volume
    from ctseg.predict import predict_volume, write_probabilities
    from ctseg.train.distributed import resolve_device
    from ctseg.train.trainer import load_trained

    console = Console(stderr=True)
    out_type = args.output_type
    name = args.output.name.lower()
    if out_type == "nifti" and not name.endswith(_NIFTI_LIKE):
        raise CtsegError(f"output type nifti needs one of {', '.join(_NIFTI_LIKE)} (or choose --output-type)",
                         args.output)
    if out_type != "nifti":
        if not args.input.is_dir():
            raise CtsegError(f"--output-type {out_type} references the source DICOM series: the input must be "
                             "a DICOM folder", args.input)
        if not name.endswith(".dcm"):
            raise CtsegError(f"--output-type {out_type} writes a DICOM file: use a .dcm name", args.output)
    outputs = [args.output] + [p for p in (args.probabilities, args.stats) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise CtsegError("output, --probabilities and --stats must be different files")
    for p in outputs:
        _check_output(p, args.overwrite)
    if args.input.resolve() in {p.resolve() for p in outputs}:
        raise CtsegError("output would overwrite the input", args.input)

    device = resolve_device(args.device)
    models = [load_trained(run_dir, device) for run_dir in args.model]
    volume = _read_input(args)
    for warning in check_hu_plausibility(volume):
        console.print(f"[yellow]warning:[/] {escape(str(args.input))}: {escape(str(warning))}", highlight=False)
    reason = _looks_like_mr(volume)
    if reason and not args.force:
        raise CtsegError(f"does not look like CT in Hounsfield units: {reason}. Pass --force to segment anyway",
                         args.input)

    result = predict_volume(volume, models, device=device, return_probabilities=args.probabilities is not None,
                            batch_size=args.batch_size, overlap=args.overlap, progress=not args.no_progress)
    if out_type == "nifti":
        write_volume(result.label, args.output)
    elif out_type == "dicom-seg":
        from ctseg.export import write_dicom_seg

        write_dicom_seg(result.label, args.input, args.output, result.classes, args.series)
    else:
        from ctseg.export import write_rtstruct

        write_rtstruct(result.label, args.input, args.output, result.classes, args.series)
    if args.probabilities is not None:
        write_probabilities(result, args.probabilities)
    stats = measure_structures(result.label, volume, result.classes)
    if args.stats is not None:
        report = {"input": str(args.input), "models": [str(m) for m in args.model],
                  "shape_zyx": list(volume.shape), "spacing_zyx_mm": list(volume.spacing),
                  "classes": {str(k): v for k, v in result.classes.items()},
                  "ensemble_agreement": result.agreement, "structures": stats}
        atomic_write_text(args.stats, json.dumps(report, indent=1))

    table = Table(title=f"{escape(str(args.output))} ({out_type})")
    for col in ("structure", "volume mL", "axial diameter mm", "components", "mean HU", "cut off"):
        table.add_column(col, justify="left" if col == "structure" else "right")
    for struct, m in stats.items():
        if not m["present"]:
            table.add_row(struct, "0", "-", "0", "-", "-")
            continue
        table.add_row(struct, f"{m['volume_ml']:.1f}", f"{m['largest_axial_diameter_mm']:.1f}",
                      str(m["n_components"]), f"{m['mean_hu']:.0f}", "yes" if m["touches_border"] else "no")
    out = Console()
    out.print(table)
    if result.agreement is not None:
        flag = "[yellow]low: check this volume[/]" if result.agreement < 0.8 else "ok"
        out.print(f"ensemble agreement (mean pairwise Dice of {len(models)} members): {result.agreement:.3f} {flag}")
    out.print("times: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()), highlight=False)
    return 0
