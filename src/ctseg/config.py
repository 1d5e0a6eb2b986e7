"""One typed experiment configuration: YAML in, validated, saved beside every result.

Every section is a pydantic model with defaults from the paper (`docs/PAPER_FIDELITY.md`);
unknown keys, and a key given twice in one mapping, are refused so that a typo never silently falls back to
a default or to the last value. Load with `load_config(path)` (which remembers the file in `cfg.source`, for
messages about it), save with `save_config(cfg, path)` (atomic).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text

#: Largest seed: numpy's SeedSequence and torch.manual_seed both accept 0..2**32-1.
MAX_SEED = 2**32 - 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    path: str | None = None
    layout: Literal["auto", "kits19", "chaos", "nnunet"] = "auto"
    task: Literal["kidney", "liver"] = "kidney"


class PreprocessConfig(_Section):
    window: Literal["percentile", "organ", "bone", "lung", "custom", "none"] = Field(
        "percentile", description="percentile (paper), a preset, custom, or none: no HU clipping, raw HU z-scored "
        "(the paper's no-windowing experiment, Supplementary Tables S2/S3), cropped as the percentile window would")
    percentiles: tuple[float, float] = (0.6, 99.0)
    presets: dict[str, tuple[float, float]] = Field(default_factory=lambda: {
        "organ": (-160.0, 240.0), "bone": (-450.0, 1050.0), "lung": (-1350.0, 150.0)})
    custom_window: tuple[float, float] | None = None
    subset_size: int = Field(8, ge=1, description="training cases drawn at random for intensity statistics")
    crop_hu: float | None = Field(
        None, description="window none only: HU threshold of the crop box; None: the percentile window's lower bound "
        "(the same crop as the windowed arm, as the paper did), a number (e.g. -500): a fixed air threshold")
    in_plane_size: int = Field(128, ge=8)
    crop: Literal["window", "none"] = Field(
        "window", description="window: cut each volume to a square box around what survives the window's lower "
        "bound before resizing (paper: 'cropped to the same regions as obtained from windowing'); none: whole slice")
    num_slices: int = Field(16, ge=1)
    exclude_background_slices: bool = True
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of the cached z-scored images (float16 halves disk and I/O)")

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.percentiles
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.percentiles}")
        for name, (a, b) in self.presets.items():
            if a >= b:
                raise ValueError(f"window preset {name!r}: lower {a} must be < upper {b}")
        if self.custom_window is not None and self.custom_window[0] >= self.custom_window[1]:
            raise ValueError(f"custom_window lower must be < upper, got {self.custom_window}")
        if self.window == "custom" and self.custom_window is None:
            raise ValueError("window 'custom' needs custom_window: [lower, upper] in HU")
        return self


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


#: The paper's arms and the field baseline: each one whole family of transforms (`ctseg.augment`).
FAMILY_AUGS = ("ctia", "mia", "nnunet", "none")

#: Ablation components of each family: component name -> the probability field that switches it on.
COMPONENTS: dict[str, dict[str, str]] = {
    "ctia": {"patch": "patch_p", "slice_skipping": "slice_skip_p", "slice_interpolation": "slice_interp_p",
             "rotation": "rotation_p", "cwvrs": "cwvrs_p", "noise": "noise_p", "random_window": "random_window_p"},
    "mia": {"scaling": "scale_p", "rotation": "rotation_p", "shear": "shear_p", "crop": "crop_p",
            "gamma": "gamma_p", "contrast": "contrast_p", "brightness": "brightness_p", "noise": "noise_p"},
    "nnunet": {"rotation": "rotation_p", "scaling": "scale_p", "elastic": "elastic_p", "noise": "noise_p",
               "blur": "blur_p", "brightness": "brightness_p", "contrast": "contrast_p", "lowres": "lowres_p",
               "gamma": "gamma_p", "gamma_inverted": "gamma_inverted_p"},
}


class ArmStep(_Section):
    """One family's transforms inside an augmentation arm: the family's config section (of `augment`) with
    `params` merged over it, then the probability of every component not kept set to 0."""
    family: Literal["ctia", "mia", "nnunet"]
    keep: list[str] | None = Field(None, description="components kept (None: all); see COMPONENTS")
    drop: list[str] = Field(default_factory=list, description="components left out")
    params: dict[str, Any] = Field(default_factory=dict, description="overrides of the family's settings")

    @model_validator(mode="after")
    def _check(self):
        known = COMPONENTS[self.family]
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
BUILTIN_ARMS: dict[str, ArmConfig] = {
    "robust": ArmConfig(steps=[ArmStep(family="mia", drop=["rotation"])],
                        description="robust (MIA − rotation, chosen by the ablation rule)"),
}


class AugmentConfig(_Section):
    name: str = Field("ctia", description="ctia, mia, nnunet, none, a built-in arm (robust) or a key of `arms`")
    ctia: CTIAConfig = Field(default_factory=CTIAConfig)
    mia: MIAConfig = Field(default_factory=MIAConfig)
    nnunet: NNUNetAugConfig = Field(default_factory=NNUNetAugConfig)
    arms: dict[str, ArmConfig] = Field(default_factory=dict, description="named arms: lists of family steps, "
                                       "e.g. {ctia-no-cwvrs: {steps: [{family: ctia, drop: [cwvrs]}]}}")

    @model_validator(mode="after")
    def _check(self):
        clash = sorted(set(self.arms) & set(FAMILY_AUGS))
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
        return [*FAMILY_AUGS, *BUILTIN_ARMS, *(a for a in self.arms if a not in BUILTIN_ARMS)]

    def arm(self, name: str) -> ArmConfig | None:
        """The arm called `name` (config arms first, then built-in ones); None for the paper's families."""
        if name in FAMILY_AUGS:
            return None
        if name in self.arms:
            return self.arms[name]
        if name in BUILTIN_ARMS:
            return BUILTIN_ARMS[name]
        raise CtsegError(f"unknown augmentation {name!r}; choose from {self.known_names()}")

    def step_config(self, step: ArmStep) -> CTIAConfig | MIAConfig | NNUNetAugConfig:
        """The family config one step runs with: this section's family config, `params` merged, left-out
        components' probabilities set to 0."""
        base: CTIAConfig | MIAConfig | NNUNetAugConfig = getattr(self, step.family)
        fields = COMPONENTS[step.family]
        off = {fields[c] for c in step.drop} | ({f for c, f in fields.items() if c not in step.keep}
                                                 if step.keep is not None else set())
        data = {**base.model_dump(), **step.params, **{f: 0.0 for f in off}}
        return type(base).model_validate(data)

    def display(self, name: str) -> str:
        """Table name of an augmentation."""
        arm = self.arm(name) if name not in FAMILY_AUGS else None
        return arm.description if arm is not None and arm.description else name


