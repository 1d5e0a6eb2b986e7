"""KiTS19: `root/case_XXXXX/imaging.nii.gz` + `segmentation.nii.gz` (0 background, 1 kidney, 2 tumour).

Cases without a segmentation are test cases (label None). `root` may also be the repository
folder holding `data/`. The files keep KiTS19's own voxel order (slice axis first, an
inferior-posterior-left affine); cases come back canonical (see `ctseg.io.to_canonical`).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from ctseg.datasets.base import Case, FolderDataset, finish_case
from ctseg.errors import CtsegError
from ctseg.io import Volume, read_volume, write_volume

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
