"""KiTS19: `root/case_XXXXX/imaging.nii.gz` + `segmentation.nii.gz` (0 background, 1 kidney, 2 tumour).

Cases without a segmentation are test cases (label None). `root` may also be the repository
folder holding `data/`. The files keep KiTS19's own voxel order (slice axis first, an
inferior-posterior-left affine); cases come back canonical (see `ctseg.io.to_canonical`).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ctseg.datasets.base import Case, FolderDataset, LayoutWriter, finish_case
from ctseg.errors import CtsegError
from ctseg.io import Volume, read_volume, write_volume
from ctseg.registry import LAYOUTS, LayoutEntry

log = logging.getLogger(__name__)

_CASE = re.compile(r"^case_\d{5}$")


def _case_dirs(root: Path) -> list[Path]:
    """Case folders `case_NNNNN` holding imaging.nii.gz; other folders with an image are skipped with a warning."""
    if not root.is_dir():
        return []
    with_image = sorted(p for p in root.iterdir() if p.is_dir() and (p / "imaging.nii.gz").is_file())
    cases = [p for p in with_image if _CASE.match(p.name)]
    if cases:
        for p in with_image:
            if not _CASE.match(p.name):
                log.warning("%s: skipped: KiTS19 case folders are named case_NNNNN (five digits, ASCII)", p)
        for p in sorted(root.iterdir()):
            if p.is_dir() and (p / "segmentation.nii.gz").is_file() and not (p / "imaging.nii.gz").is_file():
                log.warning("%s: skipped: a segmentation without imaging.nii.gz", p / "segmentation.nii.gz")
    return cases


class KiTS19Dataset(FolderDataset[Path]):
    layout = "kits19"
    classes = {0: "background", 1: "kidney", 2: "tumour"}

    def __init__(self, root: str | Path):
        root = Path(root)
        if not _case_dirs(root) and _case_dirs(root / "data"):
            root = root / "data"
        super().__init__(root)
        self._cases = {p.name: p for p in _case_dirs(root)}
        if not self._cases:
            raise CtsegError("no KiTS19 cases found (expected case_XXXXX/imaging.nii.gz)", root)

    @staticmethod
    def matches(root: Path) -> bool:
        return bool(_case_dirs(root) or _case_dirs(root / "data"))

    def has_label(self, case_id: str) -> bool:
        return (self._source(case_id) / "segmentation.nii.gz").is_file()

    def load(self, case_id: str) -> Case:
        seg = self._source(case_id) / "segmentation.nii.gz"
        label = read_volume(seg) if seg.is_file() else None
        return finish_case(case_id, self.read_image(case_id), label, self.classes)

    def image_path(self, case_id: str) -> Path:
        return self._source(case_id) / "imaging.nii.gz"

    def read_image(self, case_id: str) -> Volume:
        return read_volume(self.image_path(case_id))


def write_kits19_case(root: str | Path, case_id: str, image: Volume, label: Volume | None) -> Path:
    """Write `root/<case_id>/imaging.nii.gz` (+ `segmentation.nii.gz` as uint8 when labelled)."""
    folder = Path(root) / case_id
    write_volume(image, folder / "imaging.nii.gz")
    if label is not None:
        write_volume(label.with_array(label.array.astype("uint8")), folder / "segmentation.nii.gz")
    return folder


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


def _write_phantom_case(out: Path, case: Case) -> Path:
    if case.label is None:
        raise ValueError(f"case {case.case_id} has no label")
    return write_kits19_case(out, case.case_id, to_kits19_orientation(case.image), to_kits19_orientation(case.label))


LAYOUTS.register(LayoutEntry("kits19", KiTS19Dataset, display="KiTS19", writer=LayoutWriter(
    case_name=lambda i: f"case_{i:05d}", write_case=_write_phantom_case)))
