"""Slice-sorted cross-validation of one configuration: `run_cv(cfg, data_dir, out_dir)`.

It makes or reuses the folds file (paper: sorted by slice count, then thickness), and for each fold
preprocesses the data with an intensity plan drawn from that fold's training cases only (one cache folder per
plan, `cache/plan-<digest>/`, shared by every run whose fold has the same plan), trains on the other folds,
predicts the fold's test volumes, keeps their out-of-fold probabilities and scores them (`ctseg.cv.scoring`).
The folder it writes is a `ctseg.runs.CVRun`::

    cv.json                    identity (arch, dim, target, aug, seed), data / cache / folds paths, and the
                               signature of every case's files (`case_signature`): other data are refused
    config.yaml                the exact configuration
    fold_<k>/model/            the training run (`ctseg.train.trainer`: run.json, log.csv, weights)
    fold_<k>/oof/<case>.npy    out-of-fold softmax (C, z, S, S) float16 at network resolution
    fold_<k>/overlays/<case>.npz   one axial slice (image, reference, prediction) for the report
    fold_<k>/provenance.json   the fold's test cases and what scored them (`ctseg.evaluate.provenance`)
    fold_<k>/results.json      `VolumeResult` records of the fold; written last, it marks the fold done

Each fold's model selects its checkpoint on a validation split of the fold's training cases seeded by the fold
(`ctseg.train.splits.fold_validation_split`), the same for every run of the fold. Finished parts are skipped:
a fold with its results file is done, a completed training is reused and an interrupted one resumes from its
checkpoint. Folds can run as separate jobs (`folds=[k]`).

Inference runs once per test volume at network resolution (`ctseg.inference.predict.predict_network` on the
cached, preprocessed volume, exactly the network input of `predict_volume`); the label in original geometry
comes from restoring those probabilities in-plane (bilinear) and taking the argmax. Datasets hand out cases in
canonical orientation with the label on the image grid, so that grid is the volume's own geometry. No
test-fold statistics: a clinic never has its future scans' intensities, so no test case of fold k enters fold
k's intensity plan. The stacked ensemble over finished runs is `ctseg.cv.stack.run_stack`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import yaml

from ctseg.config import ExperimentConfig, config_to_dict, parse_config, save_config
from ctseg.cv.scoring import score_volume
from ctseg.errors import CtsegError
from ctseg.evaluate.records import ModelIdentity, VolumeResult
from ctseg.fileutil import atomic_path, atomic_write_text
from ctseg.inference.predict import predict_network
from ctseg.inference.trained import load_trained
from ctseg.progress import progress_bar
from ctseg.runs import (PROVENANCE_VERSION, CVRun, StackRun, TrainingRun, fold_dir, previous_sources,
                        training_completed)
from ctseg.runtime import resolve_device

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from ctseg.datasets.base import Dataset
    from ctseg.evaluate.folds import Folds
    from ctseg.preprocess.cache import CaseCache, CaseIndex

log = logging.getLogger(__name__)


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


def write_fold_results(path: Path, records: Sequence[VolumeResult]) -> None:
    """A fold's `results.json` (written last: it marks the fold done)."""
    atomic_write_text(path, json.dumps([r.to_json() for r in records], indent=1, allow_nan=False))


