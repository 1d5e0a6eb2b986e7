"""The `augment` section: the paper's families (CTIA, MIA, nnU-Net's pipeline; their settings below), any
registered augmentation's own section (`ctseg.registry.AUGMENTERS`), and named arms built from family steps."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ctseg.config.base import _Registered, _Section
from ctseg.errors import CtsegError
from ctseg.registry import AUGMENTERS


class CTIAConfig(_Section):
    """CT-specific augmentation (paper Table 1; `ctseg.augment.ctia`).

    A batch is augmented with probability p_batch_2d / p_batch_3d; inside an augmented batch each
    transform is applied per training image (a slice in 2D, a volume in 3D) with its own probability,
    except slice skipping / interpolation, which act along z per stack. CWVRS is outside the batch gate:
    cwvrs_p of all images get it (paper: "20 % of data"). Intensities are z-scored units.
    """
    p_batch_2d: float = Field(0.9, ge=0, le=1, description="fraction of 2D batches augmented")
    p_batch_3d: float = Field(0.8, ge=0, le=1, description="fraction of 3D batches augmented")
    noise_p: float = Field(0.5, ge=0, le=1)
    noise_sigma: tuple[float, float] = Field((0.0, 0.1), description="std of the noise map, z-scored units")
    cwvrs_p: float = Field(0.2, ge=0, le=1, description="cluster-wise voxel intensity range shift (paper: 20 %)")
    cwvrs_clusters: Literal["preset", "kmeans"] = Field(
        "preset", description="preset: tissue ranges in HU (needs the intensity plan; else k-means); kmeans: per batch")
    cwvrs_n_clusters: int = Field(3, ge=2, description="k-means clusters")
    cwvrs_tissue_ranges_hu: dict[str, tuple[float, float]] = Field(default_factory=lambda: {
        "fat": (-200.0, -30.0), "soft_tissue": (-30.0, 150.0), "enhanced_or_bone": (150.0, 3000.0)})
    cwvrs_shift: float = Field(0.05, ge=0, le=0.5, description="max shift of a cluster, fraction of its width")
    cwvrs_stretch: float = Field(0.05, ge=0, le=0.5, description="max relative stretch of a cluster's width")
    z_mode: Literal["volume", "stack"] = Field(
        "volume", description="volume: slice skipping/interpolation simulate an acquisition on the whole cached "
        "volume when the stack is sampled (ctseg.augment.acquisition); stack: resample inside the sampled stack")
    slice_skip_p: float = Field(0.2, ge=0, le=1, description="per stack; exclusive with slice interpolation")
    slice_skip_max_factor: float = Field(2.0, gt=1, description="spacing factor f drawn from (1, max]")
    slice_interp_p: float = Field(0.2, ge=0, le=1, description="per stack")
    slice_interp_min_factor: float = Field(0.5, gt=0, lt=1, description="spacing factor f drawn from [min, 1)")
    rotation_p: float = Field(0.5, ge=0, le=1)
    rotation_max_deg: float = Field(16.0, ge=0, le=180)
    patch_p: float = Field(0.5, ge=0, le=1, description="random patch extraction (same size, random offset)")
    patch_max_shift: float = Field(0.1, ge=0, le=0.5, description="max patch offset, fraction of the in-plane size")
    random_window_p: float = Field(0.0, ge=0, le=1, description="extra, off by default: random window level/width")
    random_window_level: float = Field(0.1, ge=0, le=0.5, description="max level shift, fraction of window width")
    random_window_width: float = Field(0.2, ge=0, lt=1, description="max relative change of window width")

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.noise_sigma
        if not (0.0 <= lo <= hi):
            raise ValueError(f"noise_sigma must satisfy 0 <= low <= high, got {self.noise_sigma}")
        if self.slice_skip_p + self.slice_interp_p > 1.0:
            raise ValueError("slice_skip_p + slice_interp_p must be <= 1 (a stack gets at most one of them)")
        for name, (a, b) in self.cwvrs_tissue_ranges_hu.items():
            if a >= b:
                raise ValueError(f"cwvrs_tissue_ranges_hu {name!r}: lower {a} must be < upper {b}")
        return self


class MIAConfig(_Section):
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
    def _check(self):
        for name in ("scale_range", "gamma_range", "contrast_range", "noise_sigma"):
            lo, hi = getattr(self, name)
            least = 0.0 if name == "noise_sigma" else 1e-6  # a noise std may be 0, a factor may not
            if not (least <= lo <= hi):
                raise ValueError(f"{name} must satisfy {'0 <=' if least == 0 else '0 <'} low <= high, got {(lo, hi)}")
        return self


class NNUNetAugConfig(_Section):
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


def family_augs() -> tuple[str, ...]:
    """Every registered augmentation (the paper's arms, the field baseline `none`, plugins): each one whole
    family of transforms (`ctseg.augment`)."""
    return tuple(AUGMENTERS)


def components() -> dict[str, dict[str, str]]:
    """Ablation components of each family that has some: component name -> the probability field that switches
    it on (`ctseg.registry.AugmenterEntry.components`)."""
    return {name: dict(e.components) for name, e in AUGMENTERS.items() if e.components}


class ArmStep(_Section):
    """One family's transforms inside an augmentation arm: the family's config section (of `augment`) with
    `params` merged over it, then the probability of every component not kept set to 0."""
    family: str = Field(description="an augmentation with components (see `components()`)")
    keep: list[str] | None = Field(None, description="components kept (None: all); see components()")
    drop: list[str] = Field(default_factory=list, description="components left out")
    params: dict[str, Any] = Field(default_factory=dict, description="overrides of the family's settings")

    @model_validator(mode="after")
    def _check(self):
        families = components()
        if self.family not in families:
            raise ValueError(f"arm step family {self.family!r} has no components; choose from {sorted(families)}")
        known = families[self.family]
        unknown = sorted((set(self.keep or []) | set(self.drop)) - set(known))
        if unknown:
            raise ValueError(f"{self.family} has no component(s) {unknown}; choose from {sorted(known)}")
        return self


class ArmConfig(_Section):
    """A named augmentation arm: the listed family steps applied in order under one batch gate (the first
    step's p_batch_2d / p_batch_3d); CTIA's CWVRS stays outside the gate as in CTIA itself."""
    steps: list[ArmStep] = Field(min_length=1)
    description: str = Field("", description="display name in tables and plots")
    reference: str | None = Field(None, description="the arm this one ablates (its effect = this arm minus the "
                                  "reference); default: the family of its first step")


#: Arms every config knows besides its own `augment.arms`. `robust` is what the pre-registered rule of
#: docs/ABLATION.md chose from the 2026-12-03 ablation (`mia-no-rotation` there): the paper's MIA without its
#: unrestricted in-plane rotation; measured reason in docs/ABLATION.md §5.
#: Built unvalidated (the registry of families is read when a config is validated, not at import).
BUILTIN_ARMS: dict[str, ArmConfig] = {
    "robust": ArmConfig.model_construct(steps=[ArmStep.model_construct(family="mia", drop=["rotation"])],
                                        description="robust (MIA − rotation, chosen by the ablation rule)"),
}


class AugmentConfig(_Registered):
    _registry = AUGMENTERS
    name: str = Field("ctia", description="ctia, mia, nnunet, none, a built-in arm (robust) or a key of `arms`")
    ctia: CTIAConfig = Field(default_factory=CTIAConfig)
    mia: MIAConfig = Field(default_factory=MIAConfig)
    nnunet: NNUNetAugConfig = Field(default_factory=NNUNetAugConfig)
    arms: dict[str, ArmConfig] = Field(default_factory=dict, description="named arms: lists of family steps, "
                                       "e.g. {ctia-no-cwvrs: {steps: [{family: ctia, drop: [cwvrs]}]}}")

    @model_validator(mode="after")
    def _check(self):
        clash = sorted(set(self.arms) & set(family_augs()))
        if clash:
            raise ValueError(f"arm name(s) {clash} are reserved for the paper's arms")
        bad = [a for a in self.arms if not a or not all(ch.isalnum() or ch in "-_+." for ch in a)]
        if bad:
            raise ValueError(f"arm names may hold letters, digits and - _ + . only, got {bad}")
        if self.name not in self.known_names():
            raise ValueError(f"unknown augmentation {self.name!r}; choose from {self.known_names()}")
        return self

    def known_names(self) -> list[str]:
        """Every augmentation name this config can run."""
        return [*family_augs(), *BUILTIN_ARMS, *(a for a in self.arms if a not in BUILTIN_ARMS)]

    def arm(self, name: str) -> ArmConfig | None:
        """The arm called `name` (config arms first, then built-in ones); None for the paper's families."""
        if name in family_augs():
            return None
        if name in self.arms:
            return self.arms[name]
        if name in BUILTIN_ARMS:
            return BUILTIN_ARMS[name]
        raise CtsegError(f"unknown augmentation {name!r}; choose from {self.known_names()}")

    def step_config(self, step: ArmStep) -> Any:
        """The family config one step runs with: this section's family config, `params` merged, left-out
        components' probabilities set to 0."""
        base = self.section(step.family)
        fields = components()[step.family]
        off = {fields[c] for c in step.drop} | ({f for c, f in fields.items() if c not in step.keep}
                                                 if step.keep is not None else set())
        data = {**base.model_dump(), **step.params, **{f: 0.0 for f in off}}
        return type(base).model_validate(data)

    def display(self, name: str) -> str:
        """Table name of an augmentation: a registered one's `display` (`ctseg.registry.AUGMENTERS`), an arm's
        description, else its name."""
        if name in family_augs():
            return AUGMENTERS.display(name)
        arm = self.arm(name)
        return arm.description if arm is not None and arm.description else name


