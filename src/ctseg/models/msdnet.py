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
(default for 2D on CPU, where conv3d is slow and strided inputs are cheap, and for 3D on CUDA, where
the paper's batch is 1) uses (B, C, *S) and native conv2d / conv3d. Layout ``slice_major`` (default
for 3D on CPU) keeps the buffer as (Z, B, C, Y, X) and runs each dilated 3x3x3 layer as three dilated
3x3 conv2d (one per z tap, slices folded into the batch, each tap on the slices shifted by
(kz - 1) * d): PyTorch's CPU conv3d takes the im2col path (slow_conv_dilated3d) for a batch-1 input
with few channels, the folded conv2d takes oneDNN; the input gradient is a forward conv2d with the
flipped kernel. A depth-12 3D training step at 1x1x16x64x64 is ~4-5x faster (BENCHMARKS.md).
Under ``torch.autocast`` the block runs in the autocast dtype with normalisation statistics and the
gradient buffer in float32.

Parameter count at depth 100, width 1, one input and one output channel: the reference
(msd_pytorch) has 45,652 (2D) / 136,552 (3D): conv weights + a bias per layer + final 1x1 conv.
Here the per-layer conv bias (a no-op before instance norm) is dropped and the norm adds an affine
gamma and beta per channel: 45,752 (2D) / 136,652 (3D).
"""
from __future__ import annotations

from typing import Any, Literal, cast, overload

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ctseg.config import ModelConfig, Section
from ctseg.errors import CtsegError
from ctseg.registry import NETWORKS, MemoryEstimate, NetworkEntry

NEG_SLOPE = 0.01
NORM_EPS = 1e-5

Implementation = Literal["efficient", "naive"]
Layout = Literal["auto", "sample_major", "channel_major", "slice_major"]


class MSDConfig(Section):
    """`model.msd`: the MS-D Net's depth (layers), width (channels per layer) and dilations (1..max_dilation)."""
    depth: int = Field(100, ge=1)
    width: int = Field(1, ge=1)
    max_dilation: int = Field(10, ge=1)
    implementation: Implementation = "efficient"


def dilation_schedule(depth: int, max_dilation: int = 10) -> list[int]:
    """Dilation of each layer: 1, 2, ..., max_dilation, 1, 2, ... (length `depth`)."""
    return [1 + i % max_dilation for i in range(depth)]


