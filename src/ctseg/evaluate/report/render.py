"""Report rendering: results.md (Markdown) and report/index.html (self-contained: inline CSS, images embedded as
base64 PNG) from one `Report`; formatting only, every number comes from the report's sections."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import yaml

from ctseg.evaluate.report.findings import QUALITY_TITLE, quality_note
from ctseg.evaluate.report.sections import Cell, cell_text, shown_value

if TYPE_CHECKING:
    from ctseg.evaluate.report.build import Report

Figure = tuple[str, str, Path]  # (report section, caption, PNG path)


def _md_table(header: list[str], rows: Sequence[Sequence[Cell]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell_text(c, digits) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    """results.md: headline, tables, quality flags and software versions."""
    head = report.headline
    md = [f"# {report.title}", "", f"**{head.text}**", "", *(f"- {d}" for d in head.details), ""]
    for sec in report.sections:
        md += [f"## {sec.title}", "", f"_{sec.note}_", "", _md_table(sec.header, sec.rows, sec.digits), ""]
    if report.quality_flags:
        md += [f"## {QUALITY_TITLE}", "", f"_{quality_note(report.flag_rule)}_", ""]
        for q in report.quality_flags:
            md += [f"### {q.display}", "", q.finding(), ""]
            md += [_md_table(q.header(), q.rows()) if q.flagged else "_No volume flagged._", ""]
    md += ["## Software", "", _md_table(["package", "version"], [[k, v] for k, v in report.versions.items()]), ""]
    return "\n".join(md)



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


def _html_table(header: list[str], rows: Sequence[Sequence[Cell]], row_classes: list[str] | None = None,
                highlight: str | None = None, digits: int = 3) -> str:
    """HTML table; highlight 'max' / 'min' marks the best shown value per column (`shown_value`; not the n /
    folds columns)."""
    best: dict[int, int] = {}
    for j in range(1, len(header)):
        means = [(v, i) for i, r in enumerate(rows) if j < len(r) and (v := shown_value(r[j], digits)) is not None]
        if highlight and len(means) > 1 and header[j] not in ("n", "folds"):
            best[j] = (max(means) if highlight == "max" else min(means))[1]
    h = "<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr></thead><tbody>"
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes else ""
        h += f"<tr{cls}>" + "".join(
            f'<td class="best">{html.escape(c)}</td>' if best.get(j) == i else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(cell_text(x, digits) for x in r)) + "</tr>"
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
        row_cls = [aug_of.get(cell_text(r[0]), "") for r in sec.rows]
        parts.append(f"<h2>{html.escape(sec.title)}</h2><p class=note>{html.escape(sec.note)}</p>"
                     + _html_table(sec.header, sec.rows, row_cls, sec.highlight, sec.digits))
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


def _class_colours(classes: Sequence[str]) -> str:
    from ctseg.evaluate.plots import CLASS_COLOR_NAMES

    fg = [c for c in classes if c != "total"]
    return ", ".join(f"{CLASS_COLOR_NAMES[i % len(CLASS_COLOR_NAMES)]}: {c}" for i, c in enumerate(fg))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
