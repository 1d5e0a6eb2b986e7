"""The paper's multidimensional image augmentation (MIA), Kloenne et al. 2020, Table 1 (MIA column).

The paper compares CTIA with the TensorFlow multidimensional image augmentation of its ref. 27, whose
transforms Table 1 lists: scaling, rotation without restriction, shearing, cropping, gamma correction,
contrast, brightness and Gaussian noise. Here they are a sampler plus pure functions, batched on CPU or GPU,
with the geometry from Kornia (`kornia.geometry.transform.get_affine_matrix2d`, `warp_affine`):

    scaling, rotation, shearing, cropping   sample_mia -> affine matrix (N, 3, 3) -> warp_affine_batch
                                             (one warp: bilinear image, nearest label, air outside)
    gamma correction                         gamma (N,)      -> adjust_intensity
    contrast                                 contrast (N,)   -> adjust_intensity  (factor about the image mean)
    brightness                               brightness (N,) -> adjust_intensity  (additive, z-scored units)
    Gaussian noise                           noise_sigma (N,) -> ctia.add_noise

"Cropping" is random patch extraction: a patch of side c * S (c ~ U[crop_min_fraction, 1]) at a random
position, resized back to S x S; it is folded into the same affine as scaling, rotation and shearing, so
an image is interpolated once. Images are slices in 2D; in 3D a stack is one image whose slices share one
in-plane affine (its slices are random, non-contiguous positions, so an out-of-plane rotation would mix
slices of unknown distance). The batch gate is CTIA's: 90 % of 2D and 80 % of 3D batches are augmented.

Example
-------
>>> aug = PaperMIAugmenter(MIAConfig(), "2d", intensity_plan=plan)
>>> image, label = aug(image, label, torch.Generator().manual_seed(0))   # (B, 1, Z, Y, X)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from kornia.geometry.transform import get_affine_matrix2d, warp_affine
from pydantic import Field, model_validator
from torch import Tensor

from ctseg.augment.base import Dim, IntensityPlanLike, ParamsAugmenter, batch_gate, bernoulli, uniform
from ctseg.augment.ctia import add_noise
from ctseg.config import Section
from ctseg.registry import AUGMENTERS, AugmenterEntry


class MIAConfig(Section):
    """The paper's MIA (Table 1, MIA column; `ctseg.augment.mia`): scaling, unrestricted rotation, shearing,
    cropping (random patch, resized back), gamma, contrast, brightness, Gaussian noise. One affine per image
    (a slice in 2D, a stack in 3D: in-plane, shared by its slices); probabilities per image, inside the batch
    gate shared by every augmentation. Intensities are z-scored units."""
    p_batch_2d: float = Field(0.9, ge=0, le=1, description="fraction of 2D batches augmented (as CTIA)")
    p_batch_3d: float = Field(0.8, ge=0, le=1, description="fraction of 3D batches augmented (as CTIA)")
    rotation_p: float = Field(0.5, ge=0, le=1, description="as CTIA's rotation")
    rotation_max_deg: float = Field(180.0, ge=0, le=180, description="in-plane; paper: without restriction")
    scale_p: float = Field(0.5, ge=0, le=1)
    scale_range: tuple[float, float] = Field((0.7, 1.4), description="isotropic zoom factor (nnU-Net's range)")
    shear_p: float = Field(0.5, ge=0, le=1)
    shear_max: float = Field(0.2, ge=0, le=1, description="max |shear factor| per in-plane axis (0.2 = 11.3 deg)")
    crop_p: float = Field(0.5, ge=0, le=1, description="random patch extraction, resized to the input size")
    crop_min_fraction: float = Field(0.8, gt=0, le=1, description="smallest patch side, fraction of the image side")
    gamma_p: float = Field(0.3, ge=0, le=1)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    contrast_p: float = Field(0.15, ge=0, le=1)
    contrast_range: tuple[float, float] = Field((0.75, 1.25), description="factor about the image mean")
    brightness_p: float = Field(0.15, ge=0, le=1)
    brightness_shift: float = Field(0.2, ge=0, description="max additive shift, z-scored units")
    noise_p: float = Field(0.5, ge=0, le=1, description="as CTIA's noise")
    noise_sigma: tuple[float, float] = Field((0.0, 0.1), description="std of the noise map, z-scored units")
    fill: Literal["air", "zero"] = Field(
        "air", description="value outside the transformed image: air (window lower bound, as CTIA) or zero")

    @model_validator(mode="after")
    def _check(self) -> MIAConfig:
        for name in ("scale_range", "gamma_range", "contrast_range", "noise_sigma"):
            lo, hi = getattr(self, name)
            least = 0.0 if name == "noise_sigma" else 1e-6  # a noise std may be 0, a factor may not
            if not (least <= lo <= hi):
                raise ValueError(f"{name} must satisfy {'0 <=' if least == 0 else '0 <'} low <= high, got {(lo, hi)}")
        return self


@dataclass
class MIAParams:
    """All random choices for one augmented batch; N = B * Z images in 2D, B in 3D."""

    matrix: Tensor       # (N, 3, 3) forward affine in pixel coordinates (x right, y down), input -> output
    gamma: Tensor        # (N,) exponent, 1 = none
    contrast: Tensor     # (N,) factor about the image mean, 1 = none
    brightness: Tensor   # (N,) additive shift, 0 = none
    noise_sigma: Tensor  # (N,) noise std, 0 = none


def _or_identity(apply: Tensor, value: Tensor, identity: float) -> Tensor:
    return torch.where(apply, value, torch.full_like(value, identity))


def sample_mia(n: int, height: int, width: int, cfg: MIAConfig, generator: torch.Generator) -> MIAParams:
    """Draw the MIA parameters of n images of height x width pixels (every draw made, so streams stay aligned).

    The affine is T(crop) . R(angle) . S(scale) . Shear about the image centre; the crop patch of side
    c * size is centred at a uniform position inside the image and zoomed by 1 / c."""
    rot = _or_identity(bernoulli(n, cfg.rotation_p, generator), uniform(n, -cfg.rotation_max_deg,
                                                                        cfg.rotation_max_deg, generator), 0.0)
    scale = _or_identity(bernoulli(n, cfg.scale_p, generator), uniform(n, *cfg.scale_range, generator), 1.0)
    shear_on = bernoulli(n, cfg.shear_p, generator)
    shear = _or_identity(shear_on[:, None].expand(n, 2), uniform(2 * n, -cfg.shear_max, cfg.shear_max,
                                                                 generator).view(n, 2), 0.0)
    crop_on = bernoulli(n, cfg.crop_p, generator)
    frac = _or_identity(crop_on, uniform(n, cfg.crop_min_fraction, 1.0, generator), 1.0)
    pos = uniform(2 * n, -0.5, 0.5, generator).view(n, 2)  # patch-centre offset, fraction of the free margin
    size = torch.tensor([width, height], dtype=torch.float32, device=pos.device)
    offset = pos * (1 - frac[:, None]) * size  # pixels, keeps the patch inside the image
    centre = ((size - 1) / 2).expand(n, 2)
    zoom = (scale / frac)[:, None].expand(n, 2)
    matrix = get_affine_matrix2d(-offset / frac[:, None], centre, zoom, rot,
                                 torch.atan(shear[:, 0]), torch.atan(shear[:, 1]))
    gamma = _or_identity(bernoulli(n, cfg.gamma_p, generator), uniform(n, *cfg.gamma_range, generator), 1.0)
    contrast = _or_identity(bernoulli(n, cfg.contrast_p, generator), uniform(n, *cfg.contrast_range, generator), 1.0)
    brightness = _or_identity(bernoulli(n, cfg.brightness_p, generator),
                              uniform(n, -cfg.brightness_shift, cfg.brightness_shift, generator), 0.0)
    sigma = _or_identity(bernoulli(n, cfg.noise_p, generator), uniform(n, *cfg.noise_sigma, generator), 0.0)
    return MIAParams(matrix, gamma, contrast, brightness, sigma)


def warp_affine_batch(image: Tensor, label: Tensor, matrix: Tensor, fill: Tensor) -> tuple[Tensor, Tensor]:
    """Warp images (N, C, Y, X) with forward affines matrix (N, 3, 3), pixel coordinates, C channels sharing one.

    Image bilinear with fill (N,) outside the field of view; label (integer) nearest with 0 outside."""
    m = matrix[:, :2].to(device=image.device, dtype=image.dtype)
    size = (int(image.shape[-2]), int(image.shape[-1]))
    fill = fill.to(device=image.device, dtype=image.dtype).view(-1, 1, 1, 1)
    out = warp_affine(image - fill, m, size, mode="bilinear", padding_mode="zeros", align_corners=True).add_(fill)
    out_lab = warp_affine(label.to(image.dtype), m, size, mode="nearest", padding_mode="zeros", align_corners=True)
    return out, out_lab.round_().to(label.dtype)


def adjust_intensity(x: Tensor, gamma: Tensor, contrast: Tensor, brightness: Tensor) -> Tensor:
    """Gamma, contrast and brightness of images x (N, V), in that order; returns a new tensor.

    Gamma acts on each image's [min, max] range (mapped to [0, 1], raised to gamma, mapped back); contrast
    scales about the image mean; brightness adds a shift. Identity where gamma = contrast = 1, brightness = 0."""
    gamma, contrast, brightness = (t.to(device=x.device, dtype=x.dtype)[:, None] for t in (gamma, contrast, brightness))
    lo, hi = torch.aminmax(x, dim=1, keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    out = ((x - lo) / span).clamp_(0, 1).pow_(gamma).mul_(span).add_(lo)
    mean = out.mean(dim=1, keepdim=True)
    return out.sub_(mean).mul_(contrast).add_(mean).add_(brightness)


class PaperMIAugmenter(ParamsAugmenter[MIAParams]):
    """The paper's MIA on a (B, 1, Z, Y, X) batch (`augment.name: mia`); see the module docstring.

    intensity_plan: locates air (the window's lower bound in z-scored units) for the area a transform moves
    into the field of view (fill "air", as CTIA's rotation); without it, the batch minimum."""

    def __init__(self, cfg: MIAConfig, dim: Dim, intensity_plan: IntensityPlanLike | None = None):
        self.cfg = cfg
        self.dim = dim
        self.plan = intensity_plan

    def _fill(self, image: Tensor) -> float:
        if self.cfg.fill == "zero":
            return 0.0
        if self.plan is not None:
            return (self.plan.lower - self.plan.mean) / self.plan.std
        return float(image.min())

    def sample(self, image: Tensor, generator: torch.Generator) -> MIAParams | None:
        """Draw this batch's parameters; None if the batch gate leaves it as it is."""
        if not batch_gate(self.dim, self.cfg.p_batch_2d, self.cfg.p_batch_3d, generator):
            return None
        b, _, z, h, w = image.shape
        return sample_mia(b * z if self.dim == "2d" else b, h, w, self.cfg, generator)

    def apply_params(self, image: Tensor, label: Tensor, params: MIAParams,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One affine warp, then gamma, contrast and brightness, then noise."""
        b, c, z, h, w = image.shape
        n = params.gamma.numel()
        shape4 = (b * z, 1, h, w) if self.dim == "2d" else (b, z, h, w)
        img4, lab4 = warp_affine_batch(image.reshape(shape4), label.reshape(shape4), params.matrix,
                                       torch.full((n,), self._fill(image)))
        flat = adjust_intensity(img4.reshape(n, -1), params.gamma, params.contrast, params.brightness)
        if bool((params.noise_sigma > 0).any()):
            flat = add_noise(flat, params.noise_sigma, generator)
        return flat.view(b, c, z, h, w), lab4.reshape(b, c, z, h, w)


#: Ablation components (`augment.arms` steps keep / drop them): component -> the probability field that switches it on.
AUGMENTERS.register(AugmenterEntry(
    "mia", PaperMIAugmenter, section=MIAConfig, display="MIA",
    components={"scaling": "scale_p", "rotation": "rotation_p", "shear": "shear_p", "crop": "crop_p",
                "gamma": "gamma_p", "contrast": "contrast_p", "brightness": "brightness_p", "noise": "noise_p"}))
