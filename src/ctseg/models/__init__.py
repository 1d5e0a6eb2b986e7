"""Networks: nnU-Net's U-Net and the MS-D Net, each in 2D and 3D, built from `ModelConfig`; each registers
itself (builder, config section `model.<name>`: `UNetConfig`, `MSDConfig`, memory estimate, display name) in
`ctseg.registry.NETWORKS`.

``build_model(model_cfg, in_channels, num_classes)`` maps (B, C, [Z,] Y, X) -> logits (B, K, [Z,] Y, X).
"""
from ctseg.models.unet import UNet, UNetConfig  # isort: skip (registration order: unet, then msd)
from ctseg.models.msdnet import MSDConfig, MSDNet  # isort: skip
from ctseg.models.registry import build_model, model_names

__all__ = ["MSDConfig", "MSDNet", "UNet", "UNetConfig", "build_model", "model_names"]
