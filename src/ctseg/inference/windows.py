"""The window loops every prediction runs: a network's softmax over a preprocessed volume (z, S, S) at network
resolution, slice by slice (2D) or stack by stack with the z-context the network was trained with (3D).

Shared by inference (`ctseg.inference.predict`), training's validation (`ctseg.train.data.predict_cached`) and
cross-validation (through `predict_network`). Stacks and their blending weights come from
`ctseg.preprocess.zstacks`; every network output is checked to be finite (`check_finite_output`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from ctseg.errors import CtsegError
from ctseg.preprocess.zstacks import Blend, ZStacks, inference_stride, sampled_stacks, z_stacks

ZContext = Literal["sampled", "strided", "contiguous"]


def _check_channels(logits: torch.Tensor, expected: int, where: Path | None) -> None:
    """The right number of channels, and finite values: a network with finite weights can still overflow
    (e.g. after one step at a huge learning rate); its NaN would silently become background in an ensemble."""
    if logits.shape[1] != expected:
        raise CtsegError(f"the model outputs {logits.shape[1]} channels but its classes need {expected}", where)
    check_finite_output(logits, where)


class NonFiniteOutput(CtsegError):
    """A network's output holds NaN or infinite values (its weights may be finite)."""


def check_finite_output(output: torch.Tensor, where: Path | str | None) -> None:
    """NonFiniteOutput naming the model when its output holds NaN or infinite values."""
    if not bool(torch.isfinite(output).all()):
        bad = int((~torch.isfinite(output)).sum())
        raise NonFiniteOutput(f"the model's output holds NaN or infinite values ({bad} of {output.numel()}) although its "
                         "weights are finite: it is unusable (diverged training?); retrain it or leave it out of the "
                         "ensemble", where)


def softmax_2d(module: torch.nn.Module, image: torch.Tensor, batch_size: int, out: torch.Tensor, where: Path | None,
                tick: Callable[[], None]) -> None:
    """image (z, S, S) on device -> softmax into out (K, z, S, S), `batch_size` slices at a time."""
    for z0 in range(0, image.shape[0], batch_size):
        logits = module(image[z0:z0 + batch_size, None])
        _check_channels(logits, out.shape[0], where)
        out[:, z0:z0 + logits.shape[0]] = torch.softmax(logits.float(), dim=1).transpose(0, 1)
        tick()


def stacked_softmax(module: torch.nn.Module, image: torch.Tensor, stacks: ZStacks, batch_size: int, out: torch.Tensor,
                    wsum: torch.Tensor, where: Path | None = None, tick: Callable[[], None] = lambda: None) -> None:
    """Run `module` on every stack of `stacks` (`batch_size` stacks per forward pass) and add each stack's
    softmax, times its blending weights, to its slices: out (K, z, S, S) += p * w, wsum (z,) += w.
    Padded positions (weight 0) are skipped, so every slice is written once per stack (index_add_ over
    distinct indices: deterministic on CPU and CUDA)."""
    index = torch.from_numpy(stacks.index).to(image.device)
    weight = torch.from_numpy(stacks.weight).to(image.device)
    valid = [torch.from_numpy(np.flatnonzero(w > 0)).to(image.device) for w in stacks.weight]
    for i in range(0, len(stacks), batch_size):
        idx = index[i:i + batch_size]
        logits = module(image[idx][:, None])
        _check_channels(logits, out.shape[0], where)
        probs = torch.softmax(logits.float(), dim=1)
        for b in range(idx.shape[0]):
            pos = valid[i + b]
            w = weight[i + b, pos]
            out.index_add_(1, idx[b, pos], probs[b][:, pos] * w[None, :, None, None])
            wsum.index_add_(0, idx[b, pos], w)
        tick()


def _foreground_slices(probs: torch.Tensor) -> np.ndarray:
    """Slices (ascending) where the argmax of (K, z, S, S) probabilities is not background somewhere."""
    return np.flatnonzero((argmax_uint8(probs) != 0).flatten(1).any(dim=1).cpu().numpy())


def first_pass_stacks(z: int, window: int, z_context: ZContext, overlap: float, blend: Blend) -> ZStacks:
    """Stacks of the first (or only) pass: contiguous windows, or strided ones at training's mean gap over all
    z slices (what training shows a volume without foreground)."""
    stride = 1 if z_context == "contiguous" else inference_stride(z, window)
    return z_stacks(z, window, stride, overlap, blend)


def softmax_3d(module: torch.nn.Module, image: torch.Tensor, window: int, out: torch.Tensor, *,
               z_context: ZContext = "sampled", draws: int = 4, seed: int = 0, overlap: float = 0.5,
               blend: Blend = "gaussian", batch_size: int = 2, where: Path | None = None,
               tick: Callable[[], None] = lambda: None) -> None:
    """A 3D model's softmax (K, z, S, S) into `out` for the network input image (z, S, S), with the z-context of
    `z_context` (`ctseg.config.PredictConfig`; stacks from `ctseg.preprocess.zstacks`):

    - contiguous: sliding windows of `window` adjacent slices, `overlap`, `blend` weights;
    - strided / sampled: a first pass of interleaved stacks at training's mean gap over all z slices finds the
      foreground slices F (argmax not background); none: that pass is the answer (training draws a volume
      without foreground from all its slices). Else a second pass: strided, interleaved stacks over all
      slices at training's mean gap for F slices (`inference_stride`), replacing the first pass; sampled,
      `draws` random partitions of F into stacks drawn as training draws them (`sampled_stacks`, generator
      seeded by `seed`), averaged, replacing the first pass on the slices they cover (the others keep the
      first pass's background).
    """
    z = image.shape[0]
    if z_context not in ("sampled", "strided", "contiguous"):
        raise ValueError(f"z_context must be 'sampled', 'strided' or 'contiguous', got {z_context!r}")
    wsum = torch.zeros(z, dtype=torch.float32, device=out.device)
    out.zero_()
    first = first_pass_stacks(z, window, z_context, overlap, blend)
    stacked_softmax(module, image, first, batch_size, out, wsum, where, tick)
    out /= wsum[None, :, None, None]
    if z_context == "contiguous" or z < window:
        return
    fg = _foreground_slices(out)
    if fg.size == 0:
        return
    if z_context == "strided":
        second = z_stacks(z, window, inference_stride(z, window, fg.size), overlap, blend)
    else:
        second = sampled_stacks(fg, z, window, draws, np.random.default_rng(seed))
    covered = torch.from_numpy(np.flatnonzero(second.coverage() > 0)).to(out.device)
    out.index_fill_(1, covered, 0.0)
    wsum.zero_()
    stacked_softmax(module, image, second, batch_size, out, wsum, where, tick)
    out[:, covered] /= wsum[covered][None, :, None, None]


def argmax_uint8(probs: torch.Tensor) -> torch.Tensor:
    """argmax over dim 0 of (C, ...) as uint8 (ties -> lower class); ~6x faster than `argmax(0)` on CPU."""
    best = probs[0].clone()
    label = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for c in range(1, probs.shape[0]):
        label.masked_fill_(probs[c] > best, c)
        torch.maximum(best, probs[c], out=best)
    return label
