import pytest
import torch
from torch import nn

from ctseg.config import ModelConfig
from ctseg.errors import CtsegError
from ctseg.models import MSDNet, UNet, build_model, model_names
from ctseg.models.msdnet import dilation_schedule
from ctseg.models.unet import stage_strides
from ctseg.resources import saved_activation_bytes
from ctseg.train.losses import TanimotoCELoss

TINY_UNET = {"n_stages": 3, "base_features": 4, "max_features": 16}
TINY_MSD = {"depth": 6, "width": 1}


def _cfg(arch, dim, **over):
    return ModelConfig(arch=arch, dim=dim, unet=TINY_UNET, msd={**TINY_MSD, **over})


@pytest.mark.parametrize("arch,dim,shape", [
    ("unet", "2d", (2, 1, 32, 32)), ("unet", "3d", (1, 1, 16, 32, 32)),
    ("msd", "2d", (2, 1, 24, 20)), ("msd", "3d", (1, 1, 16, 20, 24)),
])
@pytest.mark.parametrize("in_ch,classes", [(1, 3), (2, 2)])
def test_build_model_shapes(arch, dim, shape, in_ch, classes):
    model = build_model(_cfg(arch, dim), in_channels=in_ch, num_classes=classes)
    x = torch.randn(shape[0], in_ch, *shape[2:])
    y = model(x)
    assert y.shape == (shape[0], classes, *shape[2:])
    assert y.is_contiguous() and torch.isfinite(y).all()


def test_unknown_model_lists_valid_names():
    cfg = ModelConfig.model_construct(arch="resnet", dim="2d")
    with pytest.raises(CtsegError, match="msd-2d, msd-3d, unet-2d, unet-3d"):
        build_model(cfg, 1, 2)
    assert model_names() == ["msd-2d", "msd-3d", "unet-2d", "unet-3d"]
    with pytest.raises(CtsegError, match="num_classes"):
        build_model(ModelConfig(), 1, 1)


def test_unet_topology_follows_nnunet():
    assert stage_strides(6, 3, 2) == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert stage_strides(3, 2, 0) == [(1, 1), (2, 2), (2, 2)]
    # full-size default 2D U-Net: the anchor's PlainConvUNet (20.6 M parameters)
    full = build_model(ModelConfig(arch="unet", dim="2d"), 1, 3)
    assert round(sum(p.numel() for p in full.parameters()) / 1e5) == 206
    unet3d = build_model(ModelConfig(arch="unet", dim="3d"), 1, 2)
    assert unet3d.divisor == (4, 32, 32)
    convs = [m for m in unet3d.modules() if isinstance(m, nn.Conv3d)]
    assert max(c.out_channels for c in convs) == 320  # nnU-Net's 3D cap
    norms = [m for m in unet3d.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(n.affine and n.eps == 1e-5 for n in norms)
    acts = [m for m in unet3d.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.01 for a in acts)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in unet3d.modules())


def test_unet_rejects_bad_z_pooling_and_sizes():
    with pytest.raises(CtsegError, match="z_pool_stages"):
        UNet(1, 2, dim=3, n_stages=3, base_features=4, z_pool_stages=3)
    net = UNet(1, 2, dim=3, n_stages=3, base_features=4, max_features=8, z_pool_stages=1)
    assert net.divisor == (2, 4, 4)
    assert net(torch.randn(1, 1, 6, 8, 8)).shape == (1, 2, 6, 8, 8)
    with pytest.raises(CtsegError, match="divisible"):
        net(torch.randn(1, 1, 5, 8, 8))
    with pytest.raises(CtsegError, match="expected input"):
        net(torch.randn(1, 2, 6, 8, 8))


@pytest.mark.parametrize("dim", [2, 3])
def test_msd_structure_dense_and_dilated(dim):
    depth, width, cin = 23, 2, 3
    net = MSDNet(cin, 4, depth=depth, width=width, dim=dim)
    assert net.dilations == dilation_schedule(depth, 10) == [1 + i % 10 for i in range(depth)]
    assert net.dilations[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    for i, w in enumerate(net.weights):
        assert tuple(w.shape) == (width, cin + i * width, *(3,) * dim)
    assert net.final.in_channels == cin + depth * width and net.final.kernel_size == (1,) * dim
    assert net.norm_weight.shape == net.norm_bias.shape == (depth * width,)


@pytest.mark.parametrize("dim,reference", [(2, 45_652), (3, 136_552)])
def test_msd_parameter_count_matches_reference(dim, reference):
    net = MSDNet(1, 1, depth=100, width=1, dim=dim)
    ours = sum(p.numel() for p in net.parameters())
    # reference: conv weights + one bias per layer + final 1x1; ours: no conv bias, norm gamma + beta
    assert ours == reference - 100 + 200


def _grads(net, x, impl, layout="auto"):
    net.implementation, net.layout = impl, layout
    net.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = net(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * w).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("dim,shape,layout,dtype,atol", [
    (2, (3, 2, 17, 14), "sample_major", torch.float64, 1e-10),
    (2, (3, 2, 17, 14), "channel_major", torch.float64, 1e-10),
    (3, (2, 2, 7, 9, 8), "sample_major", torch.float64, 1e-10),
    (2, (2, 2, 16, 16), "sample_major", torch.float32, 1e-4),
    (3, (1, 2, 6, 8, 8), "sample_major", torch.float32, 1e-4),
    (3, (2, 2, 7, 9, 8), "slice_major", torch.float64, 1e-10),  # dilations 7..10 >= Z: z taps skipped
    (3, (1, 2, 6, 8, 8), "slice_major", torch.float32, 1e-4),
])
def test_efficient_msd_equals_naive(dim, shape, layout, dtype, atol):
    torch.manual_seed(0)
    net = MSDNet(2, 3, depth=12, width=2, dim=dim).to(dtype)
    with torch.no_grad():  # non-trivial norm parameters so their gradients are tested too
        net.norm_weight.uniform_(0.5, 1.5)
        net.norm_bias.uniform_(-0.3, 0.3)
    x = torch.randn(*shape, dtype=dtype)
    y0, gx0, gp0 = _grads(net, x, "naive")
    y1, gx1, gp1 = _grads(net, x, "efficient", layout)
    torch.testing.assert_close(y1, y0, atol=atol, rtol=0)
    torch.testing.assert_close(gx1, gx0, atol=atol, rtol=0)
    for name, a, b in zip([n for n, _ in net.named_parameters()], gp1, gp0):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=1e-6, msg=name)
    with torch.no_grad():  # inference path (no x_hat buffer) gives the same output
        net.implementation = "efficient"
        torch.testing.assert_close(net(x), y0, atol=atol, rtol=0)


