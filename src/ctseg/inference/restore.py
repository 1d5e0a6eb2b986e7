"""Network-resolution probabilities (C, z, S, S) back to a label map on the input's in-plane grid (`restore_label`):
bilinear into the crop box (`ctseg.preprocess.slices.restore_in_plane`), background outside it, argmax (ties ->
the lower class), chunk by chunk along z.

Without probabilities at full resolution (`probabilities_out`), only the labels are needed, and most of them
are known before any interpolation: an output pixel is a weighted mean, with non-negative weights summing to 1,
of the network pixels of its footprint (2 x 2 when enlarging). Where one class beats every other by more than
`_SURE_MARGIN` at every network pixel of the footprint, it beats them after the interpolation too (float32
rounding of values in [0, 1] is ~1e-7), so that pixel's label is that class. On the CPU, the interpolation
(torch's antialiased bilinear: a horizontal pass, then a vertical one, each output value computed from its own
taps) is run for the other pixels only: the horizontal pass on the whole chunk, the vertical pass on the output
columns that hold an undecided pixel. Those columns get the very float32 values of the whole-grid
interpolation, which `_separable_matches` checks once per grid size (else every pixel is interpolated). On
other devices, slices where background is sure everywhere are skipped and the others interpolated whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ctseg.inference.windows import argmax_uint8

_CHUNK_BYTES = 64 * 2**20
_SURE_MARGIN = 1e-4  # best minus second-best probability above which a network pixel's class is sure
_UNSURE = 255  # code of a network pixel without a sure class (classes are < 255 on the sparse path)

Box = tuple[int, int, int, int]


def restore_label(probs: np.ndarray | torch.Tensor, original_yx: tuple[int, int], label_out: np.ndarray,
                  probabilities_out: Sequence[np.ndarray] = (), box: Box | None = None) -> None:
    """Network-resolution probabilities (C, z, S, S) -> `label_out` (z, H, W) uint8: bilinear in-plane
    restore (`restore_in_plane`, into the crop `box`, background outside it), then argmax (ties -> lower class).

    Chunked along z: ~64 MiB of full-resolution probabilities exist at a time. `label_out` and the
    optional `probabilities_out` (C arrays (z, H, W), e.g. float16) may be strided views (another
    voxel order); they receive the results in place. Without `probabilities_out` only the labels are made
    (module docstring: the same labels, most of them without interpolating).
    """
    from ctseg.preprocess.slices import restore_in_plane

    n_cls, z = probs.shape[:2]
    h, w = original_yx
    if not probabilities_out:
        _restore_label_in_box(probs, (h, w), label_out, box if box is not None else (0, h, 0, w))
        return
    step = max(1, _CHUNK_BYTES // (4 * n_cls * h * w))
    for z0 in range(0, z, step):
        chunk = torch.as_tensor(restore_in_plane(probs[:, z0:z0 + step], (h, w), out_dtype=np.float32, box=box))
        label_out[z0:z0 + step] = argmax_uint8(chunk).cpu().numpy()
        for c, out in enumerate(probabilities_out):
            out[z0:z0 + step] = chunk[c].to(torch.float16).cpu().numpy()


def _restore_label_in_box(probs: np.ndarray | torch.Tensor, original_yx: tuple[int, int], label_out: np.ndarray,
                          box: Box) -> None:
    """`restore_label` without probabilities: the argmax of the probabilities resized to the crop `box`
    (`restore_in_plane`'s interpolation of the box), written into the part of the box inside the (H, W) grid;
    0 (background) elsewhere, as the full-grid argmax gives there."""
    h, w = original_yx
    y0, y1, x0, x1 = box
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    label_out[:] = 0
    if sy0 >= sy1 or sx0 >= sx1:
        return
    p = torch.as_tensor(probs)
    n_cls, z, s_h, s_w = p.shape
    if n_cls == 1:  # one class: every pixel is class 0
        return
    by, bx = y1 - y0, x1 - x0
    iy, ix = slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0)  # the part of the box inside the grid
    step = max(1, _CHUNK_BYTES // (4 * n_cls * by * bx))
    if _sparse_applies(p, (s_h, s_w), (by, bx)):
        rows, cols = _axis(s_h, by, horizontal=False), _axis(s_w, bx, horizontal=True)
        for z0 in range(0, z, step):
            labels = _sparse_labels(p[:, z0:z0 + step], box, rows, cols)
            label_out[z0:z0 + step, sy0:sy1, sx0:sx1] = labels[:, iy, ix]
        return
    from ctseg.preprocess.slices import resize_box_chunk

    margin = p[0] - p[1:].amax(dim=0)
    todo = torch.nonzero(margin.flatten(1).amin(dim=1) <= _SURE_MARGIN).flatten().cpu().numpy()
    del margin
    for i in range(0, len(todo), step):
        zs = todo[i:i + step]
        resized = resize_box_chunk(p[:, torch.from_numpy(zs).to(p.device)], box)  # (n, C, by, bx)
        part = resized[:, :, iy, ix].transpose(0, 1)
        label_out[zs, sy0:sy1, sx0:sx1] = argmax_uint8(part).cpu().numpy()


# ------------------------------------------------------------------------------------------ sparse path
_NEAR_ULPS = 8  # top-two gaps within 4x the bound on torch's rounding (float32 units) are interpolated by torch
_DENSE_FRACTION = 0.2  # share of undecided box pixels above which a chunk is interpolated whole
_PIXEL_BATCH = 1 << 18  # undecided pixels interpolated at a time


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The enlarging resize of `ctseg.preprocess.slices` (antialiased bilinear) of (N, C, h, w) float32."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _sparse_applies(p: torch.Tensor, net_hw: tuple[int, int], box_hw: tuple[int, int]) -> bool:
    """The sparse path: on the CPU, for fewer than 255 classes, when the box is resized by antialiased bilinear
    (enlarged along at least one axis: `_resize_image_chunk`) and torch computes that as two passes."""
    return (p.device.type == "cpu" and p.shape[0] < _UNSURE
            and not (box_hw[0] <= net_hw[0] and box_hw[1] <= net_hw[1])
            and _separable_matches(p.shape[0], net_hw, box_hw))


_CHECKED: dict[tuple[int, ...], bool] = {}


def _separable_matches(n_cls: int, net_hw: tuple[int, int], box_hw: tuple[int, int]) -> bool:
    """Whether the horizontal pass of a chunk, then the vertical pass of some of its output columns gathered
    side by side, gives the bits of `resize_box_chunk` in those columns (checked once per sizes)."""
    from ctseg.preprocess.slices import resize_box_chunk

    key = (n_cls, *net_hw, *box_hw)
    if key not in _CHECKED:
        gen = torch.Generator().manual_seed(0)
        x = torch.softmax(torch.randn((n_cls, 2, *net_hw), generator=gen) * 3, dim=0)
        full = resize_box_chunk(x, (0, box_hw[0], 0, box_hw[1]))  # (2, C, by, bx)
        tmp = _horizontal_pass(x.transpose(0, 1).contiguous(), box_hw[1])
        _CHECKED[key] = True
        for n_idx, k_idx in ((torch.tensor([1]), torch.tensor([box_hw[1] // 2])),
                             (torch.tensor([0, 1]), torch.tensor([0, box_hw[1] - 1])),
                             (torch.tensor([0, 1, 1, 0]), torch.tensor([0, box_hw[1] - 1, box_hw[1] // 2, 1]))):
            cols = _vertical_pass(tmp, n_idx, k_idx, box_hw[0])  # (C, by, P)
            _CHECKED[key] &= bool(torch.equal(cols, full[n_idx, :, :, k_idx].permute(1, 2, 0)))
    return _CHECKED[key]


def _horizontal_pass(x: torch.Tensor, width: int) -> torch.Tensor:
    """(n, C, h, w) -> (n, C, h, width): the resize's first pass (none when the width is kept)."""
    return x if x.shape[-1] == width else _bilinear(x, (x.shape[-2], width))


def _vertical_pass(tmp: torch.Tensor, n_idx: torch.Tensor, k_idx: torch.Tensor, height: int) -> torch.Tensor:
    """Output columns (n_idx[i], :, k_idx[i]) of the horizontal pass `tmp` (n, C, h, bx) through the second pass,
    gathered side by side: (C, height, P). Each value is computed from its own column's taps."""
    single = len(n_idx) == 1  # torch's antialiased resize of a 1-pixel-wide image is wrong: gather two
    if single:
        n_idx, k_idx = n_idx.repeat(2), k_idx.repeat(2)
    cols = tmp.permute(1, 2, 0, 3)[:, :, n_idx, k_idx][None].contiguous()  # (1, C, h, P)
    if cols.shape[2] != height:
        cols = _bilinear(cols, (height, cols.shape[3]))
    return cols[0, :, :, :1] if single else cols[0]


@dataclass(frozen=True)
class _Axis:
    """One axis of the box resize, for each output index: the input indices [lo, hi) with a weight, each tap's
    input index and weight (`taps`, `weights` (n_out, K), weight 0 past hi), and its range's number (`group`)
    among the distinct ranges [first, last); the output indices of range g are start[g] to start[g + 1]
    (ranges grow with the output index)."""

    taps: np.ndarray
    weights: np.ndarray
    group: np.ndarray
    first: np.ndarray
    last: np.ndarray
    start: np.ndarray


def _axis(n_in: int, n_out: int, horizontal: bool) -> _Axis:
    """The weights of one axis, read off the resize of the identity (exact: products with 0 and 1)."""
    eye = torch.eye(n_in, dtype=torch.float32)[None, None]
    if n_out == n_in:
        w = eye[0, 0]
    else:
        w = _bilinear(eye, (n_in, n_out))[0, 0].T if horizontal else _bilinear(eye, (n_out, n_in))[0, 0]
    w64 = w.numpy().astype(np.float64)  # (n_out, n_in)
    used = w64 != 0
    lo, hi = used.argmax(axis=1), n_in - used[:, ::-1].argmax(axis=1)
    offsets = np.arange(int((hi - lo).max()))
    taps = np.minimum(lo[:, None] + offsets, n_in - 1)
    weights = np.where(lo[:, None] + offsets < hi[:, None], np.take_along_axis(w64, taps, axis=1), 0.0)
    ranges, group = np.unique(np.stack([lo, hi], axis=1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    start = np.searchsorted(group, np.arange(len(ranges) + 1))
    return _Axis(taps, weights, group, ranges[:, 0], ranges[:, 1], start)


def _range_min_max(code: np.ndarray, axis: int, first: np.ndarray, last: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of `code` along `axis` over each range [first, last)."""
    mn = mx = np.take(code, first, axis=axis)
    for t in range(1, int((last - first).max())):
        taken = np.take(code, np.minimum(first + t, last - 1), axis=axis)
        mn, mx = np.minimum(mn, taken), np.maximum(mx, taken)
    return mn, mx


def _expand(per_range: np.ndarray, rows: _Axis, cols: _Axis) -> np.ndarray:
    """(n, ranges y, ranges x) -> (n, by, bx): each output pixel gets its footprint's value."""
    return np.take(np.take(per_range, cols.group, axis=2), rows.group, axis=1)


def _sparse_labels(chunk: torch.Tensor, box: Box, rows: _Axis, cols: _Axis) -> np.ndarray:
    """(C, n, S, S) probabilities -> (n, by, bx) uint8 labels of the box: the sure class where every network
    pixel of the footprint has it (module docstring); elsewhere the argmax of the interpolation computed in
    float64 with torch's weights (torch's float32 passes round within (taps) x 2^-24 x the largest value of it),
    or of torch's own values where the two best classes are within `_NEAR_ULPS` times that bound. A chunk with
    many undecided pixels is interpolated whole (`resize_box_chunk`)."""
    from ctseg.preprocess.slices import resize_box_chunk

    x = chunk.to(torch.float32).transpose(0, 1).contiguous()  # (n, C, S, S): what `resize_box_chunk` interpolates
    top = x.topk(2, dim=1)
    sure = (top.values[:, 0] - top.values[:, 1]) > _SURE_MARGIN
    code = torch.where(sure, top.indices[:, 0].to(torch.uint8), torch.tensor(_UNSURE, dtype=torch.uint8)).numpy()
    del top, sure
    mn, mx = _range_min_max(code, 2, cols.first, cols.last)  # (n, S, ranges x)
    mn, mx = _range_min_max(mn, 1, rows.first, rows.last)[0], _range_min_max(mx, 1, rows.first, rows.last)[1]
    labels = _expand(mn, rows, cols)
    cells = np.nonzero((mn != mx) | (mn == _UNSURE))  # (slice, row range, column range) of the undecided blocks
    heights, widths = np.diff(rows.start)[cells[1]], np.diff(cols.start)[cells[2]]
    if int((heights * widths).sum()) > _DENSE_FRACTION * labels.size:
        return argmax_uint8(resize_box_chunk(chunk, box).transpose(0, 1)).numpy()
    n_cls, s_h, s_w = x.shape[1:]
    by, bx = labels.shape[1:]
    planes = chunk.to(torch.float32).contiguous().numpy().reshape(n_cls, -1)  # per class, (n, S, S) flattened
    # torch's float32 passes round within (taps) x 2^-24 x the largest value of the exact interpolation, per class
    near_gap = _NEAR_ULPS * (rows.taps.shape[1] + cols.taps.shape[1]) * 2.0**-24 * max(1.0, float(np.abs(planes).max()))
    ends = np.cumsum(heights * widths)
    bounds = np.unique(np.searchsorted(ends, np.arange(0, int(ends[-1]) if ends.size else 0, _PIXEL_BATCH),
                                       side="right"))
    for c0, c1 in zip(bounds, [*bounds[1:], ends.size]):  # blocks of ~_PIXEL_BATCH pixels at a time
        n, j, k = _block_pixels([a[c0:c1] for a in cells], rows, cols)
        best, top1, second = _top_two(_interpolate_at(planes, n * s_h, j, k, rows, cols, s_w))
        labels[n, j, k] = best
        near = (top1 - second) <= near_gap
        if near.any():  # near ties: torch's own float32 values decide, as in the whole-box interpolation
            labels[n[near], j[near], k[near]] = _torch_labels_at(x, n[near], j[near], k[near], by, bx)
    return labels


def _block_pixels(cells: list[np.ndarray], rows: _Axis, cols: _Axis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slice, row, column) of every output pixel of the blocks (slice, row range, column range)."""
    n, ry, rx = cells
    height, width = np.diff(rows.start)[ry], np.diff(cols.start)[rx]
    count = height * width
    block = np.repeat(np.arange(count.size), count)
    within = np.arange(block.size) - np.repeat(np.cumsum(count) - count, count)
    dj, dk = np.divmod(within, width[block])
    return n[block], rows.start[ry][block] + dj, cols.start[rx][block] + dk


def _interpolate_at(planes: np.ndarray, first_row: np.ndarray, j: np.ndarray, k: np.ndarray, rows: _Axis,
                    cols: _Axis, width: int) -> np.ndarray:
    """(C, P) float64: per class, the interpolation at output pixels (j, k) of the slices whose first row in the
    flattened (n, S, width) `planes[c]` is `first_row`: the sum over the taps of weight_y x weight_x x input."""
    vals = np.zeros((len(planes), j.size))
    for ty in range(rows.taps.shape[1]):
        row = (first_row + rows.taps[j, ty]) * width
        wy = rows.weights[j, ty]
        for tx in range(cols.taps.shape[1]):
            index = row + cols.taps[k, tx]
            w = wy * cols.weights[k, tx]
            for c, plane in enumerate(planes):
                vals[c] += w * np.take(plane, index)
    return vals


def _top_two(vals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of (C, P) values: the best class (ties -> the lower), its value and the second-best value."""
    best = np.zeros(vals[0].size, dtype=np.uint8)
    top1, second = vals[0].copy(), np.full(vals[0].size, -np.inf)
    for c in range(1, len(vals)):
        v = vals[c]
        more = v > top1
        second = np.where(more, top1, np.maximum(second, v))
        best[more] = c
        top1 = np.where(more, v, top1)
    return best, top1, second


def _torch_labels_at(x: torch.Tensor, n: np.ndarray, j: np.ndarray, k: np.ndarray, by: int, bx: int) -> np.ndarray:
    """The labels at output pixels (n, j, k) from torch's own interpolation (`_separable_matches`): both passes
    on the columns (n, k) only."""
    slices, n_in = np.unique(n, return_inverse=True)
    tmp = _horizontal_pass(x[torch.from_numpy(slices)], bx)
    pairs, column = np.unique(np.stack([n_in.reshape(-1), k], axis=1), axis=0, return_inverse=True)
    exact = argmax_uint8(_vertical_pass(tmp, torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1]), by))
    return exact.numpy()[j, column.reshape(-1)]
