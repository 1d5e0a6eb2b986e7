"""`Case` and the dataset protocol shared by every layout reader."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Iterator, Protocol, TypeVar

import numpy as np

from ctseg.errors import CtsegError
from ctseg.fileutil import content_signature
from ctseg.io import Volume, check_hu_plausibility, resample_to, to_canonical

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One CT volume with its label (None for unlabelled test cases).

    image: HU, canonical orientation (see `ctseg.io`); label: integer classes on the image's grid.
    metadata: at least `num_slices`, `spacing` (z, y, x mm), `slice_thickness` (mm or None).
    """

    case_id: str
    image: Volume
    label: Volume | None
    metadata: dict = field(default_factory=dict)


class Dataset(Protocol):
    """A folder of cases in one layout ("nnunet", "kits19", "chaos"). `classes` maps label value -> name
    (0 = background)."""

    @property
    def root(self) -> Path: ...

    @property
    def layout(self) -> str: ...

    @property
    def classes(self) -> dict[int, str]: ...

    def case_ids(self) -> list[str]: ...

    def load(self, case_id: str) -> Case: ...

    def image_path(self, case_id: str) -> Path: ...

    def read_image(self, case_id: str) -> Volume: ...

    def __iter__(self) -> Iterator[Case]: ...

    def __len__(self) -> int: ...


Source = TypeVar("Source")


class FolderDataset(Generic[Source]):
    """Common part of the layout readers: `_cases` maps case id -> whatever `load` needs (a `Source`)."""

    layout: str = ""
    classes: dict[int, str] = {}

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._cases: dict[str, Source] = {}

    @staticmethod
    def matches(root: Path) -> bool:
        """Whether the folder `root` holds a dataset in this layout."""
        raise NotImplementedError

    def case_ids(self) -> list[str]:
        return list(self._cases)

    def load(self, case_id: str) -> Case:
        raise NotImplementedError

    def has_label(self, case_id: str) -> bool:
        """Whether the case has a label (known without reading it)."""
        raise NotImplementedError

    def source_files(self, case_id: str) -> list[Path]:
        """Every file a case is read from (files of its folders, hidden ones excepted), for
        `case_signature`."""
        source: object = self._source(case_id)
        files: list[Path] = []
        for item in source if isinstance(source, tuple) else (source,):
            if item is None:
                continue
            path = Path(str(item))
            if path.is_dir():
                files += (f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
            elif path.exists():
                files.append(path)
        return files

    def image_path(self, case_id: str) -> Path:
        """The file (or DICOM folder) holding the case's image."""
        raise NotImplementedError

    def read_image(self, case_id: str) -> Volume:
        """The case's image alone, in its file's own geometry and voxel order (what `ctseg predict` segments)."""
        raise NotImplementedError

    def _source(self, case_id: str) -> Source:
        if case_id not in self._cases:
            raise CtsegError(f"no case {case_id!r} in this {self.layout} dataset", self.root)
        return self._cases[case_id]

    def __iter__(self) -> Iterator[Case]:
        for case_id in self.case_ids():
            yield self.load(case_id)

    def __len__(self) -> int:
        return len(self._cases)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} cases)"


def case_signature(dataset: Dataset, case_id: str) -> str | None:
    """`ctseg.fileutil.content_signature` of the files a case is read from (None for a dataset that does not
    say which files those are, such as one held in memory)."""
    files = getattr(dataset, "source_files", None)
    if files is None:
        return None
    root = getattr(dataset, "root", None)
    try:
        return content_signature(files(case_id), Path(root) if root is not None else None)
    except OSError as exc:
        raise CtsegError(f"case {case_id}: cannot read its files ({exc.strerror or exc})", exc.filename) from None


def dataset_sources(dataset: Dataset) -> dict[str, str | None]:
    """`case_signature` of every case: what a run on the dataset records to refuse other data later."""
    return {case_id: case_signature(dataset, case_id) for case_id in dataset.case_ids()}


def count_labels(label: np.ndarray, minlength: int = 256, chunk: int = 1 << 22) -> np.ndarray:
    """Voxels per value of a uint8 label map (int64, length >= `minlength`), counted 4 M voxels at a time:
    `np.bincount` of the whole map would first make an int64 copy of it (8 bytes per voxel)."""
    flat = label.reshape(-1)
    counts = np.zeros(max(minlength, 256), dtype=np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start:start + chunk], minlength=counts.size)
    return counts


