"""Results of a cross-validated experiment: per-volume records -> tables (paper's Table 2), plots, HTML report.

Input is a list of `VolumeResult` (one per test volume x model). Outputs, all written atomically:

    results.csv     one row per volume x model (Dice per class, both protocols, HD95, slice geometry)
    results.json    the same records plus every summary table and the headline finding
    results.md      Table 2 layout (mean ± std over volumes, pooled across folds), the baseline/CTIA std ratios,
                    per-fold and per-slice-thickness tables, and (ensembles) the quality flag
    report/index.html   self-contained page (inline CSS, images embedded as base64 PNG)

Everything these files show is computed once, by `build_report`, into one `Report` (headline, tables, summary
statistics, quality flags); `render_markdown`, `render_html` and `Report.to_json` only format it.

Quality flag (only when records carry `agreement`, i.e. ensembles): per model, the volumes whose members
disagree unusually (`ctseg.evaluate.quality.flag_unusual` over that model's volumes), their Dice, and the
Spearman rank correlation of agreement with Dice (headline class, paper protocol): does low agreement
predict a poor segmentation?

Statistics: mean and standard deviation (numpy, ddof=0, as `ctseg.evaluate.metrics.mean_std`) over volumes,
pooled across folds; non-finite values (HD95 of a structure missing from prediction or reference) are
left out and `n` says how many remain. A second Table 2 gives mean ± std of the per-fold means.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import numpy.typing as npt
import yaml

from ctseg.evaluate.folds import THICKNESS_BINS
from ctseg.evaluate.metrics import mean_std
from ctseg.evaluate.quality import FlagRule, flag_unusual
from ctseg.evaluate.records import (AUG_NAMES, VolumeResult, display_name, json_float as _json_float, model_sort_key,
                                    models_in_order, present_thickness_groups, thickness_group_of)
from ctseg.fileutil import atomic_write_text

log = logging.getLogger(__name__)

BASELINE_AUGS = ("mia", "nnunet", "none")  # compared against CTIA, in this order; the headline uses the first present
# Kloenne et al. 2020, Table 2 (KiTS19, slice-sorted 5-fold CV; "Total Dice scores ... (mean ± stdv.)"): row -> class
# -> (mean, std). The paper does not say whether its std is over volumes or over folds. Its Table 3 (CHAOS liver)
# is not in the text we hold: liver reports say so in a section of their own (`PAPER_TABLE3_TITLE`).
PAPER_TABLE2 = {
    "nnU-Net + MIA 2D": {"kidney": (0.962, 0.006), "tumour": (0.840, 0.013), "total": (0.929, 0.009)},
    "nnU-Net + CTIA 2D": {"kidney": (0.961, 0.001), "tumour": (0.844, 0.007), "total": (0.931, 0.002)},
    "nnU-Net + MIA 3D": {"kidney": (0.960, 0.012), "tumour": (0.839, 0.021), "total": (0.929, 0.014)},
    "nnU-Net + CTIA 3D": {"kidney": (0.960, 0.002), "tumour": (0.841, 0.008), "total": (0.925, 0.003)},
    "MS-D Net + MIA 2D": {"kidney": (0.950, 0.011), "tumour": (0.774, 0.022), "total": (0.913, 0.014)},
    "MS-D Net + CTIA 2D": {"kidney": (0.950, 0.001), "tumour": (0.779, 0.009), "total": (0.914, 0.003)},
    "MS-D Net + MIA 3D": {"kidney": (0.947, 0.012), "tumour": (0.764, 0.024), "total": (0.906, 0.018)},
    "MS-D Net + CTIA 3D": {"kidney": (0.948, 0.002), "tumour": (0.765, 0.009), "total": (0.907, 0.003)},
    "Stacked CNN + MIA": {"kidney": (0.968, 0.008), "tumour": (0.841, 0.011), "total": (0.943, 0.008)},
    "Stacked CNN + CTIA": {"kidney": (0.968, 0.001), "tumour": (0.845, 0.004), "total": (0.947, 0.002)},
}
PAPER_TITLE = "Table 2 beside the paper — Dice, paper protocol"
PAPER_TABLE3_TITLE = "Table 3 (CHAOS liver) — the paper's numbers are not in the text we hold"
METRICS = {"dice_paper": "Dice, paper protocol", "dice": "Dice, full volume in original geometry",
           "hd95": "HD95 (mm), full volume"}
DEFAULT_THICKNESS_EDGES_MM = THICKNESS_BINS
Figure = tuple[str, str, Path]  # (report section, caption, PNG path)


# ----------------------------------------------------------------------------------------- statistics
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


@dataclass
class Headline:
    """The report's finding (one sentence) and the lines that back it."""

    text: str
    details: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "details": self.details}


