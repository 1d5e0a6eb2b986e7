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
    .scratch-PID/   while running: the volume being tested and its perturbed copy as memory-mapped .npy files
                    (bounded memory)

A folder whose settings differ is refused; a matching one is continued (finished rows are skipped). Every
file is written atomically (temporary name, then rename).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ctseg.config import StressConfig
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text
from ctseg.runtime import mapped_pages_dropped, release_free_memory
from ctseg.stress.models import (LoadedModels, ModelSpec, check_classes, model_specs_from_cv,  # noqa: F401
                                 model_specs_from_dirs)  # the model specs' public home is this module's API
from ctseg.stress.perturb import AXES, DegenerateSeverity, estimate_noise_hu

if TYPE_CHECKING:
    from ctseg.datasets.base import Dataset
    from ctseg.io import Volume
    from ctseg.inference.predict import Models
    from ctseg.stress.perturb import Perturbed

log = logging.getLogger(__name__)

STRESS_FORMAT = "ctseg.stress"
_FIXED = ["model", "case_id", "axis", "severity", "clean", "score_on", "seconds_perturb", "seconds_predict", "skipped"]


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


def split_volumes(dataset: Dataset, volumes: Sequence[str], parts: int) -> list[list[str]]:
    """`volumes` in at most `parts` non-empty groups of about equal work, for parallel stress-test parts: each
    volume, the largest first, goes to the group with the fewest voxels so far (sizes from the image headers; a
    volume whose header is unreadable counts as the median). Each group sorted. Which part scores a volume does
    not change its rows: every perturbation is seeded by (seed, case, axis, severity)."""
    from ctseg.inference.cases import header_shape

    shapes = {cid: header_shape(dataset.image_path(cid)) for cid in volumes}
    known = [int(np.prod(s)) for s in shapes.values() if s is not None]
    fallback = int(np.median(known)) if known else 1
    size = {cid: int(np.prod(s)) if s is not None else fallback for cid, s in shapes.items()}
    groups: list[list[str]] = [[] for _ in range(max(1, min(parts, len(volumes))))]
    load = [0] * len(groups)
    for cid in sorted(volumes, key=lambda c: (-size[c], c)):
        k = load.index(min(load))
        groups[k].append(cid)
        load[k] += size[cid]
    return [sorted(g) for g in groups if g]


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


def _volume_pool(dataset: Dataset, case_ids: Sequence[str] | None, models: Sequence[ModelSpec], data_dir: str | Path
                 ) -> list[str]:
    """The case ids to draw volumes from: `case_ids`, else every labelled case (unlabelled ones skipped with a
    warning); every one must be in the dataset and, for CV models, in a test fold."""
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
    return pool


@dataclass
class _Run:
    """What every step of a stress run needs: the data, the models, the seed, the device settings, the keys
    (model, case, axis, severity) of the rows already done and the messages of skipped severities."""

    dataset: object
    data_dir: str | Path
    classes: dict[int, str]
    recipes: dict | None
    models: Sequence[ModelSpec]
    loaded: LoadedModels
    seed: int
    batch_size: int | None
    done: set[tuple[str, str, str, str]]
    messages: list[str]

    def pending(self, case_id: str, axis: str, severity: float) -> list[ModelSpec]:
        key = _severity_key(severity)
        return [m for m in self.models if (m.name, case_id, axis, key) not in self.done]


@dataclass
class _Case:
    """One volume of the stress test: its image (HU: int16 as stored when float32 holds every value exactly,
    else float32; perturbations compute in float32 or float64 either way) and label, the scan's noise
    (estimated on first need) and the clean rows per model (predicted once, every axis's clean severity).

    Image and label live in `.npy` files of a scratch folder, memory-mapped on each use (`image`, `label`); the
    pages read from them leave this process's resident memory as they are read (`mapped_pages_dropped` around
    the perturbation, the prediction and the scoring)."""

    case_id: str
    scratch: Path
    geometry: tuple[Volume, Volume]  # image and label with 1-voxel arrays: spacing, origin, direction, meta
    noise_hu: float | None = None
    clean_rows: dict[str, dict] = field(default_factory=dict)

    @property
    def image(self) -> Volume:
        return replace(self.geometry[0], array=np.load(self.scratch / "image.npy", mmap_mode="r"))

    @property
    def label(self) -> Volume:
        return replace(self.geometry[1], array=np.load(self.scratch / "label.npy", mmap_mode="r"))

    def clean_image(self, models: Models) -> Volume:
        """The image for the clean prediction: as stored when the models' predictions of it equal those of its
        float32 copy (what they have always been given), else that copy. The only dtype-dependent step of
        `predict_volume` is the crop box's `volume >= plan.lower` (`box_same_for_integers`)."""
        from ctseg.inference.predict import flat_models
        from ctseg.preprocess.slices import box_same_for_integers

        if np.issubdtype(self.image.array.dtype, np.integer) and all(
                box_same_for_integers(float(m.plan.lower)) for m in flat_models(models)):
            return self.image
        return self.image.with_array(np.asarray(self.image.array, dtype=np.float32))


