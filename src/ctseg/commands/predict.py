"""`ctseg predict -i CT -o SEG --model RUN_DIR [RUN_DIR ...]`: segment one CT in its own geometry.

`ctseg predict -i DIR -o OUT_DIR --model ...` (an output without an image suffix) segments every
NIfTI / NRRD / MHA file and every DICOM series sub-folder of DIR, as nnU-Net and TotalSegmentator
do: the models are loaded once, the next case is read in a thread while the current one is
computed, a progress bar runs over the cases, existing outputs are skipped unless --overwrite,
a failing case is reported by name while the others go on (exit status 1 if any failed), and
`--stats FILE.csv` collects the measurements of every case in one table.

Every output path, suffix and option is checked before any inference. The label, --probabilities
and --stats of a case are written to temporaries and renamed together at the end (`ctseg.staging`),
so an error, Ctrl-C or SIGTERM leaves none of them; temporaries of killed runs are swept.
Measurements are computed only with --stats.

The label map overlays the input exactly (same size, spacing, origin, direction; NIfTI input keeps
its own orientation, affine and qform/sform codes). Several --model folders form an ensemble
(see `ctseg.predict`); their disagreement is reported. Single-slice input is refused by the reader:
a 2D model could segment it, but a one-slice "CT" is nearly always a scout / localiser or an
export mistake, and its measurements (volumes) would be meaningless.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctseg.commands._output import stdout_console
from ctseg.commands._types import overlap_fraction, positive_int
from ctseg.errors import CtsegError
from ctseg.staging import StagedOutputs, sweep_stale_temporaries

HELP = "segment a CT volume (NIfTI / NRRD / MHA file or DICOM folder) with trained model(s)"

log = logging.getLogger(__name__)

_NIFTI_LIKE = (".nii.gz", ".nii", ".nrrd", ".mha")
_IMAGE_INPUTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_CSV_COLUMNS = ("case", "structure", "present", "voxels", "volume_ml", "largest_axial_diameter_mm",
                "n_components", "mean_hu", "std_hu", "touches_border")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", type=Path, required=True,
                        help="CT volume: .nii.gz / .nii / .nrrd / .mha file or a DICOM series folder")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="label map to write (.nii.gz / .nrrd / .mha; .dcm for dicom-seg / rtstruct), or a "
                        "folder when the input is a folder of cases")
    parser.add_argument("--model", type=Path, nargs="+", required=True, metavar="RUN_DIR",
                        help="trained model folder(s) (run.json + model_best.pt); several = ensemble")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--probabilities", type=Path, metavar="FILE",
                        help="also write class probabilities (4D NIfTI on the input grid)")
    parser.add_argument("--stats", type=Path, metavar="FILE",
                        help="write measurements per structure (volume mL, axial diameter, components, HU) as JSON; "
                        "for a folder of cases, one CSV (.csv) with a row per case and structure")
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


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise CtsegError("output is a folder; give a file name", path)
    if path.exists() and not overwrite:
        raise CtsegError("output exists; pass --overwrite to replace it", path)
    _check_folder_writable(path.parent)


def _check_folder_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CtsegError(f"cannot create the output folder ({err.strerror})", folder) from None
    if not folder.is_dir():
        raise CtsegError("output folder is a file", folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CtsegError("output folder is not writable", folder)


def _is_folder_mode(args: argparse.Namespace) -> bool:
    """A folder of cases in, a folder out: the input is a folder and the output has no file suffix."""
    name = args.output.name.lower()
    return args.input.is_dir() and not name.endswith(_NIFTI_LIKE + (".dcm",)) and args.output_type == "nifti"


def _check_single_options(args: argparse.Namespace) -> None:
    """Every suffix and output path of a one-case run, before anything is computed."""
    from ctseg.io import NIFTI_SUFFIXES

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
    if args.probabilities is not None and not args.probabilities.name.lower().endswith(NIFTI_SUFFIXES):
        raise CtsegError("probability maps are written as NIfTI: use a .nii.gz or .nii name", args.probabilities)
    if not args.input.exists():
        raise CtsegError("no such file or folder", args.input)
    outputs = [args.output] + [p for p in (args.probabilities, args.stats) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise CtsegError("output, --probabilities and --stats must be different files")
    if args.input.resolve() in {p.resolve() for p in outputs}:
        raise CtsegError("output would overwrite the input", args.input)
    for p in outputs:
        _check_output(p, args.overwrite)


def _read_input(path: Path, series: str | None):
    from ctseg.io import list_dicom_series, read_dicom_series, read_volume

    if path.is_dir():
        if any(p.name.lower().endswith(_IMAGE_INPUTS) for p in path.iterdir()) and not list_dicom_series(path):
            raise CtsegError("no DICOM series here, but image files: to segment a folder of cases give -o a "
                             "folder", path)
        return read_dicom_series(path, series)
    if series is not None:
        raise CtsegError("--series applies to a DICOM folder only", path)
    return read_volume(path)


def _looks_like_mr(volume) -> str | None:
    """A reason why the volume cannot be CT in HU (a DICOM Modality other than CT, no negative values,
    or a tiny range), else None."""
    modality = str(volume.meta.get("modality") or "")
    if modality and modality.upper() != "CT":
        return f"DICOM Modality is {modality!r}, not CT"
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if lo >= 0:
        return f"no negative intensities (range {lo:g}..{hi:g}): MR, or CT without rescale to HU"
    if hi - lo < 200:
        return f"intensity range {lo:g}..{hi:g} is far too narrow for CT (normalised data?)"
    return None


def _check_ct(volume, path: Path, force: bool, console: Console) -> None:
    from ctseg.io import check_hu_plausibility

    for warning in check_hu_plausibility(volume):
        console.print(f"[yellow]warning:[/] {escape(str(path))}: {escape(str(warning))}", highlight=False,
                      soft_wrap=True)
    reason = _looks_like_mr(volume)
    if reason and not force:
        raise CtsegError(f"does not look like CT in Hounsfield units: {reason}. Pass --force to segment anyway",
                         path)


def _predict_case(volume, input_path: Path, output: Path, models, device, args, probabilities: Path | None,
                  stats_json: Path | None, measure: bool, progress: bool):
    """Segment one volume and write its outputs as one staged set. Returns (result, measurements or None)."""
    from ctseg.evaluate.measure import measure_structures
    from ctseg.io import write_volume
    from ctseg.predict import predict_volume, write_probabilities

    _check_inference_memory(volume, models, device, args, input_path, probabilities is not None)
    log.info("segmenting %s (%s voxels) with %d model(s)", input_path, "x".join(map(str, volume.shape)), len(models))
    result = predict_volume(volume, models, device=device, return_probabilities=probabilities is not None,
                            batch_size=args.batch_size, overlap=args.overlap, progress=progress,
                            z_context=args.z_context)
    stats = measure_structures(result.label, volume, result.classes) if measure else None
    with StagedOutputs() as staged:
        if args.output_type == "nifti":
            staged.write(output, lambda tmp: write_volume(result.label, tmp))
        elif args.output_type == "dicom-seg":
            from ctseg.export import write_dicom_seg

            staged.write(output, lambda tmp: write_dicom_seg(result.label, input_path, tmp, result.classes,
                                                             args.series))
        else:
            from ctseg.export import write_rtstruct

            staged.write(output, lambda tmp: write_rtstruct(result.label, input_path, tmp, result.classes,
                                                            args.series))
        if probabilities is not None:
            staged.write(probabilities, lambda tmp: write_probabilities(result, tmp))
        if stats_json is not None:
            report = {"input": str(input_path), "models": [str(m) for m in args.model],
                      "shape_zyx": list(volume.shape), "spacing_zyx_mm": list(volume.spacing),
                      "classes": {str(k): v for k, v in result.classes.items()},
                      "ensemble_agreement": result.agreement, "structures": stats}
            staged.write(stats_json, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
        staged.commit()
    return result, stats


def _check_inference_memory(volume, models, device, args, input_path: Path, probabilities: bool) -> None:
    from ctseg.resources import check_memory, inference_bytes

    cfg = models[0].cfg
    needed = inference_bytes(cfg, max(len(m.classes) for m in models), len(models), volume.shape, args.batch_size,
                             probabilities)
    check_memory(needed, device, f"segmenting this {'x'.join(map(str, volume.shape))} volume",
                 "--batch-size, or use fewer --model folders" + (" or drop --probabilities" if probabilities else ""),
                 input_path)


def _load_models(args: argparse.Namespace):
    from ctseg.train.distributed import resolve_device
    from ctseg.train.trainer import load_trained

    device = resolve_device(args.device)
    return device, [load_trained(run_dir, device) for run_dir in args.model]


def run(args: argparse.Namespace) -> int:
    if _is_folder_mode(args):
        return _run_folder(args)
    console = Console(stderr=True)
    _check_single_options(args)
    for p in [args.output, args.probabilities, args.stats]:
        if p is not None:
            sweep_stale_temporaries(p)
    device, models = _load_models(args)
    volume = _read_input(args.input, args.series)
    _check_ct(volume, args.input, args.force, console)
    result, stats = _predict_case(volume, args.input, args.output, models, device, args, args.probabilities,
                                  args.stats, measure=args.stats is not None, progress=not args.no_progress)
    out = stdout_console()
    if stats is not None:
        out.print(_stats_table(stats, f"{escape(str(args.output))} ({args.output_type})"))
    else:
        out.print(f"wrote {escape(str(args.output))} ({args.output_type}); measurements with --stats FILE",
                  highlight=False)
    if result.agreement is not None:
        flag = "[yellow]low: check this volume[/]" if result.agreement < 0.8 else "ok"
        out.print(f"ensemble agreement (mean pairwise Dice of {len(models)} members): {result.agreement:.3f} {flag}")
    out.print("times: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()), highlight=False)
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


# ------------------------------------------------------------------------------------------ folder mode


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_INPUTS:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _output_name(path: Path) -> str:
    """Same format as the input where ctseg can write it (.nii.gz / .nii / .nrrd / .mha), else .nii.gz."""
    name = path.name.lower()
    suffix = next((s for s in _NIFTI_LIKE if name.endswith(s)), ".nii.gz") if path.is_file() else ".nii.gz"
    return _case_name(path) + suffix


def find_cases(folder: Path) -> tuple[list[Path], list[Path]]:
    """(cases, other files) of a folder: image files by suffix and sub-folders (DICOM series), sorted by name;
    hidden files are ignored. The sub-folders are checked when they are read."""
    cases, others = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() or path.name.lower().endswith(_IMAGE_INPUTS):
            cases.append(path)
        else:
            others.append(path)
    return cases, others


def _check_folder_options(args: argparse.Namespace, cases: list[Path], others: list[Path]) -> None:
    if args.probabilities is not None:
        raise CtsegError("--probabilities applies to one input file; not supported for a folder of cases",
                         args.probabilities)
    if args.series is not None:
        raise CtsegError("--series applies to one DICOM folder; not supported for a folder of cases", args.input)
    if args.stats is not None:
        if not args.stats.name.lower().endswith(".csv"):
            raise CtsegError("for a folder of cases --stats writes one CSV table: use a .csv name", args.stats)
        _check_output(args.stats, args.overwrite)
    if args.output.exists() and not args.output.is_dir():
        raise CtsegError("output is a file; for a folder of cases give a folder", args.output)
    if args.output.resolve() == args.input.resolve():
        raise CtsegError("output folder is the input folder; give another folder", args.output)
    if not cases and others:
        from ctseg.io import list_dicom_series

        if list_dicom_series(args.input):
            raise CtsegError("this folder is one DICOM series, not a folder of cases: give -o a file name "
                             "(e.g. seg.nii.gz)", args.input)
    if not cases:
        listing = ", ".join(p.name for p in others[:5]) + (" ..." if len(others) > 5 else "")
        found = f"; found only {len(others)} other file(s): {listing}" if others else " (the folder is empty)"
        raise CtsegError(f"no NIfTI / NRRD / MHA files or DICOM series folders to segment{found}", args.input)
    _check_folder_writable(args.output)


def _read_case(path: Path):
    return _read_input(path, None)


def _run_folder(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    cases, others = find_cases(args.input)
    _check_folder_options(args, cases, others)
    for path in others:
        console.print(f"skipped {escape(str(path))}: not a NIfTI / NRRD / MHA file or a folder", highlight=False,
                      soft_wrap=True)
    outputs = {case: args.output / _output_name(case) for case in cases}
    for out in outputs.values():
        sweep_stale_temporaries(out)
    todo = [c for c in cases if args.overwrite or not outputs[c].exists()]
    status: dict[Path, tuple[str, str]] = {c: ("skipped", "output exists (--overwrite to redo)") for c in cases
                                           if c not in todo}
    rows: list[dict] = []
    if todo:
        device, models = _load_models(args)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, disable=args.no_progress, transient=True)
        with ThreadPoolExecutor(max_workers=1) as reader, progress as bar:
            task = bar.add_task("cases", total=len(todo))
            upcoming = reader.submit(_read_case, todo[0])
            for i, case in enumerate(todo):
                bar.update(task, description=escape(case.name))
                current = upcoming
                if i + 1 < len(todo):
                    upcoming = reader.submit(_read_case, todo[i + 1])  # reads while this case is computed
                try:
                    volume = current.result()
                    _check_ct(volume, case, args.force, console)
                    result, stats = _predict_case(volume, case, outputs[case], models, device, args, None, None,
                                                  measure=args.stats is not None, progress=False)
                    del volume
                except (CtsegError, OSError) as exc:
                    message = str(exc) if isinstance(exc, CtsegError) else f"{exc.filename}: {exc.strerror}"
                    status[case] = ("failed", message)
                    console.print(f"[bold red]failed:[/] {escape(case.name)}: {escape(message)}", highlight=False,
                                  soft_wrap=True)
                else:
                    status[case] = ("done", f"{outputs[case].name} ({sum(result.seconds.values()):.1f} s)")
                    rows += _csv_rows(case, stats) if stats is not None else []
                bar.advance(task)
    if args.stats is not None:
        _write_csv(args.stats, rows)
    return _summary(console, cases, status, args)


def _csv_rows(case: Path, stats: dict) -> list[dict]:
    return [{"case": _case_name(case), "structure": name, **{k: m.get(k, "") for k in _CSV_COLUMNS[2:]}}
            for name, m in stats.items()]


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    with StagedOutputs() as staged:
        staged.write(path, write)
        staged.commit()


def _summary(console: Console, cases: list[Path], status: dict, args: argparse.Namespace) -> int:
    counts = {s: sum(1 for v in status.values() if v[0] == s) for s in ("done", "skipped", "failed")}
    table = Table(title=f"{escape(str(args.input))} -> {escape(str(args.output))}")
    for col in ("case", "status", "detail"):
        table.add_column(col)
    for case in cases:
        state, detail = status[case]
        colour = {"done": "green", "skipped": "yellow", "failed": "red"}[state]
        table.add_row(escape(case.name), f"[{colour}]{state}[/]", escape(detail))
    out = stdout_console()
    out.print(table)
    out.print(f"{counts['done']} segmented, {counts['skipped']} skipped, {counts['failed']} failed"
              + (f"; measurements in {escape(str(args.stats))}" if args.stats is not None else ""), highlight=False)
    return 1 if counts["failed"] else 0
