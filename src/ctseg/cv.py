"""Slice-sorted cross-validation of one configuration, and the stacked ensemble over finished runs.

`run_cv(cfg, data_dir, out_dir)` makes or reuses the folds file (paper: sorted by slice count, then
thickness), and for each fold preprocesses the data with an intensity plan drawn from that fold's training
cases only (one cache folder per plan, `cache/plan-<digest>/`, shared by every run whose fold has the same
plan), trains on the other folds, predicts the fold's test volumes, keeps their out-of-fold probabilities
and scores them. A CV run folder::

    cv.json                    identity (arch, dim, target, aug, seed), data / cache / folds paths, and the
                               signature of every case's files (`case_signature`): other data are refused
    config.yaml                the exact configuration
    fold_<k>/model/            the training run (`ctseg.train.trainer`: run.json, log.csv, weights)
    fold_<k>/oof/<case>.npy    out-of-fold softmax (C, z, S, S) float16 at network resolution
    fold_<k>/overlays/<case>.npz   one axial slice (image, reference, prediction) for the report
    fold_<k>/provenance.json   the fold's test cases and what scored them (`ctseg.evaluate.provenance`)
    fold_<k>/results.json      `VolumeResult` records of the fold; written last, it marks the fold done

Each fold's model selects its checkpoint on a validation split of the fold's training cases seeded by the fold
(`ctseg.train.trainer.fold_validation_split`), the same for every run of the fold. Finished parts are skipped: a fold with its results file is done, a completed training is reused and an
interrupted one resumes from its checkpoint. Folds can run as separate jobs (`folds=[k]`).

Inference runs once per test volume at network resolution (`ctseg.predict.predict_network` on the cached,
preprocessed volume, exactly the network input of `predict_volume`); the label in original geometry comes
from restoring those probabilities in-plane (bilinear) and taking the argmax. Datasets hand out cases in
canonical orientation with the label on the image grid, so that grid is the volume's own geometry.
Scores: Dice per structure on the full volume and HD95 (`evaluate_volume`), and the paper's protocol
(`dice_paper_protocol`: network resolution, foreground slices). No test-fold statistics: a clinic never has
its future scans' intensities, so no test case of fold k enters fold k's intensity plan.

`run_stack(cv_dirs, out_dir)` builds the stacked CNN from finished CV runs (see `ctseg.models.stacking`), its
members chosen per test fold and its meta-model nested, and scores it, and the plain average of the same
members, on the same folds. Both records of a test volume
carry the members' agreement on it (`ctseg.evaluate.quality.member_agreement` of their out-of-fold maps),
the report's quality flag.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import yaml

from ctseg.config import ExperimentConfig, StackConfig, config_to_dict, parse_config, save_config
from ctseg.errors import CtsegError
from ctseg.evaluate.records import ModelIdentity, VolumeResult
from ctseg.fileutil import atomic_path, atomic_write_text
from ctseg.runtime import resolve_device

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from ctseg.datasets.base import Case, Dataset
    from ctseg.evaluate.folds import Folds
    from ctseg.models.stacking import MemberRun
    from ctseg.preprocess.cache import CachedCase, CaseCache, CaseIndex

log = logging.getLogger(__name__)

CV_FORMAT = "ctseg.cv"
STACK_FORMAT = "ctseg.stack"


# ------------------------------------------------------------------------------------------- identity
@dataclass(frozen=True)
class RunIdentity:
    """What a CV run is, for tables and stacking: name e.g. 'unet-2d-ctia', 'msd-3d-ctia-fg-s1',
    'unet-2d-ctia-nowindow' (an `experiment.variants` arm)."""

    name: str
    arch: str
    dim: str
    target: str
    aug: str
    seed: int
    variant: str

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> "RunIdentity":
        m = cfg.model
        name = f"{m.arch}-{m.dim}-{cfg.augment.name}"
        variant = []
        if m.target == "foreground":
            name += "-fg"
            variant.append("foreground")
        if cfg.seed != 0:
            name += f"-s{cfg.seed}"
            variant.append(f"seed {cfg.seed}")
        if cfg.experiment.variant:  # an arm of `experiment.variants`, e.g. nowindow
            name += f"-{cfg.experiment.variant}"
            variant.append(cfg.experiment.variant)
        return cls(name, m.arch, m.dim, m.target, cfg.augment.name, cfg.seed, ", ".join(variant))

    @property
    def model_identity(self) -> ModelIdentity:
        """The identity its `VolumeResult`s carry."""
        return ModelIdentity(self.name, self.arch, self.dim, self.aug, self.variant)


def _fold_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"fold_{k}"


def _comparable(cfg_dict: dict) -> dict:
    """Config without what does not change a CV run's results: name, experiment matrix, stack, stress test, data path,
    device and logging settings."""
    d = json.loads(json.dumps(cfg_dict))
    for key in ("name", "experiment", "stack", "stress"):
        d.pop(key, None)
    d.get("data", {}).pop("path", None)
    for key in ("device", "num_workers", "tensorboard"):
        d.get("train", {}).pop(key, None)
    return d


# ------------------------------------------------------------------------------------ data and folds
def case_metadata(dataset: Dataset) -> dict[str, dict]:
    """num_slices, slice_thickness (mm) and spacing of every case, read from the dataset: what the folds are
    sorted by, known before any intensity plan exists."""
    meta = {}
    log.info("reading the geometry of %d cases for the folds", len(dataset.case_ids()))
    for cid in dataset.case_ids():
        case = dataset.load(cid)
        th = case.image.slice_thickness if case.image.slice_thickness is not None \
            else case.metadata.get("slice_thickness")
        meta[cid] = {"num_slices": int(case.image.shape[0]), "slice_thickness": th,
                     "spacing": [float(v) for v in case.image.spacing]}
    return meta


def prepare_data(cfg: ExperimentConfig, data_dir: str | Path, folds_file: str | Path, progress: bool = True
                 ) -> tuple[Dataset, Folds]:
    """Open the dataset and make or reuse the folds file (case geometry read from the dataset when new).

    Returns (dataset, Folds). Each fold's cache comes from `fold_cache`."""
    from ctseg.datasets import open_dataset
    from ctseg.evaluate.folds import load_folds, load_or_create_folds

    dataset = open_dataset(data_dir, cfg.data.layout)
    if Path(folds_file).is_file():
        stored = load_folds(folds_file)
        case_meta = stored.case_meta if set(stored.case_meta) == set(dataset.case_ids()) else None
    else:
        case_meta = None
    folds = load_or_create_folds(folds_file, case_meta or case_metadata(dataset), cfg.cv.n_folds,
                                 cfg.cv.fold_mode, np.random.default_rng([cfg.seed, 0xF01D]))
    return dataset, folds


