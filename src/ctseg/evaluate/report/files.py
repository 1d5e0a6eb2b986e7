"""The report's files, all written atomically:

    results.csv     one row per volume x model (Dice per class, both protocols, HD95, slice geometry)
    results.json    the same records plus every summary table and the headline finding
    results.md      Table 2 layout (mean ± std over volumes, pooled across folds), the baseline/CTIA std ratios,
                    per-fold and per-slice-thickness tables, and (ensembles) the quality flag
    report/index.html   self-contained page with the plots
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from ctseg.evaluate.quality import FlagRule
from ctseg.evaluate.records import VolumeResult, model_sort_key
from ctseg.evaluate.report.build import Report, build_report
from ctseg.evaluate.report.sections import Num, Section, cell_text
from ctseg.evaluate.report.render import Figure, _class_colours, _safe, render_html, render_markdown
from ctseg.evaluate.report.statistics import DEFAULT_THICKNESS_EDGES_MM
from ctseg.fileutil import atomic_write_text

log = logging.getLogger(__name__)

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


def load_results(path: str | Path) -> list[VolumeResult]:
    """Records from a results.json written by `write_results` or a per-fold results file (a JSON list)."""
    path = Path(path)
    data = json.loads(path.read_text())
    records = [VolumeResult.from_json(d) for d in (data["records"] if isinstance(data, dict) else data)]
    for r in records:
        if r.overlay and not Path(r.overlay).is_absolute():
            r.overlay = str((path.parent / r.overlay).resolve())
    return records




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
        if effects is not None:
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
            f"{q.display}: Spearman ρ = {cell_text(Num(q.spearman, 2))}", plot_dir / f"agreement_{_safe(q.model)}.png")
    html_path = out / "report" / "index.html"
    atomic_write_text(html_path, render_html(report, figures, intro=intro, quality_figures=quality_figures))
    log.info("report written to %s", html_path)
    return html_path


