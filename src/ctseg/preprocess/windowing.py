"""CT intensity windowing and z-scoring with statistics from a random subset of training cases.

The window is either a fixed HU preset (organ, bone, lung, or a custom range), no window at all (`none`: the
paper's no-windowing experiment, Supplementary Tables S2/S3: raw HU z-scored, nothing clipped; the plan still
holds the percentile window, or `crop_hu`, as the crop's threshold, so the crop is the windowed arm's) or the
percentile window of the paper: the 0.6th and 99th percentiles of the *foreground* (label > 0) voxels of a
random subset of training cases (adapted from nnU-Net's `CTNormalization`, which uses 0.5/99.5).
Mean and std for the z-score are those of the subset's foreground voxels after clipping to the
window (nnU-Net uses the unclipped voxels; clipped statistics are what the network actually sees).

Everything the network needs is one small `IntensityPlan`, computed once, stored in the cache's
`plan.json` and copied into each trained model's metadata, so inference never needs training data.

Example
-------
>>> plan = estimate_intensity_plan(dataset, cfg.preprocess, np.random.default_rng(0))
>>> x = normalize(volume.array, plan)        # float32, clip to [lower, upper], then (x - mean) / std
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ctseg.config import PreprocessConfig
from ctseg.datasets.base import Case, Dataset
from ctseg.errors import CtsegError

log = logging.getLogger(__name__)

MODES = ("percentile", "organ", "bone", "lung", "custom", "none")
AIR_HU = -1000.0  # what lies outside the image for the unclipped (window none) input
ORGAN_WINDOW = (-160.0, 240.0)  # fallback when no case has foreground and presets lack "organ"
DEFAULT_MAX_VOXELS_PER_CASE = 100_000
_MIN_STD = 1e-8


@dataclass(frozen=True)
class IntensityPlan:
    """How to map HU to network input: clip to [lower, upper] HU, then (x - mean) / std.

    mode: window mode ("percentile", a preset name, "custom", or "none": no clipping, [lower, upper] is then
    only the crop's window); percentiles: (low, high) in percent for the percentile (and none) mode, else None; subset_ids: the training cases the statistics came
    from; n_voxels: how many (sampled, foreground) voxels they were computed on.
    """

    mode: str
    lower: float
    upper: float
    mean: float
    std: float
    percentiles: tuple[float, float] | None = None
    subset_ids: tuple[str, ...] = field(default_factory=tuple)
    n_voxels: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CtsegError(f"intensity plan: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        object.__setattr__(self, "subset_ids", tuple(str(s) for s in self.subset_ids))
        for name in ("lower", "upper", "mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise CtsegError(f"intensity plan: {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.lower >= self.upper:
            raise CtsegError(f"intensity plan: window lower {self.lower} HU must be < upper {self.upper} HU")
        if self.std <= 0:
            raise CtsegError(f"intensity plan: std must be > 0, got {self.std}")
        if self.percentiles is not None:
            lo, hi = (float(p) for p in self.percentiles)
            if not 0.0 <= lo < hi <= 100.0:
                raise CtsegError(f"intensity plan: percentiles must satisfy 0 <= low < high <= 100, "
                                 f"got {tuple(self.percentiles)}")
            object.__setattr__(self, "percentiles", (lo, hi))
        if self.n_voxels < 0:
            raise CtsegError(f"intensity plan: n_voxels must be >= 0, got {self.n_voxels}")

    @property
    def clips(self) -> bool:
        """Whether `normalize` clips to [lower, upper] (every mode but none)."""
        return self.mode != "none"

    @property
    def fill_hu(self) -> float:
        """HU of what lies outside the image (crop padding): the window's lower bound, or air when not clipped."""
        return self.lower if self.clips else min(AIR_HU, self.lower)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles) if self.percentiles is not None else None
        d["subset_ids"] = list(self.subset_ids)
        return d

    @classmethod
    def from_dict(cls, data: object, source: str | Path | None = None) -> "IntensityPlan":
        """Inverse of `to_dict`; `source` (a path) is named in the error for missing/invalid keys."""
        if not isinstance(data, dict):
            raise CtsegError(f"intensity plan must be a JSON object, got {type(data).__name__}", source)
        required = ("mode", "lower", "upper", "mean", "std")
        missing = [k for k in required if k not in data]
        if missing:
            raise CtsegError(f"intensity plan lacks {', '.join(missing)}", source)
        pct = data.get("percentiles")
        try:
            return cls(mode=str(data["mode"]), lower=data["lower"], upper=data["upper"], mean=data["mean"],
                       std=data["std"], percentiles=tuple(pct) if pct is not None else None,
                       subset_ids=tuple(data.get("subset_ids", ())), n_voxels=int(data.get("n_voxels", 0)))
        except CtsegError as err:
            raise CtsegError(str(err), source) from None
        except (TypeError, ValueError) as err:
            raise CtsegError(f"intensity plan: {err}", source) from None