def fold_cache(dataset: Dataset, cfg: ExperimentConfig, cache_root: str | Path, folds: Folds, k: int,
               progress: bool = True) -> CaseCache:
    """The `CaseCache` of fold k, built if needed: its intensity plan comes from the fold's training cases only
    (no test-fold statistics; `ctseg.preprocess.cache.build_fold_cache`), one folder per plan under cache_root."""
    from ctseg.preprocess.cache import CaseCache, build_fold_cache

    return CaseCache(build_fold_cache(dataset, cache_root, cfg, folds.train_ids(k), k, progress), expected=cfg)


def fold_cache_dir(cfg: ExperimentConfig, cache_root: str | Path, folds: Folds, k: int) -> Path:
    """Where `fold_cache` keeps fold k's cache (no building)."""
    from ctseg.preprocess.cache import fold_plan_subset, plan_cache_dir

    return plan_cache_dir(cache_root, cfg.preprocess, fold_plan_subset(folds.train_ids(k), cfg.preprocess, k))


def folds_of_cache(cache: CaseIndex, cfg: ExperimentConfig, folds_file: str | Path) -> Folds:
    """The `Folds` in `folds_file`, made from the cached cases' slice counts and thicknesses (`cfg.cv`,
    seed stream [seed, 0xF01D], as `prepare_data`) when the file does not exist yet."""
    from ctseg.evaluate.folds import load_or_create_folds

    case_meta = {cid: {k: cache.meta(cid).get(k) for k in ("num_slices", "slice_thickness", "spacing")}
                 for cid in cache.case_ids()}
    return load_or_create_folds(folds_file, case_meta, cfg.cv.n_folds, cfg.cv.fold_mode,
                                np.random.default_rng([cfg.seed, 0xF01D]))


def _eval_classes(target: str, dataset_classes: dict[int, str]) -> tuple[dict[int, str], bool]:
    """Classes to score a model's output with, and whether the reference must be merged to foreground.

    A 'foreground' model of a multi-class dataset is scored on 'total' (the union of the classes) only.
    """
    fg = [k for k in dataset_classes if k != 0]
    if target == "foreground" and len(fg) > 1:
        return {0: dataset_classes.get(0, "background"), 1: "total"}, True
    return dict(dataset_classes), False


