"""CHAOS CT: `root/<patient>/DICOM_anon/i0000,0000b.dcm ...` + `root/<patient>/Ground/liver_GT_000.png ...`.

`root` may be the CT folder itself, its parent (holding `CT/`) or `Train_Sets/`'s parent. Every
CHAOS DICOM file carries its own SeriesInstanceUID, so files are read one by one and ordered by
position. Masks pair by index: the PNG of rank i (by the number in its name) belongs to the i-th
DICOM file ordered by the number in the file name, and moves with that slice when slices are
ordered by position. Liver = PNG > 0. Patients without `Ground/` are test cases (label None).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ctseg.datasets.base import Case, FolderDataset, LayoutWriter, finish_case
from ctseg.dicom import read_dicom_files, write_dicom_series
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_path
from ctseg.io import Volume
from ctseg.registry import LAYOUTS, LayoutEntry

_NUMBER = re.compile(r"(\d+)")


def _index(path: Path) -> tuple[int, str]:
    """Sort key: the first number in the file name (CHAOS: i0042,0000b.dcm -> 42, liver_GT_042.png -> 42)."""
    match = _NUMBER.search(path.stem)
    return (int(match.group(1)) if match else -1, path.name)


def _patient_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and (p / "DICOM_anon").is_dir()]
    return sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _resolve_root(root: Path) -> Path:
    for candidate in (root, root / "CT", root / "Train_Sets" / "CT"):
        if _patient_dirs(candidate):
            return candidate
    return root


class ChaosDataset(FolderDataset[Path]):
    layout = "chaos"
    classes = {0: "background", 1: "liver"}

    def __init__(self, root: str | Path):
        super().__init__(_resolve_root(Path(root)))
        self._cases = {p.name: p for p in _patient_dirs(self.root)}
        if not self._cases:
            raise CtsegError("no CHAOS CT patients found (expected <patient>/DICOM_anon/*.dcm)", Path(root))

    @staticmethod
    def matches(root: Path) -> bool:
        return bool(_patient_dirs(_resolve_root(root)))

    def has_label(self, case_id: str) -> bool:
        return (self._source(case_id) / "Ground").is_dir()

    def load(self, case_id: str) -> Case:
        image = self.read_image(case_id)
        ground = self._source(case_id) / "Ground"
        label = _read_masks(ground, self._dicom_files(case_id), image) if ground.is_dir() else None
        return finish_case(case_id, image, label, self.classes)

    def _dicom_files(self, case_id: str) -> list[Path]:
        folder = self.image_path(case_id)
        return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm"), key=_index)

    def image_path(self, case_id: str) -> Path:
        return self._source(case_id) / "DICOM_anon"

    def read_image(self, case_id: str) -> Volume:
        image = read_dicom_files(self._dicom_files(case_id))
        image.meta["path"] = str(self.image_path(case_id))
        return image


def _sorted_by_index(paths: list[Path]) -> list[Path]:
    """`paths` ordered by the number in their names; a name without a number, or two names with the same
    number, is an error naming the file (pairing masks with slices must never guess)."""
    seen: dict[int, Path] = {}
    for path in paths:
        number, _ = _index(path)
        if number < 0:
            raise CtsegError("no slice number in the file name: cannot pair masks with DICOM slices", path)
        if number in seen:
            raise CtsegError(f"slice number {number} also used by {seen[number].name}: cannot pair masks with "
                             "DICOM slices", path)
        seen[number] = path
    return [seen[n] for n in sorted(seen)]


def _read_masks(ground: Path, files: list[Path], image: Volume) -> Volume:
    """Liver masks (z, y, x) on the image grid; interpolated (missing) slices copy the slice below."""
    pngs = _sorted_by_index(sorted(ground.glob("*.png")))
    files = _sorted_by_index(files)
    if len(pngs) != len(files):
        raise CtsegError(f"{len(pngs)} PNG masks for {len(files)} DICOM files", ground)
    png_of = {str(f): p for f, p in zip(files, pngs)}
    label = np.zeros(image.shape, dtype=np.uint8)
    for k, dicom_file in enumerate(image.meta["slice_files"]):
        if dicom_file is None:
            label[k] = label[k - 1]
            continue
        png = png_of[dicom_file]
        try:
            with Image.open(png) as im:
                mask = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16", "1") else im)
        except OSError as exc:
            raise CtsegError(f"cannot read PNG mask ({exc})", png) from exc
        if mask.shape != image.shape[1:]:
            raise CtsegError(f"mask of shape {mask.shape} does not match its DICOM slice "
                             f"{Path(dicom_file).name} of shape {image.shape[1:]}", png)
        label[k] = mask > 0
    return Volume(label, image.spacing, image.origin, image.direction, meta={"path": str(ground)})


def write_chaos_case(root: str | Path, patient: str, image: Volume, label: Volume | None,
                     rng: np.random.Generator | None = None) -> Path:
    """Write one patient as CHAOS does: `DICOM_anon/i{n:04d},0000b.dcm` (one series UID per file) and
    `Ground/liver_GT_{n:03d}.png` (0/255, same n as its DICOM file). `label` must be on `image`'s grid.
    With `rng`, file numbers are shuffled relative to slice position (CHAOS numbers need not follow it).
    """
    folder = Path(root) / patient
    nz = image.shape[0]
    numbers = rng.permutation(nz) if rng is not None else np.arange(nz)
    write_dicom_series(image, folder / "DICOM_anon", file_names=[f"i{n:04d},0000b.dcm" for n in numbers],
                       uid_per_file=True, patient_id=patient)
    if label is not None:
        if label.shape != image.shape:
            raise ValueError(f"label shape {label.shape} != image shape {image.shape}")
        (folder / "Ground").mkdir(parents=True, exist_ok=True)
        for k, n in enumerate(numbers):
            path = folder / "Ground" / f"liver_GT_{n:03d}.png"
            with atomic_path(path) as tmp:
                Image.fromarray(np.where(label.array[k] > 0, 255, 0).astype(np.uint8)).save(tmp, format="PNG")
    return folder


LAYOUTS.register(LayoutEntry("chaos", ChaosDataset, display="CHAOS", writer=LayoutWriter(
    case_name=lambda i: str(i + 1), write_case=lambda out, case: write_chaos_case(out, case.case_id, case.image,
                                                                                   case.label), tasks=("liver",))))
