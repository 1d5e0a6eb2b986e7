"""DICOM CT series <-> `Volume`.

Reading: files are grouped by SeriesInstanceUID (an empty UID is one series), sorted by
ImagePositionPatient projected on the slice normal, and the slice spacing comes from those
positions (never from SliceThickness, kept as `Volume.slice_thickness`). Missing slices are
detected (warning with their positions; filled by linear interpolation so the grid stays
regular, see `meta["interpolated_slices"]`), gantry tilt is refused, RescaleSlope/Intercept are
applied per slice, compressed transfer syntaxes are decoded by pydicom's plugins
(pylibjpeg-openjpeg for JPEG 2000, GDCM for JPEG lossless / JPEG-LS).

Volume geometry: direction columns are (row direction, column direction, slice normal) from
ImageOrientationPatient, origin = position of the first slice along the normal.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_path
from ctseg.geometry import usable_grid
from ctseg.volume import Volume

log = logging.getLogger(__name__)

_MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"  # DICOMDIR


@dataclass
class SeriesInfo:
    """One series found in a folder. series_uid is "" for files whose SeriesInstanceUID is empty."""

    series_uid: str
    files: list[Path] = field(default_factory=list)
    description: str = ""
    modality: str = ""
    series_number: int | None = None

    def __str__(self) -> str:
        return (f"{self.series_uid or '<empty SeriesInstanceUID>'} ({self.modality or '?'}, "
                f"#{self.series_number}, {len(self.files)} files, {self.description!r})")


def _dcmread(path: Path, headers_only: bool) -> Dataset | None:
    """The dataset of an image slice, or None for DICOMDIR, non-image objects and non-DICOM files. A file that
    declares itself DICOM (preamble and DICM) but holds no readable header is named: a warning when listing
    (`headers_only`), else a CtsegError."""
    if path.name.upper() == "DICOMDIR":
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=headers_only)
    except InvalidDicomError:  # no preamble: old files; accept only if it parses as an image slice
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=headers_only, force=True)
        except Exception:  # noqa: BLE001 - anything unparsable is a stray file
            return None
    except Exception as exc:  # noqa: BLE001
        if headers_only:
            log.warning("skipping unreadable file %s (%s)", path, exc)
            return None
        raise CtsegError(f"cannot read DICOM file ({type(exc).__name__}: {exc})", path) from exc
    meta = getattr(ds, "file_meta", None)
    if getattr(ds, "preamble", None) is not None and (meta is None or "TransferSyntaxUID" not in meta):
        message = "damaged: a DICOM preamble (DICM) but no readable DICOM header after it"
        if not headers_only:
            raise CtsegError(message, path)
        log.warning("%s: skipped: %s", path, message)
        return None
    if meta is not None and meta.get("MediaStorageSOPClassUID") == _MEDIA_DIRECTORY_STORAGE:
        return None
    try:
        if "Rows" not in ds:
            return None
        missing = [tag for tag in ("ImagePositionPatient", "ImageOrientationPatient") if tag not in ds]
    except Exception:  # noqa: BLE001 - force-parsed garbage
        return None
    if missing:
        if "PixelData" in ds or headers_only:
            log.warning("%s: skipped: an image without %s cannot be placed in a volume", path, " or ".join(missing))
        return None
    return ds


def _floats(ds: Dataset, tag: str, count: int, path: Path) -> np.ndarray:
    """The `count` numbers of a DS/IS attribute; CtsegError naming the file when missing or malformed."""
    try:
        values = ds[tag].value
        values = list(values) if isinstance(values, (list, tuple, MultiValue)) else [values]
        out = np.array([float(v) for v in values], dtype=np.float64)
    except KeyError:
        raise CtsegError(f"{tag} is missing", path) from None
    except (TypeError, ValueError) as exc:
        raise CtsegError(f"{tag} is malformed ({exc})", path) from None
    if out.shape != (count,) or not np.isfinite(out).all():
        raise CtsegError(f"{tag} must hold {count} finite numbers, got {ds[tag].value!r}", path)
    return out


def _orientation(iop: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unit row and column directions of an ImageOrientationPatient; refuses zero and non-orthogonal ones."""
    norms = np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])
    if min(norms) < 1e-6:
        raise CtsegError(f"ImageOrientationPatient {iop.tolist()} has a zero-length direction", path)
    row, col = iop[:3] / norms[0], iop[3:] / norms[1]
    cosine = abs(float(row @ col))
    if cosine > 1e-3:
        raise CtsegError(f"non-orthogonal orientation: ImageOrientationPatient row and column directions are "
                         f"{90 - np.degrees(np.arccos(min(cosine, 1.0))):.2f} degrees from perpendicular", path)
    return row, col


