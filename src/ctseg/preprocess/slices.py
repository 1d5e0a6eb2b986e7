"""Slice sampling and in-plane resizing, shared by the training cache and by inference.

- `sample_slices`: the paper's slice reduction, n random slices (sorted, no repeats, never
  upsampled in z), background-only slices excluded for training.
- `resize_in_plane`: (z, H, W) -> (z, S, S); images by area averaging (linear when enlarging),
  labels by majority vote (per-class counts over each output pixel's footprint), chunked
  along z to bound memory.
- `preprocess_volume` / `preprocess_label`: the single definition of "network input" used by
  `ctseg.preprocess.cache` and by `ctseg.inference.predict`.
- `restore_in_plane` / `InPlaneResize`: back from (C, z, S, S) probabilities to (C, z, H, W).
- `window_crop_box`: the paper's "we cropped the images to the same regions as obtained from
  windowing": a square in-plane box around the pixels that survive the window's lower bound, cut
  before resizing (`preprocess_volume(box=...)`, `preprocess_label(box=...)`) and undone by
  `restore_in_plane(box=...)`, which puts background outside the box.

In-plane geometry: resizing maps pixel centres as torch's `align_corners=False` does, so
`restore_in_plane` is the geometric inverse of `resize_in_plane` (pixel i of S covers input
pixels [i * H / S, (i + 1) * H / S)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import DTypeLike, NDArray
from scipy import ndimage

from ctseg.errors import CtsegError
from ctseg.preprocess.windowing import IntensityPlan, normalize

_CHUNK_BYTES = 64 * 2**20  # working memory per chunk of slices
#: Class probabilities (C, z, y, x) or a chunk of them, as numpy (`restore_in_plane` also takes a tensor)
ProbArray = NDArray[np.floating[Any]]


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"in-plane size must be positive, got {size}")
    return int(h), int(w)


def _chunk_len(plane_elems: int, channels: int = 1) -> int:
    return max(1, _CHUNK_BYTES // (4 * plane_elems * max(channels, 1)))


def foreground_slices(label_zyx: np.ndarray) -> np.ndarray:
    """Indices (int64, ascending) of slices that hold at least one voxel with label > 0."""
    z = label_zyx.shape[0]
    if z == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.asarray(label_zyx).reshape(z, -1).max(axis=1) > 0).astype(np.int64)


def sample_slices(label_zyx: np.ndarray | None, n: int, rng: np.random.Generator,
                  exclude_background: bool = True, *, num_slices: int | None = None,
                  oversample: float = 0.0) -> np.ndarray:
    """n distinct slice indices at random positions, sorted ascending (int64).

    label_zyx: (z, y, x) label map, or None (then `num_slices` gives z and every slice is eligible).
    exclude_background: only slices with foreground (label > 0) are eligible.

    Fewer than n eligible slices: like an nnU-Net patch, the sample stays n slices whenever the
    volume has them: all eligible slices are kept and topped up with the background slices closest
    to them (ties broken at random), i.e. anatomical context next to the organ. A volume with no
    foreground at all is topped up from random slices. A volume with fewer than n slices returns
    all its slices (length z < n): slices are never repeated or interpolated (no upsampling in z);
    the caller pads.

    oversample: nnU-Net-style class oversampling: round(oversample * n) of the n slices are drawn among
    the slices holding one foreground class, chosen at random among the classes present (so a rare
    class such as a small tumour is seen often enough); the others as above. 0 leaves the draw as it was.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if label_zyx is None:
        if num_slices is None:
            raise ValueError("sample_slices needs num_slices when label_zyx is None")
        z, eligible = int(num_slices), np.arange(int(num_slices), dtype=np.int64)
    else:
        z = label_zyx.shape[0]
        eligible = foreground_slices(label_zyx) if exclude_background else np.arange(z, dtype=np.int64)
    if oversample > 0 and label_zyx is not None and eligible.size > n:
        flat = np.asarray(label_zyx).reshape(z, -1)
        present = [int(v) for v in np.unique(flat[eligible]) if v > 0]
        if present:
            holding = np.flatnonzero((flat == present[int(rng.integers(len(present)))]).any(axis=1))
            forced = rng.choice(holding, size=min(int(round(oversample * n)), holding.size), replace=False)
            rest = np.setdiff1d(eligible, forced)
            return np.sort(np.concatenate([forced, rng.choice(rest, size=n - forced.size, replace=False)]))
    if eligible.size >= n:
        return np.sort(rng.choice(eligible, size=n, replace=False))
    return top_up_slices(eligible, z, n, rng)


