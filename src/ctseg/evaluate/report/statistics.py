"""Report statistics: mean ± std tables over volumes, folds and slice-thickness groups, and the baseline/CTIA
std ratios with their paired bootstrap CIs.

Statistics: mean and standard deviation (numpy, ddof=0, as `ctseg.evaluate.metrics.mean_std`) over volumes,
pooled across folds; non-finite values (HD95 of a structure missing from prediction or reference) are
left out and `n` says how many remain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from ctseg.evaluate.folds import THICKNESS_BINS
from ctseg.evaluate.metrics import mean_std
from ctseg.evaluate.records import (VolumeResult, display_name, json_float as _json_float, models_in_order,
                                    present_thickness_groups, thickness_group_of)

BASELINE_AUGS = ("mia", "nnunet", "none")  # compared against CTIA, in this order; the headline uses the first present
METRICS = {"dice_paper": "Dice, paper protocol", "dice": "Dice, full volume in original geometry",
           "hd95": "HD95 (mm), full volume"}
DEFAULT_THICKNESS_EDGES_MM = THICKNESS_BINS


@dataclass(frozen=True)
class Stat:
    """Mean and std (ddof=0) of the n finite values of a metric (NaN when n = 0)."""

    mean: float
    std: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def to_json(self) -> dict[str, Any]:
        return {"mean": _json_float(self.mean), "std": _json_float(self.std), "n": self.n}


SummaryTable = dict[str, dict[str, Stat]]  # model -> class -> Stat


def stat(values: Iterable[float]) -> Stat:
    """Mean and std (numpy, ddof=0, as `ctseg.evaluate.metrics.mean_std`) of the finite values; n counts them."""
    ms = mean_std(v for v in values if v is not None)
    return Stat(ms["mean"], ms["std"], int(ms["n"]))


def class_names(records: Sequence[VolumeResult]) -> list[str]:
    """Union of class names in first-seen order (records with more classes first)."""
    names: list[str] = []
    for r in sorted(records, key=lambda r: -len(r.dice)):
        for c in list(r.dice) + list(r.dice_paper):
            if c not in names:
                names.append(c)
    return names


def headline_class(classes: Sequence[str]) -> str:
    """'total' (union of foreground classes) when present, else the last foreground class."""
    return "total" if "total" in classes else classes[-1]


def _by_model(records: Sequence[VolumeResult]) -> dict[str, list[VolumeResult]]:
    out: dict[str, list[VolumeResult]] = {}
    for r in records:
        out.setdefault(r.model, []).append(r)
    return out


def summary_table(records: Sequence[VolumeResult], metric: str, classes: Sequence[str]) -> SummaryTable:
    """model -> class -> Stat of `metric` ('dice', 'dice_paper' or 'hd95') over all volumes and folds."""
    groups = _by_model(records)
    return {m.model: {c: stat(getattr(r, metric).get(c, math.nan) for r in groups[m.model]) for c in classes}
            for m in models_in_order(records)}


def fold_mean_table(records: Sequence[VolumeResult], metric: str, classes: Sequence[str]) -> SummaryTable:
    """model -> class -> Stat over the per-fold means (n = folds): the spread between test folds."""
    folds = sorted({r.fold for r in records})
    groups = _by_model(records)
    out: SummaryTable = {}
    for m in models_in_order(records):
        out[m.model] = {}
        for c in classes:
            means = [stat(getattr(r, metric).get(c, math.nan) for r in groups[m.model] if r.fold == k).mean
                     for k in folds]
            out[m.model][c] = stat(means)
    return out


def fold_table(records: Sequence[VolumeResult], metric: str, cls: str) -> tuple[list[int], dict[str, dict[int, Stat]]]:
    """(test folds, model -> fold -> Stat of `metric` of class `cls` over that fold's volumes)."""
    folds = sorted({r.fold for r in records})
    groups = _by_model(records)
    table = {m.model: {k: stat(getattr(r, metric).get(cls, math.nan) for r in groups[m.model] if r.fold == k)
                       for k in folds} for m in models_in_order(records)}
    return folds, table


def thickness_table(records: Sequence[VolumeResult], metric: str, cls: str, edges_mm: Sequence[float]
                    ) -> tuple[list[str], SummaryTable]:
    """(thickness groups present, model -> group -> Stat of `metric` of class `cls` over that group's volumes)."""
    labels = present_thickness_groups(records, edges_mm)
    groups = _by_model(records)
    table = {m.model: {g: stat(getattr(r, metric).get(cls, math.nan) for r in groups[m.model]
                               if thickness_group_of(r.slice_thickness, edges_mm) == g) for g in labels}
             for m in models_in_order(records)}
    return labels, table


@dataclass
class StdRatio:
    """A baseline augmentation (MIA, nnU-Net's, none) vs CTIA for one architecture/dimension: std ratio
    baseline/CTIA (> 1: CTIA more stable)."""

    pair: str
    cls: str
    base: Stat
    ctia: Stat
    ratio: float
    ci95: tuple[float, float]
    mean_diff: float  # CTIA - baseline
    baseline: str = "mia"

    def to_json(self) -> dict[str, Any]:
        return {"pair": self.pair, "class": self.cls, "baseline": self.baseline, "base": self.base.to_json(),
                "ctia": self.ctia.to_json(), "std_ratio_base_over_ctia": _json_float(self.ratio),
                "ci95": [_json_float(self.ci95[0]), _json_float(self.ci95[1])],
                "mean_diff_ctia_minus_base": _json_float(self.mean_diff)}


def _paired_values(a: list[VolumeResult], b: list[VolumeResult], metric: str, cls: str
                   ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(n,) values of `a` and of `b` on the n volumes (sorted case ids) where both are finite."""
    va = {r.case_id: getattr(r, metric).get(cls, math.nan) for r in a}
    vb = {r.case_id: getattr(r, metric).get(cls, math.nan) for r in b}
    ids = sorted(i for i in set(va) & set(vb) if math.isfinite(va[i]) and math.isfinite(vb[i]))
    return np.array([va[i] for i in ids]), np.array([vb[i] for i in ids])


def _bootstrap_ratio_ci(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], n_boot: int, seed: int
                        ) -> tuple[float, float]:
    """95 % percentile interval of std(x)/std(y), resampling volumes (paired)."""
    if x.size < 3:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    sx, sy = x[idx].std(axis=1), y[idx].std(axis=1)
    ok = sy > 0
    if ok.sum() < n_boot // 2:
        return (math.nan, math.nan)
    lo, hi = np.percentile(sx[ok] / sy[ok], [2.5, 97.5])
    return (float(lo), float(hi))


def std_ratios(records: Sequence[VolumeResult], metric: str, classes: Sequence[str], n_boot: int = 2000,
               seed: int = 0, baseline: str = "mia") -> list[StdRatio]:
    """For each (arch, dim, variant) present with both `baseline` and CTIA: per-class std ratio on paired volumes."""
    groups = _by_model(records)
    pairs: dict[tuple[str, str, str], dict[str, list[VolumeResult]]] = {}
    for m in models_in_order(records):
        if m.aug in (baseline, "ctia"):
            pairs.setdefault((m.arch, m.dim, m.variant), {})[m.aug] = groups[m.model]
    out = []
    for (arch, dim, variant), by_aug in pairs.items():
        if len(by_aug) != 2:
            continue
        label = display_name(arch, dim, "", variant).replace(" + ", " ").replace("  ", " ").strip()
        for c in classes:
            x, y = _paired_values(by_aug[baseline], by_aug["ctia"], metric, c)
            if x.size == 0:
                continue
            sbase, sctia = stat(x), stat(y)
            ratio = sbase.std / sctia.std if sctia.std > 0 else math.inf if sbase.std > 0 else math.nan
            out.append(StdRatio(label, c, sbase, sctia, ratio, _bootstrap_ratio_ci(x, y, n_boot, seed),
                                sctia.mean - sbase.mean, baseline))
    return out



def all_std_ratios(records: Sequence[VolumeResult], metric: str, classes: Sequence[str]) -> list[StdRatio]:
    """`std_ratios` of every baseline augmentation in `BASELINE_AUGS` against CTIA, baseline by baseline."""
    return [r for b in BASELINE_AUGS for r in std_ratios(records, metric, classes, baseline=b)]


