"""The stress test: trained models scored on labelled volumes under acquisition shifts, one axis at a time.

Models come in two ways:

- `model_specs_from_dirs([[RUN, ...], ...])`: each inner list is one model (several folders = an ensemble via
  `ctseg.inference.predict`); a folder is a training run, a CV fold folder, a whole CV run (all its folds) or a stacked
  ensemble (`ctseg.inference.models`).
- `model_specs_from_cv([CV_RUN, ...])`: each cross-validation run is one model, and every volume is predicted
  by the fold model that did not train on it (out-of-fold; the fold's `run.json` train/val ids are checked).

Each (volume, axis, severity) is perturbed once (`ctseg.stress.perturb`) and every model predicts it with
`ctseg.inference.predict.predict_volume` (whole volume, label back on the perturbed grid); predictions are scored on the
original grid (re-sliced axes: nearest-neighbour resampling of the prediction by physical position) or on the
perturbed grid against the perturbed label. The clean prediction is made once per volume and model and counts
as every axis's clean severity.

Output folder::

    settings.json   what was run (models, data, volumes, axes, severities); must match to continue
    rows.csv        one row per model x volume x axis x severity (Dice per structure, seconds, skips)
    summary.json    per model, axis, severity: Dice mean/std/worst per structure, failure rate, robustness gap
                    with a bootstrap CI over volumes
    curves.png      Dice (headline structure) vs severity per axis, one line per model, bootstrap 95 % band

A folder whose settings differ is refused; a matching one is continued (finished rows are skipped). Every
file is written atomically (temporary name, then rename).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ctseg.config import StressConfig
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text
from ctseg.runs import CVRun, TrainingRun
from ctseg.stress.perturb import AXES, DegenerateSeverity, estimate_noise_hu

if TYPE_CHECKING:
    from ctseg.inference.predict import Models
    from ctseg.inference.trained import TrainedModel
    from ctseg.io import Volume
    from ctseg.stress.perturb import Perturbed

log = logging.getLogger(__name__)

STRESS_FORMAT = "ctseg.stress"
_FIXED = ["model", "case_id", "axis", "severity", "clean", "score_on", "seconds_perturb", "seconds_predict", "skipped"]


# ---------------------------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """One model of the stress test. folds: None (the same members for every volume) or fold index -> run dir
    with `test_of`: case id -> fold whose model did not train on it (cross-validation runs)."""

    name: str
    display: str
    aug: str
    members: list[Path] = field(default_factory=list)
    folds: dict[int, Path] | None = None
    test_of: dict[str, int] | None = None
    source: str = ""
    stack: Path | None = None

    def to_json(self) -> dict:
        d = {"name": self.name, "display": self.display, "aug": self.aug, "source": self.source,
             "members": [str(p) for p in self.members],
             "folds": {str(k): str(v) for k, v in (self.folds or {}).items()} or None}
        return {**d, "stack": str(self.stack)} if self.stack is not None else d


def model_specs_from_dirs(groups: Sequence[Sequence[str | Path]]) -> list[ModelSpec]:
    """One `ModelSpec` per group of model folders (a group of several is an ensemble; a stack is used alone)."""
    from ctseg.evaluate.records import display_name
    from ctseg.inference.models import resolve_model

    specs, names = [], set()
    for group in groups:
        sources = [resolve_model(Path(p).resolve()) for p in group]
        stacks = [s for s in sources if s.kind == "stack"]
        if stacks and len(sources) > 1:
            raise CtsegError("a stacked ensemble is used alone: give it after its own --model", stacks[0].path)
        dirs = [d for s in sources for d in s.run_dirs]
        cfg = TrainingRun.read(dirs[0]).config
        arch, dim = cfg.get("model", {}).get("arch", "?"), cfg.get("model", {}).get("dim", "")
        aug = str(cfg.get("augment", {}).get("name", "?"))
        if stacks:
            name = stacks[0].name
            base, i = name, 2
            while name in names:
                name, i = f"{base}-{i}", i + 1
            names.add(name)
            specs.append(ModelSpec(name, display_name("stacked", "", aug), aug, members=dirs, source="stack",
                                   stack=stacks[0].path))
            continue
        name = f"{arch}-{dim}-{aug}" + (f"-ens{len(dirs)}" if len(dirs) > 1 else "")
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.add(name)
        display = display_name(arch, dim, aug) + (f" (ensemble of {len(dirs)})" if len(dirs) > 1 else "")
        specs.append(ModelSpec(name, display, aug, members=dirs, source="model"))
    return specs


def model_specs_from_cv(cv_dirs: Sequence[str | Path]) -> tuple[list[ModelSpec], CVRun]:
    """One out-of-fold `ModelSpec` per CV run, and the first run's record (data, layout, folds file: common)."""
    from ctseg.evaluate.folds import load_folds
    from ctseg.evaluate.records import display_name

    specs, manifests = [], []
    for d in cv_dirs:
        d = Path(d).resolve()
        info = CVRun.read(d)
        manifests.append(info)
        folds = load_folds(info.folds_file)
        fold_dirs, test_of = {}, {}
        for k in range(info.n_folds):
            mdir = info.model_dir(k)
            if not (mdir / "model_best.pt").is_file():
                raise CtsegError(f"fold {k} has no trained model (model_best.pt); finish the cross-validation first",
                                 mdir)
            fold_dirs[k] = mdir
            trained = info.fold_run(k).trained_on()
            for cid in folds.test_ids(k):
                if cid in trained:
                    raise CtsegError(f"fold {k}'s model trained on its own test case {cid}", mdir)
                test_of[cid] = k
        display = display_name(info.arch, info.dim, info.aug, info.variant)
        specs.append(ModelSpec(info.name, display, info.aug, folds=fold_dirs, test_of=test_of, source=str(d)))
    for key in ("data", "layout", "folds_file"):
        values = {str(getattr(m, key)) for m in manifests}
        if len(values) != 1:
            raise CtsegError(f"the cross-validation runs differ in {key}: {sorted(values)}; give runs of one "
                             "experiment")
    if len({s.name for s in specs}) != len(specs):
        raise CtsegError("the same cross-validation run is given twice")
    return specs, manifests[0]