def _load_case(run: _Run, case_id: str, scratch: Path) -> _Case:
    """Read one labelled volume into the scratch folder (the image in its own dtype when that is exact in
    float32, else as float32)."""
    case = run.dataset.load(case_id)  # type: ignore[attr-defined]
    if case.label is None:
        raise CtsegError(f"case {case_id} has no label; the stress test needs labelled volumes", run.data_dir)
    array = case.image.array
    exact = array.dtype in (np.int8, np.uint8, np.int16, np.uint16, np.float32)
    scratch.mkdir(parents=True, exist_ok=True)
    np.save(scratch / "image.npy", array if exact else array.astype(np.float32))
    np.save(scratch / "label.npy", case.label.array)
    voxel = np.zeros((1, 1, 1), dtype=np.uint8)
    geometry = (replace(case.image, array=voxel), replace(case.label, array=voxel))
    del case, array
    release_free_memory()  # the reader's work memory
    return _Case(case_id, scratch, geometry)


def _perturb(run: _Run, case: _Case, axis_name: str, severity: float) -> tuple[Perturbed | None, str]:
    """The perturbed acquisition of one shifted severity, or (None, why) when this volume cannot take it."""
    from ctseg.stress.phantom_reacquire import PARAMETERS, reacquire

    axis, cid = AXES[axis_name], case.case_id
    image, label = case.image, case.label
    try:
        if axis.needs_phantom:
            if run.recipes is None or cid not in run.recipes:
                raise CtsegError(f"case {cid} is not listed in phantom.json", run.data_dir)
            pert = reacquire(run.recipes[cid], axis_name, severity, cid)
            if axis_name in PARAMETERS:  # re-acquisitions keep the grid; populations do not
                _check_reacquired(pert, image, axis_name, cid, run.data_dir)
            return pert, ""
        if axis.apply is None:
            raise CtsegError(f"stress axis {axis_name} has no perturbation")
        with mapped_pages_dropped(image.array, label.array):  # the volume's pages leave as they are read
            if axis_name.startswith("dose") and case.noise_hu is None:
                case.noise_hu = estimate_noise_hu(image)
            return axis.apply(image, label, severity, rng=_rng(run.seed, cid, axis_name, severity),
                              classes=run.classes, noise_hu=case.noise_hu), ""
    except DegenerateSeverity as why:
        reason, unit = str(why), f" {axis.unit}"
    except ValueError as why:  # e.g. no soft tissue to estimate the noise from
        reason, unit = str(why), ""
    msg = f"case {cid}: {axis_name} {_severity_key(severity)}{unit} skipped: {reason}"
    run.messages.append(msg)
    log.warning(msg)
    return None, reason


def _score(pred: np.ndarray, ref: np.ndarray, classes: dict[int, str], merge: bool) -> dict[str, float]:
    """Dice per structure of two (z, y, x) label maps; `merge`: every foreground value is one structure
    (foreground models). From one chunked count of value pairs (no whole-volume masks)."""
    from ctseg.evaluate.metrics import dice_from_confusion, dice_per_class, label_confusion

    counts = label_confusion(pred, ref)
    if counts is None:  # values outside 0..255: one mask per structure
        if merge:
            pred, ref = (pred > 0).astype(np.uint8), (ref > 0).astype(np.uint8)
        return dice_per_class(pred, ref, classes)
    if merge:
        counts = np.stack([counts[:1].sum(0), counts[1:].sum(0)])
        counts = np.stack([counts[:, :1].sum(1), counts[:, 1:].sum(1)], axis=1)
    return dice_from_confusion(counts, classes)


