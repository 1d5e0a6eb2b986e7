"""Model registry: ``"<arch>-<dim>"`` (e.g. ``"msd-3d"``) -> builder(model_cfg, in_channels, num_classes)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ctseg.config import ModelConfig
from ctseg.errors import CtsegError

Builder = Callable[[ModelConfig, int, int], nn.Module]

_BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register a builder under ``name`` ("<arch>-<dim>")."""
    def deco(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn
    return deco


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_BUILDERS)


def build_model(model_cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """Network for ``model_cfg.arch`` / ``model_cfg.dim``: (B, C, [Z,] Y, X) -> logits (B, K, [Z,] Y, X).

    ``num_classes`` comes from the caller (multiclass: number of dataset classes; foreground: 2).
    """
    name = f"{model_cfg.arch}-{model_cfg.dim}"
    if name not in _BUILDERS:
        raise CtsegError(f"unknown model {name!r} (model.arch / model.dim); valid: {', '.join(model_names())}")
    if in_channels < 1 or num_classes < 2:
        raise CtsegError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels} and {num_classes}")
    return _BUILDERS[name](model_cfg, in_channels, num_classes)


def _unet(dim: int) -> Builder:
    def build(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
        from ctseg.models.unet import UNet
        u = cfg.unet
        max_features = u.max_features if u.max_features is not None else (512 if dim == 2 else 320)
        return UNet(in_channels, num_classes, dim=dim, n_stages=u.n_stages, base_features=u.base_features,
                    max_features=max_features, conv_per_stage=u.conv_per_stage, z_pool_stages=u.z_pool_stages)
    return build


def _msd(dim: int) -> Builder:
    def build(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
        from ctseg.models.msdnet import MSDNet
        m = cfg.msd
        return MSDNet(in_channels, num_classes, depth=m.depth, width=m.width, max_dilation=m.max_dilation,
                      dim=dim, implementation=m.implementation)
    return build


for _dim in (2, 3):
    register_model(f"unet-{_dim}d")(_unet(_dim))
    register_model(f"msd-{_dim}d")(_msd(_dim))