def list_dicom_series(folder: str | Path) -> list[SeriesInfo]:
    """The image series under `folder` (recursive), ignoring DICOMDIR and non-DICOM files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CtsegError("no such folder", folder)
    groups: dict[str, SeriesInfo] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        ds = _dcmread(path, headers_only=True)
        if ds is None:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        number = ds.get("SeriesNumber")
        info = groups.setdefault(uid, SeriesInfo(uid, [], str(ds.get("SeriesDescription", "") or ""),
                                                 str(ds.get("Modality", "") or ""),
                                                 int(number) if number not in (None, "") else None))
        info.files.append(path)
    return sorted(groups.values(), key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))


def choose_dicom_series(folder: str | Path, series_uid: str | None = None) -> SeriesInfo:
    """The one series of a folder, or the one `series_uid` names; the error lists the candidates."""
    folder = Path(folder)
    series = list_dicom_series(folder)
    if not series:
        raise CtsegError("no DICOM image files found", folder)
    listing = "\n".join(f"  {s}" for s in series)
    if series_uid is None:
        if len(series) > 1 and all(len(s.files) == 1 for s in series):
            return _one_slice_series_as_one(series, folder)
        if len(series) > 1:
            raise CtsegError(f"{len(series)} DICOM series found; choose one by SeriesInstanceUID "
                             f"(ctseg predict: --series UID):\n{listing}", folder)
        return series[0]
    matches = [s for s in series if s.series_uid == series_uid]
    if not matches:
        raise CtsegError(f"no series with SeriesInstanceUID {series_uid!r}; found:\n{listing}", folder)
    return matches[0]


def _one_slice_series_as_one(series: list[SeriesInfo], folder: Path) -> SeriesInfo:
    """Single-slice "series" (CHAOS gives every file its own SeriesInstanceUID) read as one volume, as the
    CHAOS dataset reader does; `read_dicom_files` then checks that they share orientation, size and pixel
    spacing and stack at regular positions, and refuses them (naming the file) otherwise."""
    log.warning("%s: %d single-slice series (one SeriesInstanceUID per file, as in CHAOS) are read as one "
                "volume", folder, len(series))
    files = sorted(f for s in series for f in s.files)
    return SeriesInfo("", files, f"{len(series)} single-slice series stacked", series[0].modality, None)


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Read one series from a folder; with several series, `series_uid` must say which."""
    folder = Path(folder)
    chosen = choose_dicom_series(folder, series_uid)
    volume = read_dicom_files(chosen.files)
    volume.meta.update(path=str(folder), series_uid=chosen.series_uid)
    return volume


