"""nnU-Net raw layout: `dataset.json`, `imagesTr/<case>_0000<ending>`, `labelsTr/<case><ending>`.

Classes come from dataset.json "labels" (v2 {"name": value} or v1 {"value": "name"}); cases in
`imagesTs/` are test cases (label None). Only channel 0000 is read (CT is single-channel).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ctseg.datasets.base import Case, FolderDataset, LayoutWriter, finish_case
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text
from ctseg.io import Volume, read_volume, write_volume
from ctseg.registry import LAYOUTS, LayoutEntry

log = logging.getLogger(__name__)


def _parse_labels(labels: object, path: Path) -> dict[int, str]:
    if not isinstance(labels, dict) or not labels:
        raise CtsegError('"labels" must be a non-empty mapping', path)
    try:
        if all(str(k).lstrip("-").isdigit() for k in labels):  # v1: {"0": "background"}
            classes = {int(k): str(v) for k, v in labels.items()}
        else:  # v2: {"background": 0}
            if any(not isinstance(v, int) for v in labels.values()):
                raise CtsegError("region-based labels (lists of values) are not supported", path)
            classes = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError) as exc:
        raise CtsegError(f'cannot parse "labels": {labels}', path) from exc
    if 0 not in classes:
        raise CtsegError(f'"labels" has no background (0): {labels}', path)
    return dict(sorted(classes.items()))


class NnUNetRawDataset(FolderDataset[tuple[Path, "Path | None"]]):
    layout = "nnunet"

    def __init__(self, root: str | Path):
        super().__init__(Path(root))
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise CtsegError("no dataset.json: not an nnU-Net raw dataset", self.root)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise CtsegError("dataset.json is not UTF-8 text (JSON must be UTF-8; re-save it as UTF-8)",
                             meta_path) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise CtsegError(f"cannot read dataset.json ({exc})", meta_path) from exc
        if not isinstance(meta, dict):
            raise CtsegError(f"dataset.json must hold a JSON object, got a {type(meta).__name__}", meta_path)
        self.classes = _parse_labels(meta.get("labels"), meta_path)
        self.file_ending = str(meta.get("file_ending", ".nii.gz"))
        channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
        if not isinstance(channels, dict):
            raise CtsegError(f'"channel_names" must map channel numbers to names, e.g. {{"0": "CT"}}, got '
                             f"{channels!r}", meta_path)
        if len(channels) > 1:
            log.warning("%s: %d channels %s; reading channel 0000 only", meta_path, len(channels), channels)
        suffix = "_0000" + self.file_ending
        for split, labels in (("imagesTr", "labelsTr"), ("imagesTs", None)):
            for image in sorted((self.root / split).glob(f"*{suffix}")):
                case_id = image.name[: -len(suffix)]
                label = self.root / labels / f"{case_id}{self.file_ending}" if labels else None
                if label is not None and not label.is_file():
                    raise CtsegError(f"training case {case_id} has no label {label.name} in {labels}/", image)
                if case_id in self._cases:
                    raise CtsegError(f"case {case_id} is in both imagesTr and imagesTs", image)
                self._cases[case_id] = (image, label)
        if not self._cases:
            raise CtsegError(f"no cases (expected imagesTr/<case>{suffix})", self.root)
        for label in sorted((self.root / "labelsTr").glob(f"*{self.file_ending}")):
            case_id = label.name[: -len(self.file_ending)]
            if case_id not in self._cases:
                log.warning("%s: skipped: a segmentation without its image imagesTr/%s%s", label, case_id, suffix)

    @staticmethod
    def matches(root: Path) -> bool:
        return (root / "dataset.json").is_file()

    def has_label(self, case_id: str) -> bool:
        return self._source(case_id)[1] is not None

    def load(self, case_id: str) -> Case:
        _, label_path = self._source(case_id)
        label = read_volume(label_path) if label_path is not None else None
        return finish_case(case_id, self.read_image(case_id), label, self.classes)

    def image_path(self, case_id: str) -> Path:
        return self._source(case_id)[0]

    def read_image(self, case_id: str) -> Volume:
        return read_volume(self.image_path(case_id))


def write_nnunet_dataset_json(root: str | Path, classes: dict[int, str], num_training: int,
                              name: str = "ctseg", file_ending: str = ".nii.gz") -> Path:
    """Write an nnU-Net v2 `dataset.json` (single CT channel)."""
    path = Path(root) / "dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "channel_names": {"0": "CT"}, "labels": {v: k for k, v in sorted(classes.items())},
            "numTraining": num_training, "file_ending": file_ending}
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path


def write_nnunet_case(root: str | Path, case_id: str, image: Volume, label: Volume | None,
                      file_ending: str = ".nii.gz") -> Path:
    """Write `imagesTr/<case>_0000<ending>` + `labelsTr/<case><ending>` (or `imagesTs/` when unlabelled)."""
    root = Path(root)
    write_volume(image, root / ("imagesTr" if label is not None else "imagesTs") / f"{case_id}_0000{file_ending}")
    if label is not None:
        write_volume(label.with_array(label.array.astype("uint8")), root / "labelsTr" / f"{case_id}{file_ending}")
    return root


def _write_phantom_json(out: Path, classes: dict[int, str], n_cases: int, task: str) -> None:
    write_nnunet_dataset_json(out, classes, n_cases, name=f"phantom_{task}")


LAYOUTS.register(LayoutEntry("nnunet", NnUNetRawDataset, display="nnU-Net raw", writer=LayoutWriter(
    case_name=lambda i: f"phantom_{i:03d}",
    write_case=lambda out, case: write_nnunet_case(out, case.case_id, case.image, case.label),
    prepare=_write_phantom_json)))
