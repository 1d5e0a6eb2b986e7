"""Clinical output formats for a label map predicted on a DICOM series: DICOM-SEG and RTSTRUCT.

Both reference the input series' instances (SOP Instance UIDs, Frame of Reference), so a PACS or
a treatment-planning system shows them over the images they were computed from.

- `write_dicom_seg`: highdicom `Segmentation`, BINARY, one segment per non-background class with
  SNOMED CT coded concepts (kidney 64033007, liver 10200004, neoplasm 108369006; category
  "Anatomical Structure" 91723000 or "Morphologically Abnormal Structure" 49755003), algorithm
  type AUTOMATIC with the ctseg algorithm identification.
- `write_rtstruct`: rt-utils, one ROI (closed planar contours per slice) per non-background class.

The label map (any orientation, e.g. as `ctseg.dicom.read_dicom_series` returns it) is sampled onto
each source instance's own pixel grid through physical coordinates (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing), so files stored in any order, flipped rows or reversed
slice order come out right. Writes are atomic.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ctseg import __version__
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_path
from ctseg.io import Volume

log = logging.getLogger(__name__)

#: class name -> (segmented property category, segmented property type)
SEGMENT_CODES = {
    "kidney": (codes.SCT.AnatomicalStructure, codes.SCT.Kidney),
    "liver": (codes.SCT.AnatomicalStructure, codes.SCT.Liver),
    "tumour": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "neoplasm": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
}
_FALLBACK_CODE = (codes.SCT.Tissue, codes.SCT.Tissue)
_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "StudyID", "AccessionNumber", "ReferringPhysicianName")
_COLOURS = [(220, 60, 60), (60, 160, 230), (250, 200, 40), (90, 200, 90), (180, 90, 220)]


def source_series(folder: str | Path, series_uid: str | None = None) -> list[Dataset]:
    """The headers of the chosen series' instances (CtsegError for none / several without a choice)."""
    from ctseg.dicom import choose_dicom_series

    folder = Path(folder)
    if not folder.is_dir():
        raise CtsegError("DICOM-SEG / RTSTRUCT output needs the input DICOM series folder", folder)
    chosen = choose_dicom_series(folder, series_uid)
    datasets: list[Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in chosen.files]
    for ds, path in zip(datasets, chosen.files):
        for tag in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            if not str(ds.get(tag, "") or "").strip():
                raise CtsegError(f"{tag} is empty: a DICOM-SEG / RTSTRUCT must reference the source instances by "
                                 "UID, so this (over-)anonymised series cannot carry one; write NIfTI instead",
                                 path)
        for tag in _TYPE2_PATIENT_STUDY:  # anonymised series often drop these; the outputs copy them (may be empty)
            if tag not in ds:
                setattr(ds, tag, "")
    return datasets