def _check_classes(spec: ModelSpec, run_dir: Path, dataset_classes: dict[int, str], data_dir: str | Path) -> None:
    run = TrainingRun.read(run_dir)
    model_classes = run.dataset_classes or run.classes
    if model_classes != {int(k): str(v) for k, v in dataset_classes.items()}:
        raise CtsegError(f"model {spec.name} ({run_dir}) was trained on classes {model_classes}, but the dataset "
                         f"has {dict(dataset_classes)}; stress-test it on data with the same labels", data_dir)


# ------------------------------------------------------------------------------------------- settings
def resolve_axes(cfg: StressConfig, phantom: bool) -> dict[str, list[float]]:
    """axis -> severities (clean first, unique), checked against `ctseg.stress.perturb.AXES`."""
    out = {}
    unknown = sorted(set(cfg.axes) - set(AXES)) + sorted(set(cfg.severities) - set(AXES))
    if unknown:
        raise CtsegError(f"unknown stress axes {unknown}; choose from {list(AXES)}")
    for name in cfg.axes:
        axis = AXES[name]
        if axis.needs_phantom and not phantom:
            log.warning("axis %s needs a phantom dataset (phantom.json); left out", name)
            continue
        sev = [float(s) for s in cfg.severities.get(name, axis.severities)]
        sev = [axis.clean] + [s for s in dict.fromkeys(sev) if s != axis.clean]
        if len(sev) < 2:
            raise CtsegError(f"axis {name}: give at least one severity besides the clean {axis.clean:g}")
        out[name] = sev
    if not out:
        raise CtsegError("no stress axis to run")
    return out


def choose_volumes(case_ids: Sequence[str], max_volumes: int | None, seed: int) -> list[str]:
    """All cases, or `max_volumes` of them drawn without replacement by `seed` (then sorted)."""
    ids = sorted(case_ids)
    if max_volumes is None or max_volumes >= len(ids):
        return ids
    pick = np.random.default_rng([seed, 0x5737]).choice(len(ids), size=max_volumes, replace=False)
    return sorted(ids[i] for i in pick)


def _severity_key(v: float) -> str:
    return f"{float(v):g}"


def _rng(seed: int, case_id: str, axis: str, severity: float) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(case_id.encode()), zlib.crc32(axis.encode()),
                                  zlib.crc32(_severity_key(severity).encode())])