def top_up_slices(eligible: np.ndarray, z: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Fewer than n `eligible` slices (ascending) of a z-slice volume: all of them plus the other slices
    closest to them (ties at random; random slices when none is eligible), sorted, n in all (all z if z <= n).
    `sample_slices`' rule for short foreground, shared with inference (`ctseg.preprocess.zstacks`)."""
    if z <= n:
        return np.arange(z, dtype=np.int64)
    eligible = np.asarray(eligible, dtype=np.int64)
    others = np.setdiff1d(np.arange(z, dtype=np.int64), eligible)
    if eligible.size:
        pos = np.searchsorted(eligible, others)
        left = eligible[np.clip(pos - 1, 0, eligible.size - 1)]
        right = eligible[np.clip(pos, 0, eligible.size - 1)]
        distance = np.minimum(np.abs(others - left), np.abs(others - right))
    else:
        distance = np.zeros(others.size, dtype=np.int64)
    order = np.lexsort((rng.random(others.size), distance))
    return np.sort(np.concatenate([eligible, others[order[: n - eligible.size]]]))


Box = tuple[int, int, int, int]  # (y0, y1, x0, x1) on the original grid, half-open; may reach outside it


def window_crop_box(volume_hu: np.ndarray, lower_hu: float, margin: float = 0.05,
                    min_fraction: float = 0.02) -> Box | None:
    """Square in-plane box (y0, y1, x0, x1) around what the window keeps, for all slices of (z, H, W) HU.

    A pixel belongs to the windowed region when it is >= `lower_hu` (inside or above the window) in at
    least `min_fraction` of the slices (noise specks and the odd slice's table edge do not count);
    a 3 x 3 opening removes isolated pixels. The bounding box of that region grows by `margin` of its
    side on each side and to a square around its centre (it may reach outside the image: those pixels
    are padded). None when nothing survives the window (the whole slice is used).
    """
    z, h, w = volume_hu.shape
    counts = np.zeros((h, w), dtype=np.int32)
    step = _chunk_len(h * w)
    for z0 in range(0, z, step):
        counts += (np.asarray(volume_hu[z0:z0 + step]) >= lower_hu).sum(axis=0, dtype=np.int32)
    region = ndimage.binary_opening(counts >= max(1.0, min_fraction * z), structure=np.ones((3, 3), bool))
    if not region.any():
        return None
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    side = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]) * (1 + 2 * margin)
    side = int(min(max(np.ceil(side), 8), max(h, w)))
    y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
    return (y0, y0 + side, x0, x0 + side)


def box_same_for_integers(lower_hu: float) -> bool:
    """Whether `window_crop_box(v, lower_hu)` of integer HU equals that of the same HU as float32: integers
    compare with `lower_hu` exactly, float32 with `lower_hu` rounded to float32; the same integers pass both
    when the two bounds round up to the same integer."""
    return math.ceil(lower_hu) == math.ceil(float(np.float32(lower_hu)))