def label_on_instance(label: Volume, ds: Dataset, tolerance: float = 0.05) -> np.ndarray:
    """The label map sampled (nearest voxel) on one source instance's pixel grid: (Rows, Columns).

    Raises CtsegError when the instance's pixels do not lie on voxel centres of `label`'s grid
    (within `tolerance` voxels): the label was made for another series.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    to_index = np.linalg.inv(label.affine_lps)
    origin = to_index @ np.append([float(v) for v in ds.ImagePositionPatient], 1.0)
    step_col = to_index[:3, :3] @ (row_dir * dc)  # index-space step when the column index grows
    step_row = to_index[:3, :3] @ (col_dir * dr)
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    xyz = origin[:3, None, None] + step_row[:, None, None] * i + step_col[:, None, None] * j
    rounded = np.rint(xyz)
    if np.abs(xyz - rounded).max() > tolerance:
        raise CtsegError(f"instance {ds.SOPInstanceUID} does not lie on the label map's voxel grid",
                         label.meta.get("path"))
    idx = rounded.astype(np.int64)
    shape_xyz = label.shape[::-1]
    if any(idx[k].min() < 0 or idx[k].max() >= shape_xyz[k] for k in range(3)):
        raise CtsegError(f"instance {ds.SOPInstanceUID} lies outside the label map", label.meta.get("path"))
    return label.array[idx[2], idx[1], idx[0]]


def _foreground_classes(classes: dict[int, str]) -> list[tuple[int, str]]:
    return [(int(k), str(v)) for k, v in sorted(classes.items()) if int(k) != 0]


def _atomic_save(ds: Dataset, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def write_dicom_seg(label: Volume, source_folder: str | Path, out_path: str | Path, classes: dict[int, str],
                    series_uid: str | None = None, series_description: str = "ctseg segmentation") -> Path:
    """Write `label` (integer map on the series' grid) as a BINARY DICOM-SEG referencing the series.

    classes: label value -> name (0 = background); every other class becomes one segment, numbered
    1..N in label order. Returns the written path.
    """
    import highdicom as hd

    sources = source_series(source_folder, series_uid)
    series = {str(ds.SeriesInstanceUID) for ds in sources}
    if len(series) > 1:
        raise CtsegError(f"a DICOM-SEG references one series, but these {len(sources)} slices carry {len(series)} "
                         "SeriesInstanceUIDs (one per file, as in CHAOS); use --output-type nifti", source_folder)
    fg = _foreground_classes(classes)
    if not fg:
        raise CtsegError("no foreground class to export")
    lut = np.zeros(int(max(label.array.max(), max(k for k, _ in fg))) + 1, dtype=np.uint8)
    for number, (value, _) in enumerate(fg, start=1):
        lut[value] = number
    frames = np.stack([lut[label_on_instance(label, ds)] for ds in sources])
    algorithm = hd.AlgorithmIdentificationSequence(name="ctseg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, (_, name) in enumerate(fg, start=1):
        category, prop = SEGMENT_CODES.get(name.lower(), _FALLBACK_CODE)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ctseg", manufacturer_model_name="ctseg",
            software_versions=__version__, device_serial_number="0", series_description=series_description)
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks of the source headers
        raise CtsegError(f"cannot make a DICOM-SEG of this series ({exc}); use --output-type nifti",
                         source_folder) from None
    return _atomic_save(seg, Path(out_path))


def write_rtstruct(label: Volume, source_folder: str | Path, out_path: str | Path, classes: dict[int, str],
                   series_uid: str | None = None, series_description: str = "ctseg contours") -> Path:
    """Write `label` as an RTSTRUCT (rt-utils) with one ROI per non-empty foreground class."""
    from rt_utils import ds_helper
    from rt_utils.image_helper import get_slice_position
    from rt_utils.rtstruct import RTStruct

    sources = sorted(source_series(source_folder, series_uid), key=get_slice_position)
    spacing = [float(v) for v in sources[0].PixelSpacing]
    if abs(spacing[0] - spacing[1]) > 1e-6 * max(spacing):
        # rt-utils scales the row direction by PixelSpacing[0] (the spacing *between rows*): contours
        # would be stretched on non-square pixels
        raise CtsegError(f"RTSTRUCT export needs square pixels, PixelSpacing is {spacing}; use --output-type "
                         "dicom-seg", source_folder)
    fg = _foreground_classes(classes)
    if not fg:
        raise CtsegError("no foreground class to export")
    planes = np.stack([label_on_instance(label, ds) for ds in sources], axis=-1)  # (Rows, Columns, n) as rt-utils
    rtstruct = RTStruct(sources, ds_helper.create_rtstruct_dataset(sources))
    rtstruct.set_series_description(series_description)
    for i, (value, name) in enumerate(fg):
        mask = planes == value
        if not mask.any():
            log.info("RTSTRUCT: %s is empty, no ROI written", name)
            continue
        rtstruct.add_roi(mask=mask, color=list(_COLOURS[i % len(_COLOURS)]), name=name)
    return _atomic_save(rtstruct.ds, Path(out_path))