def _claim(out: Path, settings: dict) -> None:
    path = out / "settings.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as err:
            raise CtsegError(f"unreadable ({err}); delete the folder to start again", path) from None
        if old != settings:
            diffs = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
            raise CtsegError(f"this folder holds a stress test with other settings ({', '.join(diffs)}); choose "
                             "another output folder or delete it", out)
        return
    if out.exists() and any(out.iterdir()):
        raise CtsegError("output folder exists and is not a stress-test folder; choose another", out)
    atomic_write_text(path, json.dumps(settings, indent=1))


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict], structures: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_FIXED + [f"dice_{s}" for s in structures], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ run
def _check_reacquired(pert: Perturbed, image: Volume, axis: str, case_id: str, data_dir: str | Path) -> None:
    """The re-rendered phantom must sit on the stored case's grid (dose) or in-plane grid (thickness)."""
    same = pert.image.same_geometry(image) if axis == "phantom-dose" else (
        pert.image.shape[1:] == image.shape[1:] and np.allclose(pert.image.spacing[1:], image.spacing[1:]))
    if not same:
        raise CtsegError(f"phantom.json does not reproduce case {case_id} (re-rendered grid {pert.image.shape} "
                         f"{pert.image.spacing} vs stored {image.shape} {image.spacing}); was the dataset written "
                         "with generation overrides by an older ctseg?", data_dir)


def _predict(models: Models, image: Volume, device: torch.device, batch_size: int | None) -> Volume:
    from ctseg.inference.predict import predict_volume

    return predict_volume(image, models, device=device, batch_size=batch_size).label


def _score(pred: Volume, ref: Volume, classes: dict[int, str], merge: bool) -> dict[str, float]:
    from ctseg.evaluate.metrics import dice_per_class

    p, r = np.asarray(pred.array), np.asarray(ref.array)
    if merge:
        p, r = (p > 0).astype(np.uint8), (r > 0).astype(np.uint8)
    return dice_per_class(p, r, classes)


