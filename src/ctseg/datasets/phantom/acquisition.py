"""The phantom's acquisition: scanner settings drawn per case, and rendering the anatomy into slices (partial volume, noise, PSF, streaks)."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ctseg.datasets.phantom.anatomy import _Anatomy
from ctseg.datasets.phantom.fields import _F32, _Block, _built, _Curve, _Grid, _u
from ctseg.datasets.phantom.organs import _Body

SIZES = {"full": 512, "small": 128}


@dataclass
class Acquisition:
    """Per-case scanner settings (all drawn from the case's generator)."""

    size: int                    # in-plane pixels
    pixel_spacing: float         # mm
    slice_thickness: float       # mm
    slice_spacing: float         # mm
    num_slices: int
    z_first: float               # patient z of the lowest slice centre, mm
    region: str                  # kidneys | liver | abdomen | chest-pelvis
    roll_deg: float
    table_shift_mm: tuple[float, float]
    noise_sigma: float           # HU
    hu_offset: float
    hu_gain: float
    streaks: bool
    storage: str                 # int16 | float32
    fov_padding: float | None    # HU outside the reconstruction circle (-2048, -3024) or None
    subsamples: int              # K sub-slices over the slice thickness
    psf_sigma_px: float


#: Acquisition fields `generate_case(acquisition=...)` may override (no other draw depends on them).
REACQUIRABLE = ("noise_sigma", "hu_offset", "hu_gain", "psf_sigma_px")

_THICKNESSES = ((0.5, 0.625, 0.75, 1.0, 1.25), (1.5, 2.0, 2.5, 3.0), (3.0, 4.0, 5.0))
_REGIONS = {"kidney": ("kidneys", "abdomen", "chest-pelvis"), "liver": ("liver", "abdomen", "chest-pelvis")}


def _draw_z(rng: np.random.Generator, task: str, regions: dict[str, tuple[float, float]],
            num_slices: int | None) -> tuple[str, float, float, int, float]:
    """(region, thickness, spacing, n, z_first) at full size."""
    thickness = float(rng.choice(_THICKNESSES[int(rng.choice(3, p=[0.3, 0.35, 0.35]))]))
    spacing = thickness if rng.random() < 0.75 else max(0.4, round(thickness * float(rng.choice([0.5, 0.6, 0.8])), 2))
    region = str(rng.choice(_REGIONS[task], p=[0.35, 0.45, 0.2]))
    lo, hi = regions[region]
    if region in ("kidneys", "liver"):
        lo, hi = lo - _u(rng, 5, 40), hi + _u(rng, 5, 40)
    centre = (lo + hi) / 2
    n = int((hi - lo) // spacing) + 1
    if num_slices is not None:
        n = num_slices
    n = int(np.clip(n, 20, 600)) if num_slices is None else n
    return region, thickness, spacing, n, centre - (n - 1) * spacing / 2


def _draw_acquisition(rng: np.random.Generator, size: str, body: _Body, in_plane: int | None) -> Acquisition:
    """The in-plane part of the acquisition and the noise/calibration draws (z is set by `_finish_z`)."""
    pixel_full = float(np.clip(2 * body.a * _u(rng, 1.0, 1.35) / 512, 0.6, 1.0))
    n = in_plane or SIZES[size]
    roll = float(np.clip(rng.normal(0, 4), -10, 10))
    shift = (_u(rng, -25, 25), _u(rng, -40, 20))
    noise_ref = _u(rng, 9, 20)
    acq = Acquisition(size=n, pixel_spacing=round(pixel_full * 512 / n, 4), slice_thickness=0.0, slice_spacing=0.0,
                      num_slices=0, z_first=0.0, region="", roll_deg=round(roll, 2),
                      table_shift_mm=(round(shift[0], 1), round(shift[1], 1)), noise_sigma=noise_ref,
                      hu_offset=round(_u(rng, -20, 20), 1), hu_gain=round(_u(rng, -0.05, 0.05), 4),
                      streaks=bool(rng.random() < 0.3), storage="int16" if rng.random() < 0.7 else "float32",
                      fov_padding=float(rng.choice([-2048.0, -3024.0])) if rng.random() < 0.15 else None,
                      subsamples=1, psf_sigma_px=round(_u(rng, 0.5, 0.8) * max(0.5, min(1.0, n / 512)), 3))
    return acq


def _finish_z(acq: Acquisition, rng: np.random.Generator, task: str, size: str, regions: dict[str, tuple[float, float]],
              num_slices: int | None, thickness_mm: float | None) -> None:
    region, thickness, spacing, n, z_first = _draw_z(rng, task, regions, None if size == "small" else num_slices)
    acq.noise_sigma = round(float(np.clip(acq.noise_sigma * math.sqrt(2.5 / thickness), 5, 35)), 2)
    if thickness_mm is not None:
        # explicit slice thickness: noise follows it (full-size equivalent for small), extent kept
        equivalent = thickness_mm / (4 if size == "small" else 1)
        acq.noise_sigma = round(float(np.clip(acq.noise_sigma * math.sqrt(thickness / equivalent), 5, 35)), 2)
        centre, extent = z_first + (n - 1) * spacing / 2, (n - 1) * spacing
        thickness = spacing = float(thickness_mm)
        n = num_slices if num_slices is not None else max(int(extent // spacing) + 1, 2)
        z_first = centre - (n - 1) * spacing / 2
    elif size == "small":
        # the full-size geometry coarsened: in-plane x4, along z by up to 4 while keeping >= 16 slices
        factor = float(np.clip((n - 1) / 15, 1, 4))
        extent = (n - 1) * spacing
        thickness, spacing = round(thickness * factor, 3), round(spacing * factor, 3)
        centre = z_first + extent / 2
        n = num_slices if num_slices is not None else int(round(extent / spacing)) + 1
        z_first = centre - (n - 1) * spacing / 2
    acq.region, acq.slice_thickness, acq.slice_spacing, acq.num_slices = region, thickness, spacing, n
    acq.z_first = round(float(z_first), 3)
    acq.subsamples = 1 if thickness < 1.5 else 3 if thickness < 4 else 5


def _streak_pattern(rng: np.random.Generator, grid: _Grid, centre: tuple[float, float]) -> np.ndarray:
    """(n, n) HU: thin dark (and some bright) lines through the spine, fading with distance."""
    sx = grid.rot @ np.asarray(centre) + grid.shift
    xx, yy = np.meshgrid(grid.xs - sx[0], grid.ys - sx[1])
    out = np.zeros(xx.shape, dtype=_F32)
    for _ in range(int(rng.integers(3, 8))):
        a = _u(rng, -0.45, 0.45) + (math.pi if rng.random() < 0.5 else 0)
        perp = -math.sin(a) * xx + math.cos(a) * yy
        along = math.cos(a) * xx + math.sin(a) * yy
        amp = _u(rng, 20, 60) * (-1 if rng.random() < 0.75 else 0.6)
        width = _u(rng, 1.0, 2.5) * grid.pixel
        out += (amp * np.exp(-0.5 * (perp / width) ** 2) * np.exp(-np.abs(along) / 160.0)).astype(_F32)
    return out


def _noise_gain(sigma_px: float) -> float:
    """Std of white unit noise after the in-plane Gaussian blur of `sigma_px` (exact, discrete kernel)."""
    impulse = np.zeros(41)
    impulse[20] = 1
    w = ndimage.gaussian_filter1d(impulse, sigma_px)
    return float((w ** 2).sum())


def _render(anatomy: _Anatomy, acq: Acquisition, grid: _Grid, noise_seed: int, streaks: np.ndarray | None,
            streak_curve: _Curve | None, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (z, y, x) in HU (float32, before storage rounding) and label (uint8)."""
    n, k = grid.n, acq.subsamples
    z_out = acq.z_first + acq.slice_spacing * np.arange(acq.num_slices)
    offsets = (np.arange(k) - (k - 1) / 2) * acq.slice_thickness / k
    image = np.empty((acq.num_slices, n, n), dtype=_F32)
    label = np.empty((acq.num_slices, n, n), dtype=np.uint8)
    per_block = max(1, 8 // k)
    gain = _noise_gain(acq.psf_sigma_px)
    white = acq.noise_sigma / gain
    yy, xx = np.meshgrid(grid.ys, grid.xs, indexing="ij")
    outside_fov = (np.hypot(yy, xx) > n * grid.pixel / 2) if acq.fov_padding is not None else None
    amp = np.clip(_built(streak_curve, "the streak curve")(z_out)[:, 0], 0, None) if streaks is not None else None

    def block(i0: int) -> None:
        i1 = min(i0 + per_block, acq.num_slices)
        z_fine = (z_out[i0:i1, None] + offsets[None]).reshape(-1)
        blk = _Block(grid, z_fine, air=-1000.0)
        for paint in anatomy.painters:
            paint(blk)
        hu = blk.hu.reshape(i1 - i0, k, n, n).mean(axis=1)
        label[i0:i1] = blk.lab.reshape(i1 - i0, k, n, n)[:, k // 2]
        hu *= _F32(1 + acq.hu_gain)
        hu += _F32(acq.hu_offset)
        if amp is not None and streaks is not None:  # both or neither
            hu += amp[i0:i1, None, None] * streaks[None]
        rng = np.random.default_rng([noise_seed, i0])
        hu += rng.standard_normal(hu.shape, dtype=_F32) * _F32(white)
        ndimage.gaussian_filter(hu, (0, acq.psf_sigma_px, acq.psf_sigma_px), output=hu, truncate=3.0)
        np.clip(hu, -1024, 3071, out=hu)
        if outside_fov is not None:
            hu[:, outside_fov] = acq.fov_padding
        image[i0:i1] = hu

    starts = range(0, acq.num_slices, per_block)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(block, starts))
    else:
        for i0 in starts:
            block(i0)
    return image, label