def read_fold_results(path: Path) -> list[VolumeResult]:
    """The records of a fold's `results.json`; CtsegError naming it when unreadable."""
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
    from ctseg.train.splits import fold_validation_split
    from ctseg.train.trainer import train_model  # the augmenters load when training starts

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
            fdir = fold_dir(out, k)
            done = fdir / "results.json"
            if done.is_file():
                log.info("%s fold %d: done already (%s)", ident.name, k, done)
                records += read_fold_results(done)
                bar.advance(overall)
                continue
            model_dir = fdir / "model"
            cache = fold_cache(dataset, cfg, cache_dir, fold_set, k, progress)
            if not training_completed(model_dir):
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
                save_npy(fdir / "oof" / f"{cid}.npy", probs.astype(np.float16))
                overlay = fdir / "overlays" / f"{cid}.npz"
                rec = score_volume(ident.model_identity, dataset.load(cid), cached, probs, k, cache.classes,
                                   trained.target, overlay, cfg.cv.distances)
                rec.overlay = os.path.relpath(overlay, out)
                fold_records.append(rec)
                bar.advance(task)
            write_fold_provenance(fdir, k, test_ids, {"model": "model/run.json", "cache": str(cache.root),
                                                      "intensity_plan_fitted_on": list(cache.plan.subset_ids)})
            records += close_fold(done, fold_records, bar, task, overall)
    return records


def _started_split(model_dir: Path, train_ids: Sequence[str]) -> tuple[list[str] | None, list[str] | None]:
    """The (fit, validation) split an interrupted training of this fold started with, so that it resumes with it
    (one started before validation splits were seeded by the fold keeps its own; its provenance says which)."""
    try:
        run = TrainingRun.read(model_dir)
    except CtsegError:
        return None, None
    fit, val = list(run.train_ids), list(run.val_ids)
    return (fit, val) if sorted(fit + val) == sorted(train_ids) else (None, None)


def write_fold_provenance(fdir: Path, k: int, test_ids: Sequence[str], scored_with: dict) -> None:
    """`fold_<k>/provenance.json`: the fold's test cases and what scored them (`ctseg.evaluate.provenance`)."""
    atomic_write_text(fdir / "provenance.json", json.dumps({
        "version": PROVENANCE_VERSION, "fold": k, "test_cases": sorted(test_ids), "scored_with": scored_with},
        indent=1))


def close_fold(done: Path, fold_records: list[VolumeResult], bar: Progress, task: TaskID,
               overall: TaskID) -> list[VolumeResult]:
    """Write a fold's records (marking it done) and retire its progress task; returns the records."""
    write_fold_results(done, fold_records)
    bar.remove_task(task)
    bar.advance(overall)
    return fold_records


def save_npy(path: Path, array: np.ndarray) -> None:
    """`np.save`, atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _check_run_dir(out: Path, cfg: ExperimentConfig, sources: dict[str, str | None]) -> None:
    """CtsegError unless the run folder `out` is new or holds a run of this same configuration on the same data
    (`sources`: the `dataset_sources` of the data now)."""
    old_sources = previous_sources(out)
    if old_sources is not None and old_sources != sources:
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
    CVRun(name=ident.name, arch=ident.arch, dim=ident.dim, target=ident.target, aug=ident.aug, seed=ident.seed,
          variant=ident.variant, data=str(Path(data_dir).resolve()), layout=cfg.data.layout,
          cache=str(Path(cache_dir).resolve()), folds_file=str(Path(folds_file).resolve()), n_folds=cfg.cv.n_folds,
          sources=sources, path=out).write()


def load_cv_records(run_dir: str | Path, require_all: bool = False) -> list[VolumeResult]:
    """Records of a CV (or stack) folder's finished folds; overlay paths made absolute."""
    run_dir = Path(run_dir)
    n_folds = CVRun.read(run_dir).n_folds if (run_dir / "cv.json").is_file() else StackRun.read(run_dir).n_folds
    records = []
    for k in range(n_folds):
        path = fold_dir(run_dir, k) / "results.json"
        if not path.is_file():
            if require_all:
                raise CtsegError(f"fold {k} has not finished (no {path.name})", path.parent)
            continue
        for r in read_fold_results(path):
            if r.overlay and not Path(r.overlay).is_absolute():
                r.overlay = str((run_dir / r.overlay).resolve())
            records.append(r)
    return records


def cv_log_csvs(run_dir: str | Path) -> list[Path]:
    """The training logs of a CV folder's folds (existing ones)."""
    return sorted(p for p in Path(run_dir).glob("fold_*/model/log.csv"))