class UNetConfig(_Section):
    n_stages: int = Field(6, ge=2)
    base_features: int = Field(32, ge=1)
    max_features: int | None = Field(
        None, ge=1, description="cap on features per stage; None: nnU-Net's 512 in 2D, 320 in 3D")
    conv_per_stage: int = Field(2, ge=1)
    z_pool_stages: int = Field(2, ge=0, description="3D: how many stages pool along z (fewer than in-plane)")


class MSDConfig(_Section):
    depth: int = Field(100, ge=1)
    width: int = Field(1, ge=1)
    max_dilation: int = Field(10, ge=1)
    implementation: Literal["efficient", "naive"] = "efficient"


class ModelConfig(_Section):
    arch: Literal["unet", "msd"] = "unet"
    dim: Literal["2d", "3d"] = "2d"
    target: Literal["multiclass", "foreground"] = Field(
        "multiclass", description="multiclass: all dataset classes; foreground: union of non-zero vs background")
    unet: UNetConfig = Field(default_factory=UNetConfig)
    msd: MSDConfig = Field(default_factory=MSDConfig)


class TrainConfig(_Section):
    batch_size_2d: int = Field(28, ge=1)
    batch_size_3d: int = Field(1, ge=1)
    epochs: int = Field(50, ge=1)
    steps_per_epoch: int = Field(250, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "poly"] = Field(
        "constant", description="constant (paper: Adam at lr) or poly: lr * (1 - step / steps)^0.9 per step (nnU-Net)")
    oversample_foreground: float = Field(
        0.0, ge=0, le=1, description="share of each sampled stack's slices that must hold one foreground class, "
        "drawn at random per volume among those present (nnU-Net's oversampling: 0.33); 0: the paper's uniform draw")
    loss_tanimoto_weight: float = Field(0.6, ge=0)
    loss_ce_weight: float = Field(0.4, ge=0)
    loss_smooth: float = Field(1e-5, gt=0)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    val_every: int = Field(1, ge=1, description="validate every N epochs")
    val_slices: Literal["foreground", "all"] = Field(
        "foreground", description="slices the checkpoint-selection Dice is computed on: foreground (the reference's "
        "foreground slices, as Table 2's paper protocol scores the test cases) or all (the whole volume)")
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    num_workers: int = Field(0, ge=0)
    augment_on: Literal["auto", "cpu", "device"] = "auto"
    device: str = "auto"
    tensorboard: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.loss_tanimoto_weight == 0 and self.loss_ce_weight == 0:
            raise ValueError("loss_tanimoto_weight and loss_ce_weight are both 0: the loss would be 0 and nothing "
                             "would be learned")
        return self


