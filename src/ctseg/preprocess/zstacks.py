"""Which slices a 3D model sees together at inference: stacks of `window` slice indices covering a volume.

Training (`ctseg.preprocess.slices.sample_slices`) gives a 3D model `window` (16) sorted random slices out of
a volume's F eligible slices (its foreground slices; all Z slices when it has none). Consecutive slices of
such a stack lie on average (F + 1) / (window + 1) slices apart (`expected_gap`: the mean spacing of
`window` sorted draws without replacement from F consecutive positions), about 6 slices for a kidney that
spans 100 slices, and a stack spans nearly all of the foreground. A contiguous window (gap 1) shows the
network a z-context it never saw in training, the more so the thinner the slices.

Index builders (numpy only, no model; `ctseg.inference.windows.softmax_3d` runs a model over them, for `ctseg.inference.predict`
and for validation, `ctseg.train.data.predict_cached`, alike):

- `z_stacks(stride=1)`: contiguous windows of `window` slices, `overlap` between neighbours (last one flush
  with the end), the sliding window of nnU-Net;
- `z_stacks(stride=s > 1)`: interleaved strided stacks. The slices are split into the s chains
  {o, o + s, o + 2s, ...} (o = 0 .. s - 1), and each chain is covered by windows of `window` consecutive
  chain elements as above, so each stack's slices lie exactly s apart and every slice is covered. s is capped
  at Z // window so that every chain holds at least `window` slices (no padding inside a chain);
  `inference_stride` picks s as training's mean gap;
- `sampled_stacks`: stacks drawn from a set of eligible slices exactly as training draws them (random
  partitions into sorted groups of `window`; the top-up rule of `sample_slices` when there are fewer),
  so their gaps follow training's whole distribution, not only its mean.

Each stack position carries a weight: `blend_weights` (gaussian or linear over the stack's positions, as
nnU-Net weights a patch) for windows, 1 for sampled stacks; overlapping predictions are averaged with these
weights. A volume shorter than `window` is one stack padded by repeating its last slice (as training pads),
the padded positions with weight 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Blend = Literal["gaussian", "linear"]


def blend_weights(length: int, mode: Blend = "gaussian") -> np.ndarray:
    """Per-position weights (length,) float32 in (0, 1] for blending overlapping stacks along z.

    gaussian: exp(-d^2 / (2 sigma^2)), sigma = length / 8, d = distance from the stack centre
    (nnU-Net's choice for patches); linear: 1 - |d| / (length / 2 + 1). Both peak at the centre
    and stay > 0 so every slice is covered.
    """
    d = np.arange(length, dtype=np.float64) - (length - 1) / 2.0
    if mode == "gaussian":
        w = np.exp(-(d ** 2) / (2.0 * (length / 8.0) ** 2))
    elif mode == "linear":
        w = 1.0 - np.abs(d) / (length / 2.0 + 1.0)
    else:
        raise ValueError(f"blend must be 'gaussian' or 'linear', got {mode!r}")
    w = np.maximum(w / w.max(), 1e-3)
    return w.astype(np.float32)


def window_starts(num_slices: int, window: int, overlap: float) -> list[int]:
    """Start indices of `window`-slice windows covering `num_slices` with fractional `overlap` (last flush)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if num_slices <= window:
        return [0]
    step = max(1, int(round(window * (1.0 - overlap))))
    starts = list(range(0, num_slices - window + 1, step))
    if starts[-1] != num_slices - window:
        starts.append(num_slices - window)
    return starts


def expected_gap(eligible: int, window: int) -> float:
    """Mean distance between consecutive slices of `window` sorted slices drawn without replacement from
    `eligible` consecutive positions: (eligible + 1) / (window + 1) (1.0 when eligible <= window: all taken)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if eligible <= window:
        return 1.0
    return (eligible + 1) / (window + 1)


def inference_stride(num_slices: int, window: int, eligible: int | None = None) -> int:
    """The stride of strided inference stacks: training's mean gap (`expected_gap` of `eligible` slices, default
    all `num_slices`) rounded, at least 1 and at most num_slices // window (every chain >= `window` slices)."""
    e = num_slices if eligible is None else int(eligible)
    cap = max(1, num_slices // window)
    return int(min(max(1, round(expected_gap(e, window))), cap))


@dataclass(frozen=True)
class ZStacks:
    """Inference stacks of a Z-slice volume: `index` (n, window) int64 slice indices (ascending within a
    stack), `weight` (n, window) float32 blending weight of each position (0 for padding), `stride` the gap
    between a stack's consecutive slices (0: random draws, `sampled_stacks`)."""

    index: np.ndarray
    weight: np.ndarray
    stride: int
    num_slices: int

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def coverage(self) -> np.ndarray:
        """(num_slices,) float64: the summed weight of every slice over all stacks (> 0 everywhere)."""
        return np.bincount(self.index.ravel(), weights=self.weight.ravel().astype(np.float64),
                           minlength=self.num_slices)

    def gaps(self) -> np.ndarray:
        """Distances between consecutive non-padded slices of every stack, concatenated."""
        out = [np.diff(idx[w > 0]) for idx, w in zip(self.index, self.weight)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def z_stacks(num_slices: int, window: int, stride: int = 1, overlap: float = 0.5, blend: Blend = "gaussian"
             ) -> ZStacks:
    """The inference stacks covering `num_slices` slices (see the module docstring).

    stride 1: contiguous sliding windows; s > 1: s interleaved chains of slices s apart (s capped at
    num_slices // window), each covered by sliding windows of `window` chain elements with `overlap`.
    """
    if num_slices < 1 or window < 1:
        raise ValueError(f"need num_slices >= 1 and window >= 1, got {num_slices}, {window}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if num_slices < window:  # one stack, padded by repeating the last slice; padded positions do not count
        index = np.minimum(np.arange(window), num_slices - 1)[None].astype(np.int64)
        weight = (np.arange(window) < num_slices).astype(np.float32)[None]
        return ZStacks(index, weight, 1, num_slices)
    s = int(min(stride, num_slices // window))
    w = blend_weights(window, blend)
    stacks: list[np.ndarray] = []
    for o in range(s):
        chain = np.arange(o, num_slices, s, dtype=np.int64)
        stacks.extend(chain[a:a + window] for a in window_starts(chain.size, window, overlap))
    index = np.stack(stacks)
    return ZStacks(index, np.broadcast_to(w, index.shape).copy(), s, num_slices)


def sampled_stacks(eligible: np.ndarray, num_slices: int, window: int, draws: int, rng: np.random.Generator
                   ) -> ZStacks:
    """Stacks drawn as training draws them (`sample_slices` with background slices excluded), covering every
    `eligible` slice `draws` times.

    Each draw is a random partition of the eligible slices into groups of `window` (the last group topped up
    with other eligible slices drawn at random), each group sorted: every stack is, on its own, distributed
    exactly as a training stack of a volume whose foreground slices are `eligible`, so the gaps between its
    slices follow training's distribution (mean `expected_gap`). Fewer than `window` eligible slices: one
    stack, topped up with the slices nearest to them as training does (`top_up_slices`), padded like
    `z_stacks` when the volume itself is shorter. Weights are 1 (0 for padding).
    """
    from ctseg.preprocess.slices import top_up_slices

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    eligible = np.unique(np.asarray(eligible, dtype=np.int64))
    if eligible.size and (eligible[0] < 0 or eligible[-1] >= num_slices):
        raise ValueError(f"eligible slices must lie in 0..{num_slices - 1}")
    if eligible.size < window:
        chosen = top_up_slices(eligible, num_slices, window, rng)
        if chosen.size < window:  # the volume is shorter than a stack: pad as z_stacks does
            return z_stacks(num_slices, window)
        return ZStacks(chosen[None], np.ones((1, window), np.float32), 0, num_slices)
    stacks: list[np.ndarray] = []
    for _ in range(draws):
        perm = rng.permutation(eligible)
        groups = [perm[i:i + window] for i in range(0, perm.size, window)]
        if groups[-1].size < window:
            rest = np.setdiff1d(eligible, groups[-1])
            groups[-1] = np.concatenate([groups[-1], rng.choice(rest, window - groups[-1].size, replace=False)])
        stacks.extend(np.sort(g) for g in groups)
    index = np.stack(stacks)
    return ZStacks(index, np.ones(index.shape, np.float32), 0, num_slices)