class _BlockGeometry:
    """How the efficient block lays out its buffers and calls the convolutions.

    layout 'sample_major': buffers (B, C, *S), native conv2d/conv3d on channel-prefix slices
    (contiguous only for B == 1; fastest on CPU for 2D). layout 'channel_major' (2D only): buffers seen
    as (1, C, B, Y, X), every layer a 1x3x3 conv3d on a contiguous channel prefix (no copies in cuDNN).
    layout 'slice_major' (3D only): buffers (Z, B, C, Y, X); a dilated 3x3x3 layer is the sum of three
    dilated 3x3 conv2d over the slices folded into the batch ((Z - |s|) * B, c, Y, X), tap kz reading
    the slices shifted by s = (kz - 1) * d (slices shifted out of the volume are the zero padding).
    On CPU, PyTorch runs a batch-1 dilated conv3d with few channels through slow_conv_dilated3d (im2col)
    forward and backward; the folded conv2d takes the oneDNN path.
    """

    def __init__(self, ndim: int, layout: Literal["sample_major", "channel_major", "slice_major"]):
        if layout == "channel_major" and ndim != 2:
            raise ValueError("channel_major layout is 2D only")
        if layout == "slice_major" and ndim != 3:
            raise ValueError("slice_major layout is 3D only")
        self.ndim, self.layout = ndim, layout
        self.cm, self.sm = layout == "channel_major", layout == "slice_major"
        self.block_ndim = 5 if self.cm else ndim + 2
        self.cdim = 2 if self.sm else 1  # channel dim of the block layout
        self.norm_dims = (0, 3, 4) if self.sm else tuple(range(-ndim, 0))
        self.red_dims = tuple(i for i in range(self.block_ndim) if i != self.cdim)  # all but the channel dim
        self._conv = F.conv3d if self.block_ndim == 5 and not self.sm else F.conv2d

    def alloc(self, batch: int, channels: int, spatial: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Empty buffer in the block layout: (1, C, B, Y, X), (Z, B, C, Y, X) or (B, C, *S)."""
        if self.cm:
            shape = (1, channels, batch, *spatial)
        elif self.sm:
            shape = (spatial[0], batch, channels, *spatial[1:])
        else:
            shape = (batch, channels, *spatial)
        return like.new_empty(shape)

    def channels(self, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Channels [start, stop) of a block-layout tensor (a view)."""
        return t.narrow(self.cdim, start, stop - start)

    def stat_shape(self, width: int) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector of one layer over the block layout."""
        return tuple(width if i == self.cdim else 1 for i in range(self.block_ndim))

    def to_block(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> block layout (a view; may be non-contiguous)."""
        if self.cm:
            return x.transpose(0, 1).unsqueeze(0)
        return x.permute(2, 0, 1, 3, 4) if self.sm else x

    def from_block(self, y: torch.Tensor) -> torch.Tensor:
        """Block layout -> (B, C, *S) (a view)."""
        if self.cm:
            return y.squeeze(0).transpose(0, 1)
        return y.permute(1, 2, 0, 3, 4) if self.sm else y

    def _taps(self, z: int, d: int) -> list[tuple[int, slice, slice]]:
        """slice_major: (kz, output slices, input slices) of the z taps of a dilation-d layer."""
        taps = [(1, slice(0, z), slice(0, z))]
        if d < z:
            taps += [(2, slice(0, z - d), slice(d, z)), (0, slice(d, z), slice(0, z - d))]
        return taps

    def conv(self, inp: torch.Tensor, w: torch.Tensor, d: int) -> torch.Tensor:
        """'Same' dilated 3x3(x3) conv of a block-layout input with weight (O, I, *k); no bias."""
        if not self.sm:
            if self.cm:
                return self._conv(inp, w.unsqueeze(2), None, 1, [0, d, d], [1, d, d])
            return self._conv(inp, w, None, 1, d, d)
        (kz, _, i), *others = self._taps(inp.shape[0], d)  # the first tap covers every output slice

        def tap(kz: int, i: slice) -> torch.Tensor:
            return F.conv2d(inp[i].flatten(0, 1), w[:, :, kz], None, 1, d, d).unflatten(0, (-1, inp.shape[1]))

        out = tap(kz, i)
        for kz, o, i in others:
            out[o] += tap(kz, i)
        return out

    def conv_backward(self, gz: torch.Tensor, inp: torch.Tensor, w: torch.Tensor, d: int,
                      gin: torch.Tensor, need_w: bool) -> torch.Tensor | None:
        """Backward of :meth:`conv`: adds the input gradient into `gin` (shape of `inp`); returns the
        weight gradient (shape of `w`) if `need_w`, else None."""
        cb = torch.ops.aten.convolution_backward
        if not self.sm:
            wb = w.unsqueeze(2) if self.cm else w
            pad, dil = ([0, d, d], [1, d, d]) if self.cm else ([d] * self.ndim, [d] * self.ndim)
            nd = self.block_ndim - 2
            g_in, g_w, _ = cb(gz, inp, wb, None, [1] * nd, pad, dil, False, [0] * nd, 1, [True, need_w, False])
            gin += g_in
            return g_w.view_as(w) if need_w else None
        # input gradient of a stride-1 'same' conv = 'same' conv with the flipped, transposed kernel: a forward
        # conv2d is ~10x faster on CPU than convolution_backward's input gradient at these channel counts
        g_w = torch.zeros_like(w) if need_w else None
        batch = inp.shape[1]
        for kz, o, i in self._taps(inp.shape[0], d):
            g_o = gz[o].flatten(0, 1)
            w_t = w[:, :, kz].flip(2, 3).transpose(0, 1)
            gin[i] += F.conv2d(g_o, w_t, None, 1, d, d).unflatten(0, (-1, batch))
            if g_w is not None:  # need_w
                g_w[:, :, kz] = cb(g_o, inp[i].flatten(0, 1), w[:, :, kz], None, [1, 1], [d, d], [d, d], False,
                                   [0, 0], 1, [False, True, False])[1]
        return g_w

    def final(self, buf: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """1x1(x1) conv with bias (O, C, *1), (O,) of the whole buffer, in block layout."""
        if self.sm:
            return F.conv2d(buf.flatten(0, 1), w.flatten(2, 3), b).unflatten(0, buf.shape[:2])
        return self._conv(buf, w.unsqueeze(2) if self.cm else w, b)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@overload
def _block_forward(geo: _BlockGeometry, x: torch.Tensor, weights: list[torch.Tensor], gamma: torch.Tensor,
                   beta: torch.Tensor, dilations: list[int], store_xhat: Literal[True]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]: ...


@overload
def _block_forward(geo: _BlockGeometry, x: torch.Tensor, weights: list[torch.Tensor], gamma: torch.Tensor,
                   beta: torch.Tensor, dilations: list[int], store_xhat: Literal[False]
                   ) -> tuple[torch.Tensor, None, None]: ...


def _block_forward(geo: _BlockGeometry, x: torch.Tensor, weights: list[torch.Tensor], gamma: torch.Tensor,
                   beta: torch.Tensor, dilations: list[int], store_xhat: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
    """Run all layers into one buffer. x: (B, C0, *S) in the compute dtype.

    Returns (activation buffer with C0 + depth*width channels in block layout, x_hat buffer with
    depth*width channels or None, per-layer rstd (float32+, shape of one layer's stats) or None).
    """
    batch, c0, *spatial = x.shape
    width, depth = weights[0].shape[0], len(weights)
    sdt = _stat_dtype(x.dtype)
    buf = geo.alloc(batch, c0 + depth * width, tuple(spatial), x)
    geo.channels(buf, 0, c0).copy_(geo.to_block(x))
    xbuf = geo.alloc(batch, depth * width, tuple(spatial), x) if store_xhat else None
    rstds: list[torch.Tensor] = []
    bshape = geo.stat_shape(width)
    for i, (w, d) in enumerate(zip(weights, dilations)):
        c_in, sl = c0 + i * width, slice(i * width, (i + 1) * width)
        z = geo.conv(geo.channels(buf, 0, c_in), w, d).to(sdt)
        var, mean = torch.var_mean(z, dim=geo.norm_dims, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + NORM_EPS)
        xh = (z - mean).mul_(rstd)
        if xbuf is not None:  # store_xhat
            geo.channels(xbuf, sl.start, sl.stop).copy_(xh)
            rstds.append(rstd)
        n = torch.addcmul(beta[sl].view(bshape), xh, gamma[sl].view(bshape))
        geo.channels(buf, c_in, c_in + width).copy_(F.leaky_relu(n, NEG_SLOPE))
    return buf, xbuf, (rstds if store_xhat else None)


class _MSDBlockFunction(torch.autograd.Function):
    """Whole MS-D block as one autograd node; see the module docstring for the scheme."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, geo: _BlockGeometry,
                dilations: list[int], *weights: torch.Tensor) -> torch.Tensor:
        buf, xbuf, rstds = _block_forward(geo, x, list(weights), gamma, beta, dilations, store_xhat=True)
        ctx.geo, ctx.dilations, ctx.c0 = geo, dilations, x.shape[1]
        ctx.save_for_backward(buf, xbuf, gamma, torch.stack(rstds), *weights)
        return buf

    @staticmethod
    def backward(ctx: Any, grad_buf: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        buf, xbuf, gamma, rstds, *weights = ctx.saved_tensors
        geo: _BlockGeometry = ctx.geo
        c0, width, dt = ctx.c0, weights[0].shape[0], buf.dtype
        sdt = _stat_dtype(dt)
        gbuf = grad_buf.to(sdt, copy=True, memory_format=torch.contiguous_format)
        need_w = any(ctx.needs_input_grad[5:])
        grad_w: list[torch.Tensor | None] = [None] * len(weights)
        grad_gamma = torch.empty(gamma.shape, dtype=sdt, device=gamma.device)
        grad_beta = torch.empty_like(grad_gamma)
        bshape = geo.stat_shape(width)
        for i in reversed(range(len(weights))):
            c_in, sl = c0 + i * width, slice(i * width, (i + 1) * width)
            ga = geo.channels(gbuf, c_in, c_in + width)
            gn = torch.where(geo.channels(buf, c_in, c_in + width) > 0, ga, ga * NEG_SLOPE)
            xh = geo.channels(xbuf, sl.start, sl.stop).to(sdt)
            grad_gamma[sl] = (gn * xh).sum(geo.red_dims)
            grad_beta[sl] = gn.sum(geo.red_dims)
            gx = gn * gamma[sl].to(sdt).view(bshape)
            gz = gx - gx.mean(geo.norm_dims, keepdim=True)
            gz = gz.sub_(xh * (gx * xh).mean(geo.norm_dims, keepdim=True)).mul_(rstds[i])
            grad_w[i] = geo.conv_backward(gz.to(dt), geo.channels(buf, 0, c_in), weights[i], ctx.dilations[i],
                                          geo.channels(gbuf, 0, c_in), need_w)
        grad_x = geo.from_block(geo.channels(gbuf, 0, c0)).to(dt) if ctx.needs_input_grad[0] else None
        return (grad_x, grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype), None, None, *grad_w)


class MSDNet(nn.Module):
    """MS-D Net: (B, C, [Z,] Y, X) -> logits (B, K, [Z,] Y, X).

    Args: in_channels, num_classes; depth (layers), width (channels per layer), max_dilation
    (dilations cycle 1..max_dilation), dim (2 or 3), implementation ('efficient' | 'naive'),
    layout of the efficient block ('auto': CPU 2D sample_major, 3D slice_major; CUDA 2D channel_major,
    3D sample_major). The attribute ``layout`` may be changed after construction.
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
            if device.type == "cpu":
                layout = "slice_major" if self.dim == 3 else "sample_major"
            else:
                layout = "channel_major" if self.dim == 2 else "sample_major"
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
            bias = cast(torch.Tensor, self.final.bias)  # `final` is built with a bias
            out = geo.final(buf, self.final.weight.to(dt), bias.to(dt))
        return geo.from_block(out).contiguous()


def _build(cfg: ModelConfig, dim: int, in_channels: int, num_classes: int) -> MSDNet:
    m = cfg.section("msd", MSDConfig)
    return MSDNet(in_channels, num_classes, depth=m.depth, width=m.width, max_dilation=m.max_dilation,
                  dim=dim, implementation=m.implementation)


def memory_estimate(model: ModelConfig, num_classes: int, in_channels: int = 1) -> MemoryEstimate:
    """Weights, and activations per input pixel: the input, every layer's output, its normalised and its
    activated copy (1 + 3 x depth x width values) plus the logits."""
    k = 27.0 if model.dim == "3d" else 9.0
    m = model.section("msd", MSDConfig)
    layers = sum(float(in_channels + i * m.width) for i in range(min(m.depth, 10)))  # exact start ...
    if m.depth > 10:  # ... then the closed form of sum_i (in + i w) for the remaining layers
        n0, n1 = 10.0, float(m.depth)
        layers += in_channels * (n1 - n0) + m.width * (n1 * (n1 - 1) - n0 * (n0 - 1)) / 2.0
    parameters = layers * m.width * k + (in_channels + float(m.depth) * m.width) * num_classes
    return MemoryEstimate(parameters, 1.0 + 3.0 * float(m.depth) * m.width + num_classes)


NETWORKS.register(NetworkEntry("msd", _build, memory_estimate, section=MSDConfig, display="MS-D Net"))