def network_label(probs: np.ndarray | torch.Tensor, original_yx: tuple[int, int],
                  box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(C, z, S, S) network-resolution probabilities -> uint8 (z, H, W) label: bilinear in-plane (into the
    crop `box`, background outside), argmax.

    Chunked along z (`ctseg.predict.restore_label`, as `ctseg predict` does).
    """
    from ctseg.predict import restore_label

    out = np.empty((probs.shape[1], *original_yx), dtype=np.uint8)
    restore_label(probs, original_yx, out, box=box)
    return out


def score_volume(identity: ModelIdentity, case: Case, cached: CachedCase, probs: np.ndarray, fold: int,
                 dataset_classes: dict[int, str], target: str, overlay_path: Path | None,
                 distances: bool = True) -> VolumeResult:
    """Score one test volume. probs: (C, z, S, S) at network resolution; case: the dataset's Case (HU,
    label on the image grid); cached: its `CachedCase` (network-resolution label). distances: HD95."""
    from ctseg.evaluate.metrics import dice_paper_protocol, evaluate_volume
    from ctseg.evaluate.plots import save_overlay_slice

    if case.label is None:
        raise CtsegError(f"case {case.case_id} has no label: test volumes must be labelled to be scored",
                         case.metadata.get("image_path"))
    classes, merge = _eval_classes(target, dataset_classes)
    ref_full = case.label.array
    ref_net = np.asarray(cached.label)
    if merge:
        ref_full, ref_net = (ref_full > 0).astype(np.uint8), (ref_net > 0).astype(np.uint8)
    from ctseg.preprocess.slices import InPlaneResize

    pred = network_label(probs, case.image.shape[1:], InPlaneResize.from_dict(cached.meta["in_plane"]).box)
    recs = evaluate_volume(pred, ref_full, classes, case.image.spacing, case_id=case.case_id, fold=fold,
                           slice_thickness=cached.meta.get("slice_thickness"), distances=distances)
    paper = dice_paper_protocol(np.asarray(probs).argmax(0).astype(np.uint8), ref_net, classes)
    if overlay_path is not None:
        save_overlay_slice(overlay_path, case.image.array, ref_full, pred, case.image.spacing)
    th = cached.meta.get("slice_thickness")
    return VolumeResult(
        case_id=case.case_id, fold=fold, model=identity.name, arch=identity.arch, dim=identity.dim, aug=identity.aug,
        dice={r["structure"]: float(r["dice"]) for r in recs},
        dice_paper={k: float(v) for k, v in paper.items()},
        hd95={r["structure"]: float(r["hd95"]) for r in recs if "hd95" in r},
        slice_thickness=None if th is None else float(th), num_slices=int(cached.meta["num_slices"]),
        variant=identity.variant, overlay=str(overlay_path) if overlay_path is not None else None)


def progress_bar(enabled: bool) -> Progress:
    """A rich progress display (elapsed and remaining time); when not `enabled`, one that shows nothing."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled)


def _write_records(path: Path, records: Sequence[VolumeResult]) -> None:
    atomic_write_text(path, json.dumps([r.to_json() for r in records], indent=1, allow_nan=False))


def _read_records(path: Path) -> list[VolumeResult]:
    try:
        return [VolumeResult.from_json(d) for d in json.loads(Path(path).read_text())]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CtsegError(f"unreadable fold results ({type(err).__name__}: {err}); delete it to redo the fold",
                         path) from None


