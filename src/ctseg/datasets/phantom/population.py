"""Shifts of the phantom's patient and scanner population (`generate_case(population=...)`)."""
from __future__ import annotations

from dataclasses import dataclass

from ctseg.errors import CtsegError

#: The values each population shift can take (inclusive); the identity is 1, or 0 for phase.
POPULATION_RANGES = {"habitus": (1.0, 3.0), "fov": (0.3, 3.0), "kidney_size": (0.3, 3.0), "tumour_size": (0.1, 5.0),
                     "phase": (0.0, 1.0), "kernel": (1.0, 8.0)}


@dataclass(frozen=True)
class Population:
    """A shift of the phantom's patient and scanner population (`generate_case(population=...)`; identity =
    the training population). Applied after every random draw, so a seed keeps its anatomy, acquisition and
    noise pattern and only the shifted property changes (the counterfactual of one population difference).

    habitus      > 1: a heavier patient: (habitus - 1) x the body half-width of extra subcutaneous fat all
                 round; organs keep their size, the scanner's field of view grows with the body (as drawn)
    fov          x the drawn pixel spacing (the field of view): < 1 cuts the body, > 1 adds air, coarser pixels
    kidney_size  x both kidneys' radii
    tumour_size  x every tumour's diameter (at most 100 mm)
    phase        0 = the drawn (enhanced) phase, 1 = unenhanced: organ, vessel and tumour HU blended toward
                 non-contrast values (kidney ~35 HU, close to muscle)
    kernel       >= 1: a sharper reconstruction kernel: in-plane PSF sigma / kernel, noise std x sqrt(kernel)
    """

    habitus: float = 1.0
    fov: float = 1.0
    kidney_size: float = 1.0
    tumour_size: float = 1.0
    phase: float = 0.0
    kernel: float = 1.0

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k):g}" for k, (lo, hi) in POPULATION_RANGES.items()
               if not lo <= getattr(self, k) <= hi]
        if bad:
            ranges = ", ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in POPULATION_RANGES.items())
            raise CtsegError(f"population shift out of range: {', '.join(bad)} ({ranges})")

    @classmethod
    def of(cls, value: "Population | dict | None") -> "Population":
        if value is None or isinstance(value, Population):
            return value or cls()
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise CtsegError(f"unknown population shift(s) {unknown}; choose from {list(cls.__dataclass_fields__)}")
        return cls(**{k: float(v) for k, v in value.items()})


#: HU of the unenhanced phase (`Population.phase` = 1), literature means for non-contrast CT.
_UNENHANCED_HU = {"liver": 58.0, "spleen": 48.0, "cortex": 35.0, "medulla": 32.0, "aorta": 45.0, "ivc": 45.0,
                  "heart": 45.0, "tumour": 38.0}
