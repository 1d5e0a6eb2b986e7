"""CTIA's settings (`augment.ctia`, paper Table 1): the section `ctseg.augment.ctia` registers with CTIA, kept in
a module of its own so that the transforms' module stays about transforms."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ctseg.config import Section


class CTIAConfig(Section):
    """CT-specific augmentation (paper Table 1; `ctseg.augment.ctia`).

    A batch is augmented with probability p_batch_2d / p_batch_3d; inside an augmented batch each
    transform is applied per training image (a slice in 2D, a volume in 3D) with its own probability,
    except slice skipping / interpolation, which act along z per stack. CWVRS is outside the batch gate:
    cwvrs_p of all images get it (paper: "20 % of data"). Intensities are z-scored units.
    """
    p_batch_2d: float = Field(0.9, ge=0, le=1, description="fraction of 2D batches augmented")
    p_batch_3d: float = Field(0.8, ge=0, le=1, description="fraction of 3D batches augmented")
    noise_p: float = Field(0.5, ge=0, le=1)
    noise_sigma: tuple[float, float] = Field((0.0, 0.1), description="std of the noise map, z-scored units")
    cwvrs_p: float = Field(0.2, ge=0, le=1, description="cluster-wise voxel intensity range shift (paper: 20 %)")
    cwvrs_clusters: Literal["preset", "kmeans"] = Field(
        "preset", description="preset: tissue ranges in HU (needs the intensity plan; else k-means); kmeans: per batch")
    cwvrs_n_clusters: int = Field(3, ge=2, description="k-means clusters")
    cwvrs_tissue_ranges_hu: dict[str, tuple[float, float]] = Field(default_factory=lambda: {
        "fat": (-200.0, -30.0), "soft_tissue": (-30.0, 150.0), "enhanced_or_bone": (150.0, 3000.0)})
    cwvrs_shift: float = Field(0.05, ge=0, le=0.5, description="max shift of a cluster, fraction of its width")
    cwvrs_stretch: float = Field(0.05, ge=0, le=0.5, description="max relative stretch of a cluster's width")
    z_mode: Literal["volume", "stack"] = Field(
        "volume", description="volume: slice skipping/interpolation simulate an acquisition on the whole cached "
        "volume when the stack is sampled (ctseg.augment.acquisition); stack: resample inside the sampled stack")
    slice_skip_p: float = Field(0.2, ge=0, le=1, description="per stack; exclusive with slice interpolation")
    slice_skip_max_factor: float = Field(2.0, gt=1, description="spacing factor f drawn from (1, max]")
    slice_interp_p: float = Field(0.2, ge=0, le=1, description="per stack")
    slice_interp_min_factor: float = Field(0.5, gt=0, lt=1, description="spacing factor f drawn from [min, 1)")
    rotation_p: float = Field(0.5, ge=0, le=1)
    rotation_max_deg: float = Field(16.0, ge=0, le=180)
    patch_p: float = Field(0.5, ge=0, le=1, description="random patch extraction (same size, random offset)")
    patch_max_shift: float = Field(0.1, ge=0, le=0.5, description="max patch offset, fraction of the in-plane size")
    random_window_p: float = Field(0.0, ge=0, le=1, description="extra, off by default: random window level/width")
    random_window_level: float = Field(0.1, ge=0, le=0.5, description="max level shift, fraction of window width")
    random_window_width: float = Field(0.2, ge=0, lt=1, description="max relative change of window width")

    @model_validator(mode="after")
    def _check(self) -> CTIAConfig:
        lo, hi = self.noise_sigma
        if not (0.0 <= lo <= hi):
            raise ValueError(f"noise_sigma must satisfy 0 <= low <= high, got {self.noise_sigma}")
        if self.slice_skip_p + self.slice_interp_p > 1.0:
            raise ValueError("slice_skip_p + slice_interp_p must be <= 1 (a stack gets at most one of them)")
        for name, (a, b) in self.cwvrs_tissue_ranges_hu.items():
            if a >= b:
                raise ValueError(f"cwvrs_tissue_ranges_hu {name!r}: lower {a} must be < upper {b}")
        return self