def window_bounds(cfg: PreprocessConfig) -> tuple[float, float]:
    """(lower, upper) HU of a fixed window: a preset from `cfg.presets` or `cfg.custom_window`."""
    if cfg.window == "custom":
        if cfg.custom_window is None:
            raise CtsegError("window 'custom' needs custom_window: [lower, upper] in HU")
        lo, hi = cfg.custom_window
    elif cfg.window in cfg.presets:
        lo, hi = cfg.presets[cfg.window]
    else:
        raise CtsegError(f"window {cfg.window!r} is neither 'percentile', 'custom' nor a preset "
                         f"({', '.join(sorted(cfg.presets))})")
    if not lo < hi:
        raise CtsegError(f"window {cfg.window!r}: lower {lo} HU must be < upper {hi} HU")
    return float(lo), float(hi)


def normalize(image_hu: np.ndarray, plan: IntensityPlan, out: np.ndarray | None = None) -> np.ndarray:
    """Clip HU to [plan.lower, plan.upper] (not for window none), then z-score: (x - mean) / std. Any shape ->
    float32; `out`: a float32 array of that shape (e.g. a view of a buffer reused between chunks) that receives
    it (the same values: the cast happens on assignment instead of in a copy)."""
    if out is None:
        out = np.array(image_hu, dtype=np.float32)  # always a copy: the input is never modified
    else:
        out[...] = image_hu
    if plan.clips:
        np.clip(out, plan.lower, plan.upper, out=out)
    out -= np.float32(plan.mean)
    out *= np.float32(1.0 / plan.std)
    return out


def draw_subset(case_ids: Sequence[str], subset_size: int, rng: np.random.Generator) -> list[str]:
    """`subset_size` distinct case ids drawn at random (returned sorted); CtsegError if too few cases."""
    ids = list(case_ids)
    if subset_size > len(ids):
        raise CtsegError(f"intensity statistics need a random subset of {subset_size} training cases, "
                         f"but only {len(ids)} are available; lower preprocess.subset_size")
    if subset_size < 1:
        raise CtsegError(f"preprocess.subset_size must be >= 1, got {subset_size}")
    chosen = rng.choice(len(ids), size=subset_size, replace=False)
    return sorted(ids[i] for i in chosen)