# ---------------------------------------------------------------------------------------------- run_cv
def run_cv(cfg: ExperimentConfig, data_dir: str | Path, out_dir: str | Path, folds: Sequence[int] | None = None, *,
           cache_dir: str | Path | None = None, folds_file: str | Path | None = None,
           device: str | torch.device | None = None, progress: bool = True) -> list[VolumeResult]:
    """Cross-validate `cfg` on the dataset at `data_dir`; returns the records of the folds run (or found done).

    folds: fold indices to run (default all). cache_dir / folds_file default to `out_dir/cache`,
    `out_dir/folds.json`; experiments share them between runs.
    """
    from ctseg.predict import predict_network
    from ctseg.train.trainer import fold_validation_split, load_trained, train_model

    out = Path(out_dir)
    ident = RunIdentity.of(cfg)
    cache_dir = Path(cache_dir) if cache_dir is not None else out / "cache"
    folds_file = Path(folds_file) if folds_file is not None else out / "folds.json"
    wanted = list(range(cfg.cv.n_folds)) if folds is None else sorted(set(int(k) for k in folds))
    bad = [k for k in wanted if not 0 <= k < cfg.cv.n_folds]
    if bad:
        raise CtsegError(f"fold(s) {bad} out of range: the config has {cfg.cv.n_folds} folds (0..{cfg.cv.n_folds - 1})")
    from ctseg.datasets import open_dataset
    from ctseg.datasets.base import dataset_sources

    sources = dataset_sources(open_dataset(data_dir, cfg.data.layout))
    _check_run_dir(out, cfg, sources)
    dataset, fold_set = prepare_data(cfg, data_dir, folds_file, progress)
    _claim_run_dir(out, cfg, ident, data_dir, cache_dir, folds_file, sources)
    dev = resolve_device(device if device is not None else cfg.train.device)
    records: list[VolumeResult] = []
    with progress_bar(progress) as bar:
        overall = bar.add_task(f"[bold]{ident.name}[/] folds", total=len(wanted))
        for k in wanted:
            fdir = _fold_dir(out, k)
            done = fdir / "results.json"
            if done.is_file():
                log.info("%s fold %d: done already (%s)", ident.name, k, done)
                records += _read_records(done)
                bar.advance(overall)
                continue
            model_dir = fdir / "model"
            cache = fold_cache(dataset, cfg, cache_dir, fold_set, k, progress)
            if not _training_completed(model_dir):
                resume = (model_dir / "checkpoint.pt").is_file()
                fit_ids, val_ids = _started_split(model_dir, fold_set.train_ids(k)) if resume else (None, None)
                if fit_ids is None or val_ids is None:
                    fit_ids, val_ids = fold_validation_split(fold_set.train_ids(k), cfg.train.val_fraction, k)
                train_model(cfg, cache, fit_ids, val_ids, model_dir, resume=resume, progress=progress, device=dev)
            trained = load_trained(model_dir, dev)
            test_ids = fold_set.test_ids(k)
            task = bar.add_task(f"fold {k}: predict + score", total=len(test_ids))
            fold_records = []
            for cid in test_ids:
                cached = cache.load(cid)
                probs_t, _, _ = predict_network(np.asarray(cached.image, dtype=np.float32), [trained], dev)
                probs = probs_t.cpu().numpy()
                _save_npy(fdir / "oof" / f"{cid}.npy", probs.astype(np.float16))
                overlay = fdir / "overlays" / f"{cid}.npz"
                rec = score_volume(ident.model_identity, dataset.load(cid), cached, probs, k, cache.classes,
                                   trained.target, overlay, cfg.cv.distances)
                rec.overlay = os.path.relpath(overlay, out)
                fold_records.append(rec)
                bar.advance(task)
            write_fold_provenance(fdir, k, test_ids, {"model": "model/run.json", "cache": str(cache.root),
                                                      "intensity_plan_fitted_on": list(cache.plan.subset_ids)})
            records += _close_fold(done, fold_records, bar, task, overall)
    return records


def _started_split(model_dir: Path, train_ids: Sequence[str]) -> tuple[list[str] | None, list[str] | None]:
    """The (fit, validation) split an interrupted training of this fold started with, so that it resumes with it
    (one started before validation splits were seeded by the fold keeps its own; its provenance says which)."""
    try:
        run = json.loads((model_dir / "run.json").read_text())
        fit, val = list(run["train_ids"]), list(run.get("val_ids") or [])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    return (fit, val) if sorted(fit + val) == sorted(train_ids) else (None, None)


def write_fold_provenance(fdir: Path, k: int, test_ids: Sequence[str], scored_with: dict) -> None:
    """`fold_<k>/provenance.json`: the fold's test cases and what scored them (`ctseg.evaluate.provenance`)."""
    from ctseg.evaluate.provenance import PROVENANCE_VERSION

    atomic_write_text(fdir / "provenance.json", json.dumps({
        "version": PROVENANCE_VERSION, "fold": k, "test_cases": sorted(test_ids), "scored_with": scored_with},
        indent=1))


def _close_fold(done: Path, fold_records: list[VolumeResult], bar: Progress, task: TaskID,
                overall: TaskID) -> list[VolumeResult]:
    """Write a fold's records (marking it done) and retire its progress task; returns the records."""
    _write_records(done, fold_records)
    bar.remove_task(task)
    bar.advance(overall)
    return fold_records


