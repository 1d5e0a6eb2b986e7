"""Stress-test statistics, curves and report parts.

Per model, axis and severity: Dice mean, std (ddof 0) and worst volume per structure, and the failure rate
(volumes whose headline Dice - 'total' = kidney + tumour, or the single foreground class, e.g. liver - is below
`failure_dice`). Per model and axis: the robustness gap (RAMP 2026): clean mean Dice minus the mean over the
non-clean severities of the mean Dice, with a 95 % percentile bootstrap CI resampling volumes (the same
resampled volumes for every severity: paired). Skipped severities of a volume are left out of that
severity's mean.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ctseg.fileutil import atomic_write_text
from ctseg.stress.perturb import AXES

if TYPE_CHECKING:
    from ctseg.stress.models import ModelSpec


def _headline_structure(structures: Sequence[str]) -> str:
    return "total" if "total" in structures else structures[-1]


def _f(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _matrix(rows: list[dict], model: str, axis: str, severities: list[str], structure: str
            ) -> tuple[list[str], np.ndarray]:
    """(volumes, V x S Dice matrix, NaN where skipped or missing)."""
    vals: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["model"] == model and r["axis"] == axis and r.get(f"dice_{structure}") not in (None, ""):
            vals.setdefault(r["case_id"], {})[r["severity"]] = float(r[f"dice_{structure}"])
    vols = sorted(vals)
    m = np.full((len(vols), len(severities)), np.nan)
    for i, v in enumerate(vols):
        for j, s in enumerate(severities):
            m[i, j] = vals[v].get(s, np.nan)
    return vols, m


def _gap(m: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(m, axis=0)
    shifted = means[1:]
    shifted = shifted[np.isfinite(shifted)]
    if not np.isfinite(means[0]) or shifted.size == 0:
        return math.nan
    return float(means[0] - shifted.mean())


def bootstrap_gap(m: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(gap, CI low, CI high) of a V x S matrix (column 0 clean), resampling volumes (rows)."""
    gap = _gap(m)
    if m.shape[0] < 2 or not math.isfinite(gap):
        return gap, math.nan, math.nan
    rng = np.random.default_rng([seed, 0x6A9])
    idx = rng.integers(0, m.shape[0], size=(n_boot, m.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(m[idx], axis=1)              # (B, S)
        gaps = means[:, 0] - np.nanmean(means[:, 1:], axis=1)
    gaps = gaps[np.isfinite(gaps)]
    if gaps.size < n_boot // 2:
        return gap, math.nan, math.nan
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    return gap, float(lo), float(hi)


def bootstrap_mean_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size < 2:
        return (math.nan, math.nan)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(rows: list[dict], models: Sequence[ModelSpec], axes: dict[str, list[float]], structures: list[str], *,
              failure_dice: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict:
    """The summary dict (JSON-ready) of the rows of a stress test."""
    head = _headline_structure(structures)
    rng = np.random.default_rng([seed, 0xC1])
    out: dict[str, Any] = {"headline_structure": head, "failure_dice": failure_dice, "structures": list(structures),
           "out_of_fold": all(getattr(m, "folds", None) is not None for m in models),
           "models": [{"name": m.name, "display": m.display, "aug": m.aug} for m in models], "axes": {}}
    for axis, sev in axes.items():
        keys = [f"{float(s):g}" for s in sev]
        a: dict[str, Any] = {"unit": AXES[axis].unit, "description": AXES[axis].description, "severities": [float(s) for s in sev],
             "models": {}}
        for m in models:
            entry: dict[str, Any] = {"severities": [], "gap": {}}
            for st in structures:
                vols, mat = _matrix(rows, m.name, axis, keys, st)
                if not vols:
                    continue
                g, lo, hi = bootstrap_gap(mat, n_boot, seed)
                entry["gap"][st] = {"gap": _f(g), "ci95": [_f(lo), _f(hi)]}
            _, head_mat = _matrix(rows, m.name, axis, keys, head)
            for j, s in enumerate(sev):
                per: dict[str, Any] = {"severity": float(s), "clean": j == 0, "dice": {}}
                for st in structures:
                    vols, mat = _matrix(rows, m.name, axis, keys, st)
                    col = mat[:, j] if mat.size else np.empty(0)
                    ok = np.isfinite(col)
                    if not ok.any():
                        per["dice"][st] = {"mean": None, "std": None, "n": 0, "worst": None, "worst_case": None}
                        continue
                    w = int(np.nanargmin(np.where(ok, col, np.inf)))
                    lo, hi = bootstrap_mean_ci(col, n_boot, rng)
                    per["dice"][st] = {"mean": float(col[ok].mean()), "std": float(col[ok].std()), "n": int(ok.sum()),
                                       "worst": float(col[w]), "worst_case": vols[w], "ci95": [_f(lo), _f(hi)]}
                hcol = head_mat[:, j] if head_mat.size else np.empty(0)
                hok = np.isfinite(hcol)
                per["failure_rate"] = float((hcol[hok] < failure_dice).mean()) if hok.any() else None
                per["n_skipped"] = int((~hok).sum())
                entry["severities"].append(per)
            fail = [p["failure_rate"] for p in entry["severities"][1:] if p["failure_rate"] is not None]
            entry["failure_rate_shifted"] = float(np.mean(fail)) if fail else None
            entry["failure_rate_clean"] = entry["severities"][0]["failure_rate"] if entry["severities"] else None
            a["models"][m.name] = entry
        out["axes"][axis] = a
    return out


def write_summary(summary: dict, out_dir: str | Path) -> Path:
    """summary.json + curves.png into `out_dir`; returns the JSON path."""
    out = Path(out_dir)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
    stress_curves(summary, out / "curves.png")
    return out / "summary.json"


def load_summary(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------- plots
def _tick(axis: str, s: float) -> str:
    if s == AXES[axis].clean:
        return "clean"
    return f"{s:g}"


def stress_curves(summary: dict, path: str | Path) -> Path:
    """Dice (headline structure) vs severity, one panel per axis, one line per model with its 95 % bootstrap
    band; severities in increasing order (the clean value where it falls)."""
    from ctseg.evaluate.plots import COLORS, _save, plt

    head = summary["headline_structure"]
    axes = list(summary["axes"])
    ncol = min(3, len(axes))
    nrow = math.ceil(len(axes) / ncol)
    fig, grid = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for i, axis in enumerate(axes):
        ax = grid[i // ncol][i % ncol]
        a = summary["axes"][axis]
        order = np.argsort(a["severities"], kind="stable")
        xs = np.arange(len(order))
        for j, m in enumerate(summary["models"]):
            entry = a["models"].get(m["name"])
            if not entry or not entry["severities"]:
                continue
            pts = [entry["severities"][k]["dice"].get(head, {}) for k in order]
            y = np.array([p.get("mean") if p.get("mean") is not None else np.nan for p in pts])
            lo = np.array([(p.get("ci95") or [None])[0] if (p.get("ci95") or [None])[0] is not None else np.nan
                           for p in pts])
            hi = np.array([(p.get("ci95") or [None, None])[1] if (p.get("ci95") or [None, None])[1] is not None
                           else np.nan for p in pts])
            color = COLORS.get(m["aug"], f"C{j}")
            ax.plot(xs, y, styles[j % len(styles)], marker="o", ms=3, color=color, label=m["display"])
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.set_xticks(xs, [_tick(axis, a["severities"][k]) for k in order], fontsize=8)
        ax.set_title(f"{axis} ({a['unit']})", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if i % ncol == 0:
            ax.set_ylabel(f"Dice ({head})")
    for k in range(len(axes), nrow * ncol):
        grid[k // ncol][k % ncol].axis("off")
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.02 * math.ceil(len(labels) / 4)))
    fig.tight_layout()
    return _save(fig, Path(path))


# ---------------------------------------------------------------------------------------- report parts
STRESS_TITLE = "Stress test: acquisition shifts"


def _gap_text(g: dict) -> str:
    if g is None or g.get("gap") is None:
        return "–"
    lo, hi = g["ci95"]
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
    return f"{g['gap']:+.3f}{ci}"


def shifted_mean(entry: dict, structure: str) -> float | None:
    """Mean over the non-clean severities of one model's mean Dice on one axis (absolute, not a gap)."""
    vals = [p["dice"].get(structure, {}).get("mean") for p in entry["severities"][1:]]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def headline_lines(summary: dict) -> list[str]:
    """A line with each model's clean and mean shifted Dice over all axes, then one line per axis: each model's
    absolute shifted Dice and its robustness gap (headline structure) with the gap's 95 % CI. A smaller gap from
    a lower start is not robustness, so the absolute figure comes first."""
    head = summary["headline_structure"]
    names = {m["name"]: m["display"] for m in summary["models"]}
    n = max((p["dice"].get(head, {}).get("n") or 0 for a in summary["axes"].values()
             for e in a["models"].values() for p in e["severities"][:1]), default=0)
    if len(summary["models"]) > 6:  # an ablation: a headline line per model would be unreadable
        return [f"Stress test: {len(summary['models'])} models on {n} volumes"
                f"{', out-of-fold' if summary.get('out_of_fold') else ''}; clean → shifted Dice per model and axis in "
                "the stress tables below."]
    overall = []
    for m in summary["models"]:
        entries = [a["models"][m["name"]] for a in summary["axes"].values() if m["name"] in a["models"]]
        shifted = [v for v in (shifted_mean(e, head) for e in entries) if v is not None]
        clean = entries[0]["severities"][0]["dice"].get(head, {}).get("mean") if entries else None
        if shifted and clean is not None:
            overall.append(f"{m['display']} {clean:.3f} → {float(np.mean(shifted)):.3f}")
    lines = [f"Stress test, Dice {head} clean → mean over every shifted severity of every axis "
             f"({n} volumes{', out-of-fold' if summary.get('out_of_fold') else ''}): " + "; ".join(overall) + ".",
             f"Per axis, mean shifted Dice {head} (robustness gap: clean minus shifted, 95% bootstrap CI):"]
    for axis, a in summary["axes"].items():
        parts = []
        for m, e in a["models"].items():
            sm = shifted_mean(e, head)
            parts.append(f"{names[m]} {'–' if sm is None else f'{sm:.3f}'} (gap {_gap_text(e['gap'].get(head))})")
        lines.append(f"{axis} ({', '.join(_tick(axis, s) for s in a['severities'])} {a['unit']}): " + "; ".join(parts))
    return lines


def report_tables(summary: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) for the report: robustness gap with CI and failure rate, one row per axis,
    one column per model."""
    head = summary["headline_structure"]
    models = summary["models"]
    gap_rows, fail_rows, abs_rows = [], [], []
    for axis, a in summary["axes"].items():
        label = f"{axis} ({a['unit']})"
        abs_rows.append([label, *(f"{e['severities'][0]['dice'].get(head, {}).get('mean') or 0:.3f} → "
                                  f"{shifted_mean(e, head) or 0:.3f}" if (e := a["models"].get(m["name"])) else "–"
                                  for m in models)])
        gap_rows.append([label, *(_gap_text(a["models"].get(m["name"], {}).get("gap", {}).get(head)) for m in models)])
        cells = []
        for m in models:
            e = a["models"].get(m["name"], {})
            c, s = e.get("failure_rate_clean"), e.get("failure_rate_shifted")
            cells.append("–" if s is None else f"{100 * (c or 0):.0f}% → {100 * s:.0f}%")
        fail_rows.append([label, *cells])
    header = ["axis", *(m["display"] for m in models)]
    return [
        (f"{STRESS_TITLE} — Dice {head}, clean → shifted",
         "mean Dice of the clean volumes → mean over the non-clean severities of the mean Dice (absolute: a small gap "
         "from a low start is not robustness)", header, abs_rows),
        (f"{STRESS_TITLE} — robustness gap (Dice {head})",
         "clean mean Dice minus the mean over the non-clean severities of the mean Dice (RAMP 2026); positive = "
         "worse under the shift; [95% bootstrap CI over volumes]", header, gap_rows),
        (f"{STRESS_TITLE} — failure rate",
         f"share of volumes with Dice ({head}) < {summary['failure_dice']:g}: clean → mean over shifted severities",
         header, fail_rows),
    ]
