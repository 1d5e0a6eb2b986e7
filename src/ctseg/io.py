"""CT volumes in physical space: `Volume`, reading and writing with geometry intact.

Conventions
-----------
- `Volume.array` is indexed (z, y, x) = (slice, row, column).
- `spacing` is (z, y, x) in mm, in array-axis order.
- `origin` is the physical position (LPS, mm, ITK/DICOM convention, order x, y, z) of voxel (0, 0, 0).
- `direction` is the 3x3 ITK direction matrix: column i is the physical unit vector of the ITK index
  axis i, where ITK index axes are (x, y, z) = array axes reversed. This matches SimpleITK exactly, so
  `Volume` <-> `SimpleITK.Image` conversion is lossless.
- Canonical orientation (`to_canonical`): array axis 0 is the axial slice axis and the direction is
  ~identity in LPS (x -> patient left, y -> posterior, z -> superior), reached by axis permutations
  and flips only; `from_canonical` undoes it exactly.

Formats: NIfTI (.nii, .nii.gz; read and written with nibabel so that qform/sform and their codes
round-trip), NRRD/MetaImage (.nrrd, .nhdr, .mha, .mhd; SimpleITK) and DICOM series (folders; see
`ctseg.dicom`: `read_dicom_series`, `read_dicom_files`, `list_dicom_series`).

Every reader enforces one definition of a usable geometry (`ctseg.geometry.usable_grid`): finite,
full-rank, orthogonal (within 0.06 degrees), spacing 0.01..50 mm per axis; anything else is refused
with a `CtsegError` naming the file. NIfTI whose qform and sform are both set but disagree is read
with the sform and a warning that says so (also in `meta["warnings"]`).
"""
from __future__ import annotations

import io
import itertools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from isal import igzip

from ctseg.dicom import read_dicom_series
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_path
from ctseg.geometry import usable_grid
from ctseg.volume import Volume, closest_permutation

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_READ_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SITK_WRITE_SUFFIXES = (".nrrd", ".mha")
#: Files `read_volume` reads and `write_volume` writes (NIfTI first: ".nii.gz" before ".nii" when matching).
READ_SUFFIXES = NIFTI_SUFFIXES + SITK_READ_SUFFIXES
WRITE_SUFFIXES = NIFTI_SUFFIXES + SITK_WRITE_SUFFIXES
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_sitk(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(volume.spacing[::-1])
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(volume.direction.flatten()))
    return image


