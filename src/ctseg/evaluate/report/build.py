"""`build_report`: everything a report shows (headline, sections, summary statistics, quality flags), computed
once from the per-volume records into one `Report`."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctseg.evaluate.quality import FlagRule
from ctseg.evaluate.records import VolumeResult, models_in_order
from ctseg.evaluate.report.findings import Headline, QualityFlags, headline, quality_flags
from ctseg.evaluate.report.sections import Section, standard_sections
from ctseg.evaluate.report.statistics import (DEFAULT_THICKNESS_EDGES_MM, METRICS, StdRatio, SummaryTable,
                                              all_std_ratios, class_names, headline_class, summary_table)


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


def _portable(r: VolumeResult, base: Path) -> dict[str, Any]:
    """JSON record with its overlay path relative to `base` (the results folder) when possible."""
    d = r.to_json()
    if r.overlay and Path(r.overlay).is_absolute():
        try:
            d["overlay"] = os.path.relpath(r.overlay, base)
        except ValueError:  # another drive (Windows)
            pass
    return d


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


