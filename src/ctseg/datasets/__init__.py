"""Datasets yielding `Case`s: KiTS19, CHAOS CT, nnU-Net raw (the synthetic phantom writes these layouts).

`open_dataset(path, layout="auto")` picks the reader; every case comes back in canonical
orientation with its label resampled onto the image grid (see `ctseg.datasets.base.finish_case`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from ctseg.datasets.base import Case, Dataset, FolderDataset
# registration order (ctseg.registry.LAYOUTS) is the order `detect_layout` tries the layouts in
from ctseg.datasets.nnunet_raw import NnUNetRawDataset  # isort: skip
from ctseg.datasets.kits19 import KiTS19Dataset  # isort: skip
from ctseg.datasets.chaos import ChaosDataset  # isort: skip
from ctseg.errors import CtsegError
from ctseg.registry import LAYOUTS as _REGISTRY


class _Readers(Mapping[str, "type[FolderDataset[Any]]"]):
    """Layout name -> reader class, live over `ctseg.registry.LAYOUTS` (plugins included)."""

    def __getitem__(self, name: str) -> type[FolderDataset[Any]]:
        return _REGISTRY[name].builder

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)


LAYOUTS: Mapping[str, type[FolderDataset[Any]]] = _Readers()

__all__ = ["Case", "Dataset", "ChaosDataset", "KiTS19Dataset", "NnUNetRawDataset", "LAYOUTS", "detect_layout",
           "open_dataset"]


def detect_layout(path: str | Path) -> str:
    """The layout name of the dataset at `path` ("nnunet", "kits19", "chaos" or a plugin's); CtsegError if none
    fits."""
    path = Path(path)
    if not path.exists():
        raise CtsegError("no such folder", path)
    if not path.is_dir():
        raise CtsegError("expected a dataset folder, got a file", path)
    if not any(path.iterdir()):
        raise CtsegError("empty folder: no dataset here", path)
    for name, cls in LAYOUTS.items():
        if cls.matches(path):
            return name
    raise CtsegError("no known dataset layout: expected KiTS19 (case_XXXXX/imaging.nii.gz), CHAOS "
                     "(<patient>/DICOM_anon/*.dcm + Ground/*.png) or nnU-Net raw (dataset.json, imagesTr/, labelsTr/)",
                     path)


def open_dataset(path: str | Path, layout: str = "auto") -> Dataset:
    """Open the dataset at `path` with the reader for `layout` ("auto" detects it)."""
    if layout == "auto":
        layout = detect_layout(path)
    elif not Path(path).is_dir():
        raise CtsegError("no such folder", path)
    if layout not in LAYOUTS:
        raise CtsegError(f"unknown layout {layout!r}; choose one of {['auto', *LAYOUTS]}", path)
    return LAYOUTS[layout](path)
