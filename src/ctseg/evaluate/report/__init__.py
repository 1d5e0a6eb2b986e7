"""Results of a cross-validated experiment: per-volume records -> tables (paper's Table 2), plots, HTML report.

Input is a list of `VolumeResult` (one per test volume x model); `write_report` writes results.csv / .json /
.md and report/index.html (`ctseg.evaluate.report.files`). Everything these files show is computed once, by
`build_report`, into one `Report`:

- `statistics`: mean ± std tables (over volumes, folds, slice-thickness groups), baseline/CTIA std ratios;
- `findings`: the headline and the ensembles' quality flag;
- `sections`: the tables as data (value cells: `Stat`, `Num`, ...), in display order;
- `render`: Markdown and HTML, formatting only.
"""
from ctseg.evaluate.records import (VolumeResult, arch_display, aug_display, display_name, model_sort_key,
                                    models_in_order, present_thickness_groups, thickness_group_of, thickness_labels)
from ctseg.evaluate.report.build import Report, build_report, software_versions
from ctseg.evaluate.report.files import load_results, write_report, write_results, write_results_csv
from ctseg.evaluate.report.findings import QUALITY_TITLE, Headline, QualityFlags, headline, quality_flags, quality_note
from ctseg.evaluate.report.render import Figure, render_html, render_markdown
from ctseg.evaluate.report.sections import (PAPER_TABLE2, PAPER_TABLE3_TITLE, PAPER_TITLE, Cell, Interval, Num,
                                            PlusMinus, Section, cell_text, paper_table2_section,
                                            stack_selection_section, standard_sections)
from ctseg.evaluate.report.statistics import (BASELINE_AUGS, DEFAULT_THICKNESS_EDGES_MM, METRICS, Stat, StdRatio,
                                              SummaryTable, all_std_ratios, class_names, fold_mean_table,
                                              fold_table, headline_class, stat, std_ratios, summary_table,
                                              thickness_table)

__all__ = ["BASELINE_AUGS", "DEFAULT_THICKNESS_EDGES_MM", "METRICS",
           "PAPER_TABLE2", "PAPER_TABLE3_TITLE", "PAPER_TITLE", "QUALITY_TITLE", "Cell", "Figure",
           "Headline", "Interval", "Num", "PlusMinus", "QualityFlags", "Report", "Section", "Stat",
           "StdRatio", "SummaryTable", "VolumeResult", "all_std_ratios", "arch_display", "aug_display", "build_report", "cell_text",
           "class_names", "display_name", "fold_mean_table", "fold_table", "headline", "headline_class",
           "load_results", "model_sort_key", "models_in_order", "paper_table2_section",
           "present_thickness_groups", "quality_flags", "quality_note", "render_html", "render_markdown",
           "software_versions", "stack_selection_section", "standard_sections", "stat", "std_ratios",
           "summary_table", "thickness_group_of", "thickness_labels", "thickness_table", "write_report",
           "write_results", "write_results_csv"]