def _predict_and_score(run: _Run, spec: ModelSpec, case: _Case, image: Volume, reference: Callable[[], Volume],
                       resample: bool) -> dict:
    """One model's prediction of `image`, scored against `reference()` (opened after the prediction; on its grid
    when `resample`: nearest neighbour by physical position); returns the row's seconds_predict and dice_*."""
    from ctseg.inference.predict import predict_volume

    t0 = time.perf_counter()
    with mapped_pages_dropped(image.array):  # a memory-mapped input is read slab by slab, its pages dropped
        pred = predict_volume(image, run.loaded.members(spec, case.case_id), device=run.loaded.dev,
                              batch_size=run.batch_size).label
    ref = reference()
    with mapped_pages_dropped(ref.array):
        array, keep = _resampled(pred, ref) if resample else (np.asarray(pred.array), None)
        del pred
        dice = _score(array, np.asarray(ref.array), run.loaded.eval_classes[spec.name], run.loaded.merge[spec.name])
    seconds = time.perf_counter() - t0
    del keep, array
    release_free_memory()  # the label maps' and the scoring's freed memory
    return {"seconds_predict": f"{seconds:.3f}", **{f"dice_{k}": f"{v:.6f}" for k, v in dice.items()}}


def _resampled(pred: Volume, ref: Volume) -> tuple[np.ndarray, object]:
    """`ctseg.io.resample_to(pred, ref, order=0).array` (nearest neighbour by physical position, SimpleITK) with
    no copy of the reference's voxels (its grid is all the resampling needs) and the result a view of SimpleITK's
    image (returned beside it: keep it while the view is used)."""
    import SimpleITK as sitk

    from ctseg.io import _physical_bounds, resample_to, to_sitk

    if pred.same_geometry(ref):
        return np.asarray(pred.array), None
    (lo_a, hi_a), (lo_b, hi_b) = _physical_bounds(pred), _physical_bounds(ref)
    if np.any(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b) <= 0):
        return resample_to(pred, ref, order=0).array, None  # raises resample_to's CtsegError
    f = sitk.ResampleImageFilter()  # identity transform, 0 outside: its defaults, as in sitk.Resample
    f.SetSize([int(n) for n in ref.shape[::-1]])  # what sitk.Resample(image, to_sitk(ref), ...) takes from ref
    f.SetOutputSpacing(ref.spacing[::-1])
    f.SetOutputOrigin(ref.origin)
    f.SetOutputDirection(tuple(ref.direction.flatten()))
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    array = pred.array.astype(np.uint8) if pred.array.dtype == bool else pred.array
    out = f.Execute(to_sitk(pred.with_array(array)))
    return sitk.GetArrayViewFromImage(out), out


def _to_scratch(case: _Case, pert: Perturbed | None, tag: str
                ) -> tuple[Perturbed | None, Callable[[], Volume], list[Path]]:
    """The perturbed volume moved to `tag`-named files of the scratch folder and memory-mapped, so that it is
    predicted and scored with none of it resident but the pages being read; and what its predictions are scored
    against, opened on use: the volume's label (clean, scored on the original grid, or a perturbation that kept
    the label), else the perturbed label, also moved to the scratch folder (`pert` then keeps a 1-voxel label
    for its geometry). Returns the files to delete after the severity."""
    if pert is None:
        return None, lambda: case.label, []
    files, image = [], pert.image
    if getattr(image.array, "_mmap", None) is None:  # in memory (numpy keeps the memmap class on copies)
        files.append(case.scratch / f"{tag}-image.npy")
        np.save(files[-1], image.array)
        image = replace(image, array=np.load(files[-1], mmap_mode="r"))
    geometry = replace(pert.label, array=np.zeros((1, 1, 1), dtype=np.uint8))
    array = pert.label.array
    kept = (case.scratch / "label.npy").resolve()
    if pert.score_on == "original" or (isinstance(array, np.memmap) and array.filename
                                       and Path(array.filename) == kept):
        return replace(pert, image=image, label=geometry), lambda: case.label, files
    path = case.scratch / f"{tag}-label.npy"
    np.save(path, array)
    files.append(path)
    return (replace(pert, image=image, label=geometry), lambda: replace(geometry, array=np.load(path, mmap_mode="r")),
            files)


