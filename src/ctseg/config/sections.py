"""The sections of data, preprocessing, network, training, inference, cross-validation and stacking."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ctseg.config.base import MAX_SEED, _Registered, _Section
from ctseg.registry import LAYOUTS, NETWORKS


class DataConfig(_Registered):
    _registry = LAYOUTS
    path: str | None = None
    layout: str = Field("auto", description="auto (detect) or a registered layout (`ctseg.registry.LAYOUTS`)")
    task: Literal["kidney", "liver"] = "kidney"

    @field_validator("layout")
    @classmethod
    def _layout(cls, value: str) -> str:
        if value != "auto" and value not in LAYOUTS:
            raise ValueError(f"unknown dataset layout {value!r}; choose from {['auto', *LAYOUTS]}")
        return value


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
    def _check(self) -> PreprocessConfig:
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


def check_arch(value: str) -> str:
    """`value` if it names a registered network (`ctseg.registry.NETWORKS`), else ValueError."""
    if value not in NETWORKS:
        raise ValueError(f"unknown network {value!r}; choose from {list(NETWORKS)}")
    return value


class ModelConfig(_Registered):
    """The network: `arch`, `dim`, `target`, and under each registered network's name its section (`model.unet`,
    `model.msd`, a plugin's; declared in `ctseg.models`; `section(name, kind)` reads one typed)."""
    _registry = NETWORKS
    arch: str = Field("unet", description="a registered network: unet, msd or a plugin's")
    dim: Literal["2d", "3d"] = "2d"
    target: Literal["multiclass", "foreground"] = Field(
        "multiclass", description="multiclass: all dataset classes; foreground: union of non-zero vs background")

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
        return check_arch(value)


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
    def _check(self) -> TrainConfig:
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
    arch: str
    dim: Literal["2d", "3d"]
    target: Literal["multiclass", "foreground"] = "multiclass"

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
        return check_arch(value)


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