def all_std_ratios(records: Sequence[VolumeResult], metric: str, classes: Sequence[str]) -> list[StdRatio]:
    """`std_ratios` of every baseline augmentation in `BASELINE_AUGS` against CTIA, baseline by baseline."""
    return [r for b in BASELINE_AUGS for r in std_ratios(records, metric, classes, baseline=b)]


def headline(records: Sequence[VolumeResult], metric: str, classes: Sequence[str],
             all_ratios: Sequence[StdRatio] | None = None) -> Headline:
    """The finding, computed from the data: CTIA vs the first baseline present (the paper's MIA, else nnU-Net's
    pipeline, else none) in spread (std over volumes) at their mean Dice, and the best model.

    all_ratios: `all_std_ratios(records, metric, classes)` when already computed (else computed here).
    """
    cls = headline_class(classes)
    if all_ratios is None:
        all_ratios = all_std_ratios(records, metric, [cls])
    ratios: list[StdRatio] = []
    for baseline in BASELINE_AUGS:
        ratios = [r for r in all_ratios if r.baseline == baseline and r.cls == cls
                  and math.isfinite(r.ratio) and r.ratio > 0]
        if ratios:
            break
    details = []
    if ratios:
        base = AUG_NAMES[ratios[0].baseline]
        gm = float(np.exp(np.mean(np.log([r.ratio for r in ratios]))))
        diff = float(np.mean([r.mean_diff for r in ratios]))
        n_lower = sum(r.ratio > 1 for r in ratios)
        if round(gm, 1) == 1.0 or round(1 / gm, 1) == 1.0:
            text = f"CTIA's Dice standard deviation ({cls}) is about the same as {base}'s (ratio {gm:.2f})"
        elif gm > 1:
            text = f"CTIA's Dice standard deviation ({cls}) is {gm:.1f}x lower than {base}'s"
        else:
            text = f"CTIA's Dice standard deviation ({cls}) is {1 / gm:.1f}x higher than {base}'s"
        text += (f" (geometric mean over {len(ratios)} architecture/dimension pair{'s' * (len(ratios) > 1)}; "
                 f"lower in {n_lower} of {len(ratios)}), at a mean Dice difference of {diff:+.3f} (CTIA − {base}); std over volumes.")
        for r in ratios:
            ci = (f", 95% bootstrap CI {r.ci95[0]:.2f}–{r.ci95[1]:.2f}" if math.isfinite(r.ci95[0]) else "")
            details.append(f"{r.pair}: std {base} {r.base.std:.3f} vs CTIA {r.ctia.std:.3f} → ratio {r.ratio:.2f}{ci}; "
                           f"mean {base} {r.base.mean:.3f} vs CTIA {r.ctia.mean:.3f} (n = {r.ctia.n} volumes)")
        details.append("Standard deviations here are over test volumes (all folds pooled), as in 'Table 2'; "
                       "'Table 2, read across folds' gives the std over fold means.")
    else:
        text = "No architecture was run with both CTIA and a baseline augmentation, so their spread cannot be compared."
    table = summary_table(records, metric, [cls])
    best = max(table, key=lambda m: (table[m][cls].mean if table[m][cls].n else -math.inf))
    rep = next(r for r in records if r.model == best)
    details.insert(0, f"Highest mean Dice ({cls}): {rep.display}, {table[best][cls].fmt()}.")
    return Headline(text, details)


# ------------------------------------------------------------------------------------- quality flag
QUALITY_TITLE = "Quality flag: ensemble disagreement"


@dataclass
class QualityFlags:
    """One ensemble's quality flag: flagged volumes (lowest agreement first) and how agreement tracks Dice.

    n: volumes with an agreement; threshold: agreement below which volumes are flagged; spearman /
    spearman_p: rank correlation of agreement with Dice (`metric`, class `cls`) over the `n_corr` volumes
    with both finite (NaN when not computable).
    """

    model: str
    display: str
    cls: str
    metric: str
    n: int
    threshold: float
    flagged: list[VolumeResult]
    spearman: float
    spearman_p: float
    n_corr: int

    def finding(self) -> str:
        dice_name = f"Dice ({self.cls}, {METRICS[self.metric].split(', ', 1)[-1]})"
        text = f"{len(self.flagged)} of {self.n} volumes flagged (agreement below {self.threshold:.3f}). "
        text += f"Spearman correlation of agreement with {dice_name}: "
        if not math.isfinite(self.spearman):
            return text + "not computable (too few or constant values)."
        text += f"ρ = {self.spearman:.2f} (p = {self.spearman_p:.2g}, n = {self.n_corr}): "
        if self.spearman_p >= 0.05:
            return text + "no significant association, so agreement does not reliably predict Dice here."
        if self.spearman > 0:
            return text + "lower member agreement goes with lower Dice, so the flag points at volumes worth checking."
        return text + "lower member agreement goes with higher Dice, so the flag does not point at poor segmentations."

    def header(self) -> list[str]:
        return ["case", "fold", "agreement", f"Dice ({self.cls})"]

    def rows(self) -> list[list[str]]:
        """One row per flagged volume, cells as in `header`."""
        return [[r.case_id, str(r.fold), _fmt(_agreement_of(r)), _fmt(getattr(r, self.metric).get(self.cls, math.nan))]
                for r in self.flagged]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "display": self.display, "class": self.cls, "metric": self.metric, "n": self.n,
                "threshold": _json_float(self.threshold), "spearman": _json_float(self.spearman),
                "spearman_p": _json_float(self.spearman_p), "n_corr": self.n_corr,
                "flagged": [{"case_id": r.case_id, "fold": r.fold, "agreement": _json_float(r.agreement),
                             "dice": _json_float(getattr(r, self.metric).get(self.cls, math.nan))}
                            for r in self.flagged]}


