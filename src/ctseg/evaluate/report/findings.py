"""Report findings: the headline (CTIA vs the first baseline in spread, and the best model) and the ensembles'
quality flag.

Quality flag (only when records carry `agreement`, i.e. ensembles): per model, the volumes whose members
disagree unusually (`ctseg.evaluate.quality.flag_unusual` over that model's volumes), their Dice, and the
Spearman rank correlation of agreement with Dice (headline class, paper protocol): does low agreement
predict a poor segmentation?
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ctseg.evaluate.quality import FlagRule, flag_unusual
from ctseg.evaluate.records import VolumeResult, aug_display, json_float as _json_float, models_in_order
from ctseg.evaluate.report.sections import Cell, Num
from ctseg.evaluate.report.statistics import (BASELINE_AUGS, METRICS, StdRatio, _by_model, all_std_ratios,
                                              headline_class, summary_table)


@dataclass
class Headline:
    """The report's finding (one sentence) and the lines that back it."""

    text: str
    details: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "details": self.details}


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
        base = aug_display(ratios[0].baseline)
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

    def rows(self) -> list[list[Cell]]:
        """One row per flagged volume, cells as in `header`."""
        return [[r.case_id, r.fold, Num(_agreement_of(r)), Num(getattr(r, self.metric).get(self.cls, math.nan))]
                for r in self.flagged]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "display": self.display, "class": self.cls, "metric": self.metric, "n": self.n,
                "threshold": _json_float(self.threshold), "spearman": _json_float(self.spearman),
                "spearman_p": _json_float(self.spearman_p), "n_corr": self.n_corr,
                "flagged": [{"case_id": r.case_id, "fold": r.fold, "agreement": _json_float(r.agreement),
                             "dice": _json_float(getattr(r, self.metric).get(self.cls, math.nan))}
                            for r in self.flagged]}


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