def _training_completed(model_dir: Path) -> bool:
    try:
        return json.loads((model_dir / "run.json").read_text()).get("status") == "completed" and \
            (model_dir / "model_best.pt").is_file()
    except (OSError, ValueError):
        return False


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _check_run_dir(out: Path, cfg: ExperimentConfig, sources: dict[str, str | None]) -> None:
    """CtsegError unless the run folder `out` is new or holds a run of this same configuration on the same data
    (`sources`: the `dataset_sources` of the data now)."""
    try:
        old_sources = json.loads((out / "cv.json").read_text()).get("sources")
    except (OSError, ValueError, AttributeError):
        old_sources = None
    if isinstance(old_sources, dict) and old_sources != sources:
        changed = sorted(k for k in set(old_sources) | set(sources) if old_sources.get(k) != sources.get(k))
        raise CtsegError(f"this folder holds a cross-validation of other data: {len(changed)} case(s) differ "
                         f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}: added, removed or their "
                         "files changed); its finished folds would be reported for these data. Choose another "
                         "output folder", out / "cv.json")
    cfg_path = out / "config.yaml"
    if cfg_path.is_file():
        try:
            old = parse_config(yaml.safe_load(cfg_path.read_text()), cfg_path)
        except yaml.YAMLError as err:
            raise CtsegError(f"unreadable ({err})", cfg_path) from None
        a, b = _comparable(config_to_dict(old)), _comparable(config_to_dict(cfg))
        if a != b:
            from ctseg.train.trainer import config_differences

            diffs = config_differences(a, b, ignore=())
            raise CtsegError("this folder holds a cross-validation of another configuration; choose another "
                             "output folder. Differences:\n  " + "\n  ".join(diffs[:20]), out)


def _claim_run_dir(out: Path, cfg: ExperimentConfig, ident: RunIdentity, data_dir: str | Path, cache_dir: Path,
                   folds_file: Path, sources: dict[str, str | None]) -> None:
    """Write cv.json + config.yaml (after `_check_run_dir`)."""
    cfg_path = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg_path)
    manifest = {"format": CV_FORMAT, **ident.__dict__, "data": str(Path(data_dir).resolve()),
                "layout": cfg.data.layout, "cache": str(Path(cache_dir).resolve()),
                "folds_file": str(Path(folds_file).resolve()), "n_folds": cfg.cv.n_folds, "sources": sources}
    atomic_write_text(out / "cv.json", json.dumps(manifest, indent=1))


def read_cv_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "cv.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CtsegError("not a cross-validation folder (no cv.json); run `ctseg cv` first", run_dir) from None
    except ValueError as err:
        raise CtsegError(f"unreadable ({err})", path) from None
    if not isinstance(info, dict) or info.get("format") != CV_FORMAT:
        raise CtsegError(f"not a cv.json of ctseg (format {info.get('format') if isinstance(info, dict) else info!r:.40}, "
                         f"expected {CV_FORMAT!r})", path)
    return info


def load_cv_records(run_dir: str | Path, require_all: bool = False) -> list[VolumeResult]:
    """Records of a CV (or stack) folder's finished folds; overlay paths made absolute."""
    run_dir = Path(run_dir)
    n_folds = int(json.loads((run_dir / ("cv.json" if (run_dir / "cv.json").is_file() else "stack.json"))
                             .read_text())["n_folds"])
    records = []
    for k in range(n_folds):
        path = _fold_dir(run_dir, k) / "results.json"
        if not path.is_file():
            if require_all:
                raise CtsegError(f"fold {k} has not finished (no {path.name})", path.parent)
            continue
        for r in _read_records(path):
            if r.overlay and not Path(r.overlay).is_absolute():
                r.overlay = str((run_dir / r.overlay).resolve())
            records.append(r)
    return records


def cv_log_csvs(run_dir: str | Path) -> list[Path]:
    """The training logs of a CV folder's folds (existing ones)."""
    return sorted(p for p in Path(run_dir).glob("fold_*/model/log.csv"))


# ------------------------------------------------------------------------------------------- stacking
def member_run(run_dir: str | Path) -> MemberRun:
    """A finished CV folder as a `MemberRun`: each fold model's best validation Dice and the cases it was
    computed on (per-fold selection), and their mean (the report's summary)."""
    from ctseg.models.stacking import MemberRun

    info = read_cv_manifest(run_dir)
    scores, val_ids = [], []
    for k in range(int(info["n_folds"])):
        if not (_fold_dir(Path(run_dir), k) / "results.json").is_file():
            raise CtsegError(f"fold {k} of this cross-validation has not finished; finish it before stacking",
                             run_dir)
        run = _run_json(Path(run_dir), k)
        best = run.get("best_metric")
        scores.append(math.nan if best is None else float(best))
        val_ids.append(tuple(sorted(run.get("val_ids") or [])))
    finite = [s for s in scores if math.isfinite(s)]
    return MemberRun(info["name"], Path(run_dir).resolve(), info["arch"], info["dim"], info["target"], info["aug"],
                     float(np.mean(finite)) if finite else math.nan, tuple(scores), tuple(val_ids))


