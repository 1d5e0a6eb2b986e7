"""The augmentation ablation and the pre-registered choice of a default (issue 16, docs/ABLATION.md).

Input: a finished out-of-fold stress test of cross-validation runs (`ctseg.stress.runner`: `rows.csv`,
`settings.json`) where every run is one (arm, seed). Per arm, seeds averaged per volume:

    clean          mean Dice of the clean volumes
    shifted[axis]  mean over the volumes of the mean over that axis' non-clean severities
    shifted        mean over the volumes of the mean over every non-clean severity of the scored axes
    gap            clean - shifted (positive: worse under the shifts)
    worst          lowest per-volume shifted Dice
    failure        share of (volume, shifted severity, seed) below `failure_dice`
    seed spread    the per-seed values of `shifted` (their range is the seed-to-seed noise)
    vs MIA / CTIA  paired difference of per-volume shifted Dice, 95 % percentile bootstrap CI over volumes

The rule (`SelectionConfig`) is applied on validation volumes and the winner reported on test volumes: both
halves of every CV fold, split by the rule's seed. Effects: each arm minus its reference (`ArmConfig.reference`,
default the family of its first step), with a paired CI, per axis: `effects_figure`.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctseg.config import AugmentConfig, SelectionConfig
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text
from ctseg.stress.perturb import AXES

ABLATION_FORMAT = "ctseg.ablation"


@dataclass
class ArmStats:
    """One arm's figures on one set of volumes (headline structure)."""

    arm: str
    display: str
    reference: str | None
    n_steps: int
    seeds: list[int]
    n_volumes: int
    clean: float
    clean_ci: tuple[float, float]
    shifted: float
    shifted_ci: tuple[float, float]
    shifted_axis: dict[str, float]
    gap: float
    gap_ci: tuple[float, float]
    worst: float
    worst_case: str
    failure: float
    seed_shifted: dict[int, float]
    vs: dict[str, dict[str, Any]] = field(default_factory=dict)  # ref arm -> {"shifted": (d, lo, hi), "clean": ...}
    effect: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # axis|"shifted"|"clean" -> (d, lo, hi)


def _nanmean(a: np.ndarray, axis: int | None = None) -> Any:
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(a, axis=axis)