def crop_in_plane(array_zyx: np.ndarray, box: Box, fill: float) -> np.ndarray:
    """(z, H, W) -> (z, y1 - y0, x1 - x0): the box's pixels, `fill` where the box leaves the grid."""
    y0, y1, x0, x1 = box
    z, h, w = array_zyx.shape
    out = np.full((z, y1 - y0, x1 - x0), fill, dtype=array_zyx.dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy0 < sy1 and sx0 < sx1:
        out[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = array_zyx[:, sy0:sy1, sx0:sx1]
    return out


def _normalized_box(chunk_hu: np.ndarray, plan: IntensityPlan, box: Box, out: np.ndarray | None = None
                    ) -> np.ndarray:
    """`crop_in_plane(normalize(chunk_hu, plan), box, fill)` (n, y1 - y0, x1 - x0) float32, normalising only the
    part of the box inside the grid; fill = the plan's `fill_hu` normalised. `out`: a buffer of that shape that
    already holds the fill outside the grid (reused between chunks: only the part inside is written)."""
    y0, y1, x0, x1 = box
    n, h, w = chunk_hu.shape
    if out is None:
        out = np.full((n, y1 - y0, x1 - x0), np.float32((plan.fill_hu - plan.mean) / plan.std), dtype=np.float32)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy0 < sy1 and sx0 < sx1:
        normalize(chunk_hu[:, sy0:sy1, sx0:sx1], plan, out=out[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0])
    return out


def _resize_image_chunk(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, h, w): area mean when shrinking, antialiased bilinear otherwise."""
    h, w = x.shape[-2:]
    if (h, w) == out_hw:
        return x
    if out_hw[0] <= h and out_hw[1] <= w:
        return F.interpolate(x, size=out_hw, mode="area")
    return F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=True)


def _label_values(chunk: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (a few equality scans when the range is small)."""
    lo, hi = int(chunk.min()), int(chunk.max())
    if hi - lo < 32:
        return np.array([v for v in range(lo, hi + 1) if (chunk == v).any()], dtype=chunk.dtype)
    return np.unique(chunk)


def _class_votes(chunk: np.ndarray, value: int | np.integer | np.bool_, out_hw: tuple[int, int]) -> np.ndarray:
    """How many input pixels of each output footprint hold `value`: (n, h, w), float32 fractions or counts.

    Integer factors: block sums in numpy (fast, no float temporaries); otherwise area pooling.
    """
    n, h, w = chunk.shape
    fy, fx = h // out_hw[0], w // out_hw[1]
    if fy * out_hw[0] == h and fx * out_hw[1] == w:
        dtype = np.uint8 if fy * fx < 256 else np.uint32
        return (chunk == value).reshape(n, out_hw[0], fy, out_hw[1], fx).sum(axis=(2, 4), dtype=dtype)
    mask = torch.from_numpy(chunk == value)[:, None].to(torch.float32)
    return F.interpolate(mask, size=out_hw, mode="area")[:, 0].numpy()


def _resize_label_chunk(chunk: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(n, H, W) integer labels -> (n, h, w) by majority vote; ties go to the lowest label value."""
    h, w = chunk.shape[-2:]
    if (h, w) == out_hw:
        return chunk.copy()
    if out_hw[0] > h and out_hw[1] > w:
        t = torch.from_numpy(np.ascontiguousarray(chunk)).to(torch.float32)[:, None]
        return F.interpolate(t, size=out_hw, mode="nearest-exact")[:, 0].numpy().astype(chunk.dtype)
    values = _label_values(chunk)
    winner = np.full((chunk.shape[0], *out_hw), values[0], dtype=chunk.dtype)
    if values.size == 1:
        return winner
    best = _class_votes(chunk, values[0], out_hw)
    for value in values[1:]:  # running argmax; strict > keeps the lower value on ties
        votes = _class_votes(chunk, value, out_hw)
        more = votes > best
        best[more] = votes[more]
        winner[more] = value
    return winner


def resize_in_plane(array_zyx: np.ndarray, size: int | tuple[int, int], is_label: bool) -> np.ndarray:
    """Resize every slice of (z, H, W) to (z, h, w), chunked along z.

    Image (any real dtype) -> float32: area average when shrinking (exact mean of each output
    pixel's footprint), antialiased bilinear when enlarging. Label (integer) -> same dtype:
    majority vote over each output pixel's footprint (per-class block counts or area pooling +
    running argmax; ties go to the lower label value), nearest when enlarging in both axes.
    """
    if array_zyx.ndim != 3:
        raise ValueError(f"expected (z, y, x), got shape {array_zyx.shape}")
    out_hw = _size2(size)
    z, h, w = array_zyx.shape
    if is_label:
        if not (np.issubdtype(array_zyx.dtype, np.integer) or array_zyx.dtype == np.bool_):
            raise CtsegError(f"label maps must hold integers, got dtype {array_zyx.dtype}")
        out = np.empty((z, *out_hw), dtype=array_zyx.dtype)
        step = _chunk_len(h * w, 2)  # one class mask (+ its float copy) at a time
        for z0 in range(0, z, step):
            out[z0:z0 + step] = _resize_label_chunk(np.asarray(array_zyx[z0:z0 + step]), out_hw)
        return out
    out = np.empty((z, *out_hw), dtype=np.float32)
    step = _chunk_len(h * w)
    for z0 in range(0, z, step):
        x = torch.from_numpy(np.asarray(array_zyx[z0:z0 + step], dtype=np.float32))[:, None]
        out[z0:z0 + step] = _resize_image_chunk(x, out_hw)[:, 0].numpy()
    return out


def preprocess_volume(volume_hu: np.ndarray, plan: IntensityPlan, size: int | tuple[int, int],
                      out: np.ndarray | None = None, box: Box | None = None) -> np.ndarray:
    """HU (z, H, W) -> network input (z, S, S) float32: clip + z-score (`normalize`), crop to `box` (pixels
    outside the image read as `plan.fill_hu`: the window's lower bound, air without a window), then area resize.

    Chunked along z; `out` (e.g. a float16 memmap of shape (z, S, S)) receives the result in place.
    """
    if volume_hu.ndim != 3:
        raise ValueError(f"expected (z, y, x), got shape {volume_hu.shape}")
    out_hw = _size2(size)
    z, h, w = volume_hu.shape
    if out is None:
        out = np.empty((z, *out_hw), dtype=np.float32)
    elif out.shape != (z, *out_hw):
        raise ValueError(f"out has shape {out.shape}, expected {(z, *out_hw)}")
    step = _chunk_len(h * w)
    # one work buffer for every chunk (fresh ~64 MiB arrays would be page-faulted in again each time)
    if box is None:
        buf = np.empty((min(step, z), h, w), dtype=np.float32)
    else:  # only the pixels inside the box are normalised; the fill is the normalised lower bound
        buf = np.full((min(step, z), box[1] - box[0], box[3] - box[2]),
                      np.float32((plan.fill_hu - plan.mean) / plan.std), dtype=np.float32)
    for z0 in range(0, z, step):
        n = min(step, z - z0)
        if box is None:
            chunk = normalize(volume_hu[z0:z0 + step], plan, out=buf[:n])
        else:
            chunk = _normalized_box(volume_hu[z0:z0 + step], plan, box, out=buf[:n])
        out[z0:z0 + step] = _resize_image_chunk(torch.from_numpy(chunk)[:, None], out_hw)[:, 0].numpy()
    return out


def preprocess_label(label_zyx: np.ndarray, size: int | tuple[int, int], box: Box | None = None) -> np.ndarray:
    """Label (z, H, W) with values 0..255 -> (z, S, S) uint8: crop to `box` (background outside the
    image), then majority vote."""
    if not (np.issubdtype(label_zyx.dtype, np.integer) or label_zyx.dtype == np.bool_):
        rounded = np.rint(label_zyx)
        if not np.array_equal(rounded, label_zyx):
            raise CtsegError("label map holds non-integer values")
        label_zyx = rounded
    if label_zyx.size and (label_zyx.min() < 0 or label_zyx.max() > 255):
        raise CtsegError(f"label values must lie in 0..255, found {label_zyx.min()}..{label_zyx.max()}")
    label = np.asarray(label_zyx).astype(np.uint8, copy=False)
    if box is not None:
        label = crop_in_plane(label, box, 0)
    return resize_in_plane(label, size, is_label=True)


@dataclass(frozen=True)
class InPlaneResize:
    """Record of an in-plane crop + resize: original (H, W), cut to `box` (None: whole slice), to network
    (h, w); `restore` goes back."""

    original_yx: tuple[int, int]
    size_yx: tuple[int, int]
    box: Box | None = None

    def to_dict(self) -> dict:
        return {"original_yx": list(self.original_yx), "size_yx": list(self.size_yx),
                "box": None if self.box is None else list(self.box)}

    @classmethod
    def from_dict(cls, d: dict) -> "InPlaneResize":
        (oy, ox), (sy, sx) = d["original_yx"], d["size_yx"]
        box = d.get("box")
        if box is not None:
            y0, y1, x0, x1 = box
            box = (int(y0), int(y1), int(x0), int(x1))
        return cls((int(oy), int(ox)), (int(sy), int(sx)), box)

    @overload
    def restore(self, prob_czyx: torch.Tensor, out_dtype: DTypeLike = ...) -> torch.Tensor: ...

    @overload
    def restore(self, prob_czyx: ProbArray, out_dtype: DTypeLike = ...) -> ProbArray: ...

    def restore(self, prob_czyx: ProbArray | torch.Tensor, out_dtype: DTypeLike = np.float32
                ) -> ProbArray | torch.Tensor:
        return restore_in_plane(prob_czyx, self.original_yx, out_dtype=out_dtype, box=self.box)


def _place_box(resized: torch.Tensor, box: Box, out_hw: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """Write the part of `resized` (n, C, by, bx) that lies inside the (H, W) grid into `out` (n, C, H, W),
    which holds background (channel 0 = 1) elsewhere."""
    y0, y1, x0, x1 = box
    h, w = out_hw
    out[:, 0] = 1
    out[:, 1:] = 0
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy0 < sy1 and sx0 < sx1:
        out[:, :, sy0:sy1, sx0:sx1] = resized[:, :, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    return out


@overload
def restore_in_plane(prob_czyx: torch.Tensor, original_yx: tuple[int, int], out_dtype: DTypeLike = ...,
                     box: Box | None = ...) -> torch.Tensor: ...


@overload
def restore_in_plane(prob_czyx: ProbArray, original_yx: tuple[int, int], out_dtype: DTypeLike = ...,
                     box: Box | None = ...) -> ProbArray: ...


def restore_in_plane(prob_czyx: ProbArray | torch.Tensor, original_yx: tuple[int, int],
                     out_dtype: DTypeLike = np.float32, box: Box | None = None) -> ProbArray | torch.Tensor:
    """Probabilities (C, z, h, w) at network resolution -> (C, z, H, W), bilinear, chunked along z.

    box: the crop the network input was cut to (`window_crop_box`); the probabilities are resized to
    the box and placed in it, background (channel 0) = 1 outside.
    numpy in -> numpy out (dtype `out_dtype`, float16 or float32); a torch tensor stays on its device
    and comes back as a tensor (float16 if out_dtype is float16, else float32). Memory: the output
    plus one chunk (~64 MiB of float32 working space).
    """
    if prob_czyx.ndim != 4:
        raise ValueError(f"expected (C, z, y, x) probabilities, got shape {tuple(prob_czyx.shape)}")
    out_hw = _size2(original_yx)
    resize_hw = out_hw if box is None else (box[1] - box[0], box[3] - box[2])
    c, z = prob_czyx.shape[:2]
    step = _chunk_len(max(out_hw[0] * out_hw[1], resize_hw[0] * resize_hw[1]), c)

    def restore_chunk(chunk: ProbArray | torch.Tensor) -> torch.Tensor:  # (C, n, h, w) -> (n, C, H, W) float32
        resized = _resize_chunk(chunk, resize_hw)
        if box is None:
            return resized
        return _place_box(resized, box, out_hw, resized.new_empty((resized.shape[0], c, *out_hw)))

    if isinstance(prob_czyx, torch.Tensor):
        tdtype = torch.float16 if np.dtype(out_dtype) == np.float16 else torch.float32
        out_t = torch.empty((c, z, *out_hw), dtype=tdtype, device=prob_czyx.device)
        for z0 in range(0, z, step):
            out_t[:, z0:z0 + step] = restore_chunk(prob_czyx[:, z0:z0 + step]).transpose(0, 1).to(tdtype)
        return out_t
    out = np.empty((c, z, *out_hw), dtype=out_dtype)
    for z0 in range(0, z, step):
        out[:, z0:z0 + step] = restore_chunk(prob_czyx[:, z0:z0 + step]).transpose(0, 1).numpy()
    return out


def _resize_chunk(chunk: ProbArray | torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Probabilities (C, n, h, w) (numpy or tensor) -> (n, C, H, W) float32 tensor, `restore_in_plane`'s
    interpolation."""
    if isinstance(chunk, torch.Tensor):
        x = chunk.to(torch.float32).transpose(0, 1)
    else:
        x = torch.from_numpy(np.asarray(chunk, dtype=np.float32)).transpose(0, 1)
    return _resize_image_chunk(x, size_hw)


def resize_box_chunk(chunk: ProbArray | torch.Tensor, box: Box) -> torch.Tensor:
    """Probabilities (C, n, h, w) at network resolution -> (n, C, y1 - y0, x1 - x0) float32 on the crop `box`:
    the values `restore_in_plane(box=box)` places in the box."""
    return _resize_chunk(chunk, (box[1] - box[0], box[3] - box[2]))


def network_grid(volume_hu: np.ndarray, plan: IntensityPlan, size: int, crop: str) -> InPlaneResize:
    """How a (z, H, W) HU volume maps to the network's (S, S) grid: crop "window" (`window_crop_box` with
    the plan's lower bound) or "none", then resize. Used by the cache and by inference alike."""
    h, w = volume_hu.shape[1:]
    box = window_crop_box(volume_hu, plan.lower) if crop == "window" else None
    return InPlaneResize((h, w), (size, size), box)
