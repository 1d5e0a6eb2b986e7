"""nnU-Net v2's default augmentation pipeline (`augment.name: nnunet`), the field's general-purpose baseline.

Not the paper's MIA (Table 1; that is `ctseg.augment.mia`): it has no shear and adds blur and
low-resolution simulation. Like every augmenter it leaves a batch untouched with probability
1 - p_batch_2d / p_batch_3d (the paper's batch gate, `ctseg.augment.base.batch_gate`).

The transforms are batchgeneratorsv2's, with the parameters of nnU-Net v2
`nnUNetTrainer.get_training_transforms` / `configure_rotation_dummyDA_mirroring_and_inital_patch_size`:

    SpatialTransform    rotation p 0.2 (2D: unrestricted, +-180 deg), scaling p 0.2 in (0.7, 1.4),
                        isotropic; no elastic deformation; bilinear image, one-hot-bilinear label
    random patch        patch centre offset up to crop_max_shift * size (nnU-Net's random patch location;
                        0 = centred crop); outside filled with 0 as nnU-Net (fill "zero", the z-scored
                        mean) or with air (fill "air", as CTIA's rotation)
    GaussianNoise       p 0.1, std (0, 0.1)
    GaussianBlur        p 0.2, sigma (0.5, 1), p_per_channel 0.5
    Brightness (mult.)  p 0.15, (0.75, 1.25)
    Contrast            p 0.15, (0.75, 1.25), range preserved
    SimulateLowRes      p 0.25, scale (0.5, 1), in-plane only for 3D stacks
    Gamma               p 0.1 inverted and p 0.3 plain, gamma (0.7, 1.5), stats retained
    Mirror              off by default (paper Table 1 does not list it; nnU-Net mirrors all axes)

3D stacks of 16 x 128 x 128 are anisotropic by nnU-Net's rule (128 / 16 > 3), so, as nnU-Net does, the
spatial transform runs as 2D on every slice of the stack with one shared parameter set ("dummy 2D").
Shearing (paper Table 1) is not part of nnU-Net's or batchgeneratorsv2's spatial transform (the paper's MIA,
`ctseg.augment.mia`, has it).

batchgeneratorsv2 works per sample on CPU tensors and draws from torch's and numpy's global generators.
`NNUNetAugmenter` draws one seed from the passed generator and runs the pipeline inside a forked torch RNG
and a saved/restored numpy RNG, so runs are reproducible and the global state is left untouched.
CUDA input is moved to the CPU, transformed and moved back: this pipeline is CPU-bound, as in nnU-Net.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from pydantic import Field
from torch import Tensor

from ctseg.augment.base import Augmenter, Dim, IntensityPlanLike, batch_gate
from ctseg.config import Section
from ctseg.registry import AUGMENTERS, AugmenterEntry
from ctseg.errors import CtsegError


class NNUNetAugConfig(Section):
    """nnU-Net v2's augmentation (`ctseg.augment.nnunet`, `augment.name: nnunet`): batchgeneratorsv2 transforms
    with nnU-Net v2's defaults (`nnUNetTrainer.get_training_transforms`). Probabilities are per image, inside
    the batch gate shared by every augmentation."""
    p_batch_2d: float = Field(0.9, ge=0, le=1, description="fraction of 2D batches augmented (as CTIA)")
    p_batch_3d: float = Field(0.8, ge=0, le=1, description="fraction of 3D batches augmented (as CTIA)")
    rotation_p: float = Field(0.2, ge=0, le=1)
    rotation_max_deg: float = Field(180.0, ge=0, le=180, description="in-plane; nnU-Net: unrestricted")
    scale_p: float = Field(0.2, ge=0, le=1)
    scale_range: tuple[float, float] = (0.7, 1.4)
    elastic_p: float = Field(0.0, ge=0, le=1)
    crop_max_shift: float = Field(
        0.1, ge=0, le=0.5, description="random patch extraction: max patch-centre offset, fraction of in-plane size")
    noise_p: float = Field(0.1, ge=0, le=1)
    noise_sigma: tuple[float, float] = (0.0, 0.1)
    blur_p: float = Field(0.2, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_p: float = Field(0.15, ge=0, le=1)
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_p: float = Field(0.15, ge=0, le=1)
    contrast_range: tuple[float, float] = (0.75, 1.25)
    lowres_p: float = Field(0.25, ge=0, le=1)
    lowres_scale: tuple[float, float] = (0.5, 1.0)
    gamma_inverted_p: float = Field(0.1, ge=0, le=1)
    gamma_p: float = Field(0.3, ge=0, le=1)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    mirror: bool = Field(False, description="nnU-Net mirrors all axes; the paper's MIA (Table 1) does not list it")
    fill: Literal["zero", "air"] = Field(
        "zero", description="value outside the rotated/scaled/shifted image: zero (nnU-Net) or air (needs the plan)")


def build_nnunet_pipeline(cfg: NNUNetAugConfig, spatial_shape: tuple[int, ...], fill: float = 0.0) -> BasicTransform:
    """The batchgeneratorsv2 pipeline for one sample (C, Y, X) (2D) or (C, Z, Y, X) (3D, dummy-2D spatial).

    fill: image value outside the field of view after rotation/scaling/shift (nnU-Net: 0)."""
    is_3d = len(spatial_shape) == 3
    in_plane = tuple(spatial_shape[-2:])
    rot = math.radians(cfg.rotation_max_deg)
    transforms: list[BasicTransform] = []
    if is_3d:
        transforms.append(Convert3DTo2DTransform())
    transforms.append(SpatialTransform(
        in_plane,
        patch_center_dist_from_border=[s / 2 - cfg.crop_max_shift * s for s in in_plane],
        random_crop=cfg.crop_max_shift > 0,
        p_elastic_deform=cfg.elastic_p,
        p_rotation=cfg.rotation_p, rotation=(-rot, rot),
        p_scaling=cfg.scale_p, scaling=tuple(cfg.scale_range), p_synchronize_scaling_across_axes=1,
        bg_style_seg_sampling=False,
        padding_mode_image="constant" if fill != 0 else "zeros", padding_value_image=fill,
    ))
    if is_3d:
        transforms.append(Convert2DTo3DTransform())
    transforms += [
        RandomTransform(GaussianNoiseTransform(noise_variance=tuple(cfg.noise_sigma), p_per_channel=1,
                                               synchronize_channels=True), apply_probability=cfg.noise_p),
        RandomTransform(GaussianBlurTransform(blur_sigma=tuple(cfg.blur_sigma), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=cfg.blur_p),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast(tuple(cfg.brightness_range)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=cfg.brightness_p),
        RandomTransform(ContrastTransform(contrast_range=BGContrast(tuple(cfg.contrast_range)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=cfg.contrast_p),
        RandomTransform(SimulateLowResolutionTransform(scale=tuple(cfg.lowres_scale), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=(0,) if is_3d else None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=cfg.lowres_p),
        RandomTransform(GammaTransform(gamma=BGContrast(tuple(cfg.gamma_range)), p_invert_image=1,
                                       synchronize_channels=False, p_per_channel=1, p_retain_stats=1),
                        apply_probability=cfg.gamma_inverted_p),
        RandomTransform(GammaTransform(gamma=BGContrast(tuple(cfg.gamma_range)), p_invert_image=0,
                                       synchronize_channels=False, p_per_channel=1, p_retain_stats=1),
                        apply_probability=cfg.gamma_p),
    ]
    if cfg.mirror:
        transforms.append(MirrorTransform(allowed_axes=tuple(range(len(spatial_shape)))))
    return ComposeTransforms(transforms)


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU and numpy's global generators for the block, restoring both afterwards."""
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)