class PredictConfig(_Section):
    """How a 3D model sees z at inference (`ctseg.inference.predict`, validation, CV test predictions): saved with every
    model, so a model is run as it was configured; 2D models ignore it (docs/PAPER_FIDELITY.md, point 5)."""
    z_context: Literal["sampled", "strided", "contiguous"] = Field(
        "sampled", description="sampled: a strided pass over all slices finds the foreground slices, then stacks "
        "drawn from them as training draws them (z_draws random partitions, averaged); strided: the same first "
        "pass, then interleaved stacks at training's mean gap over all slices; contiguous: sliding windows of "
        "adjacent slices (gap 1, what training never shows a 3D model)")
    z_draws: int = Field(4, ge=1, description="sampled: random partitions of the foreground slices per volume")
    z_seed: int = Field(0, ge=0, le=MAX_SEED, description="sampled: seed of the draws (the same for every volume)")


class CVConfig(_Section):
    n_folds: int = Field(5, ge=2)
    fold_mode: Literal["sorted", "random", "stratified"] = "sorted"
    distances: bool = Field(True, description="HD95 on the full volume of every test case (slow on CPU)")


class StackMemberSetConfig(_Section):
    """One set of stacked-ensemble members: the cross-validated runs of this architecture, dimension, target."""
    arch: Literal["unet", "msd"]
    dim: Literal["2d", "3d"]
    target: Literal["multiclass", "foreground"] = "multiclass"


