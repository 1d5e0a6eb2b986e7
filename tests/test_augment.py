"""CTIA transforms against hand-computed results, samplers, reproducibility, and the shared augmenter contract."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctseg.augment import (CTIAConfig, CTIAugmenter, MIAConfig, NNUNetAugConfig, NNUNetAugmenter, NoAugment,
                           PaperMIAugmenter, build_augmenter)
from ctseg.augment.ctia import (
    add_noise,
    cwvrs_map,
    kmeans_knots,
    preset_knots,
    random_window,
    resample_z,
    rotate_inplane,
    sample_cwvrs,
    sample_noise_sigma,
    sample_rotation,
    sample_z_resampling,
)
from ctseg.config import AugmentConfig, parse_config
from ctseg.errors import CtsegError


class Plan:
    """Stand-in with the four attributes the augmenters read from `IntensityPlan`."""

    lower, upper, mean, std = -160.0, 240.0, 40.0, 100.0


FORCED = CTIAConfig(p_batch_2d=1, p_batch_3d=1, noise_p=1, cwvrs_p=1, rotation_p=1, random_window_p=1,
                    slice_skip_p=0.5, slice_interp_p=0.5, z_mode="stack")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _phantom(b=2, z=6, size=32, seed=0):
    """Blocky CT-like batch: air, fat, soft tissue, an enhanced 'organ' (label 1) with a 'tumour' (label 2)."""
    g = torch.Generator().manual_seed(seed)
    hu = torch.full((b, 1, z, size, size), -1000.0)
    hu[..., 4:-4, 4:-4] = -100.0
    hu[..., 8:-8, 8:-8] = 40.0
    hu[..., 12:20, 10:22] = 200.0
    hu[..., ::2, 14:17, 12:16] = 90.0
    hu += torch.randn(hu.shape, generator=g) * 10
    label = torch.zeros(hu.shape, dtype=torch.int64)
    label[..., 12:20, 10:22] = 1
    label[..., ::2, 14:17, 12:16] = 2  # tumour on every other slice: z transforms visibly move labels
    p = Plan()
    image = (hu.clamp(p.lower, p.upper) - p.mean) / p.std
    return image.float(), label


# ----------------------------------------------------------------------------------------------- rotation
def test_rotation_by_90_degrees_equals_rot90():
    image = torch.randn(3, 2, 8, 8, generator=_gen())
    label = torch.randint(0, 3, (3, 2, 8, 8), generator=_gen(1))
    angles = torch.full((3,), math.pi / 2)
    out, out_lab = rotate_inplane(image, label, angles, torch.zeros(3))
    torch.testing.assert_close(out, torch.rot90(image, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert torch.equal(out_lab, torch.rot90(label, 1, dims=(-2, -1)))
    back, back_lab = rotate_inplane(out, out_lab, -angles, torch.zeros(3))
    torch.testing.assert_close(back, image, atol=1e-5, rtol=0)
    assert torch.equal(back_lab, label)


def test_rotation_fills_outside_with_fill_value_and_label_zero():
    image = torch.zeros(1, 1, 16, 16)
    label = torch.ones(1, 1, 16, 16, dtype=torch.int64)
    out, out_lab = rotate_inplane(image, label, torch.tensor([math.pi / 4]), torch.tensor([-2.5]))
    assert out[0, 0, 0, 0].item() == pytest.approx(-2.5)  # corner lies outside after 45 degrees
    assert out_lab[0, 0, 0, 0].item() == 0
    assert out[0, 0, 8, 8].item() == pytest.approx(0.0, abs=1e-6)  # centre stays inside
    assert out_lab[0, 0, 8, 8].item() == 1


def test_rotation_of_non_square_image_keeps_pixel_geometry():
    # a horizontal bar through the centre of a 16 x 32 image becomes a vertical bar under 90 degrees
    image = torch.zeros(1, 1, 16, 32)
    image[..., 7:9, 10:22] = 1.0
    out, _ = rotate_inplane(image, torch.zeros_like(image, dtype=torch.int64), torch.tensor([math.pi / 2]),
                            torch.zeros(1))
    rows, cols = torch.nonzero(out[0, 0] > 0.5, as_tuple=True)
    assert (rows.max() - rows.min() + 1).item() == 12 and (cols.max() - cols.min() + 1).item() == 2


def test_rotation_sampler_respects_range_and_probability():
    angles = sample_rotation(20000, 0.5, 16.0, _gen())
    assert angles.abs().max().item() <= math.radians(16.0) + 1e-6
    assert abs((angles != 0).float().mean().item() - 0.5) < 0.02
    assert torch.equal(angles, sample_rotation(20000, 0.5, 16.0, _gen()))


# ----------------------------------------------------------------------------------------------- CWVRS
def test_preset_knots_locate_hu_ranges_in_normalised_units():
    knots = preset_knots(Plan(), {"fat": (-200, -30), "soft": (-30, 150), "bone": (150, 3000)})
    expected = (torch.tensor([-160.0, -30.0, 150.0, 240.0]) - 40.0) / 100.0
    torch.testing.assert_close(knots, expected)


def test_cwvrs_map_moves_knots_as_asked_and_is_monotone():
    knots = torch.tensor([-2.0, -0.7, 1.1, 2.0])
    new = torch.tensor([[-2.1, -0.6, 1.0, 2.05], [-2.0, -0.7, 1.1, 2.0]])
    x = torch.cat([knots, torch.linspace(-3, 3, 601)])[None].repeat(2, 1)
    out = cwvrs_map(x, knots, new)
    torch.testing.assert_close(out[:, :4], new)  # each knot lands on its moved position
    torch.testing.assert_close(out[1], x[1])  # unmoved knots: identity
    ys = out[0, 4:]
    assert bool((torch.diff(ys) > 0).all())  # strictly monotone
    # linear inside a cluster: midpoint of [-0.7, 1.1] maps to the midpoint of [-0.6, 1.0]
    mid = cwvrs_map(torch.tensor([[0.2]]), knots, new[:1])
    assert mid.item() == pytest.approx(0.2, abs=1e-6)
    # slope 1 beyond the window ends, continuous there
    ends = cwvrs_map(torch.tensor([[-3.0, 3.0]]), knots, new[:1])
    torch.testing.assert_close(ends, torch.tensor([[-3.1, 3.05]]))


def test_cwvrs_sampler_bounds_and_monotone_knots():
    knots = torch.tensor([-2.0, -0.7, 1.1, 2.0])
    apply, new = sample_cwvrs(5000, 0.2, knots, shift=0.05, stretch=0.05, generator=_gen())
    assert abs(apply.float().mean().item() - 0.2) < 0.03
    assert torch.equal(new[~apply], knots.expand(int((~apply).sum()), -1))
    assert bool((torch.diff(new, dim=1) > 0).all())
    width = torch.diff(knots)
    # a knot moves at most (shift + stretch / 2) of the wider adjacent cluster
    bound = (0.05 + 0.025) * torch.maximum(torch.cat([width[:1], width]), torch.cat([width, width[-1:]]))
    assert bool(((new[apply] - knots).abs() <= bound + 1e-6).all())
    assert bool(((new[apply] - knots).abs() > 1e-4).any())


def test_kmeans_knots_split_between_intensity_modes():
    g = _gen()
    x = torch.cat([torch.randn(3000, generator=g) * 0.1 - 2, torch.randn(3000, generator=g) * 0.1,
                   torch.randn(3000, generator=g) * 0.1 + 2])
    knots = kmeans_knots(x, 3)
    assert knots.numel() == 4
    assert knots[0].item() == pytest.approx(x.min().item()) and knots[-1].item() == pytest.approx(x.max().item())
    assert -1.3 < knots[1].item() < -0.7 and 0.7 < knots[2].item() < 1.3
    assert kmeans_knots(torch.zeros(10), 3).numel() == 2  # constant input still gives a valid range


# ----------------------------------------------------------------------------------------------- z resampling
def test_slice_skipping_keeps_label_with_its_image_slice():
    b, z = 3, 12
    image = torch.arange(z, dtype=torch.float32).view(1, 1, z, 1, 1).repeat(b, 1, 1, 4, 4)
    label = (torch.arange(z) % 3).view(1, 1, z, 1, 1).repeat(b, 1, 1, 4, 4)
    mode, src = sample_z_resampling(b, z, p_skip=1.0, max_factor=3.0, p_interp=0.0, min_factor=0.5, generator=_gen())
    assert bool((mode == 1).all())
    assert torch.equal(src, src.round()) and src.min() >= 0 and src.max() <= z - 1
    assert bool((torch.diff(src, dim=1) >= 0).all())
    out, out_lab = resample_z(image, label, src)
    copied = out[:, 0, :, 0, 0].long()  # which input slice each output slice came from
    torch.testing.assert_close(out[:, 0, :, 0, 0], src)
    assert torch.equal(out_lab[:, 0, :, 0, 0], copied % 3)
    assert torch.equal(out_lab, (out.long() % 3))


def test_slice_skipping_drops_slices_like_a_thicker_spacing():
    z = 16
    _, src = sample_z_resampling(400, z, 1.0, 2.0, 0.0, 0.5, _gen())
    distinct = torch.tensor([len(torch.unique(r)) for r in src])
    assert bool((distinct < z).all())  # every stack lost at least one slice
    assert bool((distinct >= (z - 1) // 2).all())  # factor <= 2 keeps about half or more
    assert float(distinct.float().mean()) < 0.85 * z


def test_slice_interpolation_midpoint_is_mean_of_neighbours():
    image = torch.randn(1, 1, 5, 4, 4, generator=_gen())
    label = torch.randint(0, 3, (1, 1, 5, 4, 4), generator=_gen(1))
    src = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0]])  # factor 0.5
    out, out_lab = resample_z(image, label, src)
    torch.testing.assert_close(out[:, :, 1], (image[:, :, 0] + image[:, :, 1]) / 2)
    torch.testing.assert_close(out[:, :, 4], image[:, :, 2])
    src2 = torch.tensor([[0.0, 0.25, 0.75, 1.0, 1.0]])
    _, lab2 = resample_z(image, label, src2)
    assert torch.equal(lab2[:, :, 1], label[:, :, 0]) and torch.equal(lab2[:, :, 2], label[:, :, 1])


def test_slice_interpolation_sampler_range():
    z = 10
    mode, src = sample_z_resampling(500, z, 0.0, 2.0, 1.0, 0.5, _gen())
    assert bool((mode == 2).all())
    steps = torch.diff(src, dim=1)
    assert bool((steps >= 0.5 - 1e-5).all()) and bool((steps < 1.0).all())
    assert src.min() >= 0 and src.max() <= z - 1
    mode, src = sample_z_resampling(500, z, 0.3, 2.0, 0.3, 0.5, _gen())
    frac = [(mode == m).float().mean().item() for m in (0, 1, 2)]
    assert abs(frac[1] - 0.3) < 0.07 and abs(frac[2] - 0.3) < 0.07
    assert torch.equal(src[mode == 0], torch.arange(z, dtype=torch.float32).expand(int((mode == 0).sum()), -1))


# ----------------------------------------------------------------------------------------------- noise, window
def test_noise_sigma_sampler_and_noise_map_std():
    sigma = sample_noise_sigma(10000, 0.5, (0.02, 0.1), _gen())
    on = sigma[sigma > 0]
    assert abs(on.numel() / 10000 - 0.5) < 0.02 and on.min() >= 0.02 and on.max() <= 0.1
    x = torch.zeros(3, 100000)
    out = add_noise(x, torch.tensor([0.0, 0.05, 0.2]), _gen())
    assert torch.equal(out[0], x[0])
    assert out[1].std().item() == pytest.approx(0.05, rel=0.02)
    assert out[2].std().item() == pytest.approx(0.2, rel=0.02)
    assert torch.equal(x, torch.zeros(3, 100000))  # input untouched


def test_random_window_identity_and_narrowing():
    x = torch.linspace(-2, 2, 101)[None].repeat(3, 1)
    out = random_window(x, -2.0, 2.0, torch.tensor([0.0, 0.0, 0.1]), torch.tensor([1.0, 0.5, 1.0]))
    torch.testing.assert_close(out[0], x[0])
    # width halved about the centre: [-1, 1] stretched to [-2, 2], outside clipped
    torch.testing.assert_close(out[1], (x[1] * 2).clamp(-2, 2))
    # level shifted up by 0.1 of the width: [-1.6, 2.4] -> [-2, 2]
    torch.testing.assert_close(out[2], x[2].clamp(-1.6, 2.4) - 0.4)


# ----------------------------------------------------------------------------------------------- pipelines
def _augmenters(dim):
    plan = Plan()
    return {"ctia": CTIAugmenter(FORCED, dim, plan), "ctia_kmeans": CTIAugmenter(FORCED, dim),
            "ctia_default": build_augmenter(AugmentConfig(name="ctia"), dim, plan),
            "mia": PaperMIAugmenter(MIAConfig(p_batch_2d=1, p_batch_3d=1, rotation_p=1, shear_p=1, crop_p=1), dim, plan),
            "mia_default": build_augmenter(AugmentConfig(name="mia"), dim),
            "nnunet": NNUNetAugmenter(NNUNetAugConfig(p_batch_2d=1, p_batch_3d=1, rotation_p=1, scale_p=1), dim),
            "nnunet_default": build_augmenter(AugmentConfig(name="nnunet"), dim),
            "none": build_augmenter(AugmentConfig(name="none"), dim)}


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_contract_shapes_dtypes_devices_classes(dim):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    image, label = _phantom()
    for device in devices:
        img, lab = image.to(device), label.to(device)
        for name, aug in _augmenters(dim).items():
            for seed in range(3):
                out, out_lab = aug(img, lab, torch.Generator(device=device).manual_seed(seed))
                assert out.shape == img.shape and out_lab.shape == lab.shape, name
                assert out.dtype == torch.float32 and out_lab.dtype == torch.int64, name
                assert out.device == img.device and out_lab.device == lab.device, name
                assert set(out_lab.unique().tolist()) <= {0, 1, 2}, name
                assert bool(torch.isfinite(out).all()), name
        assert torch.equal(img, image.to(device)) and torch.equal(lab, label.to(device))  # inputs untouched


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_same_seed_same_output_different_seed_differs(dim):
    image, label = _phantom()
    for name, aug in _augmenters(dim).items():
        if name in ("none", "ctia_default", "mia_default"):
            continue
        a = aug(image, label, _gen(7))
        b = aug(image, label, _gen(7))
        c = aug(image, label, _gen(8))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), name
        assert not torch.equal(a[0], c[0]), name


def test_every_ctia_transform_alone_keeps_label_classes():
    image, label = _phantom(b=2, z=8)
    classes = set(label.unique().tolist())
    off = dict(noise_p=0, cwvrs_p=0, rotation_p=0, slice_skip_p=0, slice_interp_p=0, patch_p=0, p_batch_2d=1,
               p_batch_3d=1, z_mode="stack")
    for on in [dict(noise_p=1), dict(cwvrs_p=1), dict(rotation_p=1), dict(slice_skip_p=1), dict(slice_interp_p=1),
               dict(random_window_p=1), dict(patch_p=1)]:
        for dim in ("2d", "3d"):
            cfg = CTIAConfig(**{**off, **on})
            out, out_lab = CTIAugmenter(cfg, dim, Plan())(image, label, _gen(3))
            assert set(out_lab.unique().tolist()) <= classes, on
            changed_image = not torch.equal(out, image)
            assert changed_image, on
            spatial = "rotation_p" in on or "slice_skip_p" in on or "slice_interp_p" in on or "patch_p" in on
            assert torch.equal(out_lab, label) != spatial, on  # only spatial transforms move labels


def test_2d_rotation_is_per_slice_3d_rotation_per_volume():
    image = torch.zeros(1, 1, 4, 16, 16)
    image[..., 6:10, 2:14] = 1.0
    label = (image > 0).long()
    cfg = CTIAConfig(p_batch_2d=1, p_batch_3d=1, noise_p=0, cwvrs_p=0, rotation_p=1, patch_p=0, slice_skip_p=0,
                     slice_interp_p=0)
    out2d, _ = CTIAugmenter(cfg, "2d", Plan())(image, label, _gen())
    out3d, lab3d = CTIAugmenter(cfg, "3d", Plan())(image, label, _gen())
    assert all(torch.equal(out3d[0, 0, 0], out3d[0, 0, k]) for k in range(1, 4))
    assert all(torch.equal(lab3d[0, 0, 0], lab3d[0, 0, k]) for k in range(1, 4))
    assert not all(torch.equal(out2d[0, 0, 0], out2d[0, 0, k]) for k in range(1, 4))


def test_rotation_fill_is_air_of_the_window():
    image, label = _phantom(b=1, z=2)
    cfg = CTIAConfig(p_batch_2d=1, noise_p=0, cwvrs_p=0, rotation_p=1, rotation_max_deg=16, patch_p=0, slice_skip_p=0,
                     slice_interp_p=0)
    out, _ = CTIAugmenter(cfg, "2d", Plan())(image, label, _gen())
    air = (Plan.lower - Plan.mean) / Plan.std
    assert out.min().item() >= air - 1e-5
    assert out[0, 0, :, 0, 0].tolist() == pytest.approx([air, air])


def test_batch_probability_zero_returns_inputs():
    image, label = _phantom()
    aug = CTIAugmenter(CTIAConfig(p_batch_2d=0, p_batch_3d=0, cwvrs_p=0), "2d", Plan())
    out, out_lab = aug(image, label, _gen())
    assert out is image and out_lab is label
    assert isinstance(build_augmenter(AugmentConfig(name="none"), "3d"), NoAugment)


def test_batch_probability_fraction():
    image, label = _phantom(b=1, z=2, size=16)
    aug = CTIAugmenter(CTIAConfig(p_batch_3d=0.8, noise_p=1, cwvrs_p=0), "3d", Plan())
    g = _gen()
    changed = sum(not torch.equal(aug(image, label, g)[0], image) for _ in range(400))
    assert 0.74 < changed / 400 < 0.86


def test_cwvrs_in_pipeline_is_monotone_per_image():
    image, label = _phantom(b=2, z=3)
    cfg = CTIAConfig(p_batch_2d=1, noise_p=0, cwvrs_p=1, cwvrs_shift=0.2, cwvrs_stretch=0.2, rotation_p=0, patch_p=0,
                     slice_skip_p=0, slice_interp_p=0)
    out, _ = CTIAugmenter(cfg, "2d", Plan())(image, label, _gen())
    for i in range(2):
        for k in range(3):
            x, y = image[i, 0, k].flatten(), out[i, 0, k].flatten()
            order = torch.argsort(x)
            assert bool((torch.diff(y[order]) >= -1e-6).all())
            assert not torch.allclose(x, y)


def test_nnunet_reproducible_and_leaves_global_rng_alone():
    image, label = _phantom()
    aug = NNUNetAugmenter(NNUNetAugConfig(p_batch_2d=1), "2d")
    torch.manual_seed(123)
    np.random.seed(123)
    t_state, n_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = aug(image, label, _gen(5))
    assert torch.equal(torch.get_rng_state(), t_state)
    assert np.array_equal(np.random.get_state()[1], n_state)
    torch.manual_seed(999)
    np.random.seed(999)
    b = aug(image, label, _gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_nnunet_2d_gives_each_slice_its_own_parameters():
    image = torch.zeros(1, 1, 6, 32, 32)
    image[..., 10:22, 4:28] = 1.0
    label = (image > 0).long()
    out, _ = NNUNetAugmenter(NNUNetAugConfig(p_batch_2d=1, rotation_p=1, crop_max_shift=0), "2d")(image, label, _gen())
    assert not all(torch.equal(out[0, 0, 0], out[0, 0, k]) for k in range(1, 6))
    out3, _ = NNUNetAugmenter(NNUNetAugConfig(p_batch_3d=1, rotation_p=1, crop_max_shift=0, noise_p=0, blur_p=0, lowres_p=0, gamma_p=0,
                                    gamma_inverted_p=0, brightness_p=0, contrast_p=0), "3d")(image, label, _gen())
    assert all(torch.equal(out3[0, 0, 0], out3[0, 0, k]) for k in range(1, 6))  # dummy 2D: one set per stack


def test_config_validation():
    with pytest.raises(CtsegError, match="slice_skip_p"):
        parse_config({"augment": {"ctia": {"slice_skip_p": 0.7, "slice_interp_p": 0.5}}})
    with pytest.raises(CtsegError, match="noise_sigma"):
        parse_config({"augment": {"ctia": {"noise_sigma": [0.2, 0.1]}}})
    with pytest.raises(CtsegError, match="unknown augmentation .monai.; choose from"):
        parse_config({"augment": {"name": "monai"}})
    with pytest.raises(ValueError, match="dim"):
        build_augmenter(AugmentConfig(), "4d")
    with pytest.raises(ValueError, match="shape"):
        CTIAugmenter(CTIAConfig(), "2d")(torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 2, 3, 4, 4, dtype=torch.long),
                                         _gen())


def test_nnunet_fill_air_uses_window_lower_bound():
    image, label = _phantom(b=1, z=2)
    cfg = NNUNetAugConfig(p_batch_2d=1, rotation_p=1, rotation_max_deg=45, scale_p=0, crop_max_shift=0, noise_p=0, blur_p=0, lowres_p=0,
                    gamma_p=0, gamma_inverted_p=0, brightness_p=0, contrast_p=0, fill="air")
    air = (Plan.lower - Plan.mean) / Plan.std
    out, _ = NNUNetAugmenter(cfg, "2d", Plan())(image, label, _gen())
    corners = out[0, 0, :, 0, 0]
    assert torch.allclose(corners, torch.full_like(corners, air), atol=1e-5)
    zero, _ = NNUNetAugmenter(cfg.model_copy(update={"fill": "zero"}), "2d")(image, label, _gen())
    assert torch.allclose(zero[0, 0, :, 0, 0], torch.zeros(2), atol=1e-5)
    with pytest.raises(CtsegError, match="air"):
        NNUNetAugmenter(cfg, "2d")


def test_show_augment_cli_writes_png(tmp_path):
    from ctseg.cli import main
    from ctseg.datasets.kits19 import write_kits19_case
    from ctseg.io import Volume

    image, label = _phantom(b=1, z=12, size=48)
    hu = image[0, 0].numpy() * Plan.std + Plan.mean
    lab = label[0, 0].numpy().astype(np.uint8)
    geometry = dict(spacing=(3.0, 1.0, 1.0), slice_thickness=3.0)
    write_kits19_case(tmp_path / "data", "case_00000", Volume(hu.astype(np.float32), **geometry),
                      Volume(lab, **geometry))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("preprocess: {in_plane_size: 32}\naugment: {ctia: {random_window_p: 0.5}}\n")
    for aug in ("ctia", "mia"):
        out = tmp_path / f"{aug}.png"
        assert main(["show-augment", "--dataset", str(tmp_path / "data"), "--aug", aug, "--out", str(out),
                     "--n", "3", "--slices", "8", "--config", str(cfg)]) == 0
        import matplotlib.image

        png = matplotlib.image.imread(out)
        height, width = png.shape[:2]
        if aug == "ctia":  # 2 grid rows + 6 transform rows (random window switched on) of 4 panels
            assert height > 1.5 * width and height >= 8 * 250
        else:  # the grid only: 2 rows of 4
            assert width > height and height < 3 * 300
        assert png[..., :3].std() > 0.05  # not a blank canvas
    assert main(["show-augment", "--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "x.jpg")]) == 2
    assert main(["show-augment", "--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "y.png"),
                 "--case", "case_99999"]) == 2


# ----------------------------------------------------------------------------------------- paper MIA (Table 1)
def test_paper_mia_samples_shear_and_every_table1_transform():
    from ctseg.augment.mia import sample_mia

    cfg = MIAConfig(rotation_p=1, scale_p=1, shear_p=1, crop_p=1, gamma_p=1, contrast_p=1, brightness_p=1, noise_p=1)
    p = sample_mia(200, 32, 32, cfg, _gen())
    a = p.matrix[:, :2, :2]
    cols = a / a.norm(dim=1, keepdim=True)
    skew = (cols[:, :, 0] * cols[:, :, 1]).sum(dim=1).abs()  # 0 for rotation + isotropic scaling
    assert (skew > 0.05).float().mean() > 0.5  # shear is present in the sampled matrices
    det = torch.linalg.det(a)
    assert det.min() > 0.7 ** 2 * 0.9 and det.max() > 1.5  # scaling and cropping (zoom up to 1.4 / 0.8)
    angles = torch.rad2deg(torch.atan2(a[:, 1, 0], a[:, 0, 0]))
    assert angles.abs().max() > 150  # rotation without restriction
    assert (p.gamma != 1).all() and (p.contrast != 1).all() and (p.brightness != 0).all() and (p.noise_sigma > 0).all()
    none = sample_mia(50, 32, 32, MIAConfig(rotation_p=0, scale_p=0, shear_p=0, crop_p=0), _gen())
    torch.testing.assert_close(none.matrix, torch.eye(3).expand(50, 3, 3))


def test_paper_mia_crop_is_a_zoomed_patch_and_labels_stay_nearest():
    from ctseg.augment.mia import MIAParams, warp_affine_batch
    from kornia.geometry.transform import get_affine_matrix2d

    image, label = _phantom(b=1, z=1, size=32)
    # a 16 x 16 patch with its centre 4 px right of the image centre, zoomed x2 (what the crop draws)
    m = get_affine_matrix2d(torch.tensor([[-8.0, 0.0]]), torch.tensor([[15.5, 15.5]]), torch.full((1, 2), 2.0),
                            torch.zeros(1))
    out, out_lab = warp_affine_batch(image[:, 0], label[:, 0], m, torch.zeros(1))
    # output x samples input x' = (x - 15.5) / 2 + 19.5, y' = (y - 15.5) / 2 + 15.5: integer x' at x = 0.5 + 4k...
    # so compare at the patch centre: output (15.5, 15.5) <-> input (19.5, 15.5): mean of the 2 x 2 neighbours
    centre = image[0, 0, 0, 15:17, 19:21].mean()
    torch.testing.assert_close(out[0, 0, 15:17, 15:17].mean(), centre, atol=0.05, rtol=0)
    assert set(out_lab.unique().tolist()) <= set(label.unique().tolist()) and out_lab.dtype == torch.int64
    assert out_lab[0, 0, 16, 16] == label[0, 0, 0, 16, 20]
    aug = PaperMIAugmenter(MIAConfig(p_batch_2d=1), "2d", Plan())
    params = aug.sample(image, _gen(3))
    assert isinstance(params, MIAParams)
    a = aug.apply(image, label, params, _gen(9))
    b = aug.apply(image, label, params, _gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # pure given the parameters


@pytest.mark.parametrize("name", ["ctia", "mia", "nnunet"])
@pytest.mark.parametrize("dim,p", [("2d", 0.9), ("3d", 0.8)])
def test_every_augmentation_has_the_papers_batch_gate(name, dim, p):
    image, label = _phantom(b=1, z=6, size=16)
    cfg = AugmentConfig(name=name)
    section = getattr(cfg, name)
    forced_noise = {"noise_p": 1, "noise_sigma": (0.05, 0.1), **({"cwvrs_p": 0} if name == "ctia" else {})}
    setattr(cfg, name, section.model_copy(update=forced_noise))
    aug = build_augmenter(cfg, dim, Plan())
    g = _gen()
    changed = sum(not torch.equal(aug(image, label, g)[0], image) for _ in range(300))
    assert abs(changed / 300 - p) < 0.06


# ---------------------------------------------------------------------------------- CTIA patch + CWVRS fraction
def test_ctia_patch_extraction_is_an_exact_integer_shift_with_air_outside():
    from ctseg.augment.ctia import extract_patch, sample_patch_shift

    image, label = _phantom(b=1, z=2, size=32)
    img4, lab4 = image[:, 0], label[:, 0]  # (1, 2, 32, 32): a 3D stack, slices as channels
    out, out_lab = extract_patch(img4, lab4, torch.tensor([[3, -5]]), torch.tensor([-2.0]))
    torch.testing.assert_close(out[0, :, :-3, 5:], img4[0, :, 3:, :-5], rtol=0, atol=0)  # values kept exactly
    assert torch.equal(out_lab[0, :, :-3, 5:], lab4[0, :, 3:, :-5])
    assert (out[0, :, -3:] == -2.0).all() and (out[0, :, :, :5] == -2.0).all() and (out_lab[0, :, -3:] == 0).all()
    shifts = sample_patch_shift(4000, 0.5, 0.1, (32, 32), _gen())
    assert shifts.abs().max() == 3 and 0.45 < (shifts != 0).any(dim=1).float().mean() < 0.55
    cfg = CTIAConfig(p_batch_2d=1, noise_p=0, cwvrs_p=0, rotation_p=0, slice_skip_p=0, slice_interp_p=0, patch_p=1)
    aug = CTIAugmenter(cfg, "2d", Plan())
    params = aug.sample(image, _gen(1))
    k = int(torch.nonzero((params.patch_shift != 0).any(dim=1))[0])  # a slice that got a non-zero offset
    out, _ = aug.apply(image, label, params, _gen())
    dy, dx = params.patch_shift[k].tolist()
    h = 32
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(h, h - dx))
    yi, xi = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
    torch.testing.assert_close(out[0, 0, k, ys, xs], image[0, 0, k, yi, xi], rtol=0, atol=0)


@pytest.mark.parametrize("dim,b,z", [("2d", 2, 16), ("3d", 1, 16)])
def test_cwvrs_reaches_exactly_20_percent_of_samples(dim, b, z):
    image = torch.zeros(b, 1, z, 4, 4)
    aug = CTIAugmenter(CTIAConfig(), dim, Plan())  # default: 90 % / 80 % batch gate, CWVRS 0.2
    per_call = b * z if dim == "2d" else b
    g, applied, total = _gen(7), 0, 0
    while total < 10_000:
        params = aug.sample(image, g)
        applied += 0 if params is None else int(params.cwvrs_apply.sum())
        total += per_call
    assert abs(applied / total - 0.20) <= 0.01