def paired_ci(diff: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of per-volume differences, percentile bootstrap over volumes; NaN rows dropped."""
    d = diff[np.isfinite(diff)]
    if d.size == 0:
        return (math.nan, math.nan, math.nan)
    if d.size < 2:
        return (float(d.mean()), math.nan, math.nan)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(d.mean()), float(lo), float(hi))


@dataclass
class AblationData:
    """Per model (one arm x seed): volume -> axis -> severity -> Dice, plus each model's arm and seed."""

    dice: dict[str, dict[str, dict[str, dict[str, float]]]]
    arm_of: dict[str, str]
    seed_of: dict[str, int]
    structure: str
    clean_key: dict[str, str]  # axis -> severity key of its clean value

    def arms(self) -> list[str]:
        return list(dict.fromkeys(self.arm_of.values()))

    def volumes(self) -> list[str]:
        return sorted({v for per in self.dice.values() for v in per})


def load_ablation_data(stress_dir: str | Path, structure: str | None = None) -> AblationData:
    """Read a stress test's rows and map each model to its arm and seed (from its CV run's cv.json)."""
    stress_dir = Path(stress_dir)
    try:
        settings = json.loads((stress_dir / "settings.json").read_text())
        with (stress_dir / "rows.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as err:
        raise CtsegError(f"not a finished stress test ({err})", stress_dir) from None
    arm_of, seed_of = {}, {}
    for m in settings["models"]:
        if not m.get("source") or not (Path(m["source"]) / "cv.json").is_file():
            raise CtsegError(f"model {m['name']} is not a cross-validation run; the ablation needs out-of-fold "
                             "stress rows of CV runs", stress_dir)
        info = json.loads((Path(m["source"]) / "cv.json").read_text())
        arm_of[m["name"]], seed_of[m["name"]] = str(info["aug"]), int(info["seed"])
    cols = [c[5:] for c in (rows[0].keys() if rows else []) if c.startswith("dice_")]
    if not cols:
        raise CtsegError("the stress test has no Dice rows", stress_dir / "rows.csv")
    structure = structure or ("total" if "total" in cols else cols[-1])
    dice: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for r in rows:
        v = r.get(f"dice_{structure}")
        if v in (None, "") or r["model"] not in arm_of:
            continue
        dice.setdefault(r["model"], {}).setdefault(r["case_id"], {}).setdefault(r["axis"], {})[r["severity"]] = float(v)
    clean_key = {a: f"{AXES[a].clean:g}" for a in settings["axes"]}
    return AblationData(dice, arm_of, seed_of, structure, clean_key)


def _model_matrix(data: AblationData, model: str, volumes: Sequence[str], axes: Sequence[str]
                  ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(clean (V,), shifted per axis (V, A), shifted values per volume: list of arrays over all severities)."""
    per = data.dice.get(model, {})
    clean = np.full(len(volumes), np.nan)
    shifted = np.full((len(volumes), len(axes)), np.nan)
    values = []
    for i, v in enumerate(volumes):
        vol = per.get(v, {})
        cleans = [vol[a][data.clean_key[a]] for a in vol if data.clean_key.get(a) in vol[a]]
        clean[i] = cleans[0] if cleans else np.nan
        allv = []
        for j, a in enumerate(axes):
            sev = [d for s, d in vol.get(a, {}).items() if s != data.clean_key[a]]
            shifted[i, j] = np.mean(sev) if sev else np.nan
            allv += sev
        values.append(np.asarray(allv))
    return clean, shifted, values


def arm_vectors(data: AblationData, arm: str, volumes: Sequence[str], axes: Sequence[str]
                ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray], list[np.ndarray]]:
    """Seeds averaged: clean (V,), shifted per axis (V, A); per seed the per-volume shifted mean; all values."""
    models = [m for m, a in data.arm_of.items() if a == arm]
    if not models:
        raise CtsegError(f"no run of arm {arm!r} in the stress test")
    cleans, shifts, per_seed, values = [], [], {}, []
    for m in models:
        c, s, vals = _model_matrix(data, m, volumes, axes)
        cleans.append(c)
        shifts.append(s)
        per_seed[data.seed_of[m]] = _nanmean(s, axis=1)
        values += vals
    return _nanmean(np.stack(cleans), axis=0), _nanmean(np.stack(shifts), axis=0), per_seed, values


def arm_stats(data: AblationData, arm: str, aug: AugmentConfig, volumes: Sequence[str], axes: Sequence[str],
              failure_dice: float, n_boot: int, seed: int) -> ArmStats:
    """One arm's figures on `volumes` (see the module docstring)."""
    rng = np.random.default_rng([seed, 0xAB1])
    clean, shifted_axis, per_seed, values = arm_vectors(data, arm, volumes, axes)
    shifted = _nanmean(shifted_axis, axis=1)
    c = paired_ci(clean, n_boot, rng)
    s = paired_ci(shifted, n_boot, rng)
    g = paired_ci(clean - shifted, n_boot, rng)
    ok = np.isfinite(shifted)
    worst_i = int(np.nanargmin(np.where(ok, shifted, np.inf))) if ok.any() else 0
    allv = np.concatenate(values) if values else np.empty(0)
    arm_cfg = aug.arm(arm) if arm in aug.known_names() else None
    reference = None
    if arm_cfg is not None:
        reference = arm_cfg.reference or arm_cfg.steps[0].family
    display = aug.display(arm) if arm in aug.known_names() else arm
    return ArmStats(arm=arm, display=display, reference=reference,
                    n_steps=len(arm_cfg.steps) if arm_cfg is not None else (0 if arm == "none" else 1),
                    seeds=sorted(per_seed), n_volumes=int(ok.sum()), clean=c[0], clean_ci=(c[1], c[2]),
                    shifted=s[0], shifted_ci=(s[1], s[2]),
                    shifted_axis={a: float(_nanmean(shifted_axis[:, j])) for j, a in enumerate(axes)},
                    gap=g[0], gap_ci=(g[1], g[2]), worst=float(shifted[worst_i]) if ok.any() else math.nan,
                    worst_case=volumes[worst_i] if ok.any() else "",
                    failure=float((allv < failure_dice).mean()) if allv.size else math.nan,
                    seed_shifted={k: float(_nanmean(v)) for k, v in sorted(per_seed.items())})


def compare(data: AblationData, arm: str, ref: str, volumes: Sequence[str], axes: Sequence[str], n_boot: int,
            seed: int) -> dict[str, tuple[float, float, float]]:
    """Paired arm - ref per volume (seeds averaged): 'clean', 'shifted' and each axis -> (mean, CI low, high)."""
    rng = np.random.default_rng([seed, 0xC0F])
    c1, s1, _, _ = arm_vectors(data, arm, volumes, axes)
    c0, s0, _, _ = arm_vectors(data, ref, volumes, axes)
    out = {"clean": paired_ci(c1 - c0, n_boot, rng), "shifted": paired_ci(_nanmean(s1, 1) - _nanmean(s0, 1), n_boot, rng)}
    for j, a in enumerate(axes):
        out[a] = paired_ci(s1[:, j] - s0[:, j], n_boot, rng)
    return out


def split_volumes(folds: Sequence[Sequence[str]], volumes: Sequence[str], fraction: float, seed: int
                  ) -> tuple[list[str], list[str]]:
    """(validation, test): within each fold, its stress volumes shuffled by `seed`, the first
    round(fraction * n) to validation (at least one each side when the fold has two)."""
    rng = np.random.default_rng([seed, 0x5E1])
    pool = set(volumes)
    val, test = [], []
    for fold in folds:
        ids = sorted(c for c in fold if c in pool)
        ids = [ids[i] for i in rng.permutation(len(ids))]
        k = int(round(fraction * len(ids)))
        if len(ids) >= 2:
            k = min(max(k, 1), len(ids) - 1)
        val += ids[:k]
        test += ids[k:]
    return sorted(val), sorted(test)


def select(stats: Sequence[ArmStats], rule: SelectionConfig) -> tuple[ArmStats, list[str]]:
    """The rule's winner among `stats` (validation figures) and the reasons, in words."""
    ranked = sorted(stats, key=lambda s: -s.shifted)
    best = ranked[0]
    tied = [s for s in ranked if best.shifted - s.shifted <= rule.tie_margin]
    winner = sorted(tied, key=lambda s: (s.gap, s.n_steps, s.arm))[0]
    why = [f"highest validation shifted Dice: {best.display} {best.shifted:.4f}"]
    if len(tied) > 1:
        why.append(f"tied within {rule.tie_margin:g}: " + ", ".join(f"{s.display} {s.shifted:.4f} (gap {s.gap:+.4f})"
                                                                   for s in tied)
                   + f"; the smallest gap wins: {winner.display}")
    return winner, why


def rule_text(rule: SelectionConfig) -> str:
    """The rule in one paragraph (docs/ABLATION.md and the report print it)."""
    return (f"Score = mean Dice (headline structure, seeds averaged per volume) over every non-clean severity of "
            f"{', '.join(rule.axes)}, on the validation volumes ({rule.validation_fraction:g} of each CV fold's "
            f"volumes, split by seed {rule.seed}). The highest score wins; arms within {rule.tie_margin:g} of it are "
            "tied, and the tie goes to the smallest robustness gap (clean minus score), then to the fewest transform "
            "steps, then to the name. The winner is reported on the test volumes (the other part of every fold).")


def run_ablation(stress_dir: str | Path, folds: Sequence[Sequence[str]], aug: AugmentConfig, rule: SelectionConfig,
                 arms: Sequence[str], out_dir: str | Path, failure_dice: float = 0.5) -> dict[str, Any]:
    """Everything the ablation reports; writes `ablation.json`, `ablation.md` and `effects.png` to `out_dir`."""
    data = load_ablation_data(stress_dir)
    missing = [a for a in arms if a not in data.arms()]
    if missing:
        raise CtsegError(f"arms {missing} have no runs in the stress test", stress_dir)
    missing_axes = [a for a in rule.axes if a not in data.clean_key]
    if missing_axes:
        raise CtsegError(f"the stress test has no axes {missing_axes} (selection.axes)", stress_dir)
    axes = list(rule.axes)
    volumes = data.volumes()
    val, test = split_volumes(folds, volumes, rule.validation_fraction, rule.seed)
    candidates = list(rule.candidates or arms)

    def stats_on(vols: Sequence[str]) -> dict[str, ArmStats]:
        out = {}
        for arm in arms:
            st = arm_stats(data, arm, aug, vols, axes, failure_dice, rule.n_boot, rule.seed)
            for ref in ("mia", "ctia"):
                if ref in arms and ref != arm:
                    st.vs[ref] = compare(data, arm, ref, vols, axes, rule.n_boot, rule.seed)
            if st.reference is not None and st.reference in arms and st.reference != arm:
                st.effect = compare(data, arm, st.reference, vols, axes, rule.n_boot, rule.seed)
            out[arm] = st
        return out

    every, on_val, on_test = stats_on(volumes), stats_on(val), stats_on(test)
    winner, why = select([on_val[a] for a in candidates], rule)
    result = {"format": ABLATION_FORMAT, "structure": data.structure, "axes": axes, "rule": rule.model_dump(),
              "rule_text": rule_text(rule), "volumes": {"all": volumes, "validation": val, "test": test},
              "failure_dice": failure_dice, "arms": [asdict(every[a]) for a in arms],
              "validation": [asdict(on_val[a]) for a in arms], "test": [asdict(on_test[a]) for a in arms],
              "chosen": winner.arm, "chosen_display": winner.display, "why": why}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablation.json", json.dumps(result, indent=1, default=_json_default))
    atomic_write_text(out / "ablation.md", render_markdown(result))
    effects_figure(result, out / "effects.png")
    return result


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    raise TypeError(type(v).__name__)


# --------------------------------------------------------------------------------------------- output
def _f(v: Any, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _ci(d: Sequence[Any] | None, signed: bool = True) -> str:
    if not d or d[0] is None or (isinstance(d[0], float) and not math.isfinite(d[0])):
        return "–"
    lo, hi = (d[1], d[2]) if len(d) == 3 else (None, None)
    body = f"{d[0]:+.3f}" if signed else f"{d[0]:.3f}"
    return body + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and math.isfinite(lo) else "")


def arm_table(result: dict[str, Any], part: str = "arms") -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-arm table of one part ('arms' = all volumes, 'validation', 'test')."""
    axes = result["axes"]
    header = ["arm", "seeds", "clean", "shifted", *[a.removeprefix("pop-") for a in axes], "gap", "worst",
              "failure", "seed spread", "vs MIA", "vs CTIA"]
    rows = []
    for st in result[part]:
        spread = list(st["seed_shifted"].values())
        rows.append([st["display"], str(len(st["seeds"])),
                     f"{_f(st['clean'])} [{_f(st['clean_ci'][0])}, {_f(st['clean_ci'][1])}]",
                     f"{_f(st['shifted'])} [{_f(st['shifted_ci'][0])}, {_f(st['shifted_ci'][1])}]",
                     *[_f(st["shifted_axis"].get(a)) for a in axes],
                     f"{_f(st['gap'])} [{_f(st['gap_ci'][0])}, {_f(st['gap_ci'][1])}]",
                     f"{_f(st['worst'])} ({st['worst_case']})", f"{100 * st['failure']:.0f}%" if st["failure"] is not None else "–",
                     " / ".join(_f(v) for v in spread),
                     _ci(st["vs"].get("mia", {}).get("shifted")), _ci(st["vs"].get("ctia", {}).get("shifted"))])
    return header, rows


def effect_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each ablated arm minus its reference, clean, shifted and per axis, with paired CIs."""
    axes = result["axes"]
    header = ["arm", "reference", "clean", "shifted", *[a.removeprefix("pop-") for a in axes]]
    rows = []
    for st in result["arms"]:
        if not st["effect"]:
            continue
        e = st["effect"]
        rows.append([st["display"], st["reference"], _ci(e.get("clean")), _ci(e.get("shifted")),
                     *[_ci(e.get(a)) for a in axes]])
    return header, rows


def selection_lines(result: dict[str, Any]) -> list[str]:
    """The rule, its winner on validation and the winner's test figures against MIA and CTIA."""
    test = {st["arm"]: st for st in result["test"]}
    w = test[result["chosen"]]
    lines = [f"Rule (written before the runs): {result['rule_text']}",
             f"Chosen on {len(result['volumes']['validation'])} validation volumes: {result['chosen_display']} "
             f"({'; '.join(result['why'])}).",
             f"On {len(result['volumes']['test'])} test volumes: clean {_f(w['clean'])}, shifted {_f(w['shifted'])}, "
             f"gap {_f(w['gap'])}"]
    for ref in ("mia", "ctia"):
        if ref in w["vs"]:
            lines[-1] += f"; vs {ref.upper()} shifted {_ci(w['vs'][ref]['shifted'])}, clean {_ci(w['vs'][ref]['clean'])}"
    lines[-1] += "."
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    out = [f"# Augmentation ablation ({result['structure']} Dice)", "", *[f"- {ln}" for ln in selection_lines(result)], ""]
    for part, title in (("arms", "All volumes"), ("validation", "Validation volumes"), ("test", "Test volumes")):
        header, rows = arm_table(result, part)
        out += [f"## {title} ({len(result['volumes']['all' if part == 'arms' else part])})", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    header, rows = effect_table(result)
    out += ["## Effect of each component (arm minus its reference, all volumes, paired 95% CI)", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def effects_figure(result: dict[str, Any], path: str | Path) -> Path | None:
    """Forest plot: each ablated arm minus its reference (paired 95 % CI over volumes), one panel for clean, one
    for the mean over the shifts, one per shift axis; arms grouped by reference. None without effects."""
    from ctseg.evaluate.plots import COLORS, _save, plt

    arms = [st for st in result["arms"] if st["effect"]]
    if not arms:
        return None
    arms.sort(key=lambda s: (str(s["reference"]), s["arm"]))
    panels = ["clean", "shifted", *result["axes"]]
    fig, grid = plt.subplots(1, len(panels), figsize=(1.9 * len(panels) + 2.2, 0.32 * len(arms) + 1.4),
                             sharey=True, squeeze=False)
    ys = np.arange(len(arms))[::-1]
    for j, key in enumerate(panels):
        ax = grid[0][j]
        for y, st in zip(ys, arms):
            d, lo, hi = (st["effect"].get(key) or [None, None, None])
            if d is None:
                continue
            color = COLORS.get(str(st["reference"]), "#444444")
            significant = lo is not None and hi is not None and (lo > 0 or hi < 0)
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [y, y], color=color, lw=1.6)
            ax.plot([d], [y], "o", color=color, ms=5 if significant else 4, mfc=color if significant else "white")
        ax.axvline(0, color="#999999", lw=0.8)
        ax.set_title({"clean": "clean", "shifted": "all shifts"}.get(key, key.removeprefix("pop-")), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    grid[0][0].set_yticks(ys, [f"{st['display']}  (vs {st['reference']})" for st in arms], fontsize=8)
    fig.supxlabel(f"Δ Dice ({result['structure']}): arm minus its reference; filled = 95% CI excludes 0", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))


def report_parts(ablation_dir: str | Path
                 ) -> tuple[list[str], list[tuple[str, str, list[str], list[list[str]]]], Path | None]:
    """(headline lines, tables as (title, note, header, rows), the effects figure or None) of a finished ablation."""
    result = json.loads((Path(ablation_dir) / "ablation.json").read_text())
    n = {k: len(v) for k, v in result["volumes"].items()}
    tables = []
    header, rows = arm_table(result, "arms")
    tables.append((f"Ablation — every arm, {n['all']} volumes (out-of-fold)",
                   f"Dice ({result['structure']}), seeds averaged per volume; shifted = mean over the non-clean "
                   f"severities of {', '.join(result['axes'])}; gap = clean − shifted; failure = share of shifted "
                   f"(volume, severity, seed) below {result['failure_dice']:g}; vs MIA / CTIA: paired difference of "
                   "shifted Dice [95% bootstrap CI over volumes]", header, rows))
    header, rows = effect_table(result)
    tables.append(("Ablation — effect of each component", "arm minus its reference (leave-one-out: negative = the "
                   "component helped; additions: positive = it helped), paired 95% bootstrap CI over volumes",
                   header, rows))
    header, rows = arm_table(result, "test")
    tables.append((f"Ablation — test volumes ({n['test']}), after the choice on {n['validation']} validation volumes",
                   result["rule_text"], header, rows))
    effects = Path(ablation_dir) / "effects.png"  # absent when no arm ablates another (e.g. only the paper's arms)
    return selection_lines(result), tables, effects if effects.is_file() else None
