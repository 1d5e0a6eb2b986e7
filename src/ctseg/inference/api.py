"""Segment one file with trained models: the library behind `ctseg predict` (folders: `ctseg.inference.folder`).

`predict_file(input, output, models)` segments one CT (NIfTI / NRRD / MHA file or DICOM folder) and writes
its label (and optional probabilities and measurements) as one staged set: temporaries renamed together at
the end (`ctseg.staging`), so an error leaves none of them.

`predict_folder` (`ctseg.inference.folder`) segments every case of a folder the same way.

`models` is a loaded model (`ctseg.inference.load_models`), or model folder path(s) loaded on first need.
Output targets that are not regular files (a device such as /dev/full, a FIFO) are refused: the final
rename would replace them.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ctseg.errors import CtsegError
from ctseg.inference.cases import read_case_input
from ctseg.staging import StagedOutputs, sweep_stale_temporaries

if TYPE_CHECKING:
    import torch

    from ctseg.io import Volume
    from ctseg.inference.predict import Models, PredictionResult, ZContext

log = logging.getLogger(__name__)

OutputType = Literal["nifti", "dicom-seg", "rtstruct"]
CSV_COLUMNS = ("case", "structure", "present", "voxels", "volume_ml", "largest_axial_diameter_mm",
               "n_components", "mean_hu", "std_hu", "touches_border")


@dataclass
class PredictOptions:
    """How to predict: device, batch size (slices or 3D stacks per forward pass), 3D overlap and z-context
    (`ctseg.inference.predict.predict_volume`), output type, refusing non-CT unless `force`, replacing outputs."""

    device: str | torch.device = "auto"
    batch_size: int | None = None
    overlap: float = 0.5
    z_context: ZContext | None = None
    output_type: OutputType = "nifti"
    force: bool = False
    overwrite: bool = False
    progress: bool = False


@dataclass
class FileResult:
    """`predict_file`'s outcome: the prediction, the measurements (with `stats`) and warnings about the input."""

    output: Path
    result: PredictionResult
    stats: dict | None
    n_models: int
    warnings: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------------------- checks
