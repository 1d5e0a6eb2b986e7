"""CT-specific image augmentation (CTIA), Kloenne et al. 2020, Table 1.

Each transform is a parameter sampler (draws with the passed `torch.Generator`, one parameter set
per training image: a slice in 2D, a volume in 3D; per stack for the z transforms) and a pure
function that applies given parameters to a whole batch at once (no Python loop over images):

    Gaussian noise map          sample_noise_sigma   -> add_noise            (per-voxel normal, std sigma)
    CWVRS                       sample_cwvrs         -> cwvrs_map            (piecewise-linear monotone)
    slice skipping              sample_z_resampling  -> resample_z           (nearest along z, f in (1, max])
    slice interpolation         sample_z_resampling  -> resample_z           (linear along z, f in [min, 1))
                                (z_mode "stack" only; the default "volume" simulates the acquisition on the whole
                                cached volume when the stack is sampled: `ctseg.augment.acquisition`)
    in-plane rotation           sample_rotation      -> rotate_inplane       (<= 16 degrees)
    random patch extraction     sample_patch_shift   -> extract_patch        (same-size patch at a random offset)
    random window (extra, off)  sample_random_window -> random_window        (level/width, arXiv 2510.08116)

Order inside `CTIAugmenter`: z resampling, patch extraction, rotation, CWVRS, random window, noise (spatial
first so the air they bring in is remapped like all other air; noise last so it is not reshaped by CWVRS).

Random patch extraction (Table 1, CTIA column) takes an S x S patch at a random integer offset of at most
patch_max_shift * S from the S x S slice, air outside: no resampling, so the voxel size stays the physical
one (CTIA never rescales; MIA's cropping zooms). The batch gate (90 % of 2D / 80 % of 3D batches) governs
every transform but CWVRS, which is drawn per image on its own so that exactly cwvrs_p of the images
(the paper's "20 % of data") get it, whatever the gate.
Intensities are z-scored windowed values; tissue ranges in HU are located with the `IntensityPlan`
(x_norm = (clip(hu, lower, upper) - mean) / std), or, without a plan, by k-means on the batch.

Example
-------
>>> aug = CTIAugmenter(CTIAConfig(), "2d", intensity_plan=plan)
>>> image, label = aug(image, label, torch.Generator().manual_seed(0))   # (B, 1, Z, Y, X)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ctseg.augment.base import (Dim, IntensityPlanLike, ParamsAugmenter, batch_gate, bernoulli, generator_for,
                                uniform)
from ctseg.augment.ctia_config import CTIAConfig
from ctseg.registry import AUGMENTERS, AugmenterEntry

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- noise
def sample_noise_sigma(n: int, p: float, sigma_range: tuple[float, float], generator: torch.Generator) -> Tensor:
    """(n,) noise std per image, z-scored units; 0 where the image gets no noise (probability 1 - p)."""
    apply = bernoulli(n, p, generator)
    sigma = uniform(n, sigma_range[0], sigma_range[1], generator)
    return torch.where(apply, sigma, torch.zeros_like(sigma))


def add_noise(x: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """x (N, V) + sigma[n] * standard-normal map, drawn only for rows with sigma > 0. Returns a new tensor."""
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    rows = torch.nonzero(sigma > 0).flatten()
    noise = torch.randn((rows.numel(), x.shape[1]), generator=generator_for(x.device, generator),
                        device=x.device, dtype=x.dtype)
    noise.mul_(sigma[rows, None])
    if rows.numel() == x.shape[0]:
        return noise.add_(x)
    return x.index_add(0, rows, noise)


# ---------------------------------------------------------------------------------------------- CWVRS
def preset_knots(plan: IntensityPlanLike, tissue_ranges_hu: dict[str, tuple[float, float]]) -> Tensor:
    """Cluster boundaries in normalised units: window ends plus every tissue-range end inside the window.

    Returns ascending (K + 1,) float32 knots delimiting K clusters, e.g. organ window [-160, 240] HU with
    fat/soft/enhanced ranges -> HU knots [-160, -30, 150, 240] -> (hu - mean) / std.
    """
    ends = {float(v) for rng in tissue_ranges_hu.values() for v in rng}
    inside = sorted(v for v in ends if plan.lower < v < plan.upper)
    hu = torch.tensor([plan.lower, *inside, plan.upper], dtype=torch.float64)
    return ((hu - plan.mean) / plan.std).float()


def kmeans_knots(x: Tensor, n_clusters: int, max_samples: int = 16384, iterations: int = 10) -> Tensor:
    """Cluster boundaries of the batch intensities by 1D k-means (deterministic: strided subsample, quantile init).

    x: any shape; returns ascending (K + 1,) knots [min, midpoints between sorted centres, max] on x's device.
    """
    flat = x.detach().reshape(-1).float()
    lo, hi = torch.aminmax(flat)
    sample = flat[:: max(1, flat.numel() // max_samples)]
    q = torch.linspace(0, 1, n_clusters + 2, device=x.device)[1:-1]
    centres = torch.quantile(sample, q)
    for _ in range(iterations):
        assign = torch.argmin((sample[:, None] - centres[None, :]).abs(), dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, sample)
        counts = torch.zeros_like(centres).index_add_(0, assign, torch.ones_like(sample))
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    centres = torch.sort(centres).values
    mids = (centres[1:] + centres[:-1]) / 2
    knots = torch.unique(torch.cat([lo[None], mids, hi[None]]))  # sorted; ties collapse (few distinct values)
    return knots if knots.numel() >= 2 else torch.cat([knots, knots + 1])


def sample_cwvrs(n: int, p: float, knots: Tensor, shift: float, stretch: float,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw moved knots for n images: each cluster [k_i, k_i+1] is shifted by up to +-shift of its width and its
    width scaled by 1 +- stretch; adjacent clusters share the mean of their moved common end.

    knots: (K + 1,) ascending source knots. Returns (apply (n,) bool, new_knots (n, K + 1)), new knots
    non-decreasing along dim 1 (a monotone mapping); rows with apply False equal the source knots.
    """
    k = knots.numel() - 1
    apply = bernoulli(n, p, generator).to(knots.device)
    s = (uniform(n * k, -shift, shift, generator).view(n, k)).to(knots.device)
    e = (uniform(n * k, -stretch, stretch, generator).view(n, k)).to(knots.device)
    width = knots[1:] - knots[:-1]
    centre = (knots[1:] + knots[:-1]) / 2 + s * width
    half = width * (1 + e) / 2
    lower, upper = centre - half, centre + half
    inner = (upper[:, :-1] + lower[:, 1:]) / 2
    new = torch.cat([lower[:, :1], inner, upper[:, -1:]], dim=1)
    new = torch.cummax(new, dim=1).values
    new = torch.where(apply[:, None], new, knots[None, :].expand(n, -1))
    return apply, new