def from_sitk(image: sitk.Image, **meta: Any) -> Volume:
    if image.GetDimension() != 3:
        raise CtsegError(f"expected a 3D image, got {image.GetDimension()}D of size {image.GetSize()}", meta.get("path"))
    return Volume(
        array=sitk.GetArrayFromImage(image),
        spacing=tuple(image.GetSpacing())[::-1],
        origin=tuple(image.GetOrigin()),
        direction=np.array(image.GetDirection()).reshape(3, 3),
        meta=dict(meta),
    )


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _check_volume(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes beyond 3 and refuse 2D images, non-finite voxels and voxels that float32
    (the type every computation casts to) cannot hold."""
    if array.dtype.kind not in "biuf":
        raise CtsegError(f"expected scalar grey values, got voxels of type {array.dtype} (RGB or complex image?)",
                         path)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise CtsegError(f"expected a 3D volume, got an image of shape {array.shape} "
                         f"({'2D' if array.ndim < 3 else f'{array.ndim}D'})", path)
    if 1 in array.shape:
        raise CtsegError(f"expected a 3D volume, got a single slice of shape {array.shape}", path)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = np.count_nonzero(~np.isfinite(array))
        raise CtsegError(f"{bad} voxels are NaN or infinite", path)
    if array.dtype.kind == "f" and array.dtype.itemsize > 4 and array.size:
        limit = float(np.finfo(np.float32).max)
        if max(float(array.max()), -float(array.min())) > limit:
            bad = np.count_nonzero(array > limit) + np.count_nonzero(array < -limit)
            raise CtsegError(f"{bad} voxels are beyond the float32 range (|value| > {limit:.3g}): they would "
                             "become infinite", path)
    return array


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI / NRRD / MetaImage file or a DICOM series folder into a `Volume`.

    The array keeps the file's voxel order and dtype (scaled NIfTI data become float32);
    no reorientation happens here (see `to_canonical`). Raises `CtsegError` naming the file for
    missing, unreadable, truncated, 2D or non-finite input.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.is_file():
        raise CtsegError("no such file or folder", path)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path)
    if suffix in SITK_READ_SUFFIXES:
        return _read_sitk(path)
    if suffix == ".dcm":
        raise CtsegError("a single DICOM file: pass the folder of the series", path)
    raise CtsegError(f"unsupported file type {suffix!r} (expected {READ_SUFFIXES} "
                     "or a DICOM folder)", path)


def _load_nifti(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """nibabel image with its data in memory. .nii.gz is inflated with ISA-L (igzip), about 2.5x faster
    than nibabel's streaming gzip (benchmarks/bench_io.py); unscaled data are inflated straight into
    the array (`_inflate_unscaled`), so reading holds one copy of the voxels, not two."""
    if _suffix(path) != ".nii.gz":
        image = nib.load(str(path), mmap=False)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise CtsegError(f"not a NIfTI image (nibabel reads a {type(image).__name__})", path)
        return image
    with igzip.open(path, "rb") as stream:
        first = stream.read(4)
        nifti2 = 540 in (int.from_bytes(first, "little"), int.from_bytes(first, "big"))
        klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        header_bytes = first + stream.read(540 - 4 if nifti2 else 348 - 4)
        header = klass.header_class.from_fileobj(io.BytesIO(header_bytes + b"\0" * 4), check=True)
        offset = int(header["vox_offset"])
        inflated = _inflate_unscaled(stream, klass, header, len(header_bytes), offset)
        if inflated is not None:
            return inflated
    return klass.from_bytes(igzip.decompress(path.read_bytes()))


def _inflate_unscaled(stream: io.BufferedIOBase, klass: type[nib.Nifti1Image] | type[nib.Nifti2Image],
                      header: nib.Nifti1Header, position: int, offset: int) -> nib.Nifti1Image | nib.Nifti2Image | None:
    """The image with its voxels read from `stream` into one Fortran-ordered array, or None when the
    file needs nibabel's general path (scaled data, extensions, a data offset inside the header)."""
    slope, inter = header.get_slope_inter()
    if (slope is not None and (slope, inter) != (1.0, 0.0)) or offset < position or offset - position > 4:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        if not np.isfinite(header.get_best_affine()).all():
            return None  # nibabel's own path keeps a non-finite affine for the geometry check to refuse
    if stream.read(offset - position) not in (b"", b"\0" * (offset - position)):
        return None  # extensions
    array = np.empty(header.get_data_shape(), dtype=header.get_data_dtype(), order="F")
    buffer = memoryview(array.T).cast("B")  # array.T is C-contiguous over the same bytes
    filled = 0
    while filled < buffer.nbytes:
        n = stream.readinto(buffer[filled:filled + (16 << 20)])  # gzip readers inflate into a temporary of this size
        if not n:
            raise EOFError(f"file ends after {filled} of {buffer.nbytes} data bytes")
        filled += n
    header = header.copy()
    header.set_slope_inter(slope, inter)  # as nibabel leaves them on a file it read
    return klass(array, header.get_best_affine(), header=header)


def _read_nifti(path: Path) -> Volume:
    try:
        img = _load_nifti(path)
        slope, inter = img.header.get_slope_inter()
        data = np.asanyarray(img.dataobj)
        if slope is not None and data.dtype == np.float64 and img.get_data_dtype() != np.float64:
            data = data.astype(np.float32)
    except CtsegError:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt / truncated files
        raise CtsegError(f"cannot read NIfTI ({type(exc).__name__}: {exc})", path) from exc
    data = _check_volume(data, path)
    _check_voxel_size_known(img, path)
    warnings = _nifti_form_warnings(img, path)
    with np.errstate(invalid="ignore", over="ignore"):
        affine_lps = _LPS_FROM_RAS @ img.affine
    if not np.isfinite(affine_lps[:3, 3]).all():
        raise CtsegError(f"the affine's origin contains NaN or infinite values: {img.affine.tolist()}", path)
    spacing_xyz, direction = usable_grid(affine_lps[:3, :3], path, "NIfTI affine")
    return Volume(
        array=data.T,  # (i, j, k) = ITK (x, y, z) -> (z, y, x); nibabel data are Fortran-ordered: .T is C-contiguous
        spacing=tuple(spacing_xyz[::-1]),
        origin=tuple(affine_lps[:3, 3]),
        direction=direction,
        meta={"path": str(path), "nifti_header": img.header.copy(), "warnings": warnings},
    )


def _check_voxel_size_known(img: nib.Nifti1Image | nib.Nifti2Image, path: Path) -> None:
    """Refuse a NIfTI whose only geometry, pixdim, has a zero voxel size: nibabel reads it as 1 mm (a volume
    of 0.8 mm voxels would come out in the wrong size without a word)."""
    header = img.header
    if int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0:
        return
    opener = igzip.open if _suffix(path) == ".nii.gz" else open
    with opener(path, "rb") as stream:
        raw = stream.read(544)
    raw_header = type(header).from_fileobj(io.BytesIO(raw.ljust(544, b"\0")), check=False)
    pixdim = [float(v) for v in raw_header["pixdim"][1:4]]
    if 0.0 in pixdim:
        raise CtsegError(f"voxel size (pixdim) {pixdim} has a zero and neither sform nor qform is set: the voxel "
                         "size is unknown; set pixdim or an sform", path)


def _nifti_form_warnings(img: nib.Nifti1Image | nib.Nifti2Image, path: Path) -> list[str]:
    """A warning (logged and returned) when qform and sform are both set and place voxels differently.

    The affine used is nibabel's: the sform when its code is > 0, else the qform; the warning says
    which, and by how much the two place the volume's corners apart, so that a user can fix the other.
    """
    header = img.header
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode <= 0 or scode <= 0:
        return []
    with np.errstate(invalid="ignore"):
        qform, sform = header.get_qform(), header.get_sform()
    if np.isfinite(qform).all() and np.isfinite(sform).all() and np.allclose(qform, sform, atol=1e-3):
        return []
    corners = np.array([[*c, 1] for c in itertools.product(*[(0, n - 1) for n in img.shape[:3]])],
                       dtype=np.float64).T
    shift = float(np.abs(qform @ corners - sform @ corners).max()) if np.isfinite(qform).all() else float("nan")
    message = (f"qform (code {qcode}) and sform (code {scode}) disagree (voxel positions differ by up to "
               f"{shift:.2f} mm); using the sform, as nibabel does; fix the qform or set its code to 0")
    log.warning("%s: %s", path, message)
    return [message]


def _read_sitk(path: Path) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CtsegError(f"cannot read image ({str(exc).strip().splitlines()[-1]})", path) from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CtsegError(f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components", path)
    if image.GetDimension() != 3:
        raise CtsegError(f"expected a 3D volume, got a {image.GetDimension()}D image of size {image.GetSize()}",
                         path)
    usable_grid(np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing()), path,
                "image spacing / direction")
    vol = from_sitk(image, path=str(path))
    _check_volume(vol.array, path)
    return vol


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write `volume` with its geometry to .nii / .nii.gz / .nrrd / .mha, atomically (temp + rename).

    NIfTI: when `volume.meta["nifti_header"]` (set by `read_volume`) describes the same grid, it is
    reused, so qform/sform and their codes come back exactly; otherwise both forms are set from
    the geometry with code 1 (scanner). Boolean arrays are written as uint8.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise CtsegError(f"cannot write {suffix!r}: use one of {WRITE_SUFFIXES}", path)
    if volume.array.dtype == bool:
        volume = volume.with_array(volume.array.astype(np.uint8))
    with atomic_path(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            nib.save(_to_nifti(volume), str(tmp))
        else:
            sitk.WriteImage(to_sitk(volume), str(tmp), useCompression=True)
    return path


def _to_nifti(volume: Volume) -> nib.Nifti1Image:
    affine_ras = _LPS_FROM_RAS @ volume.affine_lps
    data = volume.array.T  # (z, y, x) -> (i, j, k)
    header = volume.meta.get("nifti_header")
    if isinstance(header, nib.Nifti1Header) and np.allclose(header.get_best_affine(), affine_ras, atol=1e-4) \
            and tuple(header.get_data_shape()[:3]) == data.shape:
        header = header.copy()
        header.set_data_shape(data.shape)
        if header.get_data_dtype() != data.dtype:
            header.set_data_dtype(data.dtype)
            header.set_slope_inter(None, None)
        return nib.Nifti1Image(data, header.get_best_affine(), header=header)
    img = nib.Nifti1Image(data, affine_ras)
    img.header.set_qform(affine_ras, code=1)
    img.header.set_sform(affine_ras, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


# ----------------------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class Reorientation:
    """How `to_canonical` moved the voxels, to undo it exactly with `from_canonical`.

    permutation[k]: the original ITK index axis (0=x, 1=y, 2=z) that became canonical ITK axis k;
    flips[k]: whether canonical axis k runs opposite to it. The original grid is kept so that the
    inverse restores spacing/origin/direction bit for bit.
    """

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    original_origin: tuple[float, float, float]
    original_direction: tuple[float, ...]

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        shape_xyz = self.original_shape[::-1]
        p0, p1, p2 = self.permutation
        return shape_xyz[p2], shape_xyz[p1], shape_xyz[p0]


def to_canonical(volume: Volume, copy: bool = True) -> tuple[Volume, Reorientation]:
    """Permute/flip axes (no interpolation) so that axis 0 is axial and direction ~ identity in LPS.

    Returns the canonical volume (same voxels, same physical positions) and the `Reorientation`
    that `from_canonical` inverts. Oblique volumes get the permutation of largest |direction| sum.
    copy=False: the canonical array is a strided view of `volume.array` (no memory; writes go
    through to it; may have negative strides, so copy slabs before `torch.from_numpy`).
    """
    d = volume.direction
    perm = closest_permutation(d)
    flips = (bool(d[0, perm[0]] < 0), bool(d[1, perm[1]] < 0), bool(d[2, perm[2]] < 0))
    shape_xyz = volume.shape[::-1]
    spacing_xyz = np.array(volume.spacing[::-1])
    new_direction = np.stack([d[:, perm[k]] * (-1.0 if flips[k] else 1.0) for k in range(3)], axis=1)
    corner = np.zeros(3)
    for k in range(3):
        if flips[k]:
            corner[perm[k]] = shape_xyz[perm[k]] - 1
    origin = np.asarray(volume.origin) + d @ (spacing_xyz * corner)
    reo = Reorientation(perm, flips, volume.shape, volume.spacing, volume.origin, tuple(d.flatten()))
    if reo.is_identity:
        return replace(volume, meta=dict(volume.meta)), reo
    array = _permute_flip(volume.array, perm, flips, copy)
    return Volume(array=array, spacing=tuple(spacing_xyz[list(perm)][::-1]), origin=tuple(origin),
                  direction=new_direction, slice_thickness=volume.slice_thickness, meta=dict(volume.meta)), reo


def _permute_flip(array_zyx: np.ndarray, perm: tuple[int, ...], flips: tuple[bool, ...], copy: bool = True
                  ) -> np.ndarray:
    """Array (z, y, x) -> canonical (z', y', x'): canonical ITK axis k <- original ITK axis perm[k]."""
    itk = array_zyx.transpose(2, 1, 0).transpose(perm)
    itk = itk[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.ascontiguousarray(itk.transpose(2, 1, 0)) if copy else itk.transpose(2, 1, 0)


def from_canonical(volume: Volume, reorientation: Reorientation) -> Volume:
    """Inverse of `to_canonical`: the original voxel order and geometry (exactly) for a canonical-grid volume."""
    reo = reorientation
    if volume.shape != reo.canonical_shape:
        raise ValueError(f"volume shape {volume.shape} is not the canonical shape {reo.canonical_shape}")
    spacing, origin = reo.original_spacing, reo.original_origin
    direction = np.array(reo.original_direction).reshape(3, 3)
    if reo.is_identity:
        return replace(volume, meta=dict(volume.meta), spacing=spacing, origin=origin, direction=direction)
    inverse = tuple(int(i) for i in np.argsort(reo.permutation))
    itk = volume.array.transpose(2, 1, 0)
    itk = itk[tuple(slice(None, None, -1) if f else slice(None) for f in reo.flips)].transpose(inverse)
    return Volume(array=np.ascontiguousarray(itk.transpose(2, 1, 0)), spacing=spacing, origin=origin,
                  direction=direction, slice_thickness=volume.slice_thickness, meta=dict(volume.meta))


# ---------------------------------------------------------------------------------------- resampling


def _physical_bounds(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box (mm) of the voxel extents (half a voxel beyond the centres)."""
    shape_xyz = np.array(volume.shape[::-1])
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape_xyz])))
    points = corners @ volume.affine_lps[:3, :3].T + volume.affine_lps[:3, 3]
    return points.min(axis=0), points.max(axis=0)


def resample_to(volume: Volume, reference: Volume, order: int = 0) -> Volume:
    """Resample `volume` onto `reference`'s grid by physical position (SimpleITK).

    order 0 = nearest neighbour (labels), 1 = linear, 3 = B-spline. Voxels outside `volume` become 0.
    Raises `CtsegError` when the two do not overlap in space.
    """
    if volume.same_geometry(reference):
        return replace(volume, meta=dict(volume.meta))
    lo_a, hi_a = _physical_bounds(volume)
    lo_b, hi_b = _physical_bounds(reference)
    overlap = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)
    if np.any(overlap <= 0):
        raise CtsegError(f"does not overlap the reference grid in space (bounds {lo_a.round(1).tolist()}.."
                         f"{hi_a.round(1).tolist()} mm vs {lo_b.round(1).tolist()}..{hi_b.round(1).tolist()} mm LPS)",
                         volume.meta.get("path"))
    interpolators = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}
    if order not in interpolators:
        raise ValueError(f"order must be one of {sorted(interpolators)}, got {order}")
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    out = sitk.Resample(to_sitk(volume.with_array(array)), to_sitk(reference), sitk.Transform(),
                        interpolators[order], 0.0)
    return Volume(array=sitk.GetArrayFromImage(out), spacing=reference.spacing, origin=reference.origin,
                  direction=reference.direction, slice_thickness=reference.slice_thickness,
                  meta=dict(volume.meta))


# ------------------------------------------------------------------------------------- plausibility


def check_hu_plausibility(volume: Volume, max_samples: int = 2_000_000) -> list[str]:
    """Warnings when the intensities do not look like CT Hounsfield units (empty list when they do).

    Checks: non-finite values; no negative values (raw stored values without rescale, MR, or
    normalised data); a range too narrow for CT; air (the low end, ignoring padding below -1500)
    far from -1000 HU (constant padding such as -2048 or -3024 ignored); values far above the CT range.
    """
    flat = volume.array.reshape(-1)
    step = max(1, flat.size // max_samples)
    sample = flat[::step].astype(np.float64)
    if not np.isfinite(sample).all():
        return ["NaN or infinite voxels"]
    lo, hi = float(sample.min()), float(sample.max())
    warnings = []
    if hi - lo < 200:
        warnings.append(f"intensity range {lo:g}..{hi:g} is too narrow for CT in HU (normalised data?)")
    if lo >= 0:
        warnings.append(f"no negative values (range {lo:g}..{hi:g}): not Hounsfield units "
                        "(stored values without RescaleIntercept, MR, or normalised data?); air should be -1000 HU")
    else:
        body = sample[sample != lo] if lo < -1500 else sample  # constant padding outside the scan circle
        air = float(np.percentile(body, 0.5)) if body.size else lo
        if air > -800:
            warnings.append(f"no air near -1000 HU (0.5th percentile {air:.0f} HU): not HU, or cropped to the body")
        elif air < -1200:
            warnings.append(f"air at {air:.0f} HU, far below -1000 HU: wrong rescale intercept?")
    if hi > 4000:
        warnings.append(f"maximum {hi:g} HU is above the CT range (metal, or not HU)")
    return warnings
