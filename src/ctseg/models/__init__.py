"""Networks: nnU-Net's U-Net and the MS-D Net, each in 2D and 3D, built from `ModelConfig`.

``build_model(model_cfg, in_channels, num_classes)`` maps (B, C, [Z,] Y, X) -> logits (B, K, [Z,] Y, X).
"""
from ctseg.models.msdnet import MSDNet
from ctseg.models.registry import build_model, model_names, register_model
from ctseg.models.unet import UNet

__all__ = ["MSDNet", "UNet", "build_model", "model_names", "register_model"]
