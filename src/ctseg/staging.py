"""Outputs that appear together or not at all, and the sweeping of temporaries left by killed runs.

`StagedOutputs` hands out a hidden temporary sibling for every final path (`.tmp-<hex>-<name>`,
the same pattern as `ctseg.io.write_volume`, so writers still pick the format from the suffix);
`commit()` renames them all into place at the end. Leaving the `with` block any other way
(an error, Ctrl-C, SIGTERM raised as an exception by `ctseg.cli`) removes every temporary, so a
failed step never leaves a half-done set (e.g. a label map without its statistics).

A run killed with SIGKILL cannot clean up; `sweep_stale_temporaries(path)` removes the temporaries
of `path` that such runs left once they are older than `min_age_s`, so that a concurrent writer's fresh
temporary is never touched. Temporary files are created with plain `open`, so they (and the outputs) follow
the user's umask.
"""
from __future__ import annotations

import glob
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable

from ctseg.errors import CtsegError

log = logging.getLogger(__name__)



def sweep_stale_temporaries(path: str | Path, min_age_s: float = 60.0) -> list[Path]:
    """Remove hidden temporaries of `path` older than `min_age_s` seconds; returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    now = time.time()
    for tmp in path.parent.glob(f".tmp-*-{glob.escape(path.name)}"):
        try:
            if now - tmp.stat().st_mtime >= min_age_s and tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # removed meanwhile, or not ours to remove
            continue
    for tmp in removed:
        log.warning("removed %s, a temporary left by an earlier run that was killed", tmp)
    return removed


def sweep_stale_in_folder(folder: str | Path, min_age_s: float = 600.0) -> list[Path]:
    """Remove every hidden temporary (`.tmp-*`) directly in `folder` older than `min_age_s` (a killed
    preprocess leaves its `.tmp-<hex>-<case>.npy` behind; a live one touches its file constantly)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for tmp in folder.glob(".tmp-*"):
        try:
            if tmp.is_file() and now - tmp.stat().st_mtime >= min_age_s:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue
    for tmp in sorted(removed):
        log.warning("removed %s, a temporary left by an earlier run that was killed", tmp)
    return sorted(removed)


class StagedOutputs:
    """Context manager: `staged.write(final, writer)` (or `tmp = staged.path_for(final)` and write `tmp`)
    for every output, then `staged.commit()` (see module doc)."""

    def __init__(self) -> None:
        self._pending: dict[Path, Path] = {}

    def path_for(self, final: str | Path) -> Path:
        final = Path(final)
        tmp = final.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{final.name}")
        self._pending[final] = tmp
        return tmp

    def write(self, final: str | Path, writer: Callable[[Path], object]) -> None:
        """`writer(tmp)` for the temporary of `final`; an OSError (disk full, ...) becomes a CtsegError naming
        `final`."""
        try:
            writer(self.path_for(final))
        except OSError as exc:
            raise CtsegError(f"cannot write ({exc.strerror or exc})", final) from exc

    def commit(self) -> None:
        """Rename every written temporary to its final path."""
        for final, tmp in list(self._pending.items()):
            os.replace(tmp, final)
            del self._pending[final]

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, *exc: object) -> None:
        for tmp in self._pending.values():
            tmp.unlink(missing_ok=True)
        self._pending.clear()