def cwvrs_map(x: Tensor, knots: Tensor, new_knots: Tensor) -> Tensor:
    """Piecewise-linear monotone intensity map sending knots[j] to new_knots[n, j] for each image n.

    x: (N, V); knots: (K + 1,) ascending; new_knots: (N, K + 1) non-decreasing. Between knots the map is
    linear; below the first and above the last knot it has slope 1 (continuous at the window ends).
    Written as x + c + sum_j (slope_j - 1) * (clamp(x, knots[j], knots[j+1]) - knots[j]): two passes per
    cluster, vectorised over N.
    """
    knots = knots.to(device=x.device, dtype=x.dtype)
    new_knots = new_knots.to(device=x.device, dtype=x.dtype)
    gain = (new_knots[:, 1:] - new_knots[:, :-1]) / (knots[1:] - knots[:-1]) - 1  # (N, K)
    offset = new_knots[:, :1] - knots[0] - (gain * knots[:-1]).sum(dim=1, keepdim=True)
    out = x + offset
    buf = torch.empty_like(x)
    lo, hi = knots.tolist()[:-1], knots.tolist()[1:]
    for j in range(gain.shape[1]):
        torch.clamp(x, lo[j], hi[j], out=buf)
        out.addcmul_(buf, gain[:, j:j + 1])
    return out


