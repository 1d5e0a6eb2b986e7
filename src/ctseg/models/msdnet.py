"""Mixed-scale dense network (MS-D Net; Pelt & Sethian, PNAS 2018) in 2D and 3D.

Layer i is a dilated 3x3 (3x3x3) convolution over the input and the outputs of all layers before it,
followed by instance norm (affine, eps 1e-5) and LeakyReLU(0.01); dilations cycle 1..max_dilation.
A final 1x1 (1x1x1) convolution maps input + all layer outputs to the class logits.

Two implementations of the same parameters (state dicts are interchangeable):

* ``naive``: one ``torch.cat`` per layer. Autograd keeps every concatenation alive for backward,
  about depth^2 / 2 feature maps (5,050 at depth 100). Reference for tests and benchmarks.
* ``efficient``: one preallocated buffer holds input + all layer outputs (O(depth) maps); a custom
  autograd Function (:class:`_MSDBlockFunction`) writes each layer's activation into its slice in
  forward and walks the layers in reverse in backward, accumulating input gradients into one
  gradient buffer with ``aten.convolution_backward``. Norm/activation scheme: forward also stores
  the normalised conv output x_hat = (z - mean) * rstd of every layer (one more map per layer) and
  the per-instance rstd; backward recomputes the LeakyReLU mask from the stored activation
  (same sign as its argument) and the instance-norm gradient from x_hat and rstd. No convolution
  is recomputed and nothing is divided by the norm's gamma. Peak memory is about
  3 x (in_channels + depth * width) maps (activations, x_hat, gradients) versus ~depth^2 / 2.

Memory layout: every convolution in the efficient block reads a channel prefix ``[0, c_i)`` of the
buffer. With the usual (B, C, *S) layout that prefix is contiguous only for batch 1, and PyTorch's
cuDNN path copies non-contiguous inputs. Layout ``channel_major`` (2D, default on CUDA) keeps the
buffer as (C, B, Y, X), seen as one 5-D sample (1, C, B, Y, X), and runs each 3x3 layer as a 1x3x3
conv3d that never mixes batch entries, so every prefix is contiguous. Layout ``sample_major``
(default on CPU, where conv3d is slow and strided inputs are cheap, and for 3D, where the paper's
batch is 1) uses (B, C, *S) and native conv2d / conv3d. Under ``torch.autocast`` the block runs in
the autocast dtype with normalisation statistics and the gradient buffer in float32.

Parameter count at depth 100, width 1, one input and one output channel: the reference
(msd_pytorch) has 45,652 (2D) / 136,552 (3D): conv weights + a bias per layer + final 1x1 conv.
Here the per-layer conv bias (a no-op before instance norm) is dropped and the norm adds an affine
gamma and beta per channel: 45,752 (2D) / 136,652 (3D).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import CtsegError

NEG_SLOPE = 0.01
NORM_EPS = 1e-5

Implementation = Literal["efficient", "naive"]
Layout = Literal["auto", "sample_major", "channel_major"]


def dilation_schedule(depth: int, max_dilation: int = 10) -> list[int]:
    """Dilation of each layer: 1, 2, ..., max_dilation, 1, 2, ... (length `depth`)."""
    return [1 + i % max_dilation for i in range(depth)]


class _BlockGeometry:
    """How the efficient block lays out its buffers and calls the convolutions.

    layout 'sample_major': buffers (B, C, *S), native conv2d/conv3d on channel-prefix slices
    (contiguous only for B == 1; fastest on CPU). layout 'channel_major' (2D only): buffers seen as
    (1, C, B, Y, X), every layer a 1x3x3 conv3d on a contiguous channel prefix (no copies in cuDNN).
    """

    def __init__(self, ndim: int, layout: Literal["sample_major", "channel_major"]):
        if layout == "channel_major" and ndim != 2:
            raise ValueError("channel_major layout is 2D only")
        self.ndim, self.layout = ndim, layout
        self.cm = layout == "channel_major"
        self.block_ndim = 5 if self.cm else ndim + 2
        self.norm_dims = tuple(range(-ndim, 0))
        self.red_dims = (0,) + tuple(range(2, self.block_ndim))  # all but the channel dim
        self.conv = F.conv3d if self.block_ndim == 5 else F.conv2d

    def alloc(self, batch: int, channels: int, spatial: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Empty buffer in the block layout: (1, C, B, Y, X) or (B, C, *S)."""
        shape = (1, channels, batch, *spatial) if self.cm else (batch, channels, *spatial)
        return like.new_empty(shape)

    def to_block(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> block layout (a view; may be non-contiguous)."""
        return x.transpose(0, 1).unsqueeze(0) if self.cm else x

    def from_block(self, y: torch.Tensor) -> torch.Tensor:
        """Block layout -> (B, C, *S) (a view)."""
        return y.squeeze(0).transpose(0, 1) if self.cm else y

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """Conv weight (O, I, *k) -> the weight of the block's conv call."""
        return w.unsqueeze(2) if self.cm else w

    def conv_args(self, dilation: int) -> tuple[list[int], list[int]]:
        """(padding, dilation) of a 'same' dilated 3x3(x3) layer."""
        if self.cm:
            return [0, dilation, dilation], [1, dilation, dilation]
        return [dilation] * self.ndim, [dilation] * self.ndim


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _block_forward(geo: _BlockGeometry, x: torch.Tensor, weights: list[torch.Tensor], gamma: torch.Tensor,
                   beta: torch.Tensor, dilations: list[int], store_xhat: bool):
    """Run all layers into one buffer. x: (B, C0, *S) in the compute dtype.

    Returns (activation buffer with C0 + depth*width channels in block layout, x_hat buffer with
    depth*width channels or None, per-layer rstd (float32+, shape of one layer's stats) or None).
    """
    batch, c0, *spatial = x.shape
    width, depth = weights[0].shape[0], len(weights)
    sdt = _stat_dtype(x.dtype)
    buf = geo.alloc(batch, c0 + depth * width, tuple(spatial), x)
    buf[:, :c0].copy_(geo.to_block(x))
    xbuf = geo.alloc(batch, depth * width, tuple(spatial), x) if store_xhat else None
    rstds: list[torch.Tensor] = []
    bshape = (1, width) + (1,) * (geo.block_ndim - 2)
    for i, (w, d) in enumerate(zip(weights, dilations)):
        c_in, sl = c0 + i * width, slice(i * width, (i + 1) * width)
        pad, dil = geo.conv_args(d)
        z = geo.conv(buf[:, :c_in], geo.weight(w), None, 1, pad, dil).to(sdt)
        var, mean = torch.var_mean(z, dim=geo.norm_dims, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + NORM_EPS)
        xh = (z - mean).mul_(rstd)
        if store_xhat:
            xbuf[:, sl].copy_(xh)
            rstds.append(rstd)
        n = torch.addcmul(beta[sl].view(bshape), xh, gamma[sl].view(bshape))
        buf[:, c_in:c_in + width].copy_(F.leaky_relu(n, NEG_SLOPE))
    return buf, xbuf, (rstds if store_xhat else None)


class _MSDBlockFunction(torch.autograd.Function):
    """Whole MS-D block as one autograd node; see the module docstring for the scheme."""

    @staticmethod
    def forward(ctx, x, gamma, beta, geo, dilations, *weights):
        buf, xbuf, rstds = _block_forward(geo, x, list(weights), gamma, beta, dilations, store_xhat=True)
        ctx.geo, ctx.dilations, ctx.c0 = geo, dilations, x.shape[1]
        ctx.save_for_backward(buf, xbuf, gamma, torch.stack(rstds), *weights)
        return buf

    @staticmethod
    def backward(ctx, grad_buf):
        buf, xbuf, gamma, rstds, *weights = ctx.saved_tensors
        geo: _BlockGeometry = ctx.geo
        c0, width, dt = ctx.c0, weights[0].shape[0], buf.dtype
        sdt = _stat_dtype(dt)
        gbuf = grad_buf.to(sdt, copy=True, memory_format=torch.contiguous_format)
        need_w = any(ctx.needs_input_grad[5:])
        grad_w: list[torch.Tensor | None] = [None] * len(weights)
        grad_gamma = torch.empty(gamma.shape, dtype=sdt, device=gamma.device)
        grad_beta = torch.empty_like(grad_gamma)
        bshape = (1, width) + (1,) * (geo.block_ndim - 2)
        nd = geo.block_ndim
        stride, out_pad = [1] * (nd - 2), [0] * (nd - 2)
        for i in reversed(range(len(weights))):
            c_in, sl = c0 + i * width, slice(i * width, (i + 1) * width)
            pad, dil = geo.conv_args(ctx.dilations[i])
            ga = gbuf[:, c_in:c_in + width]
            gn = torch.where(buf[:, c_in:c_in + width] > 0, ga, ga * NEG_SLOPE)
            xh = xbuf[:, sl].to(sdt)
            grad_gamma[sl] = (gn * xh).sum(geo.red_dims)
            grad_beta[sl] = gn.sum(geo.red_dims)
            gx = gn * gamma[sl].to(sdt).view(bshape)
            gz = gx - gx.mean(geo.norm_dims, keepdim=True)
            gz = gz.sub_(xh * (gx * xh).mean(geo.norm_dims, keepdim=True)).mul_(rstds[i])
            gin, gw, _ = torch.ops.aten.convolution_backward(
                gz.to(dt), buf[:, :c_in], geo.weight(weights[i]), None, stride, pad, dil, False, out_pad, 1,
                [True, need_w, False])
            gbuf[:, :c_in] += gin
            if need_w:
                grad_w[i] = gw.view_as(weights[i])
        grad_x = geo.from_block(gbuf[:, :c0]).to(dt) if ctx.needs_input_grad[0] else None
        return (grad_x, grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype), None, None, *grad_w)