class StackConfig(_Section):
    """Stacked CNN (`ctseg.models.stacking`): per test fold, the top_k members per set by the validation score of
    that fold's models; a meta-model trained (see `meta_training`) for meta_epochs x steps_per_epoch Adam steps of
    batch_size axial slices."""
    top_k: int = Field(5, ge=1)
    members: list[StackMemberSetConfig] = Field(
        default_factory=lambda: [StackMemberSetConfig(arch="msd", dim="3d", target="foreground"),
                                 StackMemberSetConfig(arch="unet", dim="2d", target="multiclass")],
        min_length=1, description="paper, KiTS: 3D MS-D Nets (kidney+tumour vs background) and 2D U-Nets")
    meta_epochs: int = Field(20, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    hidden: int = Field(16, ge=1, description="channels of the meta-model's 3x3 context branch")
    foreground_fraction: float = Field(0.5, ge=0, le=1, description="share of slices with foreground per batch")
    meta_training: Literal["nested", "oof"] = Field(
        "nested", description="what the meta-model scored on fold k learns from: nested (the fold-k members' maps "
        "of their own validation cases: nothing it sees has seen fold k) or oof (the other folds' out-of-fold maps, "
        "made by models that trained on fold k: not nested, a leak `ctseg check-leaks` reports; for comparison)")


# typed default factories: a lambda's list literal would be a list[str] to the type checker
def _paper_archs() -> list[Literal["unet", "msd"]]:
    return ["unet", "msd"]


def _paper_dims() -> list[Literal["2d", "3d"]]:
    return ["2d", "3d"]


def _paper_augs() -> list[str]:
    return ["mia", "ctia"]


def _population_axes() -> list[str]:
    return ["pop-habitus", "pop-fov", "pop-kidney-size", "pop-tumour-size", "pop-phase", "pop-kernel"]


class SelectionConfig(_Section):
    """The pre-registered rule that picks the recommended augmentation from an ablation (`ctseg.evaluate.ablation`,
    docs/ABLATION.md). The stress test's volumes are split, within each CV fold, into validation and test
    volumes by `seed`; the rule is applied on the validation volumes and the winner reported on the test ones:

    score = mean Dice (headline structure, seeds averaged) over every non-clean severity of `axes`; the arm
    with the highest score wins; arms within `tie_margin` of it are tied, and the tie goes to the smallest
    robustness gap (clean minus score), then to the fewest transform steps, then to the name."""
    enabled: bool = False
    axes: list[str] = Field(default_factory=_population_axes, min_length=1,
                            description="stress axes the score averages (default: the population shifts)")
    validation_fraction: float = Field(0.5, gt=0, lt=1, description="share of each fold's volumes for validation")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    tie_margin: float = Field(0.005, ge=0, le=1)
    candidates: list[str] | None = Field(None, description="arms the rule may pick (default: all experiment.augs)")
    n_boot: int = Field(2000, ge=100, le=100000, description="bootstrap resamples of the paired CIs")


class ExperimentMatrixConfig(_Section):
    """The paper's experiment (`ctseg experiment`): every combination of archs x dims x augs (x seeds) is
    cross-validated, then a stacked ensemble per augmentation. `profiles` are named partial configs
    (same nesting as this file) merged over the config by `--profile NAME`, in every shipped config: ci (tiny smoke run), cpu (2-core CPU size), full (paper size)."""
    archs: list[Literal["unet", "msd"]] = Field(default_factory=_paper_archs, min_length=1)
    dims: list[Literal["2d", "3d"]] = Field(default_factory=_paper_dims, min_length=1)
    augs: list[str] = Field(default_factory=_paper_augs, min_length=1,
                            description="augmentation arms: the paper's (mia, nnunet, ctia, none) or `augment.arms` keys")
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=lambda: [0], min_length=1,
                             description="one run per seed and combination; more seeds give top_k more candidates")
    stack_seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=list, description="extra seeds trained only for the stack's "
                                   "member sets, so that stack.top_k picks among more candidates than it keeps")
    exclude: list[str] = Field(default_factory=list, description="combinations to leave out, as 'arch-dim', "
                               "e.g. ['unet-3d']")
    overrides: dict[str, dict] = Field(default_factory=dict, description="partial configs merged into the runs of "
                                       "one 'arch-dim', e.g. {'msd-3d': {'train': {'epochs': 2}}}")
    variants: dict[str, dict] = Field(default_factory=dict, description="extra arms: name -> partial config merged "
                                      "into every table run, e.g. {'nowindow': {'preprocess': {'window': 'none'}}}; "
                                      "runs named '<run>-<name>', reported beside the table, not stacked")
    variant: str = Field("", description="set by the experiment on a variant arm's runs (its name); empty otherwise")
    stack: bool = True
    thickness_groups_mm: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1.5, 3.0], min_length=1,
        description="upper edges of the slice-thickness groups in the report")
    profiles: dict[str, dict] = Field(default_factory=dict)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)

    @model_validator(mode="after")
    def _check_variants(self):
        import re

        for name, over in self.variants.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", name):
                raise ValueError(f"experiment.variants name {name!r}: use lower-case letters, digits and _")
            if "experiment" in over:
                raise ValueError(f"experiment.variants.{name} may not change the experiment section")
        return self