def read_dicom_files(paths: Sequence[str | Path], spacing_tolerance: float = 0.03,
                     tilt_tolerance_deg: float = 0.1) -> Volume:
    """Read image slices file by file (series UIDs ignored, as CHAOS needs) into one volume.

    spacing_tolerance: allowed deviation of a position step from the slice spacing, as a fraction
    of it; larger steps that are whole multiples are missing slices (warned, filled), others an error.
    tilt_tolerance_deg: largest angle between the slice normal and the stacking direction.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise CtsegError("no DICOM files given")
    slices = []
    for path in files:
        if not path.is_file():
            raise CtsegError("no such file", path)
        ds = _dcmread(path, headers_only=False)
        if ds is None:
            raise CtsegError("not a DICOM image slice", path)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise CtsegError("multi-frame DICOM objects are not supported", path)
        slices.append(ds)
    if len(slices) < 2:
        raise CtsegError("a single DICOM slice: a 2D image where a volume is expected", files[0])

    iop = np.array([_floats(ds, "ImageOrientationPatient", 6, path) for ds, path in zip(slices, files)])
    bad = np.flatnonzero(np.abs(iop - iop[0]).max(axis=1) > 1e-4)
    if bad.size:
        raise CtsegError(f"slice orientation differs from {files[0].name} "
                         f"({iop[bad[0]].round(4).tolist()} vs {iop[0].round(4).tolist()})", files[bad[0]])
    row, col = _orientation(iop[0], files[0])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    pixel_spacings = [_floats(ds, "PixelSpacing", 2, path) for ds, path in zip(slices, files)]
    for ds, path, ps in zip(slices, files, pixel_spacings):
        if (int(ds.Rows), int(ds.Columns)) != (int(slices[0].Rows), int(slices[0].Columns)) or \
                not np.allclose(ps, pixel_spacings[0]):
            raise CtsegError(f"slice size {ds.Rows}x{ds.Columns} / pixel spacing {ps.tolist()} differs "
                             f"from {files[0].name}", path)
    positions = np.array([_floats(ds, "ImagePositionPatient", 3, path) for ds, path in zip(slices, files)])
    order = np.argsort(positions @ normal, kind="stable")
    slices, files, positions = [slices[i] for i in order], [files[i] for i in order], positions[order]
    along = positions @ normal
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        i = int(np.argmax(steps < 1e-3))
        raise CtsegError(f"two slices at the same position {along[i]:.3f} mm: {files[i].name} and "
                         f"{files[i + 1].name}", files[i].parent)

    extent = positions[-1] - positions[0]
    tilt = np.degrees(np.arctan2(np.linalg.norm(extent - (extent @ normal) * normal), extent @ normal))
    if tilt > tilt_tolerance_deg:
        raise CtsegError(f"gantry tilt: slices are stacked {tilt:.2f} degrees off their normal (sheared volume; "
                         "ImageOrientationPatient is orthogonal, ImagePositionPatient moves sideways); "
                         "correct the tilt first (e.g. dcm2niix)", files[0].parent)

    base = steps.min()
    multiples = np.round(steps / base).astype(int)
    spacing = float(steps[multiples == 1].mean())
    multiples = np.round(steps / spacing).astype(int)
    off = np.abs(steps - multiples * spacing) > spacing_tolerance * spacing
    if np.any(off):
        raise CtsegError(f"non-uniform slice spacing: steps {np.unique(steps.round(3)).tolist()} mm "
                         f"(spacing {spacing:.3f} mm)", files[0].parent)

    pixel_spacing = pixel_spacings[0]
    usable_grid(np.stack([row * pixel_spacing[1], col * pixel_spacing[0], normal * spacing], axis=1),
                files[0].parent, "DICOM PixelSpacing / slice spacing / ImageOrientationPatient")
    problems = []
    grid_index = np.concatenate([[0], np.cumsum(multiples)])
    for gap in np.flatnonzero(multiples > 1):
        msg = (f"missing slice(s): gap of {steps[gap]:.3f} mm between positions {along[gap]:.3f} and "
               f"{along[gap + 1]:.3f} mm (spacing {spacing:.3f} mm, {multiples[gap] - 1} slice(s) missing after "
               f"{files[gap].name}); filled by linear interpolation")
        log.warning("%s: %s", files[0].parent, msg)
        problems.append(msg)

    array = _pixels_hu(slices, files, grid_index)
    interpolated = sorted(set(range(array.shape[0])) - set(grid_index.tolist()))
    _fill_missing(array, grid_index)
    thickness = [float(_floats(ds, "SliceThickness", 1, path)[0]) for ds, path in zip(slices, files)
                 if ds.get("SliceThickness") not in (None, "")]
    slice_files: list[str | None] = [None] * array.shape[0]
    for k, path in zip(grid_index, files):
        slice_files[k] = str(path)
    first = slices[0]
    ts = first.file_meta.get("TransferSyntaxUID") if hasattr(first, "file_meta") else None
    return Volume(
        array=array,
        spacing=(spacing, pixel_spacing[0], pixel_spacing[1]),
        origin=tuple(positions[0]),
        direction=np.stack([row, col, normal], axis=1),
        slice_thickness=float(np.median(thickness)) if thickness else None,
        meta={"path": str(files[0].parent), "series_uid": str(first.get("SeriesInstanceUID", "") or ""),
              "modality": str(first.get("Modality", "") or ""), "transfer_syntax": str(ts or ""),
              "slice_files": slice_files,
              "interpolated_slices": interpolated, "warnings": problems},
    )


def _pixels_hu(slices: list[Dataset], paths: list[Path], grid_index: np.ndarray) -> np.ndarray:
    """Decode and rescale every slice into its grid row: int16 when exact, else float32."""
    rescale = _rescale_pairs(slices, paths)
    integral = all(s == 1.0 and i == int(i) for s, i in rescale)
    shape = (int(grid_index[-1]) + 1, int(slices[0].Rows), int(slices[0].Columns))
    out = np.zeros(shape, dtype=np.int32 if integral else np.float32)
    for k, ds, path, (slope, intercept) in zip(grid_index, slices, paths, rescale):
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise CtsegError(f"expected grey-level pixels, got SamplesPerPixel={ds.SamplesPerPixel}", path)
        try:
            stored = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoder plugins raise assorted types
            ts = ds.file_meta.get("TransferSyntaxUID", "?")
            raise CtsegError(f"cannot decode pixel data (transfer syntax {getattr(ts, 'name', ts)}): {exc}",
                             path) from exc
        out[k] = stored * slope + intercept if not integral else stored.astype(np.int32) + int(intercept)
    if integral and out.min() >= np.iinfo(np.int16).min and out.max() <= np.iinfo(np.int16).max:
        return out.astype(np.int16)
    return out.astype(np.float32)


def _rescale_pairs(slices: list[Dataset], paths: list[Path]) -> list[tuple[float, float]]:
    """(RescaleSlope, RescaleIntercept) per slice. Both absent everywhere means (1, 0); absent on some
    slices only, malformed, non-finite or a slope <= 0 is an error naming the file (it cannot be real:
    those slices would be read in another unit than the others)."""
    present = [tuple(ds.get(tag) not in (None, "") for tag in ("RescaleSlope", "RescaleIntercept")) for ds in slices]
    pairs = []
    for ds, path, (has_slope, has_intercept) in zip(slices, paths, present):
        for tag, has, others in (("RescaleSlope", has_slope, [p[0] for p in present]),
                                 ("RescaleIntercept", has_intercept, [p[1] for p in present])):
            if not has and any(others):
                raise CtsegError(f"{tag} is missing on this slice but present on {sum(others)} of {len(slices)} "
                                 "slices of the series: its values would not be in HU", path)
        slope = float(_floats(ds, "RescaleSlope", 1, path)[0]) if has_slope else 1.0
        intercept = float(_floats(ds, "RescaleIntercept", 1, path)[0]) if has_intercept else 0.0
        if slope <= 0:
            raise CtsegError(f"RescaleSlope {slope:g} must be > 0", path)
        pairs.append((slope, intercept))
    return pairs


def _fill_missing(array: np.ndarray, grid_index: np.ndarray) -> None:
    """Linear interpolation, in place, of the grid rows between consecutive real slices."""
    for a, b in zip(grid_index[:-1], grid_index[1:]):
        for k in range(a + 1, b):
            w = (k - a) / (b - a)
            value = (1 - w) * array[a].astype(np.float64) + w * array[b]
            array[k] = np.round(value) if array.dtype.kind == "i" else value


def write_dicom_series(volume: Volume, folder: str | Path, *, file_names: Sequence[str] | None = None,
                       series_uid: str | None = None, uid_per_file: bool = False,
                       rescale: tuple[float, float] | Sequence[tuple[float, float]] = (1.0, -1024.0),
                       transfer_syntax: str = ExplicitVRLittleEndian, patient_id: str = "anonymous",
                       series_description: str = "") -> list[Path]:
    """Write a HU volume (z, y, x) as a CT series, one int16 file per array slice, each atomically.

    Slice k lies at origin + k * spacing_z * direction[:, 2]; ImageOrientationPatient comes from
    direction columns 0 and 1. rescale: (slope, intercept), or one pair per slice; stored values are
    round((HU - intercept) / slope). transfer_syntax: any syntax pydicom can encode (uncompressed,
    RLE, JPEG-LS lossless, JPEG 2000 lossless). uid_per_file gives every file its own series UID
    (as CHAOS does). file_names default to "0000.dcm", "0001.dcm", ... Returns the paths in slice order.
    """
    folder = Path(folder)
    nz, ny, nx = volume.shape
    names = list(file_names) if file_names is not None else [f"{k:04d}.dcm" for k in range(nz)]
    if len(names) != nz:
        raise ValueError(f"{len(names)} file names for {nz} slices")
    pairs: list[tuple[float, float]]
    if np.ndim(rescale) == 1:  # one (slope, intercept) for every slice
        pairs = [cast("tuple[float, float]", tuple(rescale))] * nz
    else:
        pairs = [cast("tuple[float, float]", tuple(r)) for r in cast("Sequence[tuple[float, float]]", rescale)]
    if len(pairs) != nz:
        raise ValueError(f"{len(pairs)} rescale pairs for {nz} slices")
    folder.mkdir(parents=True, exist_ok=True)
    d, origin = volume.direction, np.asarray(volume.origin)
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    out = []
    for k in range(nz):
        slope, intercept = pairs[k]
        stored = np.round((volume.array[k].astype(np.float64) - intercept) / slope)
        if stored.min() < -32768 or stored.max() > 32767:
            raise CtsegError(f"slice {k}: HU range {volume.array[k].min()}..{volume.array[k].max()} does not fit "
                             f"int16 with slope {slope} and intercept {intercept}", folder / names[k])
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = study, frame
        ds.SeriesInstanceUID = generate_uid() if uid_per_file else series
        ds.Modality, ds.PatientID, ds.PatientName = "CT", patient_id, f"{patient_id}^"
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = series_description, 1, k + 1
        ds.ImageOrientationPatient = [DSfloat(v, auto_format=True) for v in (*d[:, 0], *d[:, 1])]
        position = origin + k * volume.spacing[0] * d[:, 2]
        ds.ImagePositionPatient = [DSfloat(v, auto_format=True) for v in position]
        ds.PixelSpacing = [DSfloat(v, auto_format=True) for v in volume.spacing[1:]]
        ds.SliceThickness = DSfloat(volume.slice_thickness or volume.spacing[0], auto_format=True)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = DSfloat(slope, auto_format=True), DSfloat(intercept, auto_format=True)
        ds.RescaleType = "HU"
        ds.PixelData = stored.astype("<i2").tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = folder / names[k]
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        out.append(path)
    return out
