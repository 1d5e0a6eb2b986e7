"""`Case` and the dataset protocol shared by every layout reader."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

from ctseg.io import Volume


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
    """A folder of cases in one layout. `classes` maps label value -> name (0 = background)."""

    root: object
    classes: dict[int, str]

    def case_ids(self) -> list[str]: ...

    def load(self, case_id: str) -> Case: ...

    def __iter__(self) -> Iterator[Case]: ...

    def __len__(self) -> int: ...
