"""Slice skipping and slice interpolation as a simulated acquisition, computed from the whole cached volume.

CTIA's slice skipping and slice interpolation (paper Table 1) stand for scans acquired with thicker / sparser
or with other slice positions. With `augment.ctia.z_mode: volume` they act when a training stack is sampled
(`ctseg.train.data.draw_stacks`), on the whole cached volume, instead of inside the 16-slice stack of random,
non-contiguous slices (where "interpolation" would blend slices many millimetres apart):

    slice skipping       factor f in (1, max]: a new grid of slabs f source slices thick, one every f slices,
                         at a random phase; a slab's image is the partial-volume mean of the source slices it
                         covers (weights = overlap of each slice's extent with the slab), its label the source
                         slice nearest the slab centre.
    slice interpolation  factor f in [min, 1): a new grid of slice positions every f slices at a random phase
                         (intermediate positions); image linear between the two neighbouring source slices,
                         label nearest.

The stack's slices are then drawn from the new grid by `ctseg.preprocess.slices.sample_slices`, the rule of
every other training stack: sorted, without repeats, foreground slices only when there are n of them, else all
of them topped up with the grid slices nearest to them, and the same class oversampling. Meaningful for 2D (each slice is a thicker
slab, or an in-between position) and for 3D (the stack's slices lie on the new, consistent grid). Source
slice i covers [i - 0.5, i + 0.5] in index units; positions below are in those units.

>>> mode, factor, phase = sample_acquisition(0.2, 2.0, 0.2, 0.5, rng)
>>> image, label = acquire_stack(case.image, case.label, 16, mode, factor, phase, rng)
"""
from __future__ import annotations

import numpy as np

from ctseg.preprocess.slices import sample_slices

NONE, SKIP, INTERP = 0, 1, 2


def sample_acquisition(p_skip: float, max_factor: float, p_interp: float, min_factor: float,
                       rng: np.random.Generator) -> tuple[int, float, float]:
    """(mode, factor, phase) for one stack: SKIP with probability p_skip (f ~ U(1, max]), INTERP with
    p_interp (f ~ U[min, 1)), else NONE; phase ~ U[0, f) in source-slice units. Always draws four numbers."""
    u, a, b, c = rng.random(4)
    if u < p_skip:
        f = 1.0 + (max_factor - 1.0) * (1.0 - a)  # (1, max]
        return SKIP, f, c * f
    if u < p_skip + p_interp:
        f = min_factor + (1.0 - min_factor) * b  # [min, 1)
        return INTERP, f, c * f
    return NONE, 1.0, 0.0


def grid_centres(num_slices: int, factor: float, phase: float) -> np.ndarray:
    """Centres of the simulated slices (float64, source index units) that lie inside the source volume.

    Grid: slabs (or positions) starting at -0.5 + phase, every `factor`; for slabs the centre is start + f/2."""
    first = -0.5 + phase
    n = int(np.floor((num_slices - 0.5 - first) / factor)) + 1
    centres = first + np.arange(max(n, 0)) * factor + (factor / 2 if factor > 1 else 0.0)
    return centres[(centres >= 0) & (centres <= num_slices - 1)]


def slab_weights(centres: np.ndarray, width: float, num_slices: int) -> np.ndarray:
    """(len(centres), num_slices) partial-volume weights: row j = overlap of each source slice's extent
    [i - 0.5, i + 0.5] with the slab [c_j - width/2, c_j + width/2], clipped to the volume, normalised to sum 1."""
    i = np.arange(num_slices, dtype=np.float64)
    lo = np.maximum(i[None, :] - 0.5, centres[:, None] - width / 2)
    hi = np.minimum(i[None, :] + 0.5, centres[:, None] + width / 2)
    w = np.clip(hi - lo, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def linear_weights(centres: np.ndarray, num_slices: int) -> np.ndarray:
    """(len(centres), num_slices) linear interpolation weights between the two source slices around each centre."""
    lo = np.clip(np.floor(centres).astype(np.int64), 0, num_slices - 1)
    hi = np.clip(lo + 1, 0, num_slices - 1)
    t = centres - lo
    w = np.zeros((centres.size, num_slices))
    rows = np.arange(centres.size)
    np.add.at(w, (rows, lo), 1.0 - t)
    np.add.at(w, (rows, hi), t)
    return w


def acquire_stack(image: np.ndarray, label: np.ndarray, n: int, mode: int, factor: float, phase: float, rng: np.random.Generator,
                  exclude_background: bool = True, oversample: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n slices of the simulated acquisition (mode SKIP or INTERP, see module docstring) of one cached volume.

    image: (Z, S, S) array-like (memory-mapped float16 is fine: only the slices a chosen slice covers are read);
    label: (Z, S, S) integer. Returns image float32 (m, S, S) and label (m, S, S) of label's dtype, m = n unless
    the simulated grid has fewer slices (the caller pads, as for short volumes). exclude_background and
    oversample: as `sample_slices`, applied to the labels of the simulated grid."""
    z = image.shape[0]
    centres = grid_centres(z, factor, phase)
    nearest = np.clip(np.rint(centres).astype(np.int64), 0, z - 1)
    grid_label = np.asarray(label)[nearest]  # (len(centres), S, S): the label of each simulated slice
    chosen = sample_slices(grid_label, n, rng, exclude_background=exclude_background, oversample=oversample)
    c = centres[chosen]
    w = slab_weights(c, factor, z) if mode == SKIP else linear_weights(c, z)
    used = np.flatnonzero(w.any(axis=0))
    src = np.asarray(image[used], dtype=np.float32).reshape(used.size, -1)
    out = (w[:, used].astype(np.float32) @ src).reshape(c.size, *image.shape[1:])
    return out, grid_label[chosen]
