"""Per-volume quality flag of an ensemble: how much its members disagree, and which volumes stand out.

Agreement (as `ctseg.inference.predict` reports it): each member's foreground mask is `argmax over classes != 0`
of its probabilities (C, z, S, S) at network resolution — for a 'multiclass' member any foreground class,
for a 'foreground' member (background, foreground) the foreground channel; the volume's agreement is the
mean Dice (`ctseg.evaluate.metrics.dice`) over all member pairs: 1.0 = identical masks, 0.0 = disjoint.

Unusual disagreement (`flag_unusual`, one-sided: only low agreement is suspicious), over the volumes of
one ensemble:

    flagged  <=>  a < median - mad_k * max(1.4826 * MAD, min_scale)   or   a < floor   or   a is not finite

MAD is the median absolute deviation of the agreements (1.4826 * MAD estimates the standard deviation of
a normal distribution, robust to the outliers being looked for); `min_scale` keeps near-identical
agreements (MAD ~ 0) from flagging volumes a hair below the median; `floor` flags volumes whose members
disagree badly even when most volumes do.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

from ctseg.evaluate.metrics import dice

MAD_TO_STD = 1.4826


def foreground_mask(probs: np.ndarray) -> np.ndarray:
    """(C, ...) class probabilities -> bool mask of `argmax(0) != 0` (ties go to the lower class, as argmax)."""
    probs = np.asarray(probs)
    if probs.ndim < 2 or probs.shape[0] < 2:
        raise ValueError(f"expected (C >= 2, ...) class probabilities, got shape {probs.shape}")
    return probs[1:].max(axis=0) > probs[0]


def member_dice_matrix(masks: Sequence[np.ndarray]) -> np.ndarray:
    """(M, M) symmetric matrix of Dice between the members' foreground masks (bool, same shape); diagonal 1."""
    out = np.ones((len(masks), len(masks)))
    for i, j in itertools.combinations(range(len(masks)), 2):
        out[i, j] = out[j, i] = dice(masks[i], masks[j])
    return out


def mean_pairwise(member_dice: np.ndarray) -> float:
    """Mean of the off-diagonal entries of a (M, M) member Dice matrix, M >= 2."""
    m = member_dice.shape[0]
    if m < 2:
        raise ValueError("agreement needs at least two members")
    return float(member_dice[np.triu_indices(m, k=1)].mean())


def member_agreement(member_probs: Sequence[np.ndarray]) -> float:
    """Mean pairwise Dice of the members' foreground masks. member_probs: per member (C_m, z, S, S) on one grid.

    C_m may differ between members (multiclass and foreground-only members mix).
    """
    shapes = {tuple(np.shape(p)[1:]) for p in member_probs}
    if len(shapes) > 1:
        raise ValueError(f"members predicted different grids: {sorted(shapes)}")
    return mean_pairwise(member_dice_matrix([foreground_mask(p) for p in member_probs]))


@dataclass(frozen=True)
class FlagRule:
    """Thresholds of `flag_unusual` (see module docstring): agreement below median - mad_k * robust
    spread, or below `floor`, is unusual."""

    mad_k: float = 3.0
    floor: float = 0.5
    min_scale: float = 0.01

    def threshold(self, agreements: Sequence[float]) -> float:
        """Agreement below which a volume is flagged (the larger of the robust cut-off and the floor);
        NaN when no agreement is finite."""
        a = np.asarray([v for v in agreements if v is not None and math.isfinite(v)], dtype=float)
        if a.size == 0:
            return math.nan
        med = float(np.median(a))
        scale = max(MAD_TO_STD * float(np.median(np.abs(a - med))), self.min_scale)
        return max(med - self.mad_k * scale, self.floor)

    def describe(self) -> str:
        return (f"agreement below median − {self.mad_k:g} × max(1.4826 × MAD, {self.min_scale:g}) "
                f"or below {self.floor:g}")


def flag_unusual(agreements: Mapping[Hashable, float], rule: FlagRule = FlagRule()) -> set:
    """Keys (e.g. case ids) of the volumes whose agreement is unusually low among `agreements`
    (one ensemble's volumes); non-finite agreements are flagged too."""
    cut = rule.threshold(list(agreements.values()))
    return {k for k, v in agreements.items() if v is None or not math.isfinite(v) or v < cut}
