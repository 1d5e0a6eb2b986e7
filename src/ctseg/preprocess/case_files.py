"""The files of one cached case, written atomically: arrays, then the JSON record that makes them valid (see
`ctseg.preprocess.cache` for the folder layout), the settings fingerprint they are keyed on, and the parallel
writer `build_cache` uses."""
from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import re
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from numpy.typing import DTypeLike

from ctseg.config import PreprocessConfig
from ctseg.datasets.base import Case, Dataset
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_path, atomic_write_text
from ctseg.preprocess.slices import Box, foreground_slices, network_grid, preprocess_label, preprocess_volume
from ctseg.preprocess.windowing import IntensityPlan

CACHE_FORMAT = 1
PLAN_FILE = "plan.json"
CASES_DIR = "cases"
# Preprocess settings that only steer sampling at training time, not the cached files.
_SAMPLING_ONLY = ("num_slices", "exclude_background_slices")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def cache_settings(pp: PreprocessConfig) -> dict:
    """The preprocess settings a cache depends on, as JSON-normalised data. Settings added later that are at
    their neutral default (`crop_hu` None) are left out, so caches made before them keep their folder and digest."""
    settings = json.loads(json.dumps(pp.model_dump(mode="json", exclude=set(_SAMPLING_ONLY))))
    if settings.get("crop_hu") is None:
        settings.pop("crop_hu", None)
    return settings


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def file_crc32(path: Path, block: int = 8 * 2**20) -> str:
    """CRC-32 of a file's bytes, 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except TypeError:
            v = v.tolist() if isinstance(v, np.ndarray) else str(v)
        out[str(k)] = v
    return out


def _case_state(cases_dir: Path, case_id: str, fingerprint: str, source: str | None) -> str:
    """'ok', 'missing', 'stale' (other settings), 'changed' (its input files are not those it was built from:
    `source`, their `case_signature`) or 'corrupt' (a file does not match its record)."""
    meta_path = cases_dir / f"{case_id}.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return "missing"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "corrupt"
    if not isinstance(meta, dict):
        return "corrupt"
    if meta.get("fingerprint") != fingerprint:
        return "stale"
    if source is not None and meta.get("source") != source:
        return "changed"
    for record in meta.get("files", {}).values():
        path = cases_dir / record["name"]
        if not path.is_file() or path.stat().st_size != record["size"] or file_crc32(path) != record["crc32"]:
            return "corrupt"
    return "ok"


def _reserve(path: Path) -> None:
    """Allocate the blocks of the (sparse) file a memmap writes, so that a full disk is ENOSPC now rather than
    SIGBUS when a page is written; file systems without fallocate are left as they are."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise


def _write_image(final: Path, volume_hu: np.ndarray, plan: IntensityPlan, size: int, dtype: str,
                 box: Box | None) -> None:
    with atomic_path(final) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(volume_hu.shape[0], size, size))
        _reserve(tmp)
        preprocess_volume(volume_hu, plan, size, out=out, box=box)
        out.flush()
        del out


def _write_array(final: Path, array: np.ndarray) -> None:
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _file_record(path: Path, array_shape: Sequence[int], dtype: DTypeLike) -> dict:
    return {"name": path.name, "dtype": str(np.dtype(dtype)), "shape": [int(s) for s in array_shape],
            "size": path.stat().st_size, "crc32": file_crc32(path)}


def write_case(case: Case, cases_dir: Path, plan: IntensityPlan, pp: PreprocessConfig, fingerprint: str,
               source: str | None = None) -> dict:
    """Preprocess one case into `cases_dir` (image, label, then the JSON record); returns the record.
    `source`: the `case_signature` of the files the case was read from, kept to detect later edits."""
    image = case.image.array
    z, h, w = image.shape
    size = pp.in_plane_size
    if case.label is not None and case.label.array.shape != image.shape:
        raise CtsegError(f"case {case.case_id}: label shape {case.label.array.shape} != image shape {image.shape}",
                         case.image.meta.get("path"))
    grid = network_grid(image, plan, size, pp.crop)
    image_path = cases_dir / f"{case.case_id}_image.npy"
    _write_image(image_path, image, plan, size, pp.cache_dtype, grid.box)
    files = {"image": _file_record(image_path, (z, size, size), pp.cache_dtype)}
    fg, present = [], []
    if case.label is not None:
        label = preprocess_label(case.label.array, size, box=grid.box)
        label_path = cases_dir / f"{case.case_id}_label.npy"
        _write_array(label_path, label)
        files["label"] = _file_record(label_path, label.shape, label.dtype)
        fg = foreground_slices(label).tolist()
        present = np.flatnonzero(np.bincount(label.reshape(-1), minlength=1)).tolist()
    vol = case.image
    meta = {
        "case_id": case.case_id,
        "fingerprint": fingerprint,
        "source": source,
        "original_shape": [z, h, w],
        "spacing": list(vol.spacing),
        "origin": list(vol.origin),
        "direction": vol.direction.flatten().tolist(),
        "slice_thickness": vol.slice_thickness if vol.slice_thickness is not None
        else case.metadata.get("slice_thickness"),
        "num_slices": z,
        "in_plane": grid.to_dict(),
        "has_label": case.label is not None,
        "foreground_slices": fg,
        "labels_present": present,
        "files": files,
        "metadata": _jsonable(case.metadata),
    }
    atomic_write_text(cases_dir / f"{case.case_id}.json", json.dumps(meta, indent=1))
    return meta


def _load_and_write(dataset: Dataset, case_id: str, cases_dir: Path, plan: IntensityPlan, pp: PreprocessConfig,
                    fingerprint: str, source: str | None) -> None:
    """Load one case and write it into the cache (also the task of a `build_cache` worker process)."""
    write_case(dataset.load(case_id), cases_dir, plan, pp, fingerprint, source)


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core: no nested thread pools


def _write_cases(dataset: Dataset, case_ids: list[str], cases_dir: Path, plan: IntensityPlan, pp: PreprocessConfig,
                 fingerprint: str, sources: dict[str, str | None], workers: int, advance: Callable[[], object]
                 ) -> None:
    """Write `case_ids` one after the other, or in `workers` spawned processes (same files either way)."""
    if workers <= 1 or len(case_ids) <= 1:
        for case_id in case_ids:
            _load_and_write(dataset, case_id, cases_dir, plan, pp, fingerprint, sources[case_id])
            advance()
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(min(workers, len(case_ids)), mp_context=context, initializer=_worker_init) as pool:
        futures = [pool.submit(_load_and_write, dataset, case_id, cases_dir, plan, pp, fingerprint, sources[case_id])
                   for case_id in case_ids]
        try:
            for future in as_completed(futures):
                future.result()
                advance()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
