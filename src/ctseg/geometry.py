"""Usable geometry: the one sanity check every volume reader applies (NIfTI, NRRD/MHA, DICOM).

A voxel grid is usable when its 3x3 voxel-to-world matrix M (column i = the physical step, in mm,
of ITK index axis i) is

- finite (no NaN / Inf in the sform, qform, pixdim, spacing or orientation);
- full rank (no zero-length or parallel axes);
- orthogonal: every pair of axis directions within `ORTHOGONAL_TOLERANCE` of perpendicular
  (|cos| <= 1e-3, about 0.06 degrees; rounding in headers stays well below). A sheared grid
  (gantry-tilted data written without tilt correction) is refused: spacing taken from the column
  lengths would overstate every voxel's volume (by 1 / cos(shear)), and no orthogonal grid holds
  the same voxels without resampling;
- of plausible spacing: every axis between `MIN_SPACING_MM` (0.01 mm) and `MAX_SPACING_MM` (50 mm).

Anything else raises `CtsegError` naming the file and the problem; nothing is repaired silently.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ctseg.errors import CtsegError

MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 50.0
ORTHOGONAL_TOLERANCE = 1e-3


def usable_grid(matrix: np.ndarray, path: str | Path | None, what: str = "voxel-to-world matrix"
                ) -> tuple[np.ndarray, np.ndarray]:
    """(spacing (3,) mm, direction (3, 3) unit columns) of a usable voxel-to-world matrix M (3, 3).

    M's column i is the physical step of ITK index axis i (x, y, z); spacing = column lengths,
    direction = M / spacing. Raises `CtsegError` (naming `path` and `what`) when M is not usable
    (see the module docstring).
    """
    m = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    if not np.isfinite(m).all():
        raise CtsegError(f"{what} contains NaN or infinite values: {m.round(4).tolist()}", path)
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing == 0):
        raise CtsegError(f"{what} has a zero-length axis (voxel size 0): {m.round(4).tolist()}", path)
    direction = m / spacing
    singular = np.linalg.svd(direction, compute_uv=False)
    if singular.min() < 1e-6:
        raise CtsegError(f"{what} is rank-deficient (two axes parallel): {m.round(4).tolist()}", path)
    cosines = np.abs(direction.T @ direction - np.eye(3))
    if cosines.max() > ORTHOGONAL_TOLERANCE:
        angle = float(np.degrees(np.arcsin(min(1.0, cosines.max()))))
        raise CtsegError(f"{what} is sheared: its axes are {angle:.2f} degrees from orthogonal, so voxel sizes "
                         "and volumes would be wrong; resample it to an orthogonal grid first (e.g. dcm2niix "
                         "with gantry-tilt correction)", path)
    if np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise CtsegError(f"implausible voxel spacing {np.round(spacing, 5).tolist()} mm (x, y, z): expected "
                         f"{MIN_SPACING_MM}..{MAX_SPACING_MM} mm per axis", path)
    return spacing, direction
