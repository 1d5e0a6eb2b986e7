"""Files that appear whole or not at all: write under a unique temporary name beside the target, then rename.

`atomic_path` is the one implementation; every writer in ctseg (volumes, DICOM, PNG, JSON/YAML/CSV,
checkpoints, cache arrays, figures) goes through it. The temporary name keeps the target's suffix, since
several writers (nibabel, SimpleITK, matplotlib, numpy) choose the format from it, and starts with a
dot so that folder listings and globs for results skip it. On any failure the temporary is removed and
an existing target is left as it was.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; renamed onto `path` when the block succeeds.

    Creates the parent folder. The temporary is unique per call (concurrent writers never share it)
    and is deleted if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