def check_target(path: Path, overwrite: bool) -> None:
    """An output file path: not a folder, not a special file, not existing unless `overwrite`, parent writable."""
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise CtsegError("output is a folder; give a file name", path)
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("character device" if stat.S_ISCHR(mode) else "block device" if stat.S_ISBLK(mode)
                else "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "special file")
        raise CtsegError(f"output is a {kind}, not a regular file: outputs are written to a temporary file and "
                         "renamed into place, which would replace it; give a regular file path", path)
    if mode is not None and not overwrite:
        raise CtsegError("output exists; pass --overwrite to replace it", path)
    check_folder_writable(path.parent)


def check_folder_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CtsegError(f"cannot create the output folder ({err.strerror})", folder) from None
    if not folder.is_dir():
        raise CtsegError("output folder is a file", folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CtsegError("output folder is not writable", folder)


def looks_like_mr(volume: Volume) -> str | None:
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


def check_ct(volume: Volume, path: Path, force: bool) -> list[str]:
    """Warnings about implausible HU; CtsegError when the volume does not look like CT (unless `force`)."""
    from ctseg.io import check_hu_plausibility

    reason = looks_like_mr(volume)
    if reason and not force:
        raise CtsegError(f"does not look like CT in Hounsfield units: {reason}. Pass --force to segment anyway",
                         path)
    return [str(w) for w in check_hu_plausibility(volume)]


def stats_format(path: Path) -> Literal["json", "csv"]:
    """`--stats` of one file: .json (one report) or .csv (the folder table's rows for this case)."""
    name = path.name.lower()
    if name.endswith(".json"):
        return "json"
    if name.endswith(".csv"):
        return "csv"
    raise CtsegError("--stats writes JSON (.json) or a CSV table (.csv): use one of these suffixes", path)


# ------------------------------------------------------------------------------------------- helpers
def _models(models: object, device: str | torch.device) -> Models:
    from ctseg.inference.models import load_models

    if isinstance(models, (str, Path)):
        return load_models([models], device)
    if isinstance(models, (list, tuple)) and models and all(isinstance(m, (str, Path)) for m in models):
        return load_models(list(models), device)
    return models  # type: ignore[return-value]


def output_classes(models: Models) -> dict[int, str]:
    """The label values the models write -> names."""
    from ctseg.inference.predict import StackedModel, check_members, flat_models

    ds_classes, out = check_members(flat_models(models))
    return ds_classes if isinstance(models, StackedModel) else out


def _model_names(models: Models) -> list[str]:
    from ctseg.inference.predict import StackedModel, flat_models

    if isinstance(models, StackedModel):
        return [str(models.source)]
    return [str(getattr(m, "run_dir", "")) for m in flat_models(models)]


def _check_memory(volume: Volume, models: Models, device: torch.device, batch_size: int | None, path: Path,
                  probabilities: bool) -> None:
    from ctseg.resources import check_memory

    check_memory(estimate_bytes(models, volume.shape, batch_size, probabilities), device,
                 f"segmenting this {'x'.join(map(str, volume.shape))} volume",
                 "--batch-size, or use fewer --model folders" + (" or drop --probabilities" if probabilities else ""),
                 path)


def estimate_bytes(models: Models, shape: tuple[int, ...], batch_size: int | None, probabilities: bool = False
                   ) -> float:
    """Estimated peak bytes of segmenting a (z, y, x) volume, the input itself not included."""
    from ctseg.inference.predict import StackedModel, flat_models
    from ctseg.resources import inference_bytes

    flat = flat_models(models)
    n_classes = max(len(m.classes) for m in flat)
    extra = 0.0
    if isinstance(models, StackedModel):  # the members' concatenated maps at network resolution
        s = float(flat[0].cfg.preprocess.in_plane_size)
        extra = 4.0 * shape[0] * s * s * sum(max(len(m.classes) for m in g) for g in models.members)
    z, y, x = (int(v) for v in shape[:3])
    return inference_bytes(flat[0].cfg, n_classes, len(flat), (z, y, x), batch_size, probabilities) + extra


def _stats_report(input_path: Path, models: Models, volume: Volume, result: PredictionResult, stats: dict) -> dict:
    return {"input": str(input_path), "models": _model_names(models), "shape_zyx": list(volume.shape),
            "spacing_zyx_mm": list(volume.spacing), "classes": {str(k): v for k, v in result.classes.items()},
            "ensemble_agreement": result.agreement, "structures": stats}


def csv_rows(case_id: str, stats: dict) -> list[dict]:
    return [{"case": case_id, "structure": name, **{k: m.get(k, "") for k in CSV_COLUMNS[2:]}}
            for name, m in stats.items()]


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_label(staged: StagedOutputs, output: Path, result: PredictionResult, input_path: Path,
                 output_type: OutputType, series: str | None) -> None:
    from ctseg.io import write_volume

    if output_type == "nifti":
        staged.write(output, lambda tmp: write_volume(result.label, tmp))
    elif output_type == "dicom-seg":
        from ctseg.export import write_dicom_seg

        staged.write(output, lambda tmp: write_dicom_seg(result.label, input_path, tmp, result.classes, series))
    else:
        from ctseg.export import write_rtstruct

        staged.write(output, lambda tmp: write_rtstruct(result.label, input_path, tmp, result.classes, series))


# ---------------------------------------------------------------------------------------------- file
def check_file_options(input: Path, output: Path, options: PredictOptions, probabilities: Path | None,
                       stats: Path | None) -> None:
    """Every suffix and output path of a one-case run, before anything is computed."""
    from ctseg.inference.cases import dataset_layout
    from ctseg.io import NIFTI_SUFFIXES, WRITE_SUFFIXES

    name = output.name.lower()
    if options.output_type == "nifti" and not name.endswith(WRITE_SUFFIXES):
        raise CtsegError(f"output type nifti needs one of {', '.join(WRITE_SUFFIXES)} (or choose --output-type)",
                         output)
    if options.output_type != "nifti":
        if not input.is_dir():
            raise CtsegError(f"--output-type {options.output_type} references the source DICOM series: the input "
                             "must be a DICOM folder", input)
        if not name.endswith(".dcm"):
            raise CtsegError(f"--output-type {options.output_type} writes a DICOM file: use a .dcm name", output)
    if probabilities is not None and not probabilities.name.lower().endswith(NIFTI_SUFFIXES):
        raise CtsegError("probability maps are written as NIfTI: use a .nii.gz or .nii name", probabilities)
    if not input.exists():
        raise CtsegError("no such file or folder", input)
    if input.is_dir():
        layout = dataset_layout(input)
        if layout is not None:
            raise CtsegError(f"this is a {layout} dataset, a folder of cases: to segment them give -o a folder",
                             input)
    outputs = [output] + [p for p in (probabilities, stats) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise CtsegError("output, --probabilities and --stats must be different files")
    if input.resolve() in {p.resolve() for p in outputs}:
        raise CtsegError("output would overwrite the input", input)
    for p in outputs:
        check_target(p, options.overwrite)
    if stats is not None:
        stats_format(stats)


def _segment(volume: Volume, input_path: Path, models: Models, device: torch.device, options: PredictOptions,
             probabilities: bool, progress: bool) -> PredictionResult:
    from ctseg.inference.predict import flat_models, predict_volume

    _check_memory(volume, models, device, options.batch_size, input_path, probabilities)
    log.info("segmenting %s (%s voxels) with %d network(s)", input_path, "x".join(map(str, volume.shape)),
             len(flat_models(models)))
    return predict_volume(volume, models, device=device, return_probabilities=probabilities,
                          batch_size=options.batch_size, overlap=options.overlap, progress=progress,
                          z_context=options.z_context)


def predict_file(input: str | Path, output: str | Path, models: object, options: PredictOptions | None = None, *,
                 probabilities: str | Path | None = None, stats: str | Path | None = None,
                 series: str | None = None) -> FileResult:
    """Segment one CT (file or DICOM folder) into `output`; optionally write class `probabilities` (4D NIfTI)
    and measurements to `stats` (.json report, or .csv rows as `predict_folder` writes). models: loaded
    models or model folder path(s) (`ctseg.inference.models`). All outputs appear together or not at all."""
    from ctseg.evaluate.measure import measure_structures
    from ctseg.inference.predict import flat_models, write_probabilities
    from ctseg.runtime import resolve_device

    options = options or PredictOptions()
    input, output = Path(input), Path(output)
    prob_path = Path(probabilities) if probabilities is not None else None
    stats_path = Path(stats) if stats is not None else None
    check_file_options(input, output, options, prob_path, stats_path)
    for p in (output, prob_path, stats_path):
        if p is not None:
            sweep_stale_temporaries(p)
    device = resolve_device(options.device)
    loaded = _models(models, device)
    volume = read_case_input(input, series)
    warnings = check_ct(volume, input, options.force)
    result = _segment(volume, input, loaded, device, options, prob_path is not None, options.progress)
    measured = measure_structures(result.label, volume, result.classes) if stats_path is not None else None
    with StagedOutputs() as staged:
        _write_label(staged, output, result, input, options.output_type, series)
        if prob_path is not None:
            staged.write(prob_path, lambda tmp: write_probabilities(result, tmp))
        if stats_path is not None and measured is not None:
            if stats_format(stats_path) == "csv":
                text = csv_text(csv_rows(case_name(input), measured))
            else:
                text = json.dumps(_stats_report(input, loaded, volume, result, measured), indent=1)
            staged.write(stats_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        staged.commit()
    return FileResult(output, result, measured, len(flat_models(loaded)), warnings)


def case_name(path: Path) -> str:
    """A file's name without its image suffix (a folder's name)."""
    from ctseg.inference.cases import image_suffix

    suffix = "" if path.is_dir() else image_suffix(path.name) or ""
    return path.name[: len(path.name) - len(suffix)]


