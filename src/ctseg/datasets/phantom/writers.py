"""Phantom datasets on disk: cases written in a dataset layout, plus `phantom.json`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ctseg.datasets.base import Case
from ctseg.datasets.phantom.fields import _built
from ctseg.datasets.phantom.generate import CLASSES, generate_case
from ctseg.errors import CtsegError
from ctseg.io import Volume

log = logging.getLogger(__name__)

LAYOUTS = ("kits19", "chaos", "nnunet")


def to_kits19_orientation(volume: Volume) -> Volume:
    """A canonical volume in KiTS19's voxel order: NIfTI axis 0 = slices going inferior, then posterior, left.

    Same voxels and physical positions; readers must reorient (`ctseg.io.to_canonical`) to get back.
    """
    nz = volume.shape[0]
    sz, sy, sx = volume.spacing
    direction = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])   # columns: ITK axes i, j, k
    origin = np.asarray(volume.origin) + volume.direction @ np.array([0.0, 0.0, (nz - 1) * sz])
    array = np.ascontiguousarray(volume.array[::-1].transpose(2, 1, 0))
    return Volume(array, (sx, sy, sz), tuple(origin), direction, volume.slice_thickness, dict(volume.meta))


def case_names(layout: str, n_cases: int) -> list[str]:
    """Case ids as each layout names them: case_00000 (KiTS19), 1, 2, ... (CHAOS), phantom_000 (nnU-Net)."""
    if layout == "kits19":
        return [f"case_{i:05d}" for i in range(n_cases)]
    if layout == "chaos":
        return [str(i + 1) for i in range(n_cases)]
    return [f"phantom_{i:03d}" for i in range(n_cases)]


def iter_phantom_cases(task: str = "kidney", n_cases: int = 10, seed: int = 0, size: str = "small",
                       layout: str = "kits19", **overrides) -> Iterator[Case]:
    """The cases `write_phantom_dataset` writes, in memory (case i from SeedSequence([seed, i]))."""
    for i, name in enumerate(case_names(layout, n_cases)):
        yield generate_case(np.random.SeedSequence([seed, i]), task=task, size=size, case_id=name, **overrides)


def write_phantom_dataset(out: str | Path, task: str = "kidney", n_cases: int = 10, layout: str | None = None,
                          seed: int = 0, size: str = "small", on_case: Callable[[Case], None] | None = None,
                          **overrides) -> Path:
    """Write `n_cases` phantom cases in a dataset layout; returns `out`.

    layout: "kits19" (default for kidney; `case_XXXXX/imaging.nii.gz` + `segmentation.nii.gz` in KiTS19's
    own slice-first, inferior-posterior-left orientation), "chaos" (default for liver; one DICOM file per
    slice, each its own SeriesInstanceUID, + `Ground/liver_GT_NNN.png`) or "nnunet" (`dataset.json`,
    `imagesTr/<case>_0000.nii.gz`, `labelsTr/<case>.nii.gz`). Also writes `phantom.json` (per-case
    acquisition and anatomy). Deterministic per `seed`. `on_case` is called after each case is written.
    """
    from ctseg.fileutil import atomic_write_text
    from ctseg.datasets.chaos import write_chaos_case
    from ctseg.datasets.kits19 import write_kits19_case
    from ctseg.datasets.nnunet_raw import write_nnunet_case, write_nnunet_dataset_json

    layout = layout or ("kits19" if task == "kidney" else "chaos")
    if layout not in LAYOUTS:
        raise CtsegError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}", out)
    if task not in CLASSES:
        raise CtsegError(f"unknown phantom task {task!r}; choose one of {list(CLASSES)}", out)
    if layout == "chaos" and task != "liver":
        raise CtsegError("the CHAOS layout holds liver masks only: use --task liver (or another layout)", out)
    if n_cases < 1:
        raise CtsegError(f"n_cases must be >= 1, got {n_cases}", out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "nnunet":
        write_nnunet_dataset_json(out, CLASSES[task], n_cases, name=f"phantom_{task}")
    summary: dict[str, Any] = {"task": task, "layout": layout, "seed": seed, "size": size, "classes": CLASSES[task],
               "overrides": dict(overrides), "cases": {}}
    for case in iter_phantom_cases(task, n_cases, seed, size, layout, **overrides):
        if layout == "kits19":
            write_kits19_case(out, case.case_id, to_kits19_orientation(case.image),
                              to_kits19_orientation(_built(case.label, "the phantom label")))
        elif layout == "chaos":
            write_chaos_case(out, case.case_id, case.image, case.label)
        else:
            write_nnunet_case(out, case.case_id, case.image, case.label)
        summary["cases"][case.case_id] = {k: v for k, v in case.metadata.items()}
        log.info("phantom case %s written (%d slices)", case.case_id, case.metadata["num_slices"])
        if on_case is not None:
            on_case(case)
    atomic_write_text(out / "phantom.json", json.dumps(summary, indent=1, default=float))
    return out
