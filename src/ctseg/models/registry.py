"""Build the network a `ModelConfig` names: `model.arch` is an entry of `ctseg.registry.NETWORKS` (U-Net,
MS-D Net, or a plugin's), `model.dim` its 2D or 3D form."""
from __future__ import annotations

from torch import nn

from ctseg.config import ModelConfig
from ctseg.errors import CtsegError
from ctseg.registry import NETWORKS


def model_names() -> list[str]:
    """Every buildable "<arch>-<dim>", sorted."""
    return sorted(f"{arch}-{dim}" for arch in NETWORKS for dim in ("2d", "3d"))


def build_model(model_cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """Network for ``model_cfg.arch`` / ``model_cfg.dim``: (B, C, [Z,] Y, X) -> logits (B, K, [Z,] Y, X).

    ``num_classes`` comes from the caller (multiclass: number of dataset classes; foreground: 2).
    """
    if model_cfg.arch not in NETWORKS:
        raise CtsegError(f"unknown model {model_cfg.arch}-{model_cfg.dim!r} (model.arch / model.dim); valid: "
                         f"{', '.join(model_names())}")
    if in_channels < 1 or num_classes < 2:
        raise CtsegError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels} and {num_classes}")
    return NETWORKS[model_cfg.arch].builder(model_cfg, 2 if model_cfg.dim == "2d" else 3, in_channels, num_classes)