def run_stress(models: Sequence[ModelSpec], data_dir: str | Path, out_dir: str | Path, cfg: StressConfig, *,
               layout: str = "auto", case_ids: Sequence[str] | None = None, device: str | torch.device = "auto",
               batch_size: int | None = None, progress: bool = True, messages: list[str] | None = None) -> dict:
    """Run (or continue) the stress test; returns the summary (also written to `out_dir/summary.json`).

    case_ids: the volumes to draw from (default: every labelled case of the dataset; CV mode: the folds' cases).
    messages: skipped severities are appended here as text naming the case (and logged).
    """
    from ctseg.progress import progress_bar
    from ctseg.datasets import open_dataset
    from ctseg.io import resample_to
    from ctseg.stress.phantom_reacquire import PARAMETERS, phantom_recipes, reacquire
    from ctseg.inference.trained import load_trained
    from ctseg.runtime import resolve_device

    out = Path(out_dir)
    dataset = open_dataset(data_dir, layout)
    classes = {int(k): str(v) for k, v in dataset.classes.items()}
    recipes = phantom_recipes(data_dir)
    axes = resolve_axes(cfg, recipes is not None)
    pool = list(case_ids) if case_ids is not None else dataset.case_ids()
    has_label = getattr(dataset, "has_label", None)
    if case_ids is None and has_label is not None:
        unlabelled = set(cid for cid in pool if not has_label(cid))
        if unlabelled:
            pool = [cid for cid in pool if cid not in unlabelled]
            log.warning("%s: %d unlabelled case(s) skipped (test cases: nothing to score against), %d left",
                        data_dir, len(unlabelled), len(pool))
        if not pool:
            raise CtsegError("no labelled case: the stress test scores against labels", data_dir)
    missing = sorted(set(pool) - set(dataset.case_ids()))
    if missing:
        raise CtsegError(f"cases {missing[:5]} of the models' folds are not in the dataset", data_dir)
    for spec in models:
        if spec.test_of is not None:
            outside = sorted(set(pool) - set(spec.test_of))
            if outside:
                raise CtsegError(f"{spec.name}: cases {outside[:5]} are in no test fold of this cross-validation",
                                 spec.source)
    volumes = choose_volumes(pool, cfg.max_volumes, cfg.seed)
    dev = resolve_device(device)
    member_dirs = {spec.name: (spec.members if spec.folds is None else list(spec.folds.values())) for spec in models}
    for spec in models:
        for d in member_dirs[spec.name]:
            _check_classes(spec, d, classes, data_dir)
    settings = {"format": STRESS_FORMAT, "data": str(Path(data_dir).resolve()), "layout": layout,
                "models": [m.to_json() for m in models], "volumes": volumes,
                "axes": {a: [float(s) for s in sev] for a, sev in axes.items()}, "seed": cfg.seed,
                "max_volumes": cfg.max_volumes}
    _claim(out, settings)
    rows_path = out / "rows.csv"
    rows = _read_rows(rows_path)
    done = {(r["model"], r["case_id"], r["axis"], r["severity"]) for r in rows}
    messages = messages if messages is not None else []
    cache: dict[str, TrainedModel] = {}

    def load(run_dir: Path) -> TrainedModel:
        if str(run_dir) not in cache:
            cache[str(run_dir)] = load_trained(run_dir, dev)
        return cache[str(run_dir)]

    eval_classes: dict[str, dict[int, str]] = {}
    merges: dict[str, bool] = {}
    structures: list[str] = []
    from ctseg.cv.scoring import eval_classes as _eval_classes
    from ctseg.inference.predict import check_members

    stacks: dict[str, Models] = {}
    for spec in models:
        if spec.stack is not None:  # the meta-model predicts the dataset's classes
            from ctseg.inference.models import load_models

            stacks[spec.name] = load_models([spec.stack], dev)
            target = "multiclass"
        else:
            trained = [load(d) for d in member_dirs[spec.name]]
            _, out_classes = check_members(trained[:1] if spec.folds is not None else trained)
            target = "multiclass" if out_classes == classes else "foreground"
        eval_classes[spec.name], merges[spec.name] = _eval_classes(target, classes)
        from ctseg.evaluate.metrics import structures as _structs

        for name in _structs(eval_classes[spec.name]):
            if name not in structures:
                structures.append(name)

    def members_for(spec: ModelSpec, cid: str) -> Models:
        if spec.name in stacks:
            return stacks[spec.name]
        if spec.folds is None or spec.test_of is None:  # both set (cross-validation) or both None
            return [load(d) for d in spec.members]
        return [load(spec.folds[spec.test_of[cid]])]

    total = len(volumes) * sum(len(s) for s in axes.values())
    with progress_bar(progress) as bar:
        task = bar.add_task("[bold]stress test[/] volumes x severities", total=total)
        for cid in volumes:
            todo = [(a, s) for a, sev in axes.items() for s in sev
                    if any((m.name, cid, a, _severity_key(s)) not in done for m in models)]
            if not todo:
                bar.advance(task, sum(len(s) for s in axes.values()))
                continue
            case = dataset.load(cid)
            if case.label is None:
                raise CtsegError(f"case {cid} has no label; the stress test needs labelled volumes", data_dir)
            image = case.image.with_array(case.image.array.astype(np.float32))
            noise_hu = None
            clean_rows: dict[str, dict] = {}
            for axis_name, sev in axes.items():
                axis = AXES[axis_name]
                for s in sev:
                    key_s = _severity_key(s)
                    if all((m.name, cid, axis_name, key_s) in done for m in models):
                        bar.advance(task)
                        continue
                    t0 = time.perf_counter()
                    is_clean = s == axis.clean
                    pert: Perturbed | None = None
                    skipped = ""
                    if not is_clean:
                        try:
                            if axis.needs_phantom:
                                if recipes is None or cid not in recipes:
                                    raise CtsegError(f"case {cid} is not listed in phantom.json", data_dir)
                                pert = reacquire(recipes[cid], axis_name, s, cid)
                                if axis_name in PARAMETERS:  # re-acquisitions keep the grid; populations do not
                                    _check_reacquired(pert, image, axis_name, cid, data_dir)
                            else:
                                if axis_name.startswith("dose") and noise_hu is None:
                                    noise_hu = estimate_noise_hu(image)
                                if axis.apply is None:
                                    raise CtsegError(f"stress axis {axis_name} has no perturbation")
                                pert = axis.apply(image, case.label, s, rng=_rng(cfg.seed, cid, axis_name, s),
                                                  classes=classes, noise_hu=noise_hu)
                        except DegenerateSeverity as why:
                            skipped = str(why)
                            msg = f"case {cid}: {axis_name} {key_s} {axis.unit} skipped: {why}"
                            messages.append(msg)
                            log.warning(msg)
                        except ValueError as why:  # e.g. no soft tissue to estimate the noise from
                            skipped = str(why)
                            msg = f"case {cid}: {axis_name} {key_s} skipped: {why}"
                            messages.append(msg)
                            log.warning(msg)
                    t_perturb = time.perf_counter() - t0
                    for spec in models:
                        if (spec.name, cid, axis_name, key_s) in done:
                            continue
                        row = {"model": spec.name, "case_id": cid, "axis": axis_name, "severity": key_s,
                               "clean": int(is_clean), "score_on": "", "seconds_perturb": f"{t_perturb:.3f}",
                               "seconds_predict": "", "skipped": skipped}
                        if is_clean:
                            if spec.name not in clean_rows:
                                t1 = time.perf_counter()
                                pred = _predict(members_for(spec, cid), image, dev, batch_size)
                                dice = _score(pred, case.label, eval_classes[spec.name], merges[spec.name])
                                clean_rows[spec.name] = {"seconds_predict": f"{time.perf_counter() - t1:.3f}",
                                                         **{f"dice_{k}": f"{v:.6f}" for k, v in dice.items()}}
                            row.update(clean_rows[spec.name], score_on="original")
                        elif pert is not None:
                            t1 = time.perf_counter()
                            pred = _predict(members_for(spec, cid), pert.image, dev, batch_size)
                            if pert.score_on == "original":
                                pred, ref = resample_to(pred, case.label, order=0), case.label
                            else:
                                ref = pert.label
                            dice = _score(pred, ref, eval_classes[spec.name], merges[spec.name])
                            row.update({"score_on": pert.score_on,
                                        "seconds_predict": f"{time.perf_counter() - t1:.3f}",
                                        **{f"dice_{k}": f"{v:.6f}" for k, v in dice.items()}})
                        rows.append(row)
                        done.add((spec.name, cid, axis_name, key_s))
                    bar.advance(task)
            _write_rows(rows_path, rows, structures)
    return _summarize(rows, models, axes, structures, cfg, out)