def _fmt(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else "–"


def _agreement_of(r: VolumeResult) -> float:
    """Member agreement of an ensemble's volume; NaN for a single model's."""
    return math.nan if r.agreement is None else r.agreement


def quality_flags(records: Sequence[VolumeResult], cls: str, metric: str = "dice_paper",
                  rule: FlagRule = FlagRule()) -> list[QualityFlags]:
    """Per model whose records carry `agreement` (paper row order): flagged volumes and the Spearman
    correlation of agreement with `metric` of class `cls`."""
    from scipy.stats import spearmanr

    groups = _by_model(records)
    out: list[QualityFlags] = []
    for m in models_in_order(records):
        recs = [r for r in groups[m.model] if r.agreement is not None]
        if not recs:
            continue
        flagged_ids = flag_unusual({r.case_id: _agreement_of(r) for r in recs}, rule)
        flagged = sorted((r for r in recs if r.case_id in flagged_ids),
                         key=lambda r: (_agreement_of(r) if math.isfinite(_agreement_of(r)) else -math.inf, r.case_id))
        pairs = np.array([(_agreement_of(r), getattr(r, metric).get(cls, math.nan)) for r in recs], dtype=float)
        pairs = pairs[np.isfinite(pairs).all(axis=1)]
        rho = p = math.nan
        if len(pairs) >= 3 and np.ptp(pairs[:, 0]) > 0 and np.ptp(pairs[:, 1]) > 0:
            res = spearmanr(pairs[:, 0], pairs[:, 1])
            rho, p = float(res.statistic), float(res.pvalue)
        out.append(QualityFlags(m.model, m.display, cls, metric, len(recs),
                                rule.threshold([_agreement_of(r) for r in recs]), flagged, rho, p, len(pairs)))
    return out


def quality_note(rule: FlagRule) -> str:
    """What agreement is and which volumes `rule` flags, for the report."""
    return ("agreement: mean pairwise Dice between the ensemble members' foreground masks on a volume (1 = the members "
            f"agree exactly). Flagged: {rule.describe()} (MAD: median absolute deviation over the model's volumes). "
            "Flagged volumes deserve a check by hand.")


# -------------------------------------------------------------------------------------------- tables
@dataclass
class Section:
    """One table of the report as strings (shared by Markdown and HTML); highlight: 'max', 'min' or None."""

    title: str
    note: str
    header: list[str]
    rows: list[list[str]]
    highlight: str | None = "max"


def standard_sections(records: Sequence[VolumeResult], classes: Sequence[str], thickness_edges_mm: Sequence[float],
                      summary: dict[str, SummaryTable], all_ratios: Sequence[StdRatio]) -> list[Section]:
    """The report's own tables, in display order.

    summary: metric (each key of `METRICS`) -> `summary_table` over `classes`; all_ratios: `all_std_ratios` of
    Dice, paper protocol, over `classes`.
    """
    cls = headline_class(classes)
    names = {m.model: m.display for m in models_in_order(records)}
    secs = []
    for metric, title in (("dice_paper", "Table 2 — Dice, paper protocol"),
                          ("dice", "Dice on the full volume in original geometry")):
        t = summary[metric]
        secs.append(Section(title, "mean ± std over volumes, pooled across folds", ["model", *classes, "n"],
                            [[names[m], *(t[m][c].fmt() for c in classes), str(max(s.n for s in t[m].values()))]
                             for m in t]))
    t = fold_mean_table(records, "dice_paper", classes)
    secs.append(Section("Table 2, read across folds — Dice, paper protocol",
                        "mean ± std of the per-fold mean Dice (n = folds); the paper's very small stds suggest its "
                        "Table 2 may read this way", ["model", *classes, "folds"],
                        [[names[m], *(t[m][c].fmt() for c in classes), str(max(s.n for s in t[m].values()))]
                         for m in t]))
    paper = paper_table2_section(records, classes)
    if paper is not None:
        secs.append(paper)
    t = summary["hd95"]
    if any(st.n for row in t.values() for st in row.values()):
        secs.append(Section("HD95 (mm), full volume", "95th percentile Hausdorff distance in mm; mean ± std over "
                            "volumes where both structures are present", ["model", *classes],
                            [[names[m], *(t[m][c].fmt(2) for c in classes)] for m in t], "min"))
    for baseline in BASELINE_AUGS:
        ratios = [r for r in all_ratios if r.baseline == baseline]
        if not ratios:
            continue
        b = AUG_NAMES[baseline]
        secs.append(Section(
            f"Spread: {b} vs CTIA per architecture", f"std ratio {b}/CTIA > 1 means CTIA varies less across "
            "volumes (std over volumes); 95% CI from a paired bootstrap over volumes; Dice, paper protocol",
            ["architecture", "class", b, "CTIA", f"std ratio {b}/CTIA", "95% CI", f"Δ mean (CTIA − {b})"],
            [[r.pair, r.cls, r.base.fmt(), r.ctia.fmt(), f"{r.ratio:.2f}",
              f"{r.ci95[0]:.2f}–{r.ci95[1]:.2f}" if math.isfinite(r.ci95[0]) else "–", f"{r.mean_diff:+.3f}"]
             for r in ratios], None))
    folds, ft = fold_table(records, "dice_paper", cls)
    secs.append(Section(f"Per fold — Dice ({cls}), paper protocol", "test folds of the slice-sorted cross-validation",
                        ["model", *(f"fold {k}" for k in folds)], [[names[m], *(ft[m][k].fmt() for k in folds)] for m in ft]))
    groups, tt = thickness_table(records, "dice_paper", cls, thickness_edges_mm)
    counts = {g: len({r.case_id for r in records if thickness_group_of(r.slice_thickness, thickness_edges_mm) == g})
              for g in groups}
    secs.append(Section(f"By slice thickness — Dice ({cls}), paper protocol", "volumes grouped by slice thickness",
                        ["model", *(f"{g} (n={counts[g]})" for g in groups)],
                        [[names[m], *(tt[m][g].fmt() for g in groups)] for m in tt]))
    return secs


def paper_table2_section(records: Sequence[VolumeResult], classes: Sequence[str]) -> Section | None:
    """Our Table 2 rows next to the paper's (`PAPER_TABLE2`), with both std definitions: over test volumes (all
    folds pooled) and over the per-fold means. For liver (CHAOS, the paper's Table 3) our rows with a note that
    the paper's numbers are not in the text we hold, instead of an empty column. None for other classes."""
    if "liver" in classes and "kidney" not in classes:
        vol, folds = summary_table(records, "dice_paper", ["liver"]), fold_mean_table(records, "dice_paper", ["liver"])
        return Section(PAPER_TABLE3_TITLE, "the paper's Table 3 (CHAOS liver) numbers are not in the paper text this "
                       "project holds (only Table 2, KiTS19, is), so there is no paper column to compare with; ours: "
                       "mean ± std over test volumes and over the per-fold means",
                       ["model", "class", "ours, std over volumes", "ours, std over fold means"],
                       [[m.display, "liver", vol[m.model]["liver"].fmt(), folds[m.model]["liver"].fmt()]
                        for m in models_in_order(records) if m.model in vol], None)
    wanted = [c for c in ("kidney", "tumour", "total") if c in classes]
    if len(wanted) < 3:
        return None
    vol = summary_table(records, "dice_paper", wanted)
    folds = fold_mean_table(records, "dice_paper", wanted)
    rows = []
    for m in models_in_order(records):
        if m.model not in vol:
            continue
        ref = PAPER_TABLE2.get(m.display)
        for c in wanted:
            paper = f"{ref[c][0]:.3f} ± {ref[c][1]:.3f}" if ref else "–"
            diff = f"{vol[m.model][c].mean - ref[c][0]:+.3f}" if ref and vol[m.model][c].n else "–"
            rows.append([m.display, c, paper, vol[m.model][c].fmt(), folds[m.model][c].fmt(), diff])
    return Section(PAPER_TITLE, "paper: Kloenne et al. 2020, Table 2 (KiTS19), mean ± std as printed, the std's "
                   "definition unstated; ours: the same mean with the std over test volumes (all folds pooled: the "
                   "definition of our Table 2, the spread tables and the headline) and over the per-fold means "
                   "(n = folds); Δ = our mean − the paper's", ["model", "class", "paper", "ours, std over volumes",
                                                          "ours, std over fold means", "Δ mean"], rows, None)


def stack_selection_section(stack_dirs: Sequence[str | Path]) -> Section | None:
    """The stacked ensembles' candidates per member set with their validation score and whether top_k kept them
    (from each stack folder's `stack.json`). None when no stack folder records candidates."""
    from ctseg.runs import StackRun

    stacks = [StackRun.read(d) for d in stack_dirs if (Path(d) / "stack.json").is_file()]
    rows = []
    for info in stacks:
        aug = AUG_NAMES.get(info.aug, info.aug)
        cands = sorted(info.candidates, key=lambda c: (c["set"], -(c["val_score"] or -1.0), c["name"]))
        for c in cands:
            score = "–" if c["val_score"] is None else f"{c['val_score']:.4f}"
            kept = c.get("selected_folds")  # per-fold selection (issue 17); older stacks: one global choice
            chosen = ("folds " + ", ".join(map(str, kept)) if kept else "no") if kept is not None else \
                ("yes" if c["selected"] else "no")
            rows.append([aug, c["set"], c["name"], score, chosen])
    if not rows:
        return None
    top_k = {info.top_k for info in stacks if info.top_k is not None}
    return Section("Stacked CNN: candidates and the top-k kept", f"top_k = {', '.join(map(str, sorted(top_k)))} per "
                   "member set and test fold k, by the best validation Dice of each candidate's fold-k model on "
                   "fold k's validation split (seeded by the fold: the same cases for every candidate, none in fold "
                   "k); the score shown is the mean over folds",
                   ["stack", "member set", "candidate run", "validation score", "kept for test fold"], rows, None)


# ---------------------------------------------------------------------------------------- the report
def software_versions() -> dict[str, str]:
    """Package -> version of this process (ctseg, python, torch, numpy, matplotlib), platform, device, git commit."""
    import matplotlib
    import torch

    import ctseg

    v = {"ctseg": ctseg.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
         "numpy": np.__version__, "matplotlib": matplotlib.__version__, "platform": platform.platform(),
         "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"}
    try:
        v["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                         text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return v


@dataclass
class Report:
    """Everything a report shows, computed once from the records by `build_report`.

    `render_markdown`, `render_html` and `Report.to_json` only format it, so results.md, report/index.html and
    results.json agree by construction.
    """

    title: str
    created: datetime  # when built, UTC
    records: list[VolumeResult]
    models: list[VolumeResult]  # one representative record per model, in the paper's row order
    classes: list[str]  # `class_names` of the records
    headline: Headline  # including the stress test's lines
    sections: list[Section]  # tables in display order: standard, extra (e.g. stack selection), stress test
    summary: dict[str, SummaryTable]  # metric (each key of METRICS) -> model -> class -> Stat
    std_ratios: list[StdRatio]  # every baseline of BASELINE_AUGS vs CTIA, Dice paper protocol, every class
    flag_rule: FlagRule
    quality_flags: list[QualityFlags]  # one per model whose records carry `agreement` (ensembles)
    versions: dict[str, str]  # package -> version (`software_versions`)
    config: dict[str, Any] | None = None
    stress: dict[str, Any] | None = None  # stress-test summary (`ctseg.stress.summary`)

    @property
    def headline_class(self) -> str:
        return headline_class(self.classes)

    def to_json(self, results_dir: Path) -> dict[str, Any]:
        """results.json content; overlay paths relative to `results_dir` where possible."""
        return {"title": self.title, "created": self.created.isoformat(timespec="seconds"), "classes": self.classes,
                "headline": self.headline.to_json(),
                "summary": {metric: {m: {c: s.to_json() for c, s in row.items()} for m, row in table.items()}
                            for metric, table in self.summary.items()},
                "std_ratios": [r.to_json() for r in self.std_ratios],
                "quality_flags": [q.to_json() for q in self.quality_flags], "stress": self.stress,
                "versions": self.versions, "config": self.config,
                "records": [_portable(r, results_dir) for r in self.records]}


def build_report(records: Sequence[VolumeResult], *, title: str = "ctseg results",
                 config: dict[str, Any] | None = None, thickness_edges_mm: Sequence[float] = DEFAULT_THICKNESS_EDGES_MM,
                 versions: dict[str, str] | None = None, flag_rule: FlagRule = FlagRule(),
                 extra_sections: Sequence[Section] = (),
                 stress: dict[str, Any] | None = None, headline_extra: Sequence[str] = ()) -> Report:
    """Compute everything the report shows from the per-volume records (at least one).

    versions: package versions (default: `software_versions()` of this process).
    flag_rule: thresholds of the ensemble quality flag (flags only when records carry `agreement`).
    extra_sections: tables appended after the standard ones (e.g. `stack_selection_section`).
    stress: a stress-test summary (`ctseg.stress.summary`): its robustness gaps join the headline and tables.
    headline_extra: lines added to the headline's details (e.g. the ablation's choice).
    """
    if not records:
        raise ValueError("no results to report")
    classes = class_names(records)
    summary = {metric: summary_table(records, metric, classes) for metric in METRICS}
    ratios = all_std_ratios(records, "dice_paper", classes)
    head = headline(records, "dice_paper", classes, all_ratios=ratios)
    sections = [*standard_sections(records, classes, thickness_edges_mm, summary, ratios), *extra_sections]
    if stress:
        from ctseg.stress.summary import headline_lines, report_tables

        head.details += headline_lines(stress)
        sections += [Section(t, n, h, r, None) for t, n, h, r in report_tables(stress)]
    head.details += list(headline_extra)
    return Report(title=title, created=datetime.now(timezone.utc), records=list(records),
                  models=models_in_order(records), classes=classes, headline=head, sections=sections, summary=summary,
                  std_ratios=ratios, flag_rule=flag_rule,
                  quality_flags=quality_flags(records, headline_class(classes), rule=flag_rule),
                  versions=versions or software_versions(), config=config, stress=stress)


# ------------------------------------------------------------------------------------- results files
_CSV_FIXED = ["case_id", "fold", "model", "display", "arch", "dim", "aug", "variant", "slice_thickness", "num_slices",
              "agreement"]


def write_results_csv(records: Sequence[VolumeResult], path: Path, classes: Sequence[str]) -> None:
    """results.csv: one row per volume x model (paper row order, fold, case); empty cells for NaN."""
    buf = io.StringIO()
    cols = _CSV_FIXED + [f"{m}_{c}" for m in ("dice", "dice_paper", "hd95") for c in classes]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in sorted(records, key=lambda r: (model_sort_key(r), r.fold, r.case_id)):
        row = {k: getattr(r, k) for k in _CSV_FIXED if k not in ("display", "agreement")}
        row["display"] = r.display
        row["agreement"] = "" if r.agreement is None or not math.isfinite(r.agreement) else f"{r.agreement:.6g}"
        for m in ("dice", "dice_paper", "hd95"):
            for c in classes:
                v = getattr(r, m).get(c, math.nan)
                row[f"{m}_{c}"] = "" if not math.isfinite(v) else f"{v:.6g}"
        w.writerow(row)
    atomic_write_text(path, buf.getvalue())


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    """results.md: headline, tables, quality flags and software versions."""
    head = report.headline
    md = [f"# {report.title}", "", f"**{head.text}**", "", *(f"- {d}" for d in head.details), ""]
    for sec in report.sections:
        md += [f"## {sec.title}", "", f"_{sec.note}_", "", _md_table(sec.header, sec.rows), ""]
    if report.quality_flags:
        md += [f"## {QUALITY_TITLE}", "", f"_{quality_note(report.flag_rule)}_", ""]
        for q in report.quality_flags:
            md += [f"### {q.display}", "", q.finding(), ""]
            md += [_md_table(q.header(), q.rows()) if q.flagged else "_No volume flagged._", ""]
    md += ["## Software", "", _md_table(["package", "version"], [[k, v] for k, v in report.versions.items()]), ""]
    return "\n".join(md)


def write_results(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write results.csv / results.json / results.md (+ config.yaml, versions.json) into `out_dir`; returns
    the paths by kind ('csv', 'json', 'md', 'config')."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    write_results_csv(report.records, paths["csv"], report.classes)
    atomic_write_text(paths["json"], json.dumps(report.to_json(out), indent=1, allow_nan=False))
    atomic_write_text(paths["md"], render_markdown(report))
    if report.config is not None:
        paths["config"] = out / "config.yaml"
        atomic_write_text(paths["config"], yaml.safe_dump(report.config, sort_keys=False))
    atomic_write_text(out / "versions.json", json.dumps(report.versions, indent=1))
    return paths


def _portable(r: VolumeResult, base: Path) -> dict[str, Any]:
    """JSON record with its overlay path relative to `base` (the results folder) when possible."""
    d = r.to_json()
    if r.overlay and Path(r.overlay).is_absolute():
        try:
            d["overlay"] = os.path.relpath(r.overlay, base)
        except ValueError:  # another drive (Windows)
            pass
    return d


def load_results(path: str | Path) -> list[VolumeResult]:
    """Records from a results.json written by `write_results` or a per-fold results file (a JSON list)."""
    path = Path(path)
    data = json.loads(path.read_text())
    records = [VolumeResult.from_json(d) for d in (data["records"] if isinstance(data, dict) else data)]
    for r in records:
        if r.overlay and not Path(r.overlay).is_absolute():
            r.overlay = str((path.parent / r.overlay).resolve())
    return records


# ---------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2433;background:#f6f7fb;margin:0}
main{max-width:1180px;margin:0 auto;padding:28px 32px 60px;background:#fff;box-shadow:0 0 24px rgba(0,0,0,.06)}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 8px;border-bottom:2px solid #e4e7ef;padding-bottom:6px}
h3{font-size:16px;margin:22px 0 6px}.sub{color:#5b6478;margin:0 0 18px;font-size:14px}
.headline{background:#eef5ff;border-left:6px solid #2f6fde;padding:14px 18px;border-radius:6px;font-size:17px;line-height:1.45}
.headline ul{font-size:14px;margin:8px 0 0;padding-left:20px;color:#34405a}
table{border-collapse:collapse;margin:8px 0 4px;font-size:14px;font-variant-numeric:tabular-nums}
th,td{padding:6px 12px;border-bottom:1px solid #e4e7ef;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f0f2f8;font-weight:600}
tr:nth-child(even) td{background:#fafbfd}tr.ctia td:first-child{color:#1f5fbf}tr.mia td:first-child{color:#b35c00}tr.nnunet td:first-child{color:#8a3fb3}
td.best{font-weight:700;background:#e6f4ea !important}
.note{color:#5b6478;font-size:13px;margin:2px 0 6px}
figure{margin:12px 0 20px}figure img{max-width:100%;border:1px solid #e4e7ef;border-radius:4px}
figcaption{color:#5b6478;font-size:13px;margin-top:4px}
pre{background:#f6f8fa;border:1px solid #e4e7ef;border-radius:6px;padding:12px;font-size:12px;overflow:auto;max-height:480px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:6px 18px}.grid figure{margin:6px 0}
"""


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figure_html(path: Path, caption: str) -> str:
    """A <figure> with the PNG at `path` embedded."""
    return (f'<figure><img src="{png_data_uri(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _html_table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
                highlight: str | None = None) -> str:
    """HTML table; highlight 'max' / 'min' marks the best mean per column (cells 'mean ± std')."""
    best: dict[int, int] = {}
    for j in range(1, len(header)):
        means = []
        for i, r in enumerate(rows):
            try:
                means.append((float(r[j].split(" ")[0]), i))
            except (ValueError, IndexError):
                pass
        if highlight and len(means) > 1 and header[j] not in ("n", "folds"):
            best[j] = (max(means) if highlight == "max" else min(means))[1]
    h = "<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr></thead><tbody>"
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes else ""
        h += f"<tr{cls}>" + "".join(
            f'<td class="best">{html.escape(c)}</td>' if best.get(j) == i else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(r)) + "</tr>"
    return h + "</tbody></table>"


def render_html(report: Report, figures: Sequence[Figure] = (), *, intro: str = "",
                quality_figures: dict[str, Path] | None = None) -> str:
    """The report page. figures: (section, caption, PNG path) in display order; images are embedded.
    quality_figures: model -> agreement vs Dice scatter plot, shown in the quality-flag section."""
    aug_of = {m.display: m.aug for m in report.models}
    n_vol = len({r.case_id for r in report.records})
    n_folds = len({r.fold for r in report.records})
    head = report.headline
    parts = [f"<h1>{html.escape(report.title)}</h1>",
             f'<p class="sub">{n_vol} volumes, {n_folds}-fold slice-sorted cross-validation, '
             f"{len(report.models)} models · generated {report.created.astimezone().strftime('%Y-%m-%d %H:%M')}"
             f"{' · ' + html.escape(intro) if intro else ''}</p>",
             f'<div class="headline"><b>{html.escape(head.text)}</b><ul>'
             + "".join(f"<li>{html.escape(d)}</li>" for d in head.details) + "</ul></div>"]
    for sec in report.sections:
        row_cls = [aug_of.get(r[0], "") for r in sec.rows]
        parts.append(f"<h2>{html.escape(sec.title)}</h2><p class=note>{html.escape(sec.note)}</p>"
                     + _html_table(sec.header, sec.rows, row_cls, sec.highlight))
    sections: dict[str, list[tuple[str, Path]]] = {}
    for section, caption, path in figures:
        sections.setdefault(section, []).append((caption, path))
    for section, figs in sections.items():
        items = "".join(_figure_html(path, caption) for caption, path in figs)
        parts.append(f"<h2>{html.escape(section)}</h2>" + (f'<div class="grid">{items}</div>' if len(figs) > 1 else items))
    if report.quality_flags:
        parts.append(f'<h2 id="quality-flag">{html.escape(QUALITY_TITLE)}</h2>'
                     f"<p class=note>{html.escape(quality_note(report.flag_rule))}</p>")
        for q in report.quality_flags:
            parts.append(f"<h3>{html.escape(q.display)}</h3><p>{html.escape(q.finding())}</p>"
                         + (_html_table(q.header(), q.rows(), highlight=None) if q.flagged
                            else "<p class=note>No volume flagged.</p>"))
            fig = (quality_figures or {}).get(q.model)
            if fig is not None:
                parts.append(_figure_html(fig, f"{q.display}: agreement between members vs Dice ({q.cls}, paper "
                                               "protocol), one point per volume; flagged volumes in red, dashed line: "
                                               "flag threshold"))
    parts.append("<h2>Software</h2>"
                 + _html_table(["package", "version"], [[k, v] for k, v in report.versions.items()]))
    if report.config is not None:
        parts.append("<h2>Configuration</h2><pre>" + html.escape(yaml.safe_dump(report.config, sort_keys=False))
                     + "</pre>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(report.title)}</title>'
            f"<style>{_CSS}</style></head><body><main>" + "\n".join(parts) + "</main></body></html>\n")


def write_report(records: Sequence[VolumeResult], out_dir: str | Path, *, config: dict[str, Any] | None = None,
                 log_csvs: dict[str, list[Path]] | None = None, title: str = "ctseg results",
                 thickness_edges_mm: Sequence[float] = DEFAULT_THICKNESS_EDGES_MM, intro: str = "",
                 flag_rule: FlagRule = FlagRule(), extra_sections: Sequence[Section] = (),
                 stress_dir: str | Path | None = None, ablation_dir: str | Path | None = None) -> Path:
    """Results files + plots + `report/index.html` into `out_dir`, all from one `build_report`; returns the HTML path.

    log_csvs: display name -> training logs (`log.csv` of each fold's run) for the training curves.
    flag_rule: thresholds of the ensemble quality flag.
    stress_dir: a finished stress test (`summary.json`, `curves.png`; `ctseg.stress.runner`) to report.
    ablation_dir: a finished augmentation ablation (`ctseg.evaluate.ablation`): its choice joins the headline,
    its tables and effect figure the report.
    Overlay images come from each record's `overlay` file (relative paths resolve against `out_dir`).
    """
    from ctseg.evaluate import plots

    out = Path(out_dir)
    stress = None
    stress_figures: list[Figure] = []
    if stress_dir is not None:
        from ctseg.stress.summary import load_summary

        stress = load_summary(stress_dir)
        stress_figures.append((
            "Stress test: Dice vs severity", f"Dice ({stress['headline_structure']}) per acquisition-shift axis vs "
            "severity, one line per model, band: 95% bootstrap CI over volumes; 'clean' = the scan as acquired (see "
            "docs/STRESS.md)", Path(stress_dir) / "curves.png"))
    headline_extra: list[str] = []
    if ablation_dir is not None:
        from ctseg.evaluate.ablation import report_parts

        headline_extra, tables, effects = report_parts(ablation_dir)
        extra_sections = [*extra_sections, *(Section(t, n, h, r, None) for t, n, h, r in tables)]
        stress_figures.append(("Ablation: effect of each augmentation component", "each ablated arm minus its "
                               "reference (Dice, paired 95% bootstrap CI over volumes): clean, all population "
                               "shifts, each shift; filled dot = CI excludes 0 (docs/ABLATION.md)", effects))
    report = build_report(records, title=title, config=config, thickness_edges_mm=thickness_edges_mm,
                          flag_rule=flag_rule, extra_sections=extra_sections, stress=stress,
                          headline_extra=headline_extra)
    write_results(report, out)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    classes, cls = report.classes, report.headline_class
    figures: list[Figure] = []
    p = plots.dice_boxplot(records, "dice_paper", classes, plot_dir / "dice_boxplot.png")
    figures.append(("Dice per configuration", "Dice per volume (paper protocol); one box per model, "
                    "points are volumes. Orange: MIA, purple: nnU-Net DA, blue: CTIA, green: ensembles.", p))
    p = plots.thickness_boxplot(records, "dice_paper", cls, thickness_edges_mm, plot_dir / "dice_by_thickness.png")
    figures.append(("Dice by slice thickness", f"Dice ({cls}, paper protocol) per slice-thickness group", p))
    for model in report.models:
        recs = [r for r in records if r.model == model.model and r.overlay]
        if not recs:
            continue
        p = plots.overlay_figure(recs, cls, out, plot_dir / f"overlay_{_safe(model.model)}.png")
        figures.append(("Best, median and worst volume per model",
                        f"{model.display} — ground truth solid, prediction dashed ({_class_colours(classes)}); "
                        "axial slice with the most ground-truth foreground", p))
    for name, paths in (log_csvs or {}).items():
        existing = [Path(x) for x in paths if Path(x).is_file()]
        if existing:
            curves = plots.training_curves(existing, name, plot_dir / f"curves_{_safe(name)}.png")
            if curves is not None:
                figures.append(("Training curves", f"{name}: one line per fold", curves))
    figures += stress_figures
    quality_figures = {}
    for q in report.quality_flags:
        recs = [r for r in records if r.model == q.model and r.agreement is not None]
        quality_figures[q.model] = plots.agreement_scatter(
            recs, {r.case_id for r in q.flagged}, q.threshold, q.cls, q.metric,
            f"{q.display}: Spearman ρ = {_fmt(q.spearman, 2)}", plot_dir / f"agreement_{_safe(q.model)}.png")
    html_path = out / "report" / "index.html"
    atomic_write_text(html_path, render_html(report, figures, intro=intro, quality_figures=quality_figures))
    log.info("report written to %s", html_path)
    return html_path


def _class_colours(classes: Sequence[str]) -> str:
    from ctseg.evaluate.plots import CLASS_COLOR_NAMES

    fg = [c for c in classes if c != "total"]
    return ", ".join(f"{CLASS_COLOR_NAMES[i % len(CLASS_COLOR_NAMES)]}: {c}" for i, c in enumerate(fg))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
