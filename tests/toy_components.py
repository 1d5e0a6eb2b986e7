"""Toy components registered from a test module, with no other file edited: an augmentation (random
left-right flips), a network (two convolutions) and a dataset layout ("toyflat": one folder of NIfTI pairs).
Importing this module registers them; `unregister()` removes them again."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ctseg.augment.base import Augmenter, Dim, IntensityPlanLike, batch_gate, bernoulli
from ctseg.config import ModelConfig
from ctseg.datasets.base import Case, FolderDataset, LayoutWriter, finish_case
from ctseg.errors import CtsegError
from ctseg.io import Volume, read_volume, write_volume
from ctseg.registry import (AUGMENTERS, LAYOUTS, NETWORKS, AugmenterEntry, LayoutEntry, MemoryEstimate,
                            NetworkEntry)


# ------------------------------------------------------------------------------------------ augmentation
class ToyFlipConfig(BaseModel):
    """`augment.toyflip`: each image (a slice in 2D, a stack in 3D) flipped along x with probability p."""

    model_config = ConfigDict(extra="forbid")
    p_batch_2d: float = Field(1.0, ge=0, le=1)
    p_batch_3d: float = Field(1.0, ge=0, le=1)
    p: float = Field(0.5, ge=0, le=1)


class ToyFlip(Augmenter):
    def __init__(self, cfg: ToyFlipConfig, dim: Dim, intensity_plan: IntensityPlanLike | None = None):
        self.cfg, self.dim = cfg, dim

    def sample(self, image: Tensor, generator: torch.Generator) -> Tensor | None:
        """(B,) bool: which stacks are flipped; None when the batch gate stays shut."""
        if not batch_gate(self.dim, self.cfg.p_batch_2d, self.cfg.p_batch_3d, generator):
            return None
        return bernoulli(image.shape[0], self.cfg.p, generator)

    def apply(self, image: Tensor, label: Tensor, params: Tensor | None,
              generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if params is None:
            return image, label
        m = params.view(-1, 1, 1, 1, 1).to(image.device)
        return torch.where(m, image.flip(-1), image), torch.where(m, label.flip(-1), label)


# ------------------------------------------------------------------------------------------ network
class ToyNetConfig(BaseModel):
    """`model.toynet`: hidden channels of the one hidden layer."""

    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(4, ge=1)


class ToyNet(nn.Module):
    """(B, C, [Z,] Y, X) -> logits (B, K, [Z,] Y, X): 3x3(x3) convolution, ReLU, 1x1 convolution."""

    def __init__(self, dim: int, in_channels: int, num_classes: int, hidden: int):
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.net = nn.Sequential(conv(in_channels, hidden, 3, padding=1), nn.ReLU(), conv(hidden, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_toynet(cfg: ModelConfig, dim: int, in_channels: int, num_classes: int) -> ToyNet:
    section = cfg.section("toynet")
    assert isinstance(section, ToyNetConfig)
    return ToyNet(dim, in_channels, num_classes, section.hidden)


def toynet_memory(cfg: ModelConfig, num_classes: int, in_channels: int = 1) -> MemoryEstimate:
    hidden = cfg.section("toynet").hidden  # type: ignore[attr-defined]
    k = 9.0 if cfg.dim == "2d" else 27.0
    return MemoryEstimate(k * in_channels * hidden + hidden * num_classes, 2.0 * hidden + num_classes)


# ------------------------------------------------------------------------------------------ layout
class ToyFlatDataset(FolderDataset[Path]):
    """`toy.json` (classes) + `<case>_img.nii.gz` / `<case>_seg.nii.gz` in one folder."""

    layout = "toyflat"

    def __init__(self, root: str | Path):
        super().__init__(Path(root))
        if not self.matches(self.root):
            raise CtsegError("no toy.json: not a toyflat dataset", self.root)
        meta = json.loads((self.root / "toy.json").read_text())
        self.classes = {int(k): v for k, v in meta["classes"].items()}
        self._cases = {p.name[: -len("_img.nii.gz")]: p for p in sorted(self.root.glob("*_img.nii.gz"))}
        if not self._cases:
            raise CtsegError("no cases (expected <case>_img.nii.gz)", self.root)

    @staticmethod
    def matches(root: Path) -> bool:
        return (root / "toy.json").is_file()

    def load(self, case_id: str) -> Case:
        seg = self.root / f"{case_id}_seg.nii.gz"
        return finish_case(case_id, self.read_image(case_id), read_volume(seg) if seg.is_file() else None,
                           self.classes)

    def image_path(self, case_id: str) -> Path:
        return self._source(case_id)

    def read_image(self, case_id: str) -> Volume:
        return read_volume(self.image_path(case_id))


def _write_case(out: Path, case: Case) -> None:
    write_volume(case.image, out / f"{case.case_id}_img.nii.gz")
    if case.label is not None:
        write_volume(case.label, out / f"{case.case_id}_seg.nii.gz")


def _prepare(out: Path, classes: dict[int, str], n_cases: int, task: str) -> None:
    (out / "toy.json").write_text(json.dumps({"classes": classes, "task": task}))


def register() -> None:
    AUGMENTERS.register(AugmenterEntry("toyflip", ToyFlip, section=ToyFlipConfig, display="toy flips"))
    NETWORKS.register(NetworkEntry("toynet", build_toynet, toynet_memory, section=ToyNetConfig, display="Toy net"))
    LAYOUTS.register(LayoutEntry("toyflat", ToyFlatDataset, display="toy flat", writer=LayoutWriter(
        case_name=lambda i: f"toy{i:02d}", write_case=_write_case, prepare=_prepare)))


def unregister() -> None:
    AUGMENTERS.unregister("toyflip")
    NETWORKS.unregister("toynet")
    LAYOUTS.unregister("toyflat")