def _stress_severity(run: _Run, case: _Case, axis_name: str, severity: float) -> list[dict]:
    """The rows of one (volume, axis, severity) for the models that still need it: perturb once, then each model
    predicts and is scored. The clean severity reuses the volume's clean prediction (made on first need)."""
    specs = run.pending(case.case_id, axis_name, severity)
    if not specs:
        return []
    is_clean = severity == AXES[axis_name].clean
    key = _severity_key(severity)
    t0 = time.perf_counter()
    pert, skipped = (None, "") if is_clean else _perturb(run, case, axis_name, severity)
    pert, reference, files = _to_scratch(case, pert, f"{axis_name}={key}")
    release_free_memory()  # the perturbation's freed work memory, kept in the heap by `tune_malloc`
    t_perturb = time.perf_counter() - t0
    rows = []
    try:
        for spec in specs:
            row = {"model": spec.name, "case_id": case.case_id, "axis": axis_name, "severity": key,
                   "clean": int(is_clean), "score_on": "", "seconds_perturb": f"{t_perturb:.3f}",
                   "seconds_predict": "", "skipped": skipped}
            if is_clean:
                if spec.name not in case.clean_rows:
                    clean = case.clean_image(run.loaded.members(spec, case.case_id))
                    case.clean_rows[spec.name] = _predict_and_score(run, spec, case, clean, reference, False)
                    del clean
                row.update(case.clean_rows[spec.name], score_on="original")
            elif pert is not None:
                row.update(_predict_and_score(run, spec, case, pert.image, reference, pert.score_on == "original"),
                           score_on=pert.score_on)
            rows.append(row)
    finally:
        del pert, reference
        for f in files:  # a file still mapped stays readable until unmapped
            f.unlink(missing_ok=True)
    return rows


def run_stress(models: Sequence[ModelSpec], data_dir: str | Path, out_dir: str | Path, cfg: StressConfig, *,
               layout: str = "auto", case_ids: Sequence[str] | None = None, device: str | torch.device = "auto",
               batch_size: int | None = None, progress: bool = True, messages: list[str] | None = None) -> dict:
    """Run (or continue) the stress test; returns the summary (also written to `out_dir/summary.json`).

    case_ids: the volumes to draw from (default: every labelled case of the dataset; CV mode: the folds' cases).
    messages: skipped severities are appended here as text naming the case (and logged).

    Steps: the volumes and settings (`_volume_pool`, `_claim`), the models (`LoadedModels`), then per volume
    (`_load_case`) and per severity (`_stress_severity`: `_perturb`, then `_predict_and_score` per model); the
    rows are written after each volume. The volume, its label and each perturbed copy wait in memory-mapped files
    of a scratch folder (`out_dir/.scratch-PID`, removed at the end) whose pages leave the resident memory as they
    are read (`ctseg.runtime.mapped_pages_dropped`): a perturbed copy is resident only while it is made, and a
    prediction holds the network input, the label it writes and work chunks, as `ctseg predict` does.
    """
    from ctseg.progress import progress_bar
    from ctseg.datasets import open_dataset
    from ctseg.stress.phantom_reacquire import phantom_recipes
    from ctseg.runtime import resolve_device

    out = Path(out_dir)
    dataset = open_dataset(data_dir, layout)
    classes = {int(k): str(v) for k, v in dataset.classes.items()}
    recipes = phantom_recipes(data_dir)
    axes = resolve_axes(cfg, recipes is not None)
    volumes = choose_volumes(_volume_pool(dataset, case_ids, models, data_dir), cfg.max_volumes, cfg.seed)
    dev = resolve_device(device)
    for spec in models:
        for d in (spec.members if spec.folds is None else list(spec.folds.values())):
            check_classes(spec, d, classes, data_dir)
    settings = {"format": STRESS_FORMAT, "data": str(Path(data_dir).resolve()), "layout": layout,
                "models": [m.to_json() for m in models], "volumes": volumes,
                "axes": {a: [float(s) for s in sev] for a, sev in axes.items()}, "seed": cfg.seed,
                "max_volumes": cfg.max_volumes}
    _claim(out, settings)
    rows_path = out / "rows.csv"
    rows = _read_rows(rows_path)
    done = {(r["model"], r["case_id"], r["axis"], r["severity"]) for r in rows}
    run = _Run(dataset, data_dir, classes, recipes, models, LoadedModels(models, classes, dev), cfg.seed,
               batch_size, done, messages if messages is not None else [])
    severities = [(a, s) for a, sev in axes.items() for s in sev]
    scratch = out / f".scratch-{os.getpid()}"
    with progress_bar(progress) as bar:
        task = bar.add_task("[bold]stress test[/] volumes x severities", total=len(volumes) * len(severities))
        try:
            for cid in volumes:
                if not any(run.pending(cid, a, s) for a, s in severities):
                    bar.advance(task, len(severities))
                    continue
                case = _load_case(run, cid, scratch)
                for axis_name, s in severities:
                    new = _stress_severity(run, case, axis_name, s)
                    rows += new
                    done.update((r["model"], cid, axis_name, r["severity"]) for r in new)
                    bar.advance(task)
                _write_rows(rows_path, rows, run.loaded.structures)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return _summarize(rows, models, axes, run.loaded.structures, cfg, out)


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
