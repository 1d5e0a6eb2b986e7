"""CT volumes in physical space: `Volume`, reading and writing with geometry intact.

Conventions
-----------
- `Volume.array` is indexed (z, y, x) = (slice, row, column).
- `spacing` is (z, y, x) in mm, in array-axis order.
- `origin` is the physical position (LPS, mm, ITK/DICOM convention, order x, y, z) of voxel (0, 0, 0).
- `direction` is the 3x3 ITK direction matrix: column i is the physical unit vector of the ITK index
  axis i, where ITK index axes are (x, y, z) = array axes reversed. This matches SimpleITK exactly, so
  `Volume` <-> `SimpleITK.Image` conversion is lossless.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ctseg.errors import CtsegError


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
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
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
