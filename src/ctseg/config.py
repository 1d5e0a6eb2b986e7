"""One typed experiment configuration: YAML in, validated, saved beside every result.

Every section is a pydantic model with defaults from the paper (`shared/design/METHOD.md`);
unknown keys are refused so that a typo never silently falls back to a default.
Load with `load_config(path)`, save with `save_config(cfg, path)` (atomic).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    path: str | None = None
    layout: Literal["auto", "kits19", "chaos", "nnunet"] = "auto"
    task: Literal["kidney", "liver"] = "kidney"


class PreprocessConfig(_Section):
    window: Literal["percentile", "organ", "bone", "lung", "custom"] = "percentile"
    percentiles: tuple[float, float] = (0.6, 99.0)
    presets: dict[str, tuple[float, float]] = Field(default_factory=lambda: {
        "organ": (-160.0, 240.0), "bone": (-450.0, 1050.0), "lung": (-1350.0, 150.0)})
    custom_window: tuple[float, float] | None = None
    subset_size: int = Field(8, ge=1, description="training cases drawn at random for intensity statistics")
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


class AugmentConfig(_Section):
    name: Literal["ctia", "mia", "nnunet", "none"] = "ctia"
    ctia: CTIAConfig = Field(default_factory=CTIAConfig)
    mia: MIAConfig = Field(default_factory=MIAConfig)
    nnunet: NNUNetAugConfig = Field(default_factory=NNUNetAugConfig)


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
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    num_workers: int = Field(0, ge=0)
    augment_on: Literal["auto", "cpu", "device"] = "auto"
    device: str = "auto"
    tensorboard: bool = False


class PredictConfig(_Section):
    """How a 3D model sees z at inference (`ctseg.predict`, validation, CV test predictions): saved with every
    model, so a model is run as it was configured; 2D models ignore it (docs/PAPER_FIDELITY.md, point 5)."""
    z_context: Literal["sampled", "strided", "contiguous"] = Field(
        "sampled", description="sampled: a strided pass over all slices finds the foreground slices, then stacks "
        "drawn from them as training draws them (z_draws random partitions, averaged); strided: the same first "
        "pass, then interleaved stacks at training's mean gap over all slices; contiguous: sliding windows of "
        "adjacent slices (gap 1, what training never shows a 3D model)")
    z_draws: int = Field(4, ge=1, description="sampled: random partitions of the foreground slices per volume")
    z_seed: int = Field(0, ge=0, le=2**32 - 1, description="sampled: seed of the draws (the same for every volume)")


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
    """Stacked CNN (`ctseg.models.stacking`): top_k members per set by validation score, meta-model trained on
    out-of-fold member maps for meta_epochs x steps_per_epoch Adam steps of batch_size axial slices."""
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


# typed default factories: a lambda's list literal would be a list[str] to the type checker
def _paper_archs() -> list[Literal["unet", "msd"]]:
    return ["unet", "msd"]


def _paper_dims() -> list[Literal["2d", "3d"]]:
    return ["2d", "3d"]


def _paper_augs() -> list[Literal["mia", "nnunet", "ctia", "none"]]:
    return ["mia", "ctia"]


class ExperimentMatrixConfig(_Section):
    """The paper's experiment (`ctseg experiment`): every combination of archs x dims x augs (x seeds) is
    cross-validated, then a stacked ensemble per augmentation. `profiles` are named partial configs
    (same nesting as this file) merged over the config by `--profile NAME`, in every shipped config: ci (tiny smoke run), cpu (2-core CPU size), full (paper size)."""
    archs: list[Literal["unet", "msd"]] = Field(default_factory=_paper_archs, min_length=1)
    dims: list[Literal["2d", "3d"]] = Field(default_factory=_paper_dims, min_length=1)
    augs: list[Literal["mia", "nnunet", "ctia", "none"]] = Field(default_factory=_paper_augs, min_length=1)
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(default_factory=lambda: [0], min_length=1,
                             description="one run per seed and combination; more seeds give top_k more candidates")
    stack_seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(default_factory=list, description="extra seeds trained only for the stack's "
                                   "member sets, so that stack.top_k picks among more candidates than it keeps")
    exclude: list[str] = Field(default_factory=list, description="combinations to leave out, as 'arch-dim', "
                               "e.g. ['unet-3d']")
    overrides: dict[str, dict] = Field(default_factory=dict, description="partial configs merged into the runs of "
                                       "one 'arch-dim', e.g. {'msd-3d': {'train': {'epochs': 2}}}")
    stack: bool = True
    thickness_groups_mm: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1.5, 3.0], min_length=1,
        description="upper edges of the slice-thickness groups in the report")
    profiles: dict[str, dict] = Field(default_factory=dict)


class StressConfig(_Section):
    """Acquisition-shift stress test (`ctseg stress`, `ctseg.stress`): axes from `ctseg.stress.perturb.AXES`,
    each with its default severities unless `severities` gives them (the clean value is always added first).
    `ctseg experiment` runs it out-of-fold on the table runs when `enabled`."""
    enabled: bool = False
    axes: list[str] = Field(default_factory=lambda: ["thickness-factor", "dose", "hu-offset", "hu-gain", "contrast",
                                                     "rotation", "pixel-spacing"], min_length=1)
    severities: dict[str, list[float]] = Field(default_factory=dict, description="axis -> severities")
    max_volumes: int | None = Field(None, ge=1, description="volumes drawn by `seed` (None: all)")
    seed: int = 0
    failure_dice: float = Field(0.5, ge=0, le=1, description="a volume fails below this headline Dice")
    n_boot: int = Field(1000, ge=100, description="bootstrap resamples for the CIs")

    @model_validator(mode="after")
    def _check(self):
        from ctseg.stress.perturb import AXES

        unknown = sorted((set(self.axes) | set(self.severities)) - set(AXES))
        if unknown:
            raise ValueError(f"unknown stress axes {unknown}; choose from {list(AXES)}")
        return self


class ExperimentConfig(_Section):
    name: str = "ctseg"
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy and torch seeds derive from it")
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


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise CtsegError("config file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CtsegError("not a text (UTF-8 YAML) file", path) from None
    except yaml.YAMLError as err:
        raise CtsegError(f"not valid YAML: {err}", path) from None
    if data is not None and not isinstance(data, dict):
        raise CtsegError(f"expected a mapping at the top level, got {type(data).__name__}", path)
    return parse_config(data or {}, path)


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