def _run_json(run_dir: Path, k: int) -> dict:
    path = _fold_dir(run_dir, k) / "model" / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CtsegError(f"unreadable training record ({type(err).__name__}: {err})", path) from None


def _model_lineage(run_dir: Path, k: int) -> dict[str, list[str]]:
    """What fold k's model of a CV run was fitted and chosen on: weights, checkpoint selection, intensity plan."""
    run = _run_json(run_dir, k)
    return {"weights_fitted_on": sorted(run["train_ids"]), "checkpoint_selected_on": sorted(run.get("val_ids") or []),
            "intensity_plan_fitted_on": sorted(run.get("intensity_plan", {}).get("subset_ids") or [])}


def _trained_on(run_dir: Path, k: int) -> frozenset[str]:
    """The cases fold k's model of a CV run has seen in any way (weights, checkpoint selection, plan)."""
    return frozenset().union(*(set(v) for v in _model_lineage(run_dir, k).values()))


def _heldout_maps(member: MemberRun, k: int, cases: Sequence[str], cache: CaseCache, out: Path,
                  dev: torch.device) -> dict[str, Path]:
    """Fold k's model of `member` applied to `cases` (its validation cases, on fold k's cache): the nested
    meta-model's inputs, kept under `out` (`<member>/<case>.npy`, float16) and reused when present."""
    from ctseg.predict import predict_network
    from ctseg.train.trainer import load_trained

    paths = {cid: out / member.name / f"{cid}.npy" for cid in cases}
    missing = [cid for cid, p in paths.items() if not p.is_file()]
    if missing:
        trained = load_trained(_fold_dir(member.path, k) / "model", dev)
        for cid in missing:
            probs, _, _ = predict_network(np.asarray(cache.load(cid).image, dtype=np.float32), [trained], dev)
            _save_npy(paths[cid], probs.cpu().numpy().astype(np.float16))
    return paths


def _unique_members(per_fold: Sequence[Sequence[MemberRun]]) -> list[MemberRun]:
    seen: dict[str, MemberRun] = {}
    for members in per_fold:
        for m in members:
            seen.setdefault(m.name, m)
    return list(seen.values())


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_stack(cv_dirs: Sequence[str | Path], out_dir: str | Path, stack_cfg: StackConfig | None = None, *,
              seed: int = 0, distances: bool | None = None, device: str | torch.device | None = None,
              progress: bool = True) -> list[VolumeResult]:
    """`_run_stack` (the stacked ensemble, see there); a run that fails (or is interrupted) removes what it
    created and did not finish: the fold folders without `results.json` it made, `stack.json` when no fold is
    done, and `out_dir` when it made it and left it empty. Finished folds stay (a rerun continues)."""
    out = Path(out_dir)
    made_out = not out.exists()
    had_stack = (out / "stack.json").exists()
    old_folds = set(out.glob("fold_*")) if not made_out else set()
    try:
        return _run_stack(cv_dirs, out, stack_cfg, seed=seed, distances=distances, device=device, progress=progress)
    except BaseException:
        _remove_unfinished_stack(out, made_out, had_stack, old_folds)
        raise


