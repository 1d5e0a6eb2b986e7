"""The preprocessed cache: every case windowed, z-scored and resized once, memory-mappable.

Layout of a cache folder::

    plan.json                 IntensityPlan, preprocess settings, classes, dataset, versions, fingerprint
    cases/<id>_image.npy      float16 (z, S, S), z-scored (np.load(..., mmap_mode="r"))
    cases/<id>_label.npy      uint8 (z, S, S) (absent for unlabelled cases)
    cases/<id>.json           original shape/spacing/thickness/geometry, foreground slices, file checksums

Every file is written under a temporary name and renamed; a case's JSON is written last and
records the settings fingerprint, the CRC-32 and size of its arrays and the signature of the input files
it was read from (`ctseg.datasets.base.case_signature`: size, mtime and a hash of each file's head). The
intensity plan is keyed on the signatures of its subset too. `build_cache` skips cases that are up to
date, rebuilds stale, corrupted or changed ones (a label edited since); `CaseCache.load` refuses stale or corrupted
files with a message to re-run `ctseg preprocess`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import ctseg
from ctseg.config import ExperimentConfig, PreprocessConfig
from ctseg.datasets.base import Case, Dataset, case_signature
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text
from ctseg.preprocess.case_files import (CACHE_FORMAT, CASES_DIR, PLAN_FILE, _SAFE_ID, _case_state, _digest,
                                        _write_cases, cache_settings, file_crc32)
from ctseg.preprocess.windowing import IntensityPlan, compute_intensity_plan, draw_subset
from ctseg.staging import sweep_stale_in_folder

log = logging.getLogger(__name__)

@dataclass
class CachedCase:
    """One cached case: image float16 memmap (z, S, S) z-scored; label uint8 (z, S, S) or None."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    meta: dict


# ------------------------------------------------------------------------------------ what readers need
class CachedVolume(Protocol):
    """What training and validation read of one cached case (`CachedCase` is one): the z-scored image
    (z, S, S) and the label (z, S, S) at network resolution (None for an unlabelled case)."""

    @property
    def image(self) -> np.ndarray: ...

    @property
    def label(self) -> np.ndarray | None: ...


class SliceCache(Protocol):
    """A source of cached volumes by case id: what `ctseg.train.data` draws training stacks and validates from
    (`CaseCache` is one)."""

    def load(self, case_id: str) -> CachedVolume: ...


class CaseIndex(Protocol):
    """The cached cases and their JSON records (original shape, spacing, slice_thickness, num_slices,
    labels_present, files...): what the folds and the dataset fingerprint are made from."""

    def case_ids(self) -> list[str]: ...

    def meta(self, case_id: str) -> dict: ...


class TrainingCache(SliceCache, CaseIndex, Protocol):
    """Everything a training run reads from its cache (`ctseg.train.trainer`); `CaseCache` is one."""

    @property
    def root(self) -> Path: ...

    @property
    def classes(self) -> dict[int, str]: ...

    @property
    def plan(self) -> IntensityPlan: ...

    @property
    def fingerprint(self) -> str: ...