class NNUNetAugmenter(Augmenter):
    """nnU-Net's default augmentation behind the CTIA interface: (B, 1, Z, Y, X) in and out.

    dim "2d": each of the B * Z slices is one 2D sample with its own parameters; "3d": each stack is one sample.
    intensity_plan: needed only for cfg.fill "air" (air = window lower bound in normalised units).
    """

    def __init__(self, cfg: NNUNetAugConfig, dim: Dim, intensity_plan: IntensityPlanLike | None = None):
        self.cfg = cfg
        self.dim = dim
        self.fill = 0.0
        if cfg.fill == "air":
            if intensity_plan is None:
                raise CtsegError("augment.nnunet.fill 'air' needs the intensity plan (window lower bound, mean, std)")
            self.fill = (intensity_plan.lower - intensity_plan.mean) / intensity_plan.std
        self._pipelines: dict[tuple[int, ...], BasicTransform] = {}

    def _pipeline(self, spatial_shape: tuple[int, ...]) -> BasicTransform:
        if spatial_shape not in self._pipelines:
            self._pipelines[spatial_shape] = build_nnunet_pipeline(self.cfg, spatial_shape, self.fill)
        return self._pipelines[spatial_shape]

    def sample(self, image: Tensor, generator: torch.Generator) -> int | None:
        """The seed of batchgenerators' global RNGs for this batch; None if the batch gate leaves it as it is."""
        if not batch_gate(self.dim, self.cfg.p_batch_2d, self.cfg.p_batch_3d, generator):
            return None
        return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())

    def apply(self, image: Tensor, label: Tensor, params: int | None,
              generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The pipeline run with every random draw from seed `params`; None returns the inputs."""
        if params is None:
            return image, label
        seed = params
        b, c, z, h, w = image.shape
        if self.dim == "2d":
            imgs = image.detach().transpose(1, 2).reshape(b * z, c, h, w).cpu()
            labs = label.detach().transpose(1, 2).reshape(b * z, c, h, w).cpu()
        else:
            imgs, labs = image.detach().cpu(), label.detach().cpu()
        pipeline = self._pipeline(tuple(imgs.shape[2:]))
        out_img, out_lab = torch.empty_like(imgs), torch.empty_like(labs)
        with seeded_global_rngs(seed):
            for i in range(imgs.shape[0]):
                d = pipeline(image=imgs[i].clone(), segmentation=labs[i].to(torch.int16))
                out_img[i] = d["image"]
                out_lab[i] = d["segmentation"]
        if self.dim == "2d":
            out_img = out_img.view(b, z, c, h, w).transpose(1, 2)
            out_lab = out_lab.view(b, z, c, h, w).transpose(1, 2)
        return (out_img.to(image.device, image.dtype).contiguous(),
                out_lab.to(label.device, label.dtype).contiguous())


#: Ablation components (`augment.arms` steps keep / drop them): component -> the probability field that switches it on.
AUGMENTERS.register(AugmenterEntry(
    "nnunet", NNUNetAugmenter, section=NNUNetAugConfig, display="nnU-Net DA",
    components={"rotation": "rotation_p", "scaling": "scale_p", "elastic": "elastic_p", "noise": "noise_p",
                "blur": "blur_p", "brightness": "brightness_p", "contrast": "contrast_p", "lowres": "lowres_p",
                "gamma": "gamma_p", "gamma_inverted": "gamma_inverted_p"}))