def _remove_unfinished_stack(out: Path, made_out: bool, had_stack: bool, old_folds: set[Path]) -> None:
    import shutil

    folds = [p for p in out.glob("fold_*") if p.is_dir()]
    for fdir in folds:
        if fdir not in old_folds and not (fdir / "results.json").is_file():
            shutil.rmtree(fdir, ignore_errors=True)
    if not had_stack and not any((f / "results.json").is_file() for f in folds):
        (out / "stack.json").unlink(missing_ok=True)
    if made_out and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _run_stack(cv_dirs: Sequence[str | Path], out_dir: str | Path, stack_cfg: StackConfig | None = None, *,
               seed: int = 0, distances: bool | None = None, device: str | torch.device | None = None,
               progress: bool = True) -> list[VolumeResult]:
    """Stacked CNN and plain average of the top-k members per set, per test fold, evaluated on the members' folds.

    For each fold k the members are the top_k of each set by the validation Dice of their fold-k models (the
    fold's validation split, inside its training side). The meta-model scored on fold k learns, with
    `stack.meta_training: nested` (default), from those members' maps of their validation cases, or with `oof`
    from the other folds' out-of-fold maps (not nested: those maps come from models trained on fold k).
    `stack.json` records each fold's selection and the cases it was made on, `fold_<k>/meta_training.json`
    exactly which maps and cases the meta-model learnt from (`ctseg.evaluate.provenance` checks them).
    Writes `stack.json`, per-fold `results.json`, `meta.pt` and overlays into `out_dir`; skips done folds.
    """
    from ctseg.datasets import open_dataset
    from ctseg.evaluate.folds import load_folds
    from ctseg.evaluate.provenance import PROVENANCE_VERSION
    from ctseg.evaluate.quality import member_agreement
    from ctseg.models.stacking import (MemberPrediction, average_members, meta_training_cases, nested_meta_cases,
                                       predict_meta, save_meta_model, select_members, stack_inputs,
                                       train_meta_model, vote_matrix)
    from ctseg.preprocess.cache import CaseCache
    from ctseg.train.losses import TanimotoCELoss

    if not cv_dirs:
        raise CtsegError("no cross-validation folders given")
    manifests = [read_cv_manifest(d) for d in cv_dirs]
    first_cfg = parse_config(yaml.safe_load((Path(cv_dirs[0]) / "config.yaml").read_text()), cv_dirs[0])
    stack_cfg = stack_cfg or first_cfg.stack
    distances = first_cfg.cv.distances if distances is None else distances
    for key in ("data", "cache", "folds_file", "n_folds"):
        values = {str(m[key]) for m in manifests}
        if len(values) != 1:
            raise CtsegError(f"the runs to stack differ in {key}: {sorted(values)}; stack runs of one experiment")
    sets = {(s.arch, s.dim, s.target) for s in stack_cfg.members}
    candidates = [c for c in (member_run(d) for d in cv_dirs) if (c.arch, c.dim, c.target) in sets]
    base = manifests[0]
    dataset = open_dataset(base["data"], base["layout"])
    fold_set = load_folds(base["folds_file"])
    fold_of = {cid: k for k, ids in enumerate(fold_set.folds) for cid in ids}
    per_fold = [select_members(candidates, stack_cfg.members, stack_cfg.top_k, fold=k)
                for k in range(fold_set.n_folds)]
    all_members = _unique_members(per_fold)
    augs = sorted({m.aug for m in all_members})
    aug = augs[0] if len(augs) == 1 else "+".join(augs)
    # a case's label and maps come from its own test fold's cache (the plan its members' predictions used)
    caches = [CaseCache(fold_cache_dir(first_cfg, base["cache"], fold_set, k)) for k in range(fold_set.n_folds)]
    n_classes = len(caches[0].classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stacked = ModelIdentity(f"stacked-{aug}", "stacked", "", aug)
    averaged = ModelIdentity(f"average-{aug}", "average", "", aug)
    mode = stack_cfg.meta_training
    folds_info = []
    for k, members in enumerate(per_fold):
        folds_info.append({"fold": k, "test_cases": fold_set.test_ids(k), "members": [m.name for m in members],
                           "candidates": [{"name": c.name, "set": f"{c.arch}-{c.dim}-{c.target}",
                                           "val_score": _finite(c.score(k)), "selected": c in members,
                                           "selected_on": list(c.fold_val_ids[k])} for c in candidates]})
    atomic_write_text(out / "stack.json", json.dumps({
        "format": STACK_FORMAT, "aug": aug, "n_folds": fold_set.n_folds, "top_k": stack_cfg.top_k,
        "selection": "per fold", "meta_training": mode, "folds_file": str(Path(base["folds_file"]).resolve()),
        "provenance": {"version": PROVENANCE_VERSION},
        "members": [{"name": m.name, "path": str(m.path), "arch": m.arch, "dim": m.dim, "target": m.target,
                     "val_score": _finite(m.val_score), "folds": [k for k, ms in enumerate(per_fold) if m in ms]}
                    for m in all_members],
        "candidates": [{"name": c.name, "path": str(c.path), "set": f"{c.arch}-{c.dim}-{c.target}",
                        "selected": any(c in ms for ms in per_fold),
                        "selected_folds": [k for k, ms in enumerate(per_fold) if c in ms],
                        "val_score": _finite(c.val_score)} for c in candidates],
        "folds": folds_info, "stack": stack_cfg.model_dump(mode="json")}, indent=1))
    dev = resolve_device(device if device is not None else "auto")
    loss = TanimotoCELoss()
    records: list[VolumeResult] = []
    steps = stack_cfg.meta_epochs * stack_cfg.steps_per_epoch
    with progress_bar(progress) as bar:
        overall = bar.add_task(f"[bold]stacked ensemble ({aug})[/] folds", total=fold_set.n_folds)
        for k in range(fold_set.n_folds):
            fdir = _fold_dir(out, k)
            done = fdir / "results.json"
            if done.is_file():
                records += _read_records(done)
                bar.advance(overall)
                continue
            members = per_fold[k]
            names = [m.name for m in members]
            test_cases = fold_set.test_ids(k)
            lineage = {(m.name, j): _model_lineage(m.path, j) for m in members for j in range(fold_set.n_folds)}
            test_maps = {cid: [MemberPrediction(cid, m.name, k, _fold_dir(m.path, k) / "oof" / f"{cid}.npy",
                                                frozenset(lineage[m.name, k]["weights_fitted_on"]))
                               for m in members] for cid in test_cases}
            if mode == "nested":
                train_cases = nested_meta_cases(fold_set.train_ids(k), [lineage[m.name, k]["weights_fitted_on"]
                                                                        for m in members], k)
                held = {m.name: _heldout_maps(m, k, train_cases, caches[k], fdir / "heldout", dev) for m in members}
                train_maps = {cid: [MemberPrediction(cid, m.name, k, held[m.name][cid],
                                                     frozenset(lineage[m.name, k]["weights_fitted_on"]))
                                    for m in members] for cid in train_cases}
                label_cache = {cid: caches[k] for cid in train_cases}
            else:
                train_cases = meta_training_cases(fold_of, k)
                train_maps = {cid: [MemberPrediction(cid, m.name, fold_of[cid],
                                                     _fold_dir(m.path, fold_of[cid]) / "oof" / f"{cid}.npy",
                                                     frozenset(lineage[m.name, fold_of[cid]]["weights_fitted_on"]))
                                    for m in members] for cid in train_cases}
                label_cache = {cid: caches[fold_of[cid]] for cid in train_cases}
            leaked = sorted(set(train_cases) & set(test_cases))
            if leaked:
                raise CtsegError(f"fold {k}: meta-model training cases include test cases {leaked}")
            inputs, labels, maps_used = [], [], {}
            for cid in train_cases:
                x, used = stack_inputs(cid, train_maps, names)
                inputs.append(x)
                labels.append(np.asarray(label_cache[cid].load(cid).label))
                maps_used[cid] = [{"member": p.member, "fold": p.fold, "map": os.path.relpath(p.path, out),
                                   "member_trained_on": lineage[p.member, p.fold]["weights_fitted_on"],
                                   "member_selected_on": lineage[p.member, p.fold]["checkpoint_selected_on"],
                                   "member_plan_fitted_on": lineage[p.member, p.fold]["intensity_plan_fitted_on"]}
                                  for p in used]
            atomic_write_text(fdir / "meta_training.json", json.dumps(
                {"eval_fold": k, "mode": mode, "test_cases": test_cases, "training_cases": train_cases,
                 "members": names, "maps": maps_used,
                 "provenance": {"version": PROVENANCE_VERSION, "meta_model_fitted_on": train_cases}}, indent=1))
            task = bar.add_task(f"fold {k}: meta-model", total=steps)
            gen = torch.Generator().manual_seed(int(seed) * 1000 + k)
            meta = train_meta_model(inputs, labels, n_classes, loss=loss, steps=steps, batch_size=stack_cfg.batch_size,
                                    lr=stack_cfg.lr, hidden=stack_cfg.hidden,
                                    foreground_fraction=stack_cfg.foreground_fraction, generator=gen,
                                    init_weight=vote_matrix([m.target for m in members], n_classes), device=dev,
                                    on_step=(lambda s, v: bar.update(task, advance=1)) if progress else None)
            del inputs, labels
            save_meta_model(meta, fdir / "meta.pt")
            bar.remove_task(task)
            task = bar.add_task(f"fold {k}: predict + score", total=len(test_cases))
            fold_records = []
            for cid in test_cases:
                x, used = stack_inputs(cid, test_maps, names)
                case, cached = dataset.load(cid), caches[k].load(cid)
                p_meta = predict_meta(meta, x, dev)
                maps = [np.asarray(p.load(), dtype=np.float32) for p in used]
                agreement = member_agreement(maps) if len(maps) > 1 else None
                p_avg = average_members(maps, [m.target for m in members], n_classes)
                del maps
                for ident, p in ((stacked, p_meta), (averaged, p_avg)):
                    overlay = fdir / "overlays" / ident.name / f"{cid}.npz"
                    rec = score_volume(ident, case, cached, p, k, caches[k].classes, "multiclass", overlay, distances)
                    rec.overlay = os.path.relpath(overlay, out)
                    rec.agreement = agreement
                    fold_records.append(rec)
                bar.advance(task)
            write_fold_provenance(fdir, k, test_cases, {
                "members": {m.name: str(_fold_dir(m.path, k) / "model" / "run.json") for m in members},
                "meta_model": "meta.pt", "meta_training": "meta_training.json"})
            records += _close_fold(done, fold_records, bar, task, overall)
    return records