class StressConfig(_Section):
    """Acquisition-shift stress test (`ctseg stress`, `ctseg.stress`): axes from `ctseg.stress.perturb.AXES`,
    each with its default severities unless `severities` gives them (the clean value is always added first).
    `ctseg experiment` runs it out-of-fold on the table runs when `enabled`."""
    enabled: bool = False
    axes: list[str] = Field(default_factory=lambda: ["thickness-factor", "dose", "hu-offset", "hu-gain", "contrast",
                                                     "rotation", "pixel-spacing"], min_length=1)
    severities: dict[str, list[float]] = Field(default_factory=dict, description="axis -> severities")
    max_volumes: int | None = Field(None, ge=1, description="volumes drawn by `seed` (None: all)")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    failure_dice: float = Field(0.5, ge=0, le=1, description="a volume fails below this headline Dice")
    n_boot: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples for the CIs")

    @model_validator(mode="after")
    def _check(self):
        from ctseg.stress.perturb import AXES, VALID_SEVERITY

        unknown = sorted((set(self.axes) | set(self.severities)) - set(AXES))
        if unknown:
            raise ValueError(f"unknown stress axes {unknown}; choose from {list(AXES)}")
        for axis, values in self.severities.items():
            text, valid = VALID_SEVERITY[axis]
            bad = [v for v in values if not valid(v)]
            if bad:
                raise ValueError(f"{axis} severities must be {text}, got {', '.join(f'{v:g}' for v in bad)}")
        return self


class ExperimentConfig(_Section):
    name: str = "ctseg"
    seed: int = Field(0, ge=0, le=MAX_SEED, description="numpy and torch seeds derive from it")
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    stack: StackConfig = Field(default_factory=StackConfig)
    experiment: ExperimentMatrixConfig = Field(default_factory=ExperimentMatrixConfig)
    stress: StressConfig = Field(default_factory=StressConfig)
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The YAML file this config was loaded from (None when made in code)."""
        return self._source

    @model_validator(mode="after")
    def _check_augs(self):
        sel = self.experiment.selection
        unknown = [a for a in [*self.experiment.augs, *(sel.candidates or [])] if a not in self.augment.known_names()]
        if unknown:
            raise ValueError(f"experiment.augs / selection.candidates {unknown} are neither the paper's arms nor keys of augment.arms; "
                             f"choose from {self.augment.known_names()}")
        if sel.enabled:
            missing = sorted(set(sel.axes) - set(self.stress.axes))
            if not self.stress.enabled or missing:
                raise ValueError(f"experiment.selection needs the stress test on (stress.enabled) with its axes "
                                 f"{sorted(sel.axes)}; missing from stress.axes: {missing}")
        return self


def check_aug_names(aug: AugmentConfig, names: list[str], source: str | Path | None = None) -> list[str]:
    """`names` if every one is an augmentation `aug` can run (paper arm, built-in or configured arm), else a
    `CtsegError` listing the choices (for `--aug` options)."""
    unknown = [n for n in names if n not in aug.known_names()]
    if unknown:
        raise CtsegError(f"unknown augmentation(s) {unknown}; this config knows {aug.known_names()}", source)
    return names


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_config(data: dict, source: str | Path | None = None) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data or {})
    except ValidationError as err:
        raise CtsegError(_format_validation_error(err), source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping holding one key twice (PyYAML would keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader refuses it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> object:
    """YAML text as Python data; a key given twice in a mapping is a `yaml.YAMLError`."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise CtsegError("config file not found", path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CtsegError("not a text (UTF-8 YAML) file", path) from None
    except yaml.YAMLError as err:
        raise CtsegError(f"not valid YAML: {err}", path) from None
    if data is not None and not isinstance(data, dict):
        raise CtsegError(f"expected a mapping at the top level, got {type(data).__name__}", path)
    cfg = parse_config(data or {}, path)
    cfg._source = path
    return cfg


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
