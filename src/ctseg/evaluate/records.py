"""Per-volume results of a model (`VolumeResult`), their display names, row order and thickness groups.

The records that cross-validation writes and the report and its plots read: a small module at the
bottom of `ctseg.evaluate`, so that `ctseg.cv` need not import the report and `ctseg.evaluate.plots`
and `ctseg.evaluate.report` need not import each other. Names stay importable from
`ctseg.evaluate.report`. Display names are the registries' (`ctseg.registry`: each network's and
augmentation's entry owns its `display`), but for the ensembles, which are not networks (`ENSEMBLES`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ctseg.evaluate.folds import thickness_group
from ctseg.registry import AUGMENTERS, NETWORKS

#: The ensembles' `arch` -> table name: the stacked CNN and the plain average of its members (`ctseg.cv.stack`),
#: models that are not networks of `ctseg.registry.NETWORKS`.
ENSEMBLES = {"stacked": "Stacked CNN", "average": "Averaged members"}
_ARCH_ORDER = ["unet", "msd", *ENSEMBLES]
_DIM_ORDER = ["2d", "3d", ""]
_AUG_ORDER = ["mia", "nnunet", "ctia", "none"]


@dataclass(frozen=True)
class ModelIdentity:
    """The model a `VolumeResult` belongs to: `name` (e.g. 'unet-2d-ctia', 'stacked-ctia'), `arch`, `dim`
    ('' for ensembles), augmentation `aug` and `variant` (e.g. 'foreground, seed 1'; '' for none)."""

    name: str
    arch: str
    dim: str
    aug: str
    variant: str = ""


@dataclass
class VolumeResult:
    """Scores of one model on one test volume.

    dice / dice_paper / hd95: class name -> value (NaN when undefined). `dice` is computed on the full
    volume in its original geometry; `dice_paper` follows the paper's protocol (see `ctseg.evaluate.metrics`).
    overlay: optional path (relative to the results folder or absolute) of an `.npz` written by
    `ctseg.evaluate.plots.save_overlay_slice`, used for the best/median/worst figures.
    agreement: ensembles only, mean pairwise Dice of the members' foreground masks on this volume
    (`ctseg.evaluate.quality.member_agreement`); None for single models.
    """

    case_id: str
    fold: int
    model: str
    arch: str
    dim: str
    aug: str
    dice: dict[str, float]
    dice_paper: dict[str, float]
    hd95: dict[str, float] = field(default_factory=dict)
    slice_thickness: float | None = None
    num_slices: int = 0
    variant: str = ""
    overlay: str | None = None
    agreement: float | None = None

    @property
    def display(self) -> str:
        return display_name(self.arch, self.dim, self.aug, self.variant)

    def to_json(self) -> dict:
        d = asdict(self)
        for key in ("dice", "dice_paper", "hd95"):
            d[key] = {c: json_float(v) for c, v in d[key].items()}
        d["agreement"] = json_float(self.agreement)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "VolumeResult":
        d = dict(d)
        for key in ("dice", "dice_paper", "hd95"):
            d[key] = {c: (math.nan if v is None else float(v)) for c, v in d.get(key, {}).items()}
        if d.get("agreement") is not None:
            d["agreement"] = float(d["agreement"])
        return cls(**d)


def arch_display(arch: str) -> str:
    """Table name of a model's `arch`: an ensemble's (`ENSEMBLES`), a registered network's `display`, else `arch`."""
    return ENSEMBLES.get(arch) or NETWORKS.display(arch)


def aug_display(aug: str) -> str:
    """Table name of an augmentation: a registered one's `display` (`ctseg.registry.AUGMENTERS`), else `aug` (an
    arm's name)."""
    return AUGMENTERS.display(aug)


def display_name(arch: str, dim: str, aug: str, variant: str = "") -> str:
    """Row label as in the paper's Table 2, e.g. 'nnU-Net + CTIA 2D', 'Stacked CNN + MIA'."""
    name = f"{arch_display(arch)} + {aug_display(aug)}"
    if dim:
        name += f" {dim.upper()}"
    return f"{name} ({variant})" if variant else name


def _order(values: list[str], v: str) -> int:
    return values.index(v) if v in values else len(values)


def model_sort_key(r: VolumeResult) -> tuple:
    return (_order(_ARCH_ORDER, r.arch), _order(_DIM_ORDER, r.dim), r.variant, _order(_AUG_ORDER, r.aug), r.model)


def json_float(v: float | None) -> float | None:
    """NaN and ±inf (e.g. HD95 against an empty mask) -> None: strict JSON has no such numbers."""
    return None if v is None or not math.isfinite(v) else float(v)


def models_in_order(records: Sequence[VolumeResult]) -> list[VolumeResult]:
    """One representative record per model, in the paper's row order."""
    seen: dict[str, VolumeResult] = {}
    for r in sorted(records, key=model_sort_key):
        seen.setdefault(r.model, r)
    return list(seen.values())


def thickness_labels(edges_mm: Sequence[float]) -> list[str]:
    """Group names of `ctseg.evaluate.folds.thickness_group` for these upper edges, thinnest first."""
    edges = sorted(edges_mm)
    probes = [edges[0], *((lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])), edges[-1] + 1.0]
    return [thickness_group(t, tuple(edges)) for t in probes]


def thickness_group_of(thickness: float | None, edges_mm: Sequence[float]) -> str:
    return thickness_group(thickness, tuple(sorted(edges_mm)))


def present_thickness_groups(records: Sequence[VolumeResult], edges_mm: Sequence[float]) -> list[str]:
    """Thickness groups holding at least one volume, thinnest first ('unknown' last)."""
    present = {thickness_group_of(r.slice_thickness, edges_mm) for r in records}
    return [g for g in [*thickness_labels(edges_mm), "unknown"] if g in present]
