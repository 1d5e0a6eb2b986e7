"""Phantom datasets on disk: cases written in a dataset layout, plus `phantom.json`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ctseg.datasets.base import Case, LayoutWriter
from ctseg.datasets.phantom.generate import CLASSES, generate_case
from ctseg.errors import CtsegError
from ctseg.registry import LAYOUTS

log = logging.getLogger(__name__)


def _writer(layout: str, out: object = None) -> LayoutWriter:
    """The phantom writer of a registered layout; CtsegError for a layout without one."""
    writable = writable_layouts()
    if layout not in writable:
        raise CtsegError(f"unknown layout {layout!r}; choose one of {writable}",
                         out if isinstance(out, (str, Path)) else None)
    writer: LayoutWriter = LAYOUTS[layout].writer
    return writer


def writable_layouts() -> list[str]:
    """The registered layouts a phantom dataset can be written in (`ctseg.registry.LAYOUTS` entries with a writer)."""
    return [name for name, entry in LAYOUTS.items() if entry.writer is not None]


def case_names(layout: str, n_cases: int) -> list[str]:
    """Case ids as each layout names them: case_00000 (KiTS19), 1, 2, ... (CHAOS), phantom_000 (nnU-Net)."""
    return [_writer(layout).case_name(i) for i in range(n_cases)]


def iter_phantom_cases(task: str = "kidney", n_cases: int = 10, seed: int = 0, size: str = "small",
                       layout: str = "kits19", **overrides: Any) -> Iterator[Case]:
    """The cases `write_phantom_dataset` writes, in memory (case i from SeedSequence([seed, i]))."""
    for i, name in enumerate(case_names(layout, n_cases)):
        yield generate_case(np.random.SeedSequence([seed, i]), task=task, size=size, case_id=name, **overrides)


def write_phantom_dataset(out: str | Path, task: str = "kidney", n_cases: int = 10, layout: str | None = None,
                          seed: int = 0, size: str = "small", on_case: Callable[[Case], None] | None = None,
                          **overrides: Any) -> Path:
    """Write `n_cases` phantom cases in a dataset layout; returns `out`.

    layout: "kits19" (default for kidney; `case_XXXXX/imaging.nii.gz` + `segmentation.nii.gz` in KiTS19's
    own slice-first, inferior-posterior-left orientation), "chaos" (default for liver; one DICOM file per
    slice, each its own SeriesInstanceUID, + `Ground/liver_GT_NNN.png`), "nnunet" (`dataset.json`,
    `imagesTr/<case>_0000.nii.gz`, `labelsTr/<case>.nii.gz`) or any registered layout with a writer
    (`ctseg.registry.LAYOUTS`, `ctseg.datasets.base.LayoutWriter`). Also writes `phantom.json` (per-case
    acquisition and anatomy). Deterministic per `seed`. `on_case` is called after each case is written.
    """
    from ctseg.fileutil import atomic_write_text

    layout = layout or ("kits19" if task == "kidney" else "chaos")
    writer = _writer(layout, out)
    if task not in CLASSES:
        raise CtsegError(f"unknown phantom task {task!r}; choose one of {list(CLASSES)}", out)
    if task not in writer.tasks:
        raise CtsegError(f"the {LAYOUTS[layout].display or layout} layout holds {' / '.join(writer.tasks)} masks only: "
                         f"use --task {writer.tasks[0]} (or another layout)", out)
    if n_cases < 1:
        raise CtsegError(f"n_cases must be >= 1, got {n_cases}", out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer.prepare(out, CLASSES[task], n_cases, task)
    summary: dict[str, Any] = {"task": task, "layout": layout, "seed": seed, "size": size, "classes": CLASSES[task],
               "overrides": dict(overrides), "cases": {}}
    for case in iter_phantom_cases(task, n_cases, seed, size, layout, **overrides):
        writer.write_case(out, case)
        summary["cases"][case.case_id] = {k: v for k, v in case.metadata.items()}
        log.info("phantom case %s written (%d slices)", case.case_id, case.metadata["num_slices"])
        if on_case is not None:
            on_case(case)
    atomic_write_text(out / "phantom.json", json.dumps(summary, indent=1, default=float))
    return out
