"""Errors that speak to the user: which file, what was expected, what was found."""
from __future__ import annotations

from pathlib import Path


class CtsegError(Exception):
    """An error caused by input or configuration; the CLI prints it and exits with status 2."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)
