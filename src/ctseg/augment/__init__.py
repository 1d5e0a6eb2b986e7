"""Training-time augmentation: CT-specific (CTIA, the paper's method), the paper's baseline MIA (Table 1), or
nnU-Net v2's pipeline (a third, field-standard baseline).

>>> aug = build_augmenter(cfg.augment, "2d", intensity_plan=cache.plan)
>>> image, label = aug(image, label, generator)    # (B, 1, Z, Y, X) float / int64, CPU or CUDA
"""
from __future__ import annotations

from ctseg.augment.base import Augmenter, Dim, IntensityPlanLike, NoAugment
from ctseg.augment.ctia import CTIAugmenter
from ctseg.augment.mia import PaperMIAugmenter
from ctseg.augment.nnunet import NNUNetAugmenter
from ctseg.config import AugmentConfig

__all__ = ["Augmenter", "CTIAugmenter", "NNUNetAugmenter", "NoAugment", "PaperMIAugmenter", "build_augmenter"]


def build_augmenter(aug_cfg: AugmentConfig, dim: Dim, intensity_plan: IntensityPlanLike | None = None) -> Augmenter:
    """The augmenter named by aug_cfg.name for 2D or 3D training.

    intensity_plan (an `IntensityPlan` or any object with lower, upper, mean, std) lets CTIA's CWVRS find
    the preset tissue ranges in normalised units; without it CWVRS clusters each batch by k-means. MIA uses it
    for its air fill (else the batch minimum); nnU-Net's pipeline only for `nnunet.fill: air`.
    """
    if dim not in ("2d", "3d"):
        raise ValueError(f"dim must be '2d' or '3d', got {dim!r}")
    if aug_cfg.name == "ctia":
        return CTIAugmenter(aug_cfg.ctia, dim, intensity_plan)
    if aug_cfg.name == "mia":
        return PaperMIAugmenter(aug_cfg.mia, dim, intensity_plan)
    if aug_cfg.name == "nnunet":
        return NNUNetAugmenter(aug_cfg.nnunet, dim, intensity_plan)
    return NoAugment(dim)
