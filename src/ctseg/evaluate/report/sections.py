"""Report sections: tables as data (header + rows of value cells), shared by Markdown and HTML.

A cell is a label (str), a count (int), a `Stat` (mean ± std over n values), a `Num`, a `PlusMinus` (a
published mean ± std), an `Interval` or None (missing, shown "–"); `cell_text` formats one as both outputs
show it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from ctseg.evaluate.records import VolumeResult, aug_display, models_in_order, thickness_group_of
from ctseg.evaluate.report.statistics import (BASELINE_AUGS, Stat, StdRatio, SummaryTable, fold_mean_table, fold_table,
                                              headline_class, summary_table, thickness_table)

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


@dataclass(frozen=True)
class Num:
    """A number shown with `digits` decimals (signed: always with its sign); non-finite: "–" when dash, else
    as Python prints it (inf, nan)."""

    value: float
    digits: int = 3
    signed: bool = False
    dash: bool = True


@dataclass(frozen=True)
class PlusMinus:
    """A published mean ± std (n unknown), e.g. the paper's Table 2."""

    mean: float
    std: float
    digits: int = 3


@dataclass(frozen=True)
class Interval:
    """A range lo–hi (e.g. a 95 % CI); "–" when lo is not finite."""

    lo: float
    hi: float
    digits: int = 2


Cell = Union[str, int, Stat, Num, PlusMinus, Interval, None]


def cell_text(cell: Cell, digits: int = 3) -> str:
    """A cell as the report prints it; `digits`: decimals of a `Stat` (the section's)."""
    if cell is None:
        return "–"
    if isinstance(cell, Stat):
        return cell.fmt(digits)
    if isinstance(cell, Num):
        if cell.dash and not math.isfinite(cell.value):
            return "–"
        return f"{cell.value:{'+' if cell.signed else ''}.{cell.digits}f}"
    if isinstance(cell, PlusMinus):
        return f"{cell.mean:.{cell.digits}f} ± {cell.std:.{cell.digits}f}"
    if isinstance(cell, Interval):
        return f"{cell.lo:.{cell.digits}f}–{cell.hi:.{cell.digits}f}" if math.isfinite(cell.lo) else "–"
    return str(cell)


def shown_value(cell: Cell, digits: int = 3) -> float | None:
    """The number a value cell shows (its mean for a Stat, as rounded on the page), for marking a column's best;
    None for labels, intervals and missing values."""
    if isinstance(cell, str) or cell is None or isinstance(cell, Interval):
        return None
    try:
        return float(cell_text(cell, digits).split(" ")[0])
    except ValueError:
        return None


@dataclass
class Section:
    """One table of the report: rows of value cells under `header`. highlight: 'max', 'min' or None (mark each
    column's best shown mean); digits: decimals of its `Stat` cells."""

    title: str
    note: str
    header: list[str]
    rows: Sequence[Sequence[Cell]]
    highlight: str | None = "max"
    digits: int = 3

    def text_rows(self) -> list[list[str]]:
        """The rows as printed."""
        return [[cell_text(c, self.digits) for c in row] for row in self.rows]


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
                            [[names[m], *(t[m][c] for c in classes), max(s.n for s in t[m].values())] for m in t]))
    t = fold_mean_table(records, "dice_paper", classes)
    secs.append(Section("Table 2, read across folds — Dice, paper protocol",
                        "mean ± std of the per-fold mean Dice (n = folds); the paper's very small stds suggest its "
                        "Table 2 may read this way", ["model", *classes, "folds"],
                        [[names[m], *(t[m][c] for c in classes), max(s.n for s in t[m].values())] for m in t]))
    paper = paper_table2_section(records, classes)
    if paper is not None:
        secs.append(paper)
    t = summary["hd95"]
    if any(st.n for row in t.values() for st in row.values()):
        secs.append(Section("HD95 (mm), full volume", "95th percentile Hausdorff distance in mm; mean ± std over "
                            "volumes where both structures are present", ["model", *classes],
                            [[names[m], *(t[m][c] for c in classes)] for m in t], "min", digits=2))
    for baseline in BASELINE_AUGS:
        ratios = [r for r in all_ratios if r.baseline == baseline]
        if not ratios:
            continue
        b = aug_display(baseline)
        secs.append(Section(
            f"Spread: {b} vs CTIA per architecture", f"std ratio {b}/CTIA > 1 means CTIA varies less across "
            "volumes (std over volumes); 95% CI from a paired bootstrap over volumes; Dice, paper protocol",
            ["architecture", "class", b, "CTIA", f"std ratio {b}/CTIA", "95% CI", f"Δ mean (CTIA − {b})"],
            [[r.pair, r.cls, r.base, r.ctia, Num(r.ratio, 2, dash=False), Interval(*r.ci95),
              Num(r.mean_diff, signed=True, dash=False)] for r in ratios], None))
    folds, ft = fold_table(records, "dice_paper", cls)
    secs.append(Section(f"Per fold — Dice ({cls}), paper protocol", "test folds of the slice-sorted cross-validation",
                        ["model", *(f"fold {k}" for k in folds)], [[names[m], *(ft[m][k] for k in folds)] for m in ft]))
    groups, tt = thickness_table(records, "dice_paper", cls, thickness_edges_mm)
    counts = {g: len({r.case_id for r in records if thickness_group_of(r.slice_thickness, thickness_edges_mm) == g})
              for g in groups}
    secs.append(Section(f"By slice thickness — Dice ({cls}), paper protocol", "volumes grouped by slice thickness",
                        ["model", *(f"{g} (n={counts[g]})" for g in groups)],
                        [[names[m], *(tt[m][g] for g in groups)] for m in tt]))
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
                       [[m.display, "liver", vol[m.model]["liver"], folds[m.model]["liver"]]
                        for m in models_in_order(records) if m.model in vol], None)
    wanted = [c for c in ("kidney", "tumour", "total") if c in classes]
    if len(wanted) < 3:
        return None
    vol = summary_table(records, "dice_paper", wanted)
    folds = fold_mean_table(records, "dice_paper", wanted)
    rows: list[list[Cell]] = []
    for m in models_in_order(records):
        if m.model not in vol:
            continue
        ref = PAPER_TABLE2.get(m.display)
        for c in wanted:
            paper = PlusMinus(*ref[c]) if ref else None
            diff = Num(vol[m.model][c].mean - ref[c][0], signed=True, dash=False) if ref and vol[m.model][c].n else None
            rows.append([m.display, c, paper, vol[m.model][c], folds[m.model][c], diff])
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
    rows: list[list[Cell]] = []
    for info in stacks:
        aug = aug_display(info.aug)
        cands = sorted(info.candidates, key=lambda c: (c["set"], -(c["val_score"] or -1.0), c["name"]))
        for c in cands:
            score = None if c["val_score"] is None else Num(c["val_score"], 4, dash=False)
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


