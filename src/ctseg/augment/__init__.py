"""Training-time augmentation: CT-specific (CTIA, the paper's method), the paper's baseline MIA (Table 1),
nnU-Net v2's pipeline (a third, field-standard baseline), or a named arm built from their components
(`augment.arms`, `ctseg.config.ArmConfig`: e.g. CTIA without CWVRS, CTIA plus MIA's scaling). Each family
registers itself in `ctseg.registry.AUGMENTERS` (config section `augment.<name>`: `CTIAConfig`, `MIAConfig`,
`NNUNetAugConfig`; builder, display name, ablation components).

>>> aug = build_augmenter(cfg.augment, "2d", intensity_plan=cache.plan)
>>> image, label = aug(image, label, generator)    # (B, 1, Z, Y, X) float / int64, CPU or CUDA
"""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from ctseg.augment.base import Augmenter, ComposedAugmenter, Dim, IntensityPlanLike, NoAugment
from ctseg.augment.ctia import CTIAConfig, CTIAugmenter
from ctseg.augment.mia import MIAConfig, PaperMIAugmenter
from ctseg.augment.nnunet import NNUNetAugConfig, NNUNetAugmenter
from ctseg.config import AugmentConfig
from ctseg.registry import AUGMENTERS, AugmenterEntry

__all__ = ["Augmenter", "ComposedAugmenter", "CTIAConfig", "CTIAugmenter", "MIAConfig", "NNUNetAugConfig",
           "NNUNetAugmenter", "NoAugment", "PaperMIAugmenter", "acquisition_config", "build_augmenter"]


_Section = TypeVar("_Section", bound=BaseModel)

AUGMENTERS.register(AugmenterEntry("none", lambda section, dim, plan: NoAugment(dim), display="no augmentation"))


def _family(name: str, cfg: Any, dim: Dim, intensity_plan: IntensityPlanLike | None) -> Augmenter:
    return AUGMENTERS.get_entry(name).builder(cfg, dim, intensity_plan)


def build_augmenter(aug_cfg: AugmentConfig, dim: Dim, intensity_plan: IntensityPlanLike | None = None) -> Augmenter:
    """The augmenter named by aug_cfg.name for 2D or 3D training.

    intensity_plan (an `IntensityPlan` or any object with lower, upper, mean, std) lets CTIA's CWVRS find
    the preset tissue ranges in normalised units; without it CWVRS clusters each batch by k-means. MIA uses it
    for its air fill (else the batch minimum); nnU-Net's pipeline only for `nnunet.fill: air`.
    A registered augmentation (`ctseg.registry.AUGMENTERS`) is built from its config section (None without one).
    An arm of one step is that family's augmenter with the step's settings (its own batch gate); an arm of
    several steps is a `ComposedAugmenter` (one gate for all).
    """
    if dim not in ("2d", "3d"):
        raise ValueError(f"dim must be '2d' or '3d', got {dim!r}")
    arm = aug_cfg.arm(aug_cfg.name)
    if arm is None:
        entry = AUGMENTERS.get_entry(aug_cfg.name)
        return _family(aug_cfg.name, aug_cfg.section(aug_cfg.name) if entry.section else None, dim, intensity_plan)
    configs = [(step.family, aug_cfg.step_config(step)) for step in arm.steps]
    if len(configs) == 1:
        return _family(*configs[0], dim, intensity_plan)

    def ungated(cfg: _Section) -> _Section:
        return cfg.model_copy(update={"p_batch_2d": 1.0, "p_batch_3d": 1.0})

    def closed(cfg: _Section) -> _Section:
        return cfg.model_copy(update={"p_batch_2d": 0.0, "p_batch_3d": 0.0})

    first = configs[0][1]
    return ComposedAugmenter(dim, first.p_batch_2d, first.p_batch_3d,
                             [_family(name, ungated(c), dim, intensity_plan) for name, c in configs],
                             [_family(name, closed(c), dim, intensity_plan) for name, c in configs
                              if isinstance(c, CTIAConfig)])


def acquisition_config(aug_cfg: AugmentConfig) -> CTIAConfig | None:
    """The CTIA settings whose slice skipping / interpolation simulate an acquisition when a training stack is
    drawn (`ctseg.augment.acquisition`, `z_mode: volume`), or None when the augmentation has no such step.
    In a composed arm the acquisition is gated by the arm's gate (its first step's p_batch)."""
    arm = aug_cfg.arm(aug_cfg.name) if aug_cfg.name != "none" else None
    if aug_cfg.name == "ctia":
        ctia: CTIAConfig | None = aug_cfg.section("ctia", CTIAConfig)
    elif arm is None:
        return None
    else:
        steps = [aug_cfg.step_config(s) for s in arm.steps]
        ctia = next((c for c in steps if isinstance(c, CTIAConfig)), None)
        if ctia is not None and len(steps) > 1:
            ctia = ctia.model_copy(update={"p_batch_2d": steps[0].p_batch_2d, "p_batch_3d": steps[0].p_batch_3d})
    return ctia if ctia is not None and ctia.z_mode == "volume" else None
