"""Acquisition-shift perturbations of a CT volume (HU) and its label, one physical axis at a time.

Every perturbation is a pure function of (image `Volume` in HU, label `Volume` on the same grid, severity)
plus, where noise is drawn, a `numpy.random.Generator` passed in. Geometry is never lost: a perturbed
volume carries the grid it was "acquired" on, and `Perturbed.score_on` says on which grid predictions are
scored (`"original"`: resample the prediction back by physical position; `"perturbed"`: against the
perturbed label). Nothing here shares code with `ctseg.augment.ctia` (the training transforms): the test
must not measure itself. See docs/STRESS.md for the physics and how each axis relates to a CTIA transform.

Axes (severity unit; the clean value first):

    thickness         slice thickness in mm (native, then thicker), box slice profile, scored on the original grid
    thickness-factor  slice thickness as a multiple of the native thickness (1 = clean)
    dose              total noise as a multiple k of the scan's own noise (1 = clean; dose ~ 1/k^2)
    dose-projection   the same k, noise made in the projection domain (radon, Poisson counts, FBP); slow
    hu-offset         added HU (0 = clean)
    hu-gain           HU multiplied by g around water (1 = clean)
    contrast          contrast-phase shift, fraction s of a delayed-phase enhancement pattern (0 = clean)
    rotation          in-plane patient rotation in degrees (0 = clean)
    pixel-spacing     in-plane pixel spacing in "512-matrix mm-equivalent" (0 = native = clean)

The phantom's axes are not perturbations of a volume but the case rendered again, so they are defined where
that is done, `ctseg.stress.phantom_reacquire`: phantom-dose / phantom-thickness (the phantom case re-rendered)
and the population shifts pop-habitus, pop-fov, pop-kidney-size, pop-tumour-size, pop-phase, pop-kernel (the
phantom case drawn from a shifted patient / scanner population, `ctseg.datasets.phantom.Population`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

import numpy as np
from scipy import ndimage

from ctseg.io import Volume
from ctseg.registry import STRESS_AXES

AIR_HU = -1000.0


class DegenerateSeverity(ValueError):
    """A severity that this volume cannot take (e.g. slices thicker than half its extent); skip it."""


@dataclass
class Perturbed:
    """A perturbed acquisition: image (HU, float32) and label on the perturbed grid; where to score."""

    image: Volume
    label: Volume
    score_on: Literal["original", "perturbed"] = "perturbed"


# ------------------------------------------------------------------------------------------- geometry
def in_plane_axes(volume: Volume) -> tuple[int, int]:
    """The two array axes other than the slice axis (`Volume.slice_axis`: from the direction matrix, as
    `to_canonical` takes it, not from array order)."""
    k = volume.slice_axis()
    a, b = (ax for ax in range(3) if ax != k)
    return a, b


def _with(volume: Volume, array: np.ndarray, spacing: Sequence[float] | np.ndarray | None = None,
          origin: Sequence[float] | np.ndarray | None = None, slice_thickness: float | None = None) -> Volume:
    return replace(volume, array=array, spacing=tuple(spacing) if spacing is not None else volume.spacing,
                   origin=tuple(origin) if origin is not None else volume.origin,
                   slice_thickness=slice_thickness if slice_thickness is not None else volume.slice_thickness,
                   meta=dict(volume.meta))


def _direction_of_array_axis(volume: Volume, axis: int) -> np.ndarray:
    """Physical unit vector (LPS) of array axis `axis`."""
    return volume.direction[:, 2 - axis]


# ------------------------------------------------------------------------------------- slice thickness
_CHUNK_BYTES = 64 * 2**20  # float64 work memory per chunk of a whole-volume perturbation


def _box_average_of_linear_interpolant(values: np.ndarray, spacing: float, lo: np.ndarray, hi: np.ndarray
                                       ) -> np.ndarray:
    """Exact mean of the piecewise-linear interpolant of `values` (n, a, b) at positions i * spacing over the
    intervals [lo_j, hi_j] (mm, same frame); constant beyond the end slices. Returns (len(lo), a, b) float32,
    computed in float64 a few rows of axis 1 at a time (each column is independent: ~64 MiB of work memory)."""
    n, rows = values.shape[0], values.shape[1]
    step = max(1, _CHUNK_BYTES // (8 * 3 * max(n, len(lo)) * int(np.prod(values.shape[2:], dtype=np.int64))))
    out = np.empty((len(lo), *values.shape[1:]), dtype=np.float32)
    for r0 in range(0, rows, step):
        out[:, r0:r0 + step] = _box_average_columns(values[:, r0:r0 + step], spacing, lo, hi)
    return out


def _box_average_columns(values: np.ndarray, spacing: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`_box_average_of_linear_interpolant` of one chunk of columns, float64."""
    v = values.astype(np.float64, copy=False)
    n = v.shape[0]
    # cumulative integral at the knots (trapezoids)
    cum = np.concatenate([np.zeros((1, *v.shape[1:])), np.cumsum((v[1:] + v[:-1]) * (spacing / 2.0), axis=0)])
    end = (n - 1) * spacing

    def antiderivative(z: float) -> np.ndarray:
        if z <= 0.0:
            return z * v[0]
        if z >= end:
            return cum[-1] + (z - end) * v[-1]
        i = min(int(z // spacing), n - 2)
        t = z - i * spacing
        return cum[i] + v[i] * t + (v[i + 1] - v[i]) * t * t / (2.0 * spacing)

    return np.stack([(antiderivative(b) - antiderivative(a)) / (b - a) for a, b in zip(lo, hi)])


def reslice_thickness(image: Volume, label: Volume, thickness_mm: float) -> Perturbed:
    """Re-acquire with contiguous slices of `thickness_mm` along the patient's superior-inferior axis.

    Slice profile: box of width `thickness_mm` (ideal partial-volume averaging) applied to the linear
    interpolant of the native slices, integrated exactly; slice spacing = thickness. The new slices tile
    the native extent [first centre - s/2, last centre + s/2], centred, and the label takes the native
    slice nearest to each new slice centre (nearest neighbour by physical position). Predictions are
    scored back on the original grid. Raises `DegenerateSeverity` when fewer than 2 slices remain or the
    target is thinner than the native slice spacing (that would need data the scan does not hold).
    """
    k = image.slice_axis()
    s0 = image.spacing[k]
    n0 = image.shape[k]
    t0 = image.slice_thickness or s0
    if thickness_mm < max(s0, t0) - 1e-6:
        raise DegenerateSeverity(f"{thickness_mm:g} mm is thinner than the native {max(s0, t0):g} mm slices")
    extent = n0 * s0
    n1 = int(math.floor(extent / thickness_mm + 1e-9))
    if n1 < 2:
        raise DegenerateSeverity(f"{thickness_mm:g} mm slices leave {n1} slice(s) of its {extent:g} mm extent")
    start = -s0 / 2.0 + (extent - n1 * thickness_mm) / 2.0          # index-axis mm of the first new slice edge
    lo = start + thickness_mm * np.arange(n1)
    hi = lo + thickness_mm
    centres = (lo + hi) / 2.0
    moved = np.moveaxis(image.array, k, 0)
    new = _box_average_of_linear_interpolant(moved, s0, lo, hi)
    nearest = np.clip(np.floor(centres / s0 + 0.5).astype(int), 0, n0 - 1)
    new_label = np.moveaxis(label.array, k, 0)[nearest]
    spacing = list(image.spacing)
    spacing[k] = float(thickness_mm)
    origin = np.asarray(image.origin) + _direction_of_array_axis(image, k) * centres[0]
    return Perturbed(_with(image, np.ascontiguousarray(np.moveaxis(new, 0, k)), spacing, origin, float(thickness_mm)),
                     _with(label, np.ascontiguousarray(np.moveaxis(new_label, 0, k)), spacing, origin,
                           float(thickness_mm)), "original")


def reslice_thickness_factor(image: Volume, label: Volume, factor: float) -> Perturbed:
    """`reslice_thickness` to `factor` x the native slice thickness (or spacing when the thickness is unknown)."""
    k = image.slice_axis()
    native = max(image.spacing[k], image.slice_thickness or 0.0)
    return reslice_thickness(image, label, factor * native)


# ------------------------------------------------------------------------------------------------ dose
def estimate_noise_hu(image: Volume, window_px: int = 5, soft_tissue_hu: tuple[float, float] = (-50.0, 150.0),
                      max_slices: int = 24) -> float:
    """The scan's own noise (HU std) from homogeneous regions: mode of the local-std histogram.

    Local mean and std over `window_px` x `window_px` in-plane windows; windows whose mean lies in the soft-tissue
    range count; the mode of their std histogram (1 HU bins, light smoothing) is the noise (Christianson et al.,
    AJR 2015, "global noise"). At most `max_slices` evenly spaced slices are used. Raises ValueError when the
    volume holds no soft tissue.
    """
    k = image.slice_axis()
    arr = np.moveaxis(image.array, k, 0)
    idx = np.unique(np.linspace(0, arr.shape[0] - 1, min(max_slices, arr.shape[0])).round().astype(int))
    stds = []
    for i in idx:
        sl = arr[i].astype(np.float64)
        mean = ndimage.uniform_filter(sl, window_px, mode="reflect")
        sq = ndimage.uniform_filter(sl * sl, window_px, mode="reflect")
        std = np.sqrt(np.clip(sq - mean * mean, 0, None) * window_px ** 2 / (window_px ** 2 - 1))
        keep = (mean >= soft_tissue_hu[0]) & (mean <= soft_tissue_hu[1])
        stds.append(std[keep])
    values = np.concatenate(stds) if stds else np.empty(0)
    values = values[values > 0]
    if values.size < 50:
        raise ValueError("no homogeneous soft tissue to estimate the noise from")
    hist, edges = np.histogram(values, bins=np.arange(0.0, float(np.percentile(values, 99)) + 2.0, 1.0))
    hist = ndimage.gaussian_filter1d(hist.astype(np.float64), 1.5)
    j = int(np.argmax(hist))
    return float((edges[j] + edges[j + 1]) / 2.0)


def ct_noise_power_spectrum(shape: tuple[int, int], peak_cycles_per_px: float = 0.2) -> np.ndarray:
    """Target 2D NPS of filtered back-projection noise, (h, w) on `numpy.fft.fftfreq` ordering, unit mean.

    NPS(rho) = rho * exp(-rho^2 / (2 p^2)), rho the radial frequency in cycles/pixel: the ramp filter's rise
    times a smooth apodisation, peaking at p (default 0.2 cycles/px = 0.4 x Nyquist, where a soft-tissue kernel
    on a 512 matrix peaks, ~0.25 cycles/mm at 0.8 mm pixels). Zero at DC: the noise has no mean.
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    rho = np.hypot(fy, fx)
    nps = rho * np.exp(-(rho ** 2) / (2.0 * peak_cycles_per_px ** 2))
    return nps / nps.mean()


def correlated_noise(shape_2d: tuple[int, int], n_slices: int, sigma: float, rng: np.random.Generator,
                     peak_cycles_per_px: float = 0.2) -> np.ndarray:
    """(n_slices, h, w) float32 noise of std `sigma` with the `ct_noise_power_spectrum` in-plane (independent
    between slices, as axial FBP reconstructions are). White Gaussian noise shaped in the Fourier domain
    (periodic; padded by 16 px per side so the wrap-around does not correlate opposite edges)."""
    h, w = shape_2d
    ph, pw = h + 32, w + 32
    amplitude = np.sqrt(ct_noise_power_spectrum((ph, pw), peak_cycles_per_px))
    out = np.empty((n_slices, h, w), dtype=np.float32)
    for i in range(n_slices):
        white = rng.standard_normal((ph, pw))
        shaped = np.fft.ifft2(np.fft.fft2(white) * amplitude).real
        out[i] = shaped[16:16 + h, 16:16 + w]
    return out * np.float32(sigma)


def add_dose_noise(image: Volume, label: Volume, k: float, rng: np.random.Generator,
                   noise_hu: float | None = None, peak_cycles_per_px: float = 0.2) -> Perturbed:
    """Lower dose: total noise k x the scan's own (`estimate_noise_hu`), i.e. dose / k^2.

    Adds CT-like correlated noise of std sigma0 * sqrt(k^2 - 1) in-plane (independent noise adds in variance).
    noise_hu: the scan's noise when already known. Label and grid unchanged.
    """
    def add(slices: np.ndarray, sigma: float) -> None:  # a few slices at a time: the same draws in the same order
        step = max(1, _CHUNK_BYTES // (4 * slices.shape[1] * slices.shape[2]))
        for z0 in range(0, slices.shape[0], step):
            chunk = slices[z0:z0 + step]
            chunk += correlated_noise(slices.shape[1:], chunk.shape[0], sigma, rng, peak_cycles_per_px)

    return _add_noise(image, label, k, noise_hu, add)


def projection_noise_slice(slice_hu: np.ndarray, sigma: float, rng: np.random.Generator, n_angles: int | None = None,
                           mu_water_per_px: float = 0.02) -> np.ndarray:
    """Noise (h, w) of std ~`sigma` (inside the body) made the physical way for one axial slice: forward-project
    (skimage radon), Poisson counts I0 exp(-p), log, filtered back-projection (ramp x Hann); the noise is the
    reconstruction of the noisy sinogram minus that of the clean one. I0 is set from a first draw so that
    the std inside the body (> -500 HU) is `sigma`; the spatial pattern and its non-stationarity (more noise
    behind dense, wide paths) come from the physics."""
    from skimage.transform import iradon, radon

    h, w = slice_hu.shape
    mu = np.clip((slice_hu.astype(np.float64) + 1000.0) / 1000.0, 0, None) * mu_water_per_px
    n_angles = n_angles or max(90, int(math.ceil(math.pi / 2 * max(h, w))))
    theta = np.linspace(0.0, 180.0, n_angles, endpoint=False)
    sino = radon(mu, theta, circle=False)
    i0 = 1e5
    counts = rng.poisson(i0 * np.exp(-sino))
    noisy = -np.log(np.maximum(counts, 1) / i0)
    rec = iradon(noisy - sino, theta, output_size=max(h, w), filter_name="hann", circle=False)
    rec = rec[:h, :w] * (1000.0 / mu_water_per_px)
    body = slice_hu > -500
    std = rec[body].std() if body.sum() > 50 else rec.std()
    return (rec * (sigma / std)).astype(np.float32) if std > 0 else rec.astype(np.float32)


def add_projection_noise(image: Volume, label: Volume, k: float, rng: np.random.Generator,
                         noise_hu: float | None = None) -> Perturbed:
    """`add_dose_noise` with the projection-domain noise of `projection_noise_slice` (slow: one radon/iradon
    pair per slice; the physical reference for the Fourier-shaped noise)."""
    def add(slices: np.ndarray, sigma: float) -> None:
        for i in range(slices.shape[0]):
            slices[i] += projection_noise_slice(slices[i], sigma, rng)

    return _add_noise(image, label, k, noise_hu, add)


def _add_noise(image: Volume, label: Volume, k: float, noise_hu: float | None,
               add: Callable[[np.ndarray, float], None]) -> Perturbed:
    """Total noise k x the scan's own: `add(slices (z, a, b) float32 view, sigma)` adds noise of std
    sigma0 * sqrt(k^2 - 1) in place, slices along the patient's slice axis."""
    if k < 1.0:
        raise DegenerateSeverity(f"noise multiple {k:g} < 1 would need denoising")
    out = image.array.astype(np.float32)
    if k > 1.0:
        sigma0 = estimate_noise_hu(image) if noise_hu is None else noise_hu
        a, b = in_plane_axes(image)
        add(np.moveaxis(out, (image.slice_axis(), a, b), (0, 1, 2)), sigma0 * math.sqrt(k * k - 1.0))
    return Perturbed(_with(image, out), _with(label, label.array), "perturbed")


# ------------------------------------------------------------------------------------------ calibration
def hu_offset(image: Volume, label: Volume, offset_hu: float) -> Perturbed:
    """Scanner calibration: HU + offset (exact, float32)."""
    out = image.array.astype(np.float32)
    out += np.float32(offset_hu)
    return Perturbed(_with(image, out), _with(label, label.array))


def hu_gain(image: Volume, label: Volume, gain: float) -> Perturbed:
    """Scanner calibration: HU x gain around water (0 HU fixed; exact, float32)."""
    out = image.array.astype(np.float32)
    out *= np.float32(gain)
    return Perturbed(_with(image, out), _with(label, label.array))


# --------------------------------------------------------------------------------------- contrast phase
#: Delayed-phase pattern (HU at s = 1) by label name, then by HU class for unlabelled voxels.
CONTRAST_LABEL_SHIFTS_HU = {"kidney_cortex": -40.0, "kidney_medulla": 40.0, "tumour": -50.0, "liver": 30.0}
CONTRAST_CLASS_SHIFTS_HU = (  # (lower HU, upper HU, shift): unlabelled tissue by HU range
    (-30.0, 90.0, 10.0),       # unenhanced / mildly enhanced parenchyma, muscle, bowel wall
    (90.0, 200.0, 25.0),       # enhanced parenchyma (liver, spleen in portal phase)
    (200.0, 400.0, -50.0),     # arterial blood pool and vessels: contrast washes out
)


def contrast_shift_map(image: Volume, label: Volume, classes: dict[int, str]) -> np.ndarray:
    """(z, y, x) float32 HU shift at s = 1: a later (delayed) contrast phase than the scan's.

    Labelled organs shift by `CONTRAST_LABEL_SHIFTS_HU` (a kidney's voxels above its median HU count as cortex,
    the others as medulla: the corticomedullary contrast fades); other voxels by HU class
    (`CONTRAST_CLASS_SHIFTS_HU`); fat, air and bone (> 400 HU) do not change. Smoothed (sigma 1 px) so that
    no artificial edge appears at a class border.
    """
    shift = np.zeros(image.shape, dtype=np.float32)
    step = max(1, _CHUNK_BYTES // (4 * max(1, int(np.prod(image.shape[1:])))))
    slabs = [slice(z0, z0 + step) for z0 in range(0, shift.shape[0], step)]  # masks of a few slices at a time
    hu = lambda sl: np.asarray(image.array[sl], dtype=np.float32)  # noqa: E731  (float32 HU of one slab)
    for sl in slabs:
        h = hu(sl)
        for lo, hi, s in CONTRAST_CLASS_SHIFTS_HU:
            shift[sl][(h >= lo) & (h < hi)] = s
    for value, name in classes.items():
        v, lname = int(value), str(name).lower()
        if v == 0:
            continue
        if lname.startswith("kidney"):
            inside = [image.array[sl][label.array[sl] == v] for sl in slabs]
            if not any(x.size for x in inside):
                continue
            med = float(np.median(np.concatenate(inside).astype(np.float32)))
            del inside
            for sl in slabs:
                h, m = hu(sl), label.array[sl] == v
                shift[sl][m & (h > med)] = CONTRAST_LABEL_SHIFTS_HU["kidney_cortex"]
                shift[sl][m & (h <= med)] = CONTRAST_LABEL_SHIFTS_HU["kidney_medulla"]
            continue
        key = ("tumour" if lname.startswith(("tumour", "tumor", "lesion")) else
               "liver" if lname.startswith("liver") else None)
        if key is not None:
            for sl in slabs:
                shift[sl][label.array[sl] == v] = CONTRAST_LABEL_SHIFTS_HU[key]
    return ndimage.gaussian_filter(shift, 1.0, output=shift)  # separable 1D passes: in place is exact


def contrast_phase(image: Volume, label: Volume, fraction: float, classes: dict[int, str]) -> Perturbed:
    """HU + fraction x `contrast_shift_map` (fraction 0 = the scan's own phase, 1 = the full delayed pattern)."""
    if fraction == 0:
        return Perturbed(_with(image, image.array.astype(np.float32)), _with(label, label.array))
    out = contrast_shift_map(image, label, classes)  # one float32 volume: fraction x shift, then + HU slab by slab
    out *= np.float32(fraction)
    step = max(1, _CHUNK_BYTES // (4 * max(1, int(np.prod(image.shape[1:])))))
    for z0 in range(0, out.shape[0], step):  # float32 addition commutes: the bits of HU + fraction x shift
        out[z0:z0 + step] += np.asarray(image.array[z0:z0 + step], dtype=np.float32)
    return Perturbed(_with(image, out), _with(label, label.array))


# ------------------------------------------------------------------------------- patient position / FOV
def rotate_in_plane(image: Volume, label: Volume, degrees: float) -> Perturbed:
    """The patient rotated by `degrees` about the image centre in the axial plane (scipy.ndimage.rotate:
    linear for HU, nearest for the label, air outside). Grid unchanged; scored against the rotated label."""
    if degrees == 0:
        return Perturbed(_with(image, image.array.astype(np.float32)), _with(label, label.array))
    a, b = in_plane_axes(image)
    img = ndimage.rotate(image.array, degrees, axes=(b, a), reshape=False, output=np.float32, order=1,
                         mode="constant", cval=AIR_HU)  # interpolated in float64 from any input dtype
    lab = ndimage.rotate(label.array, degrees, axes=(b, a), reshape=False, order=0, mode="constant", cval=0)
    return Perturbed(_with(image, img), _with(label, lab))


def equivalent_pixel_mm(image: Volume) -> float:
    """In-plane pixel spacing scaled to a 512 matrix over the same field of view (mm)."""
    a, b = in_plane_axes(image)
    return float(np.mean([image.spacing[a] * image.shape[a] / 512.0, image.spacing[b] * image.shape[b] / 512.0]))


def resample_pixel_spacing(image: Volume, label: Volume, target_equivalent_mm: float) -> Perturbed:
    """Another reconstruction field of view: pixel spacing set to `target_equivalent_mm` (512-matrix equivalent,
    see `equivalent_pixel_mm`), matrix size kept, centred on the same point, so the patient fills more (smaller
    spacing, body may be cut) or less of the image. 0 = native. Linear for HU, nearest for the label, air
    outside; scored on the perturbed grid against the resampled label."""
    if target_equivalent_mm == 0:
        return Perturbed(_with(image, image.array.astype(np.float32)), _with(label, label.array))
    factor = target_equivalent_mm / equivalent_pixel_mm(image)
    a, b = in_plane_axes(image)
    scale = np.ones(3)
    scale[[a, b]] = factor
    centre = (np.asarray(image.shape, dtype=np.float64) - 1) / 2.0
    offset = centre - scale * centre
    img = ndimage.affine_transform(image.array, scale, offset, output=np.float32, order=1, mode="constant",
                                   cval=AIR_HU)
    lab = ndimage.affine_transform(label.array, scale, offset, order=0, mode="constant", cval=0)
    spacing = np.asarray(image.spacing) * scale
    spacing_xyz = np.asarray(image.spacing)[::-1]
    centre_phys = np.asarray(image.origin) + image.direction @ (spacing_xyz * centre[::-1])
    origin = centre_phys - image.direction @ (spacing[::-1] * centre[::-1])
    return Perturbed(_with(image, img, spacing, origin), _with(label, lab, spacing, origin))


# ------------------------------------------------------------------------------------------------ axes
@dataclass(frozen=True)
class Axis:
    """One acquisition-shift axis (an entry of `ctseg.registry.STRESS_AXES`): its severities (clean first), unit,
    how to apply a severity and which severities it can take at all (text for messages, predicate)."""

    name: str
    clean: float
    severities: tuple[float, ...]
    unit: str
    apply: Callable[..., Perturbed] | None      # (image, label, severity, *, rng, classes, noise_hu) -> Perturbed
    description: str
    needs_phantom: bool = False
    valid: tuple[str, Callable[[float], bool]] = ("a finite number", math.isfinite)  # severities it can take at all

    @property
    def display(self) -> str:
        return self.description


def _thick(image: Volume, label: Volume, s: float, **_: object) -> Perturbed:
    return reslice_thickness(image, label, s)


_AXES = (
    Axis("thickness", 0.0, (0.0, 2.0, 3.0, 5.0, 7.5), "mm", _thick,
         "slice thickness (box profile), 0 = native; thinner than native is skipped"),
    Axis("thickness-factor", 1.0, (1.0, 1.5, 2.0, 3.0, 4.0), "x native",
         lambda im, lab, s, **_: reslice_thickness_factor(im, lab, s), "slice thickness, multiple of native"),
    Axis("dose", 1.0, (1.0, 1.5, 2.0, 3.0, 4.0), "x noise",
         lambda im, lab, s, *, rng, noise_hu=None, **_: add_dose_noise(im, lab, s, rng, noise_hu),
         "noise std multiple (dose / k^2), CT-like correlated noise"),
    Axis("dose-projection", 1.0, (1.0, 1.5, 2.0, 3.0, 4.0), "x noise",
         lambda im, lab, s, *, rng, noise_hu=None, **_: add_projection_noise(im, lab, s, rng, noise_hu),
         "noise std multiple, projection-domain (radon, Poisson, FBP)"),
    Axis("hu-offset", 0.0, (0.0, -60.0, -30.0, 30.0, 60.0), "HU", lambda im, lab, s, **_: hu_offset(im, lab, s),
         "calibration offset"),
    Axis("hu-gain", 1.0, (1.0, 0.9, 0.95, 1.05, 1.1), "x", lambda im, lab, s, **_: hu_gain(im, lab, s),
         "calibration gain around water"),
    Axis("contrast", 0.0, (0.0, 0.25, 0.5, 0.75, 1.0), "x delayed pattern",
         lambda im, lab, s, *, classes, **_: contrast_phase(im, lab, s, classes),
         "contrast phase: tissue-dependent shifts up to +-50 HU"),
    Axis("rotation", 0.0, (0.0, 7.5, 15.0, 22.5, 30.0), "deg", lambda im, lab, s, **_: rotate_in_plane(im, lab, s),
         "in-plane patient rotation"),
    Axis("pixel-spacing", 0.0, (0.0, 0.6, 0.7, 0.8, 0.9, 1.0), "mm (512-equiv.)",
         lambda im, lab, s, **_: resample_pixel_spacing(im, lab, s), "field of view: pixel spacing, 0 = native"),
)

#: The severities each built-in axis can take at all (`Axis.valid`, checked when the settings are read); a plausible
#: value that one volume cannot take (slices thinner than native) is skipped for that volume instead
#: (`DegenerateSeverity`).
_VALID_SEVERITY: dict[str, tuple[str, Callable[[float], bool]]] = {
    "thickness": ("0 (native) to 100 mm", lambda s: 0 <= s <= 100),
    "thickness-factor": ("> 0 and <= 100", lambda s: 0 < s <= 100),
    "dose": ("> 0 and <= 20", lambda s: 0 < s <= 20),
    "dose-projection": ("> 0 and <= 20", lambda s: 0 < s <= 20),
    "hu-offset": ("-1000 to 1000 HU", lambda s: -1000 <= s <= 1000),
    "hu-gain": ("> 0 and <= 10", lambda s: 0 < s <= 10),
    "contrast": ("-5 to 5", lambda s: -5 <= s <= 5),
    "rotation": ("-180 to 180 degrees", lambda s: -180 <= s <= 180),
    "pixel-spacing": ("0 (native) or 0.1 to 5 mm", lambda s: s == 0 or 0.1 <= s <= 5),
}

#: Every stress axis by name: the registry (`ctseg.registry.STRESS_AXES`) a plugin adds its own `Axis` to; the
#: phantom's axes (phantom-dose, phantom-thickness, pop-*) are registered by `ctseg.stress.phantom_reacquire`.
AXES = STRESS_AXES
for _axis in _AXES:
    STRESS_AXES.register(replace(_axis, valid=_VALID_SEVERITY[_axis.name]))
