"""nnU-Net's U-Net (``PlainConvUNet`` from dynamic_network_architectures) built from our config.

Topology as nnU-Net plans it: ``n_stages`` resolution stages, ``conv_per_stage`` 3x3(x3) convs per
stage in encoder and decoder, features doubling from ``base_features`` and capped at
``max_features``, strided-conv downsampling, transposed-conv upsampling, instance norm (affine,
eps 1e-5), LeakyReLU(0.01), He initialisation, deep supervision off.

3D inputs are 16 x 128 x 128: z is pooled only in the first ``z_pool_stages`` downsamplings
(stride (2, 2, 2)), afterwards (1, 2, 2) -- what nnU-Net's planner does when a feature-map axis
would fall below 4 voxels (16 -> 8 -> 4 with the default 2). The input's spatial sizes must be
divisible by the total stride per axis (:meth:`UNet.divisor`).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ctseg.config import ModelConfig, Section
from ctseg.errors import CtsegError
from ctseg.registry import NETWORKS, MemoryEstimate, NetworkEntry

NEG_SLOPE = 0.01
NORM_EPS = 1e-5


class UNetConfig(Section):
    """`model.unet`: the U-Net's topology as nnU-Net plans it (see the module docstring)."""
    n_stages: int = Field(6, ge=2)
    base_features: int = Field(32, ge=1)
    max_features: int | None = Field(
        None, ge=1, description="cap on features per stage; None: nnU-Net's 512 in 2D, 320 in 3D")
    conv_per_stage: int = Field(2, ge=1)
    z_pool_stages: int = Field(2, ge=0, description="3D: how many stages pool along z (fewer than in-plane)")


def stage_strides(n_stages: int, dim: int, z_pool_stages: int) -> list[tuple[int, ...]]:
    """Stride of each encoder stage: stage 0 is 1; then 2 in-plane, 2 in z for z_pool_stages stages."""
    if dim == 2:
        return [(1, 1), *((2, 2) for _ in range(1, n_stages))]
    return [(1, 1, 1), *(((2 if s <= z_pool_stages else 1), 2, 2) for s in range(1, n_stages))]


def stage_features(n_stages: int, base_features: int, max_features: int) -> list[int]:
    """Features per stage: base * 2**s, capped at max_features."""
    return [min(base_features * 2 ** s, max_features) for s in range(n_stages)]


class UNet(nn.Module):
    """U-Net (B, C, [Z,] Y, X) -> logits (B, K, [Z,] Y, X); spatial sizes divisible by `divisor`."""

    def __init__(self, in_channels: int, num_classes: int, dim: int = 2, n_stages: int = 6,
                 base_features: int = 32, max_features: int = 512, conv_per_stage: int = 2,
                 z_pool_stages: int = 2):
        super().__init__()
        try:
            from dynamic_network_architectures.architectures.unet import PlainConvUNet
            from dynamic_network_architectures.initialization.weight_init import InitWeights_He
        except ImportError as err:  # optional dependency: pip install --no-deps dynamic-network-architectures
            raise CtsegError("the U-Net needs the 'dynamic-network-architectures' package "
                             f"(pip install --no-deps 'dynamic-network-architectures>=0.3'): {err}") from None
        if dim == 3 and not 0 <= z_pool_stages <= n_stages - 1:
            raise CtsegError(f"model.unet.z_pool_stages must be in 0..n_stages-1 = 0..{n_stages - 1}, "
                             f"got {z_pool_stages}")
        self.dim, self.in_channels, self.num_classes = dim, in_channels, num_classes
        strides = stage_strides(n_stages, dim, z_pool_stages)
        self.divisor = tuple(math.prod(s[a] for s in strides) for a in range(dim))
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
        self.net = PlainConvUNet(
            input_channels=in_channels, n_stages=n_stages,
            features_per_stage=stage_features(n_stages, base_features, max_features),
            conv_op=conv, kernel_sizes=[(3,) * dim] * n_stages, strides=strides,
            n_conv_per_stage=conv_per_stage, num_classes=num_classes,
            n_conv_per_stage_decoder=conv_per_stage, conv_bias=True,
            norm_op=norm, norm_op_kwargs={"eps": NORM_EPS, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"negative_slope": NEG_SLOPE, "inplace": True},
            deep_supervision=False)
        self.net.apply(InitWeights_He(NEG_SLOPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        if x.ndim != self.dim + 2 or x.shape[1] != self.in_channels:
            raise CtsegError(f"expected input (B, {self.in_channels}, {'Z, ' if self.dim == 3 else ''}Y, X), "
                             f"got {tuple(x.shape)}")
        if any(s % d for s, d in zip(spatial, self.divisor)):
            raise CtsegError(f"U-Net input spatial size {spatial} must be divisible by {self.divisor} "
                             "(the total stride per axis); pad or resize the input, or use fewer stages")
        return self.net(x)


def _build(cfg: ModelConfig, dim: int, in_channels: int, num_classes: int) -> UNet:
    u = cfg.section("unet", UNetConfig)
    max_features = u.max_features if u.max_features is not None else (512 if dim == 2 else 320)
    return UNet(in_channels, num_classes, dim=dim, n_stages=u.n_stages, base_features=u.base_features,
                max_features=max_features, conv_per_stage=u.conv_per_stage, z_pool_stages=u.z_pool_stages)


def _stages(model: ModelConfig) -> list[tuple[int, float]]:
    """(features, fraction of the input pixels) per U-Net stage."""
    u = model.section("unet", UNetConfig)
    cap = u.max_features if u.max_features is not None else (512 if model.dim == "2d" else 320)
    stages, fraction = [], 1.0
    for s in range(u.n_stages):
        stages.append((min(u.base_features * 2**s, cap), fraction))
        fraction /= 8.0 if (model.dim == "3d" and s < u.z_pool_stages) else 4.0
    return stages


def memory_estimate(model: ModelConfig, num_classes: int, in_channels: int = 1) -> MemoryEstimate:
    """Weights, and activations per input pixel: 3 values (convolution, norm, activation) per feature per
    convolution in the encoder and the decoder, each stage at 1/4 of the pixels of the one above (1/8 where 3D
    pooling also halves z)."""
    k = 27.0 if model.dim == "3d" else 9.0
    cps = model.section("unet", UNetConfig).conv_per_stage
    total, previous = 0.0, float(in_channels)
    for features, _ in _stages(model):
        total += k * features * (previous + features * (2 * cps - 1))
        previous = features
    activations = sum(2 * 3 * cps * f * frac for f, frac in _stages(model)) + num_classes
    return MemoryEstimate(total, activations)


NETWORKS.register(NetworkEntry("unet", _build, memory_estimate, section=UNetConfig, display="nnU-Net"))