class MSDNet(nn.Module):
    """MS-D Net: (B, C, [Z,] Y, X) -> logits (B, K, [Z,] Y, X).

    Args: in_channels, num_classes; depth (layers), width (channels per layer), max_dilation
    (dilations cycle 1..max_dilation), dim (2 or 3), implementation ('efficient' | 'naive'),
    layout of the efficient block ('auto': channel_major for 2D on CUDA, else sample_major).
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int = 100, width: int = 1,
                 max_dilation: int = 10, dim: int = 2, implementation: Implementation = "efficient",
                 layout: Layout = "auto"):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if implementation not in ("efficient", "naive"):
            raise ValueError(f"implementation must be 'efficient' or 'naive', got {implementation!r}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.depth, self.width, self.dim = depth, width, dim
        self.implementation = implementation
        self.dilations = dilation_schedule(depth, max_dilation)
        k = (3,) * dim
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(width, in_channels + i * width, *k)) for i in range(depth))
        self.norm_weight = nn.Parameter(torch.ones(depth * width))
        self.norm_bias = nn.Parameter(torch.zeros(depth * width))
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.final = conv(in_channels + depth * width, num_classes, kernel_size=1)
        self.layout = layout
        for w in self.weights:
            nn.init.kaiming_normal_(w, a=NEG_SLOPE)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, depth={self.depth}, "
                f"width={self.width}, dim={self.dim}, dilations=1..{max(self.dilations)}, "
                f"implementation={self.implementation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dim + 2 or x.shape[1] != self.in_channels:
            raise CtsegError(f"expected input (B, {self.in_channels}, {'Z, ' if self.dim == 3 else ''}Y, X), "
                             f"got {tuple(x.shape)}")
        if self.implementation == "naive":
            return self._forward_naive(x)
        return self._forward_efficient(x)

    def _forward_naive(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.dim == 2 else F.conv3d
        feats = [x]
        w_ = self.width
        for i, (w, d) in enumerate(zip(self.weights, self.dilations)):
            z = conv(torch.cat(feats, 1), w, None, 1, d, d)
            z = F.instance_norm(z, weight=self.norm_weight[i * w_:(i + 1) * w_],
                                bias=self.norm_bias[i * w_:(i + 1) * w_], eps=NORM_EPS)
            feats.append(F.leaky_relu(z, NEG_SLOPE))
        return self.final(torch.cat(feats, 1))

    def _geometry(self, device: torch.device) -> _BlockGeometry:
        layout = self.layout
        if layout == "auto":
            layout = "channel_major" if self.dim == 2 and device.type == "cuda" else "sample_major"
        return _BlockGeometry(self.dim, layout)

    def _forward_efficient(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        weights = [w.to(dt) for w in self.weights]
        geo = self._geometry(x.device)
        with torch.autocast(dev, enabled=False):
            xc = x.to(dt)
            needs_grad = torch.is_grad_enabled() and (
                xc.requires_grad or any(p.requires_grad for p in self.parameters()))
            if needs_grad:
                buf = _MSDBlockFunction.apply(xc, self.norm_weight, self.norm_bias, geo, self.dilations,
                                              *weights)
            else:
                buf, _, _ = _block_forward(geo, xc, weights, self.norm_weight, self.norm_bias,
                                           self.dilations, store_xhat=False)
            out = geo.conv(buf, geo.weight(self.final.weight.to(dt)), self.final.bias.to(dt))
        return geo.from_block(out).contiguous()