class CaseCache:
    """Read side of a cache folder written by `build_cache`.

    expected: a config (or its preprocess section); if given, the cache must have been built with
    the same preprocess settings (sampling-only settings excepted), else CtsegError.
    Each file's checksum is verified on its first load through this object; size, shape and dtype
    on every load.
    """

    def __init__(self, root: str | Path, expected: ExperimentConfig | PreprocessConfig | None = None):
        self.root = Path(root)
        plan_path = self.root / PLAN_FILE
        if not plan_path.is_file():
            raise CtsegError("not a preprocessed cache (no plan.json); run `ctseg preprocess DATASET --out "
                             f"{self.root}` first", self.root)
        try:
            info = json.loads(plan_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CtsegError(f"unreadable ({err}); re-run `ctseg preprocess` to rebuild the cache", plan_path) from None
        if not isinstance(info, dict):
            raise CtsegError(f"damaged (a JSON {type(info).__name__}, not an object); re-run `ctseg preprocess` to "
                             "rebuild the cache", plan_path)
        if info.get("format") != CACHE_FORMAT:
            raise CtsegError(f"cache format {info.get('format')!r}, this ctseg reads {CACHE_FORMAT}; "
                             "re-run `ctseg preprocess` to rebuild the cache", plan_path)
        self.info = info
        try:
            self.plan = IntensityPlan.from_dict(info["intensity_plan"], plan_path)
            self.classes = {int(k): str(v) for k, v in info["classes"].items()}
            self.fingerprint: str = str(info["fingerprint"])
            self.settings: dict = dict(info["preprocess"])
            self.in_plane_size: int = int(self.settings["in_plane_size"])
            self._ids: list[str] = [str(i) for i in info["cases"]]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CtsegError(f"damaged ({type(err).__name__}: {err}); re-run `ctseg preprocess` to rebuild the cache",
                             plan_path) from None
        self._meta: dict[str, dict] = {}
        self._verified: set[Path] = set()
        if expected is not None:
            pp = expected.preprocess if isinstance(expected, ExperimentConfig) else expected
            wanted = cache_settings(pp)
            diff = {k: (self.settings.get(k), v) for k, v in wanted.items() if self.settings.get(k) != v}
            if diff:
                lines = "; ".join(f"{k}: cache has {a!r}, config wants {b!r}" for k, (a, b) in sorted(diff.items()))
                raise CtsegError(f"cache was built with other preprocess settings ({lines}); re-run "
                                 "`ctseg preprocess` with this config or point to a matching cache", self.root)

    def case_ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._ids

    def meta(self, case_id: str) -> dict:
        """The case's JSON record (original shape, spacing, slice_thickness, num_slices, foreground_slices...)."""
        if case_id in self._meta:
            return self._meta[case_id]
        if case_id not in self._ids:
            raise CtsegError(f"case {case_id!r} is not in this cache", self.root)
        path = self.root / CASES_DIR / f"{case_id}.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise CtsegError("missing; re-run `ctseg preprocess` to rebuild the cache", path) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CtsegError(f"unreadable ({err}); re-run `ctseg preprocess` to rebuild it", path) from None
        if not isinstance(meta, dict) or meta.get("fingerprint") != self.fingerprint:
            raise CtsegError("built with other settings than this cache's plan.json (stale); re-run "
                             "`ctseg preprocess` to rebuild it", path)
        self._meta[case_id] = meta
        return meta

    def _open(self, record: dict) -> np.ndarray:
        path = self.root / CASES_DIR / record["name"]
        if not path.is_file():
            raise CtsegError("missing; re-run `ctseg preprocess` to rebuild the cache", path)
        size = path.stat().st_size
        if size != record["size"]:
            raise CtsegError(f"corrupted: {size} bytes, expected {record['size']}; re-run `ctseg preprocess` "
                             "to rebuild it", path)
        if path not in self._verified:
            if file_crc32(path) != record["crc32"]:
                raise CtsegError("corrupted: checksum mismatch; re-run `ctseg preprocess` to rebuild it", path)
            self._verified.add(path)
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise CtsegError(f"corrupted ({err}); re-run `ctseg preprocess` to rebuild it", path) from None
        if list(array.shape) != record["shape"] or str(array.dtype) != record["dtype"]:
            raise CtsegError(f"holds {array.dtype} {array.shape}, expected {record['dtype']} {tuple(record['shape'])}; "
                             "re-run `ctseg preprocess` to rebuild it", path)
        return array

    def load(self, case_id: str) -> CachedCase:
        meta = self.meta(case_id)
        files = meta["files"]
        label = self._open(files["label"]) if "label" in files else None
        return CachedCase(case_id, self._open(files["image"]), label, meta)


@dataclass
class BuildReport:
    """What `build_cache` did: cases built, skipped as up to date, rebuilt after corruption or after their
    input files changed."""

    root: Path
    plan: IntensityPlan
    plan_reused: bool
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _read_plan_json(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable: recomputing the intensity plan", path)
        return None
    return info if isinstance(info, dict) and info.get("format") == CACHE_FORMAT else None


def build_cache(dataset: Dataset, out_dir: str | Path, cfg: ExperimentConfig, rng: np.random.Generator,
                train_ids: Sequence[str] | None = None, progress: bool = True, force: bool = False,
                subset: Sequence[str] | None = None, workers: int = 1) -> BuildReport:
    """Preprocess every case of `dataset` into `out_dir` (see module docstring); returns a `BuildReport`.

    The intensity plan comes from `cfg.preprocess.subset_size` cases drawn with `rng` from
    `train_ids` (default: all cases), or from the given `subset` of them; it is reused from an existing
    plan.json when settings and subset are unchanged. Cases already cached with the same fingerprint and
    intact files are skipped unless `force`; stale and corrupted ones are rebuilt, in `workers` processes
    when > 1 (each holds one case in memory; the files are byte-identical to a serial build). `dataset`
    must then be picklable (the folder datasets are).
    """
    if workers < 1:
        raise CtsegError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    pp = cfg.preprocess
    root = Path(out_dir)
    cases_dir = root / CASES_DIR
    dataset_root = getattr(dataset, "root", None)
    ids = list(dataset.case_ids())
    if not ids:
        raise CtsegError("the dataset has no cases", dataset_root)
    bad = [i for i in ids if not _SAFE_ID.match(i)]
    if bad:
        raise CtsegError(f"case ids unusable as file names: {', '.join(bad[:5])}", dataset_root)
    pool = list(dict.fromkeys(train_ids)) if train_ids is not None else ids
    unknown = sorted(set(pool) - set(ids))
    if unknown:
        raise CtsegError(f"training case ids not in the dataset: {', '.join(unknown[:10])}", dataset_root)
    if subset is None:
        subset = draw_subset(pool, pp.subset_size, rng)
    elif not set(subset) <= set(pool):
        raise CtsegError(f"intensity subset cases not among the training cases: "
                         f"{', '.join(sorted(set(subset) - set(pool))[:10])}", dataset_root)
    subset = sorted(subset)
    settings = cache_settings(pp)
    sources = {case_id: case_signature(dataset, case_id) for case_id in ids}
    plan_key = _digest({"format": CACHE_FORMAT, "settings": settings, "subset": subset,
                        "sources": [sources[case_id] for case_id in subset]})
    previous = _read_plan_json(root / PLAN_FILE)
    cases_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_in_folder(cases_dir)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        if previous is not None and previous.get("plan_key") == plan_key and not force:
            plan, reused = IntensityPlan.from_dict(previous["intensity_plan"], root / PLAN_FILE), True
            log.info("intensity plan unchanged (same settings and subset): reusing %s", root / PLAN_FILE)
        else:
            task = bar.add_task("intensity statistics", total=len(subset))

            def subset_cases() -> Iterator[Case]:
                for case_id in subset:
                    yield dataset.load(case_id)
                    bar.advance(task)

            plan, reused = compute_intensity_plan(subset_cases(), pp, rng), False
        fingerprint = _digest({"format": CACHE_FORMAT, "plan": plan.to_dict(), "in_plane_size": pp.in_plane_size,
                               "cache_dtype": pp.cache_dtype})
        report = BuildReport(root, plan, reused)
        task = bar.add_task("preprocessing", total=len(ids))
        for case_id in ids:
            state = "rebuild" if force else _case_state(cases_dir, case_id, fingerprint, sources[case_id])
            if state == "ok":
                report.skipped.append(case_id)
                bar.advance(task)
            else:
                if state == "corrupt":
                    log.warning("cached case %s is corrupted: rebuilding it", case_id)
                    report.repaired.append(case_id)
                elif state == "changed":
                    log.warning("case %s: its files changed since it was cached: rebuilding it", case_id)
                    report.changed.append(case_id)
                report.built.append(case_id)
        _write_cases(dataset, report.built, cases_dir, plan, pp, fingerprint, sources, workers,
                     lambda: bar.advance(task))

    info = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "plan_key": plan_key,
        "intensity_plan": plan.to_dict(),
        "preprocess": settings,
        "classes": {str(k): v for k, v in sorted(dataset.classes.items())},
        "dataset": str(dataset_root) if dataset_root is not None else None,
        "train_ids": sorted(train_ids) if train_ids is not None else None,
        "subset": subset,
        "cases": ids,
        "versions": {"ctseg": ctseg.__version__, "numpy": np.__version__, "torch": torch.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(root / PLAN_FILE, json.dumps(info, indent=1))
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------------------------ per-fold plans
def fold_plan_subset(train_ids: Sequence[str], pp: PreprocessConfig, fold: int) -> list[str]:
    """The intensity subset of cross-validation fold `fold`: `pp.subset_size` of the fold's training cases
    (all of them if fewer), drawn with a generator seeded by the fold index alone, so every run of an
    experiment (any architecture, augmentation or model seed) gets the same plan for the same fold."""
    ids = sorted(train_ids)
    size = min(pp.subset_size, len(ids))
    if size < pp.subset_size:
        log.warning("fold %d has %d training cases, fewer than preprocess.subset_size %d: the intensity plan "
                    "uses all of them", fold, len(ids), pp.subset_size)
    return draw_subset(ids, size, np.random.default_rng([0xCAC4E, fold]))


def plan_cache_dir(root: str | Path, pp: PreprocessConfig, subset: Sequence[str]) -> Path:
    """The cache folder of one intensity plan under `root`: `plan-<digest of settings and subset>`.

    Folds (or runs) whose plans coincide share the folder and its preprocessed cases."""
    return Path(root) / f"plan-{_digest({'format': CACHE_FORMAT, 'settings': cache_settings(pp), 'subset': sorted(subset)})}"


def build_fold_cache(dataset: Dataset, root: str | Path, cfg: ExperimentConfig, train_ids: Sequence[str], fold: int,
                     progress: bool = True) -> Path:
    """Build (or reuse) the cache of fold `fold`: every case preprocessed with an intensity plan estimated on a
    subset of the fold's training cases only (test cases never enter it). Returns the cache folder."""
    subset = fold_plan_subset(train_ids, cfg.preprocess, fold)
    out = plan_cache_dir(root, cfg.preprocess, subset)
    build_cache(dataset, out, cfg, np.random.default_rng([0xCAC4E, fold, 1]), train_ids=train_ids,
                progress=progress, subset=subset)
    return out