# ---------------------------------------------------------------------------------------------- z resampling
def sample_z_resampling(b: int, z: int, p_skip: float, max_factor: float, p_interp: float, min_factor: float,
                        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per stack, at most one of slice skipping / slice interpolation; returns (mode (b,) int, src (b, z)).

    mode: 0 none, 1 skipping, 2 interpolation. src[b, i] is the (fractional) input slice position that output
    slice i is taken from. Skipping with factor f ~ U(1, max]: thick slices of f input slices start at a
    random phase; each output slice copies the input slice nearest the centre of its thick slice
    (nearest-neighbour down- and up-sampling along z: field of view and Z kept, integer src).
    Interpolation with f ~ U[min, 1): src = offset + i * f (zoom in along z: linear intermediate slices).
    """
    u = uniform(b, 0.0, 1.0, generator)
    mode = torch.where(u < p_skip, 1, torch.where(u < p_skip + p_interp, 2, 0)) * int(z > 1)
    f_skip = uniform(b, 1.0, max_factor, generator)
    phase = uniform(b, 0.0, 1.0, generator) * f_skip
    f_int = uniform(b, min_factor, 1.0, generator)
    offset = uniform(b, 0.0, 1.0, generator) * (z - 1) * (1 - f_int)
    i = torch.arange(z, device=u.device, dtype=torch.float32)[None, :]
    last = torch.floor((z - 1 - phase) / f_skip).clamp_min(0)[:, None]
    k = torch.round((i - phase[:, None]) / f_skip[:, None]).clamp(min=0).minimum(last)
    skip = torch.round(phase[:, None] + k * f_skip[:, None]).clamp(0, z - 1)
    interp = (offset[:, None] + i * f_int[:, None]).clamp(0, z - 1)
    src = torch.where(mode[:, None] == 1, skip, torch.where(mode[:, None] == 2, interp, i.expand(b, -1)))
    return mode, src


def resample_z(image: Tensor, label: Tensor, src: Tensor) -> tuple[Tensor, Tensor]:
    """Resample stacks along z at source positions src (B, Z): image linear, label nearest.

    image/label: (B, C, Z, Y, X). Integer src copies slices exactly (label of output slice i = label of the
    input slice it was copied from); fractional src blends the two neighbouring slices.
    """
    b, c, z = image.shape[:3]
    src = src.to(image.device)
    lo = torch.floor(src).long().clamp(0, z - 1)
    hi = (lo + 1).clamp(max=z - 1)
    w = (src - lo).to(image.dtype)
    base = (torch.arange(b, device=image.device) * z)[:, None]
    img = image.transpose(1, 2).reshape(b * z, -1)
    lab = label.transpose(1, 2).reshape(b * z, -1)
    out = torch.lerp(img.index_select(0, (base + lo).flatten()), img.index_select(0, (base + hi).flatten()),
                     w.reshape(-1, 1))
    near = torch.round(src).long().clamp(0, z - 1)
    out_lab = lab.index_select(0, (base + near).flatten())
    shape = (b, z, c, *image.shape[3:])
    return out.view(shape).transpose(1, 2).contiguous(), out_lab.view(shape).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------- rotation
def sample_rotation(n: int, p: float, max_deg: float, generator: torch.Generator) -> Tensor:
    """(n,) in-plane angles in radians, U(-max, max) with probability p, else 0."""
    apply = bernoulli(n, p, generator)
    angle = uniform(n, -max_deg, max_deg, generator) * (math.pi / 180)
    return torch.where(apply, angle, torch.zeros_like(angle))


def _rotation_grid(angles: Tensor, h: int, w: int, dtype: torch.dtype) -> Tensor:
    """grid_sample grid (N, H, W, 2) for rotations about the image centre in pixel space (align_corners=False).

    The 2x2 map acts on normalised (x, y) and is separable: an x part plus a y part, added as two planes and
    returned as a permuted view (many times faster on CPU than affine_grid; grid_sample takes the view as is).
    """
    cos, sin = torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)
    # output pixel (x, y) samples input at R(-angle) (x, y) in pixel units (y down); normalise per axis
    a00, a01 = cos, -sin * (h / w)
    a10, a11 = sin * (w / h), cos
    xs = (torch.arange(w, device=angles.device, dtype=dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=angles.device, dtype=dtype) * 2 + 1) / h - 1
    gx = torch.stack([a00[:, None] * xs, a10[:, None] * xs], dim=1)[:, :, None, :]  # (N, 2, 1, W)
    gy = torch.stack([a01[:, None] * ys, a11[:, None] * ys], dim=1)[:, :, :, None]  # (N, 2, H, 1)
    return (gx + gy).permute(0, 2, 3, 1)


def rotate_inplane(image: Tensor, label: Tensor, angles: Tensor, fill: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate each image n by angles[n] radians about its centre (positive = counter-clockwise as displayed,
    rows down; 90 degrees equals torch.rot90(x, 1, dims=(-2, -1)) on square images).

    image: (N, C, Y, X) float, bilinear, outside filled with fill (N,); label: (N, C, Y, X) integer, nearest,
    outside 0. All N images in one grid_sample call (C channels share the image's angle: a 3D volume's
    slices are channels).
    """
    n, c, h, w = image.shape
    grid = _rotation_grid(angles.to(image.device), h, w, image.dtype)
    fill = fill.to(device=image.device, dtype=image.dtype).view(n, 1, 1, 1)
    out = F.grid_sample(image - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False).add_(fill)
    out_lab = F.grid_sample(label.to(image.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out, out_lab.to(label.dtype)


# ---------------------------------------------------------------------------------------------- random patch
def sample_patch_shift(n: int, p: float, max_shift: float, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """(n, 2) int64 patch offsets (dy, dx) in pixels, uniform integers in [-max_shift * size, max_shift * size]
    with probability p, else 0. size: (Y, X) in pixels."""
    apply = bernoulli(n, p, generator)
    u = uniform(2 * n, 0.0, 1.0, generator).view(n, 2)
    limit = torch.tensor([int(max_shift * size[0]), int(max_shift * size[1])], dtype=torch.float32, device=u.device)
    shift = torch.floor(u * (2 * limit + 1)).long() - limit.long()
    return torch.where(apply[:, None], shift, torch.zeros_like(shift))


def extract_patch(image: Tensor, label: Tensor, shift: Tensor, fill: Tensor) -> tuple[Tensor, Tensor]:
    """The Y x X patch of each image n whose top-left corner is shift[n] = (dy, dx): out[y, x] = in[y + dy, x + dx].

    image: (N, C, Y, X) float, fill (N,) outside the slice (air); label: (N, C, Y, X) integer, 0 outside.
    Integer offsets, no interpolation: voxel values and size are kept. C channels share the offset."""
    n, c, h, w = image.shape
    shift = shift.to(image.device)
    ys = torch.arange(h, device=image.device)[None, :] + shift[:, :1]  # (N, Y) source rows
    xs = torch.arange(w, device=image.device)[None, :] + shift[:, 1:]  # (N, X) source columns
    inside = (((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]).view(n, 1, h * w)
    src = ys.clamp(0, h - 1)[:, :, None] * w + xs.clamp(0, w - 1)[:, None, :]  # flat source index (N, Y, X)
    src = src.view(n, 1, h * w).expand(n, c, h * w)
    out = image.reshape(n, c, h * w).gather(2, src)
    out_lab = label.reshape(n, c, h * w).gather(2, src).masked_fill_(~inside, 0)
    fill = fill.to(device=image.device, dtype=image.dtype).view(n, 1, 1)
    return torch.where(inside, out, fill).view(n, c, h, w), out_lab.view(n, c, h, w)


# ---------------------------------------------------------------------------------------------- random window
def sample_random_window(n: int, p: float, level: float, width: float,
                         generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Draw (apply (n,), level shift (n,) as fraction of window width, width scale (n,)); identity where not applied."""
    apply = bernoulli(n, p, generator)
    shift = uniform(n, -level, level, generator)
    scale = uniform(n, 1 - width, 1 + width, generator)
    return apply, torch.where(apply, shift, 0.0), torch.where(apply, scale, 1.0)


def random_window(x: Tensor, lower: float, upper: float, shift: Tensor, scale: Tensor) -> Tensor:
    """Re-window x (N, V) to [l', u'] = level + shift * W -+ scale * W / 2, then stretch [l', u'] back to
    [lower, upper] (W = upper - lower, normalised units). A narrower window clips; a wider one compresses."""
    wdt = upper - lower
    shift = shift.to(device=x.device, dtype=x.dtype)[:, None]
    scale = scale.to(device=x.device, dtype=x.dtype)[:, None]
    lo = (lower + upper) / 2 + shift * wdt - scale * wdt / 2
    hi = lo + scale * wdt
    return (torch.minimum(torch.maximum(x, lo), hi) - lo) / scale + lower


# ---------------------------------------------------------------------------------------------- pipeline
def _pick(values: Tensor, rows: Tensor | None) -> Tensor:
    return values if rows is None else values[rows.to(values.device)]


def _on_rows(fn: Callable[..., Sequence[Tensor]], mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Apply fn(rows, *sub_tensors) -> new sub_tensors to the rows (dim 0) where mask holds, out of place.

    rows is None when every row is selected (no gather/scatter); unselected rows are copied unchanged.
    """
    rows = torch.nonzero(mask).flatten()
    if rows.numel() == 0:
        return tensors
    if rows.numel() == mask.numel():
        return tuple(fn(None, *tensors))
    rows = rows.to(tensors[0].device)
    out = fn(rows, *(t.index_select(0, rows) for t in tensors))
    return tuple(t.index_copy(0, rows, o) for t, o in zip(tensors, out))


@dataclass
class CTIAParams:
    """All random choices for one augmented batch. N = B * Z images in 2D, B in 3D."""

    z_mode: Tensor        # (B,) 0 none / 1 skip / 2 interp
    z_src: Tensor         # (B, Z) source slice positions
    patch_shift: Tensor   # (N, 2) int64 patch offsets (dy, dx) in pixels, 0 = none
    angles: Tensor        # (N,) radians, 0 = none
    cwvrs_apply: Tensor   # (N,) bool
    knots: Tensor         # (K + 1,) source knots, normalised units
    new_knots: Tensor     # (N, K + 1)
    window_apply: Tensor  # (N,) bool
    window_shift: Tensor  # (N,)
    window_scale: Tensor  # (N,)
    noise_sigma: Tensor   # (N,)


class CTIAugmenter(ParamsAugmenter[CTIAParams]):
    """CT-specific augmentation of a (B, 1, Z, Y, X) batch; see the module docstring.

    intensity_plan: object with lower/upper (HU window), mean/std (z-score); locates the preset tissue
    ranges and the window ends. Without it CWVRS uses k-means on the batch and the window ends are the
    batch min/max.
    """

    def __init__(self, cfg: CTIAConfig, dim: Dim, intensity_plan: IntensityPlanLike | None = None):
        self.cfg = cfg
        self.dim = dim
        self.plan = intensity_plan
        self._preset = None
        if cfg.cwvrs_clusters == "preset":
            if intensity_plan is None:
                log.info("CTIA: no intensity plan, CWVRS uses k-means clusters on each batch")
            else:
                self._preset = preset_knots(intensity_plan, cfg.cwvrs_tissue_ranges_hu)

    def _window(self, image: Tensor) -> tuple[Tensor | float, Tensor | float]:
        if self.plan is not None:
            return ((self.plan.lower - self.plan.mean) / self.plan.std,
                    (self.plan.upper - self.plan.mean) / self.plan.std)
        return image.min(), image.max()

    def sample(self, image: Tensor, generator: torch.Generator) -> CTIAParams | None:
        """Draw every parameter for this batch; None if it is left as it is.

        The batch gate (p_batch_2d / p_batch_3d) decides whether the batch gets the spatial, window and noise
        transforms; CWVRS is drawn per image regardless of the gate (exactly cwvrs_p of the images).
        image is read only for its shape and, for k-means clusters, its intensities."""
        cfg = self.cfg
        b, _, z, h, w = image.shape
        n = b * z if self.dim == "2d" else b
        gate = batch_gate(self.dim, cfg.p_batch_2d, cfg.p_batch_3d, generator)
        z_mode, z_src = sample_z_resampling(b, z, cfg.slice_skip_p, cfg.slice_skip_max_factor,
                                            cfg.slice_interp_p, cfg.slice_interp_min_factor, generator)
        if cfg.z_mode == "volume":  # done on the whole volume when the stack was sampled (ctseg.augment.acquisition)
            z_mode = torch.zeros_like(z_mode)
        patch = sample_patch_shift(n, cfg.patch_p, cfg.patch_max_shift, (h, w), generator)
        angles = sample_rotation(n, cfg.rotation_p, cfg.rotation_max_deg, generator)
        if self._preset is not None:
            knots = self._preset.to(image.device)
        elif cfg.cwvrs_p > 0:
            knots = kmeans_knots(image, cfg.cwvrs_n_clusters)
        else:
            knots = torch.tensor([0.0, 1.0])
        cwvrs_apply, new_knots = sample_cwvrs(n, cfg.cwvrs_p, knots, cfg.cwvrs_shift, cfg.cwvrs_stretch, generator)
        window_apply, shift, scale = sample_random_window(n, cfg.random_window_p, cfg.random_window_level,
                                                          cfg.random_window_width, generator)
        sigma = sample_noise_sigma(n, cfg.noise_p, cfg.noise_sigma, generator)
        if not gate:
            if not bool(cwvrs_apply.any()):
                return None
            z_mode, patch, angles, sigma = (torch.zeros_like(t) for t in (z_mode, patch, angles, sigma))
            window_apply = torch.zeros_like(window_apply)
        return CTIAParams(z_mode, z_src, patch, angles, cwvrs_apply, knots, new_knots, window_apply, shift, scale,
                          sigma)

    def apply_params(self, image: Tensor, label: Tensor, params: CTIAParams,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """z resampling, patch extraction, rotation, CWVRS, random window, then noise (the module's order)."""
        b, c, z, h, w = image.shape
        n = params.angles.numel()
        image, label = _on_rows(lambda rows, i, l: resample_z(i, l, _pick(params.z_src, rows)),
                                params.z_mode != 0, image, label)
        lower, upper = self._window(image)

        # 2D: every slice is an image; 3D: a volume's slices are channels sharing one angle
        shape4 = (b * z, 1, h, w) if self.dim == "2d" else (b, z, h, w)
        img4, lab4 = _on_rows(lambda rows, i, l: extract_patch(
            i, l, _pick(params.patch_shift, rows), torch.full((i.shape[0],), float(lower))),
            (params.patch_shift != 0).any(dim=1), image.view(shape4), label.view(shape4))
        img4, lab4 = _on_rows(lambda rows, i, l: rotate_inplane(
            i, l, _pick(params.angles, rows), torch.full((i.shape[0],), float(lower))),
            params.angles != 0, img4, lab4)

        flat = img4.reshape(n, -1)
        (flat,) = _on_rows(lambda rows, x: (cwvrs_map(x, params.knots, _pick(params.new_knots, rows)),),
                           params.cwvrs_apply, flat)
        (flat,) = _on_rows(lambda rows, x: (random_window(x, float(lower), float(upper), _pick(params.window_shift, rows),
                                                          _pick(params.window_scale, rows)),),
                           params.window_apply, flat)
        if bool((params.noise_sigma > 0).any()):
            flat = add_noise(flat, params.noise_sigma, generator)
        return flat.view(b, c, z, h, w), lab4.view(b, c, z, h, w)


#: Ablation components (`augment.arms` steps keep / drop them): component -> the probability field that switches it on.
AUGMENTERS.register(AugmenterEntry(
    "ctia", CTIAugmenter, section=CTIAConfig, display="CTIA",
    components={"patch": "patch_p", "slice_skipping": "slice_skip_p", "slice_interpolation": "slice_interp_p",
                "rotation": "rotation_p", "cwvrs": "cwvrs_p", "noise": "noise_p", "random_window": "random_window_p"}))
