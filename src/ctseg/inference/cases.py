"""The cases of an input folder for `ctseg predict -i FOLDER -o OUT_DIR`.

- A dataset in a layout ctseg reads (KiTS19, CHAOS CT, nnU-Net raw with imagesTr/ and imagesTs/; see
  `ctseg.datasets`): every case of it, named by its case id.
- Any other folder: every NIfTI / NRRD / MHA file and every sub-folder (a DICOM series), named after the file
  without its suffix; when every image file ends in nnU-Net's channel suffix `_0000`, that is dropped too
  (`imagesTs/case_0000.nii.gz` -> `case`), as nnU-Net names its predictions.

Outputs are `<case id><suffix>` with the input's suffix where ctseg writes it (.nii.gz, .nii, .nrrd, .mha),
else .nii.gz. Two cases whose outputs would collide (`a.nii.gz` and a DICOM folder `a/`, or names differing
only in case) are refused before anything is computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from ctseg.errors import CtsegError
from ctseg.io import READ_SUFFIXES, WRITE_SUFFIXES, Volume

CHANNEL = "_0000"


@dataclass(frozen=True)
class CaseInput:
    """One case to segment: `path` is what is read (file or DICOM folder), `read()` gives its image in the
    file's own geometry."""

    case_id: str
    path: Path
    output_name: str
    read: Callable[[], Volume]


def image_suffix(name: str) -> str | None:
    """The image suffix of a file name (case-insensitive), or None."""
    lower = name.lower()
    return next((s for s in READ_SUFFIXES if lower.endswith(s)), None)


def output_name(case_id: str, source: Path) -> str:
    """`case_id` + the source's suffix where ctseg can write it, else .nii.gz."""
    suffix = image_suffix(source.name) if source.is_file() else None
    return case_id + (suffix.lower() if suffix in WRITE_SUFFIXES else ".nii.gz")


def read_case_input(path: Path, series: str | None = None, in_folder: bool = False) -> Volume:
    """The image of a file, a DICOM folder or a KiTS19 case folder (`imaging.nii.gz`). Another folder of image
    files is not a DICOM series: the message says how to segment it (its own folder run; from inside a folder of
    cases, a run on that sub-folder)."""
    from ctseg.dicom import list_dicom_series, read_dicom_series
    from ctseg.io import read_volume

    if path.is_dir():
        if (path / "imaging.nii.gz").is_file():  # a KiTS19 case folder: its image
            return read_volume(path / "imaging.nii.gz")
        if any(image_suffix(p.name) for p in path.iterdir()) and not list_dicom_series(path):
            if in_folder:
                raise CtsegError("a sub-folder with image files, not a DICOM series: segment it on its own "
                                 f"(ctseg predict -i {path} -o OUT_DIR)", path)
            raise CtsegError("no DICOM series here, but image files: to segment a folder of cases give -o a "
                             "folder", path)
        return read_dicom_series(path, series)
    if series is not None:
        raise CtsegError("--series applies to a DICOM folder only", path)
    return read_volume(path)


def dataset_layout(folder: Path) -> str | None:
    """The dataset layout of `folder` ("kits19", "chaos", "nnunet"), or None when it is a plain folder."""
    from ctseg.datasets import LAYOUTS

    return next((name for name, cls in LAYOUTS.items() if cls.matches(folder)), None)


def _dataset_cases(folder: Path, layout: str) -> list[CaseInput]:
    from ctseg.datasets import open_dataset

    dataset = open_dataset(folder, layout)
    return [CaseInput(cid, dataset.image_path(cid), output_name(cid, dataset.image_path(cid)),
                      partial(dataset.read_image, cid)) for cid in dataset.case_ids()]


def _plain_cases(folder: Path) -> tuple[list[CaseInput], list[Path]]:
    paths: list[Path] = []
    others: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        (paths if path.is_dir() or image_suffix(path.name) else others).append(path)
    files = [p for p in paths if not p.is_dir()]
    strip = bool(files) and all(p.name[: -len(image_suffix(p.name) or "")].endswith(CHANNEL) for p in files)
    cases = []
    for path in paths:
        suffix = "" if path.is_dir() else image_suffix(path.name) or ""
        case_id = path.name[: len(path.name) - len(suffix)]
        if strip and suffix:
            case_id = case_id[: -len(CHANNEL)]
        cases.append(CaseInput(case_id, path, output_name(case_id, path),
                               partial(read_case_input, path, in_folder=True)))
    return cases, others


def find_cases(folder: Path) -> tuple[list[CaseInput], list[Path], str | None]:
    """(cases, other files that are skipped, dataset layout or None) of an input folder; CtsegError when two
    cases would write the same output."""
    layout = dataset_layout(folder)
    if layout is not None:
        cases, others = _dataset_cases(folder, layout), list[Path]()
    else:
        cases, others = _plain_cases(folder)
    seen: dict[str, CaseInput] = {}
    for case in cases:
        key = case.case_id.casefold()
        if key in seen:
            first = seen[key]
            raise CtsegError(f"{first.path.name}{'/' if first.path.is_dir() else ''} and {case.path.name}"
                             f"{'/' if case.path.is_dir() else ''} are both case {case.case_id!r}: their outputs "
                             f"({first.output_name}, {case.output_name}) and table rows would collide; rename one",
                             folder)
        seen[key] = case
    return cases, others, layout


def header_shape(path: Path) -> tuple[int, int, int] | None:
    """(z, y, x) of an image file from its header alone, or None (DICOM folders, unreadable headers)."""
    if not path.is_file():
        return None
    try:
        if (image_suffix(path.name) or "").startswith(".nii"):
            import nibabel as nib

            shape = nib.load(str(path)).shape  # type: ignore[attr-defined]
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = reader.GetSize()
    except Exception:  # noqa: BLE001 - a header we cannot read means "size unknown": the case reads when due
        return None
    if len(shape) < 3:
        return None
    x, y, z = (int(v) for v in shape[:3])
    return z, y, x