def sample_voxels(image_hu: np.ndarray, mask: np.ndarray | None, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most `cap` voxel values (float32) drawn without replacement from image_hu[mask] (all if mask is None)."""
    values = image_hu.reshape(-1) if mask is None else image_hu[mask]
    if values.size > cap:
        values = values[rng.choice(values.size, size=cap, replace=False)]
    return np.asarray(values, dtype=np.float32)


def _case_sample(case: Case, cap: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """(sampled HU values, True) from the case's foreground, or (values from all voxels, False) without one."""
    image = case.image.array
    if case.label is not None and case.label.array.shape != image.shape:
        raise CtsegError(f"case {case.case_id}: label shape {case.label.array.shape} != image shape {image.shape}")
    mask = case.label.array > 0 if case.label is not None else None
    if mask is None or not mask.any():
        log.warning("case %s has no foreground voxels: left out of the intensity statistics", case.case_id)
        return sample_voxels(image, None, cap, rng), False
    return sample_voxels(image, mask, cap, rng), True


def compute_intensity_plan(cases: Iterable[Case], cfg: PreprocessConfig, rng: np.random.Generator,
                           max_voxels_per_case: int = DEFAULT_MAX_VOXELS_PER_CASE) -> IntensityPlan:
    """Intensity plan from exactly these (already chosen) cases.

    At most `max_voxels_per_case` foreground voxels are sampled per case (bounded memory); the
    percentiles are those of the pooled sample. Cases without foreground (or without a label) are
    skipped with a warning; if none has foreground, the organ preset is used (percentile mode) and
    mean/std come from all voxels, with a warning.
    """
    ids: list[str] = []
    samples: list[np.ndarray] = []
    all_voxels: list[np.ndarray] = []
    for case in cases:
        ids.append(case.case_id)
        values, foreground = _case_sample(case, max_voxels_per_case, rng)
        (samples if foreground else all_voxels).append(values)
        del case, values  # one case in memory at a time: the next one is loaded before the loop rebinds `case`
    if not ids:
        raise CtsegError("intensity statistics need at least one training case, got none")

    mode: str = cfg.window
    percentiles: tuple[float, float] | None = None
    if samples:
        values = np.concatenate(samples)
    else:
        values = np.concatenate(all_voxels)
        log.warning("no case of the subset (%s) has foreground voxels: statistics from all voxels%s",
                    ", ".join(ids), ", window falls back to the organ preset" if mode == "percentile" else "")
        if mode == "percentile":
            mode = "organ"
    if mode == "none" and not samples and cfg.crop_hu is None:
        raise CtsegError(f"window none: no case of the subset ({', '.join(ids)}) has foreground voxels, so there is "
                         "no percentile window to take the crop from; set preprocess.crop_hu (e.g. -500)")
    if mode in ("percentile", "none"):
        percentiles = (float(cfg.percentiles[0]), float(cfg.percentiles[1]))
        lower, upper = (float(v) for v in np.percentile(values, percentiles))
        if mode == "none" and cfg.crop_hu is not None:  # a fixed air threshold instead of the window's crop
            lower, upper = float(cfg.crop_hu), max(upper, float(cfg.crop_hu) + 1.0)
        if not lower < upper:
            raise CtsegError(f"percentile window is empty: the {percentiles[0]}th and {percentiles[1]}th "
                             f"percentiles of the foreground voxels are both {lower} HU (subset: {', '.join(ids)})")
    elif mode == "organ" and cfg.window == "percentile":
        lower, upper = (float(v) for v in cfg.presets.get("organ", ORGAN_WINDOW))
    else:
        lower, upper = window_bounds(cfg)
    # the z-score of what the network sees: clipped values, or the raw HU without a window
    clipped = (np.clip(values, lower, upper) if mode != "none" else values).astype(np.float64)
    std = float(clipped.std())
    if std < _MIN_STD:
        log.warning("foreground intensity std is %.3g after clipping to [%g, %g] HU; using %g",
                    std, lower, upper, _MIN_STD)
        std = _MIN_STD
    return IntensityPlan(mode=mode, lower=lower, upper=upper, mean=float(clipped.mean()), std=std,
                         percentiles=percentiles, subset_ids=tuple(ids), n_voxels=int(values.size))


def estimate_intensity_plan(cases: Dataset | Iterable[Case], cfg: PreprocessConfig, rng: np.random.Generator, *,
                            case_ids: Sequence[str] | None = None,
                            max_voxels_per_case: int = DEFAULT_MAX_VOXELS_PER_CASE) -> IntensityPlan:
    """Draw `cfg.subset_size` training cases with `rng` and compute their `IntensityPlan`.

    cases: a dataset (has `case_ids()` and `load(case_id)`; only the subset is loaded) or a sequence
    of `Case`s. case_ids: restrict the draw to these (the training cases); default all cases.
    """
    if hasattr(cases, "load") and hasattr(cases, "case_ids"):
        available, load = list(cases.case_ids()), cases.load
    else:
        by_id = {c.case_id: c for c in cases}
        available, load = list(by_id), by_id.__getitem__
    pool = list(case_ids) if case_ids is not None else available
    unknown = sorted(set(pool) - set(available))
    if unknown:
        raise CtsegError(f"training case ids not in the dataset: {', '.join(unknown[:10])}")
    subset = draw_subset(pool, cfg.subset_size, rng)
    return compute_intensity_plan((load(i) for i in subset), cfg, rng, max_voxels_per_case)
