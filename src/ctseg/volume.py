"""`Volume`: a 3D array with its geometry (conventions in `ctseg.io`, which re-exports it).

A module of its own below `ctseg.io` and `ctseg.dicom`, so that both build volumes without importing
each other's readers.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ctseg.errors import CtsegError


def closest_permutation(direction: np.ndarray) -> tuple[int, int, int]:
    """perm[k] = index axis best aligned with physical axis k (max total |component|; robust when oblique)."""
    weights = np.abs(direction)
    p = max(itertools.permutations(range(3)), key=lambda p: sum(weights[k, p[k]] for k in range(3)))
    return p[0], p[1], p[2]


def _triple(values: Any, what: str, path: Any) -> tuple[float, float, float]:
    """Three floats (a spacing or an origin), or CtsegError naming `path`."""
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise CtsegError(f"a 3D volume needs 3 {what} values, got {len(out)}", path)
    return out[0], out[1], out[2]


@dataclass
class Volume:
    """A 3D image or label map with its geometry.

    array: (z, y, x); spacing: (z, y, x) mm; origin: (x, y, z) LPS mm; direction: 3x3 (ITK order).
    slice_thickness: DICOM SliceThickness in mm when known (may differ from the slice spacing).
    meta: free-form provenance (source path, series UID, ...); never needed for geometry.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    slice_thickness: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise CtsegError(f"expected a 3D volume (z, y, x), got an array of shape {self.array.shape}",
                             self.meta.get("path"))
        self.spacing = _triple(self.spacing, "spacing", self.meta.get("path"))
        self.origin = _triple(self.origin, "origin", self.meta.get("path"))
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ITK indices (x, y, z, 1) to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction @ np.diag(self.spacing[::-1])
        a[:3, 3] = self.origin
        return a

    def slice_axis(self) -> int:
        """Array axis (0, 1 or 2 of (z, y, x)) closest to the patient's superior-inferior axis.

        Taken from the direction matrix as `to_canonical` does (0 for canonical volumes; 2 for a KiTS19
        NIfTI whose first nibabel axis is I-S, since the array holds nibabel's axes reversed).
        """
        return 2 - closest_permutation(self.direction)[2]

    def slice_spacing_mm(self) -> float:
        """Distance between slices (mm) along `slice_axis()`."""
        return self.spacing[self.slice_axis()]

    def slice_thickness_mm(self) -> float:
        """DICOM SliceThickness when known, else the slice spacing (mm)."""
        return self.slice_thickness if self.slice_thickness is not None else self.slice_spacing_mm()

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new voxels (same shape)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} != {self.array.shape}")
        return replace(self, array=array, meta=dict(self.meta))

    def same_geometry(self, other: "Volume", atol: float = 1e-4) -> bool:
        return (self.shape == other.shape
                and np.allclose(self.spacing, other.spacing, atol=atol)
                and np.allclose(self.origin, other.origin, atol=atol)
                and np.allclose(self.direction, other.direction, atol=atol))