def _summarize(rows: list[dict], models: Sequence[ModelSpec], axes: dict[str, list[float]], structures: list[str],
               cfg: StressConfig, out: Path) -> dict:
    """summary.json + curves.png of the rows, with the skipped severities listed; returns the summary."""
    from ctseg.stress.summary import summarize, write_summary

    summary = summarize(rows, models, axes, structures, failure_dice=cfg.failure_dice, n_boot=cfg.n_boot,
                        seed=cfg.seed)
    summary["skipped"] = sorted({f"case {r['case_id']}: {r['axis']} {r['severity']}: {r['skipped']}"
                                 for r in rows if r.get("skipped")})
    write_summary(summary, out)
    return summary


def merge_stress_parts(parts: Sequence[Path], models: Sequence[ModelSpec], out_dir: str | Path,
                       cfg: StressConfig) -> dict:
    """One stress-test folder (settings.json, rows.csv, summary.json, curves.png) from finished parts that ran
    the same models and axes on disjoint volumes (`ctseg experiment --jobs`); returns the summary."""
    out = Path(out_dir)
    settings = [json.loads((Path(p) / "settings.json").read_text()) for p in parts]
    rows = [r for p in parts for r in _read_rows(Path(p) / "rows.csv")]
    first = settings[0]
    for p, st in zip(parts, settings):
        if st["models"] != first["models"] or st["axes"] != first["axes"]:
            raise CtsegError("stress-test parts ran other models or axes; delete the folder to start again", p)
    merged = {**first, "volumes": sorted(v for st in settings for v in st["volumes"]), "max_volumes": cfg.max_volumes,
              "parts": [str(Path(p).name) for p in parts]}
    structures = [c[5:] for c in (rows[0].keys() if rows else []) if c.startswith("dice_")]
    atomic_write_text(out / "settings.json", json.dumps(merged, indent=1))
    _write_rows(out / "rows.csv", rows, structures)
    axes = {a: [float(s) for s in sev] for a, sev in first["axes"].items()}
    return _summarize(rows, models, axes, structures, cfg, out)