def check_label_values(array: np.ndarray, classes: dict[int, str], path: str | Path | None,
                       role: str = "the label map", hint: str = "") -> np.ndarray:
    """The label as uint8 after checking that every value is a whole number among `classes` (a CT image, a
    probability map or another dataset's labels would otherwise score Dice 0 without a word).

    CtsegError naming `path`; role: what the array is, hint: appended to the messages (e.g. " (see --classes)").
    """
    lo, hi = float(array.min()), float(array.max())
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise CtsegError(f"{role} holds non-integer values ({lo:g}..{hi:g}): a label map has whole class values "
                         "(is this an image or a probability map?)", path)
    if lo < 0 or hi > max(classes):
        outside = np.unique(array[(array < 0) | (array > max(classes))])
        shown = ", ".join(f"{v:g}" for v in outside[:8]) + (", ..." if outside.size > 8 else "")
        raise CtsegError(f"{role} holds label values [{shown}] outside the classes {sorted(classes)}{hint}", path)
    label = array.astype(np.uint8, copy=False)
    unknown = sorted(set(np.flatnonzero(count_labels(label)).tolist()) - set(classes))
    if unknown:
        raise CtsegError(f"{role} holds label values {unknown} that are not among the classes {sorted(classes)}"
                         f"{hint}", path)
    return label


def finish_case(case_id: str, image: Volume, label: Volume | None, classes: dict[int, str]) -> Case:
    """Check the label, put it on the image grid (by geometry) and bring both to canonical orientation.

    Pass `image` without keeping a reference (`finish_case(id, read_volume(...), ...)`): its voxels are
    released once the canonical copy exists, which bounds the peak memory of a load.

    metadata: num_slices, spacing (z, y, x mm, canonical), slice_thickness (DICOM SliceThickness,
    else the slice spacing), slice_thickness_source, original_shape, reorientation (to go back to
    the file's voxel order with `ctseg.io.from_canonical`), image_path, label_path, warnings.
    """
    warnings = list(image.meta.get("warnings", []))
    warnings += [f"image: {w}" for w in check_hu_plausibility(image)]
    if label is not None:
        label_path = label.meta.get("path")
        label = label.with_array(check_label_values(label.array, classes, label_path))
        if not label.same_geometry(image):
            before_mm3 = np.count_nonzero(label.array) * np.prod(label.spacing)
            label = resample_to(label, image, order=0)
            after_mm3 = np.count_nonzero(label.array) * np.prod(image.spacing)
            warnings.append(f"label resampled onto the image grid (geometry differs); foreground volume "
                            f"{before_mm3 / 1000:.1f} -> {after_mm3 / 1000:.1f} mL")
    thickness, original_shape, image_path = image.slice_thickness, image.shape, image.meta.get("path")
    canonical, reorientation = to_canonical(image)
    del image  # callers pass the volume without keeping it: the original voxels go before the label's copy
    canonical_label = None
    if label is not None:
        canonical_label, _ = to_canonical(label)
    for w in warnings:
        log.warning("case %s: %s", case_id, w)
    metadata = {
        "num_slices": canonical.shape[0],
        "spacing": canonical.spacing,
        "slice_thickness": thickness if thickness is not None else canonical.spacing[0],
        "slice_thickness_source": "dicom" if thickness is not None else "spacing",
        "original_shape": original_shape,
        "reorientation": reorientation,
        "image_path": image_path,
        "label_path": label.meta.get("path") if label is not None else None,
        "warnings": warnings,
    }
    return Case(case_id, canonical, canonical_label, metadata)


def _nothing_to_prepare(out: Path, classes: dict[int, str], n_cases: int, task: str) -> None:
    return None


@dataclass(frozen=True)
class LayoutWriter:
    """How `ctseg phantom` writes a dataset in one layout (`ctseg.registry.LayoutEntry.writer`).

    case_name(i): the id of case i (0-based); write_case(out, case): one canonical `Case` into folder `out`;
    prepare(out, classes, n_cases, task): dataset-level files written first (e.g. nnU-Net's dataset.json);
    tasks: the phantom tasks the layout can hold."""

    case_name: Callable[[int], str]
    write_case: Callable[[Path, Case], object]
    prepare: Callable[[Path, dict[int, str], int, str], None] = _nothing_to_prepare
    tasks: tuple[str, ...] = ("kidney", "liver")