def test_msd_layout_auto_and_invalid():
    net3, net2 = MSDNet(1, 2, depth=3, dim=3), MSDNet(1, 2, depth=3, dim=2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert net3._geometry(cpu).layout == "slice_major"  # CPU: dilated conv3d is slow, fold z into conv2d
    assert net3._geometry(cuda).layout == "sample_major"  # cuDNN conv3d unchanged
    assert net2._geometry(cpu).layout == "sample_major" and net2._geometry(cuda).layout == "channel_major"
    net2.layout = "slice_major"
    with pytest.raises(ValueError, match="3D only"):
        net2(torch.randn(1, 1, 8, 8))


def test_slice_major_conv_equals_conv3d():
    # one layer in isolation, Z = 5 with dilations below, at and above Z (taps shifted out of the volume)
    from ctseg.models.msdnet import _BlockGeometry
    geo = _BlockGeometry(3, "slice_major")
    x = torch.randn(2, 3, 5, 7, 6, dtype=torch.float64)
    w = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64)
    gz = torch.randn(2, 2, 5, 7, 6, dtype=torch.float64)
    for d in (1, 2, 4, 5, 7):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = torch.nn.functional.conv3d(xr, wr, None, 1, d, d)
        ref.backward(gz)
        xb = geo.to_block(x).contiguous()
        out = geo.from_block(geo.conv(xb, w, d))
        torch.testing.assert_close(out, ref.detach(), atol=1e-12, rtol=0)
        gin = torch.zeros_like(xb)
        gw = geo.conv_backward(geo.to_block(gz).contiguous(), xb, w, d, gin, need_w=True)
        torch.testing.assert_close(geo.from_block(gin), xr.grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(gw, wr.grad, atol=1e-11, rtol=0)
        assert geo.conv_backward(geo.to_block(gz).contiguous(), xb, w, d, gin, need_w=False) is None


@pytest.mark.parametrize("dim,shape", [(2, (2, 1, 16, 16)), (3, (1, 1, 6, 16, 16))])
def test_efficient_msd_under_cpu_autocast(dim, shape):
    torch.manual_seed(0)
    net = MSDNet(1, 2, depth=8, dim=dim)
    x = torch.randn(*shape)
    ref = net(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        loss = TanimotoCELoss()(y, (x[:, 0] > 0).long())
    loss.backward()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in net.parameters())


@pytest.mark.parametrize("dim,shape", [(2, (2, 1, 32, 32)), (3, (1, 1, 8, 16, 16))])
def test_msd_saved_memory_linear_vs_quadratic(dim, shape):
    x = torch.randn(*shape)
    saved = {}
    for impl in ("naive", "efficient"):
        for depth in (10, 40):
            net = MSDNet(1, 2, depth=depth, dim=dim, implementation=impl)
            saved[impl, depth] = saved_activation_bytes(net, x)
    naive_growth = saved["naive", 40] / saved["naive", 10]
    eff_growth = saved["efficient", 40] / saved["efficient", 10]
    assert naive_growth > 8, naive_growth  # ~ (40/10)^2 for the concatenations
    assert eff_growth < 4.5, eff_growth  # ~ 40/10
    assert saved["efficient", 40] * 4 < saved["naive", 40]


@pytest.mark.parametrize("arch,dim,shape", [
    ("unet", "2d", (4, 1, 16, 16)), ("msd", "2d", (4, 1, 16, 16)), ("msd", "3d", (1, 1, 8, 16, 16)),
])
def test_few_adam_steps_fit_a_batch(arch, dim, shape):
    torch.manual_seed(0)
    model = build_model(_cfg(arch, dim), 1, 2)
    x = torch.randn(*shape)
    target = (x[:, 0] > 0.3).long()
    loss_fn = TanimotoCELoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
