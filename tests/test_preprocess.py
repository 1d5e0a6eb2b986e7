"""Windowing, z-score statistics, slice sampling and in-plane resizing (ctseg.preprocess)."""
import json
import logging

import numpy as np
import pytest
import torch

from ctseg.config import PreprocessConfig, parse_config
from ctseg.datasets.base import Case
from ctseg.errors import CtsegError
from ctseg.io import Volume
from ctseg.preprocess import slices
from ctseg.preprocess.slices import (InPlaneResize, foreground_slices, preprocess_label, preprocess_volume,
                                     resize_in_plane, restore_in_plane, sample_slices)
from ctseg.preprocess.windowing import (IntensityPlan, compute_intensity_plan, estimate_intensity_plan, normalize,
                                        window_bounds)


def make_case(case_id, image, label):
    vol = Volume(image, spacing=(2.0, 0.8, 0.8))
    lab = None if label is None else Volume(label, spacing=(2.0, 0.8, 0.8))
    return Case(case_id, vol, lab, {"num_slices": image.shape[0], "spacing": vol.spacing, "slice_thickness": 2.0})


def blob_case(case_id, rng, fg_mean=100.0, z=6, size=24, with_fg=True):
    """Body at ~40 HU with noise, air outside, a foreground cube of intensity ~fg_mean."""
    image = np.full((z, size, size), -1000.0, dtype=np.float32)
    image[:, 2:-2, 2:-2] = rng.normal(40.0, 30.0, (z, size - 4, size - 4))
    label = np.zeros(image.shape, dtype=np.uint8)
    if with_fg:
        label[1:-1, 6:14, 6:14] = 1
        image[label == 1] = rng.normal(fg_mean, 20.0, int(label.sum()))
    return make_case(case_id, image, label)


# ---------------------------------------------------------------- windowing

@pytest.mark.parametrize("window,bounds", [("organ", (-160, 240)), ("bone", (-450, 1050)), ("lung", (-1350, 150))])
def test_preset_windows_bound_the_plan(window, bounds, rng):
    cfg = PreprocessConfig(window=window, subset_size=2)
    cases = [blob_case(f"c{i}", rng) for i in range(3)]
    plan = estimate_intensity_plan(cases, cfg, rng)
    assert (plan.lower, plan.upper) == bounds and plan.mode == window and plan.percentiles is None
    fg = np.concatenate([c.image.array[c.label.array > 0] for c in cases if c.case_id in plan.subset_ids])
    clipped = np.clip(fg.astype(np.float64), *bounds)
    assert plan.mean == pytest.approx(clipped.mean(), rel=1e-6)
    assert plan.std == pytest.approx(clipped.std(), rel=1e-6)


def test_custom_window_and_configurable_presets():
    assert window_bounds(PreprocessConfig(window="custom", custom_window=(-50, 50))) == (-50.0, 50.0)
    cfg = PreprocessConfig(window="organ", presets={"organ": (-100.0, 200.0)})
    assert window_bounds(cfg) == (-100.0, 200.0)


def test_percentile_window_matches_known_percentiles(rng):
    # Foreground holds exactly the values 0..9999 HU; background values far outside must not count.
    z, y, x = 10, 40, 25
    image = np.full((z, y, x), 5000.0, dtype=np.float32)
    label = np.zeros((z, y, x), dtype=np.uint8)
    label[:, :40, :25] = 1
    label[:, :, 0] = 0  # 10 * 40 = 400 background voxels at 5000 HU
    image[label == 1] = rng.permutation(np.arange(z * y * 24, dtype=np.float32))
    cfg = PreprocessConfig(window="percentile", percentiles=(0.6, 99.0), subset_size=1)
    plan = estimate_intensity_plan([make_case("a", image, label)], cfg, rng)
    n = 9600
    assert plan.lower == pytest.approx(0.006 * (n - 1))  # linear interpolation between order statistics
    assert plan.upper == pytest.approx(0.99 * (n - 1))
    expected = np.clip(np.arange(n, dtype=np.float64), plan.lower, plan.upper)
    assert plan.mean == pytest.approx(expected.mean()) and plan.std == pytest.approx(expected.std())
    assert plan.percentiles == (0.6, 99.0) and plan.n_voxels == n


def test_voxels_per_case_are_capped(rng):
    case = blob_case("a", rng, z=8, size=32)
    plan = compute_intensity_plan([case], PreprocessConfig(), rng, max_voxels_per_case=50)
    assert plan.n_voxels == 50


def test_statistics_come_only_from_the_seeded_subset():
    rng0 = np.random.default_rng(1)
    cases = [blob_case(f"case_{i}", rng0, fg_mean=-100.0 + 60.0 * i) for i in range(6)]
    cfg = PreprocessConfig(window="organ", subset_size=2)
    plans = [estimate_intensity_plan(cases, cfg, np.random.default_rng(s)) for s in range(6)]
    again = estimate_intensity_plan(cases, cfg, np.random.default_rng(3))
    assert again.subset_ids == plans[3].subset_ids and again.mean == plans[3].mean
    assert len({p.subset_ids for p in plans}) > 1
    for plan in plans:
        assert len(plan.subset_ids) == 2
        fg = np.concatenate([c.image.array[c.label.array > 0] for c in cases if c.case_id in plan.subset_ids])
        assert plan.mean == pytest.approx(np.clip(fg.astype(np.float64), -160, 240).mean(), rel=1e-6)
    # restricted to training ids: the subset never leaves them
    train = ["case_0", "case_2", "case_5"]
    for s in range(5):
        plan = estimate_intensity_plan(cases, cfg, np.random.default_rng(s), case_ids=train)
        assert set(plan.subset_ids) <= set(train)


def test_subset_larger_than_dataset_is_an_error(rng):
    cases = [blob_case(f"c{i}", rng) for i in range(3)]
    with pytest.raises(CtsegError, match="subset of 4"):
        estimate_intensity_plan(cases, PreprocessConfig(subset_size=4), rng)
    with pytest.raises(CtsegError, match="not in the dataset"):
        estimate_intensity_plan(cases, PreprocessConfig(subset_size=1), rng, case_ids=["nope"])


def test_case_without_foreground_is_skipped_with_a_warning(rng, caplog):
    good = blob_case("good", rng, fg_mean=100.0)
    empty = blob_case("empty", rng, with_fg=False)
    empty.image.array[:] = 3000.0  # would drag the statistics if it were used
    with caplog.at_level(logging.WARNING, logger="ctseg.preprocess.windowing"):
        plan = compute_intensity_plan([good, empty], PreprocessConfig(), rng)
    assert "empty has no foreground" in caplog.text
    fg = good.image.array[good.label.array > 0]
    assert plan.upper <= fg.max() and plan.n_voxels == fg.size


def test_no_foreground_anywhere_falls_back_to_the_organ_preset(rng, caplog):
    cases = [blob_case(f"c{i}", rng, with_fg=False) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="ctseg.preprocess.windowing"):
        plan = compute_intensity_plan(cases, PreprocessConfig(window="percentile"), rng)
    assert "falls back to the organ preset" in caplog.text
    assert plan.mode == "organ" and (plan.lower, plan.upper) == (-160.0, 240.0)
    allv = np.concatenate([c.image.array.ravel() for c in cases]).astype(np.float64)
    assert plan.mean == pytest.approx(np.clip(allv, -160, 240).mean(), rel=1e-5)


def test_normalize_hand_computed():
    plan = IntensityPlan("custom", lower=-100.0, upper=100.0, mean=10.0, std=20.0)
    out = normalize(np.array([[-500, 0], [50, 500]], dtype=np.int16), plan)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-5.5, -0.5], [2.0, 4.5]], rtol=1e-6)


def test_intensity_plan_validates_and_round_trips():
    plan = IntensityPlan("percentile", -80.5, 300.0, 95.0, 60.0, (0.6, 99.0), ("a", "b"), 1234)
    assert IntensityPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(CtsegError, match="lower"):
        IntensityPlan("organ", 10.0, 10.0, 0.0, 1.0)
    with pytest.raises(CtsegError, match="percentiles"):
        IntensityPlan("percentile", 0.0, 10.0, 0.0, 1.0, (0.6, 101.0))
    with pytest.raises(CtsegError, match="std"):
        IntensityPlan("organ", 0.0, 10.0, 0.0, 0.0)
    with pytest.raises(CtsegError, match="finite"):
        IntensityPlan("organ", 0.0, float("nan"), 0.0, 1.0)
    with pytest.raises(CtsegError, match="lacks std"):
        IntensityPlan.from_dict({"mode": "organ", "lower": 0, "upper": 1, "mean": 0}, "plan.json")
    with pytest.raises(CtsegError, match="percentiles"):
        parse_config({"preprocess": {"percentiles": [-1, 99]}})


def test_degenerate_percentile_window_is_a_clear_error(rng):
    image = np.zeros((4, 8, 8), dtype=np.float32)
    label = np.ones((4, 8, 8), dtype=np.uint8)
    with pytest.raises(CtsegError, match="percentile window is empty"):
        compute_intensity_plan([make_case("flat", image, label)], PreprocessConfig(), rng)


# ---------------------------------------------------------------- slice sampling

def test_sample_slices_sorted_unique_foreground_only_and_seeded():
    label = np.zeros((60, 4, 4), dtype=np.uint8)
    fg = np.r_[5:20, 33:50]
    label[fg, 1, 1] = 2
    draws = [sample_slices(label, 16, np.random.default_rng(s)) for s in range(10)]
    for idx in draws:
        assert idx.size == 16 and np.all(np.diff(idx) > 0) and np.isin(idx, fg).all()
    np.testing.assert_array_equal(sample_slices(label, 16, np.random.default_rng(3)), draws[3])
    assert len({tuple(d) for d in draws}) > 1
    everything = np.concatenate([sample_slices(label, 16, np.random.default_rng(s), exclude_background=False)
                                 for s in range(10)])
    assert not np.isin(everything, fg).all()  # background slices are eligible when not excluded
    idx = sample_slices(None, 16, np.random.default_rng(0), num_slices=30)
    assert idx.size == 16 and idx.max() < 30 and np.all(np.diff(idx) > 0)


def test_sample_slices_with_too_few_foreground_slices_tops_up_with_nearest_background():
    label = np.zeros((40, 4, 4), dtype=np.uint8)
    label[10:13, 0, 0] = 1
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(sample_slices(label, 5, rng), np.arange(9, 14))
    np.testing.assert_array_equal(sample_slices(label, 7, rng), np.arange(8, 15))
    six = sample_slices(label, 6, rng)  # one of the two slices at distance 2
    assert six.size == 6 and set(np.arange(9, 14)) <= set(six) and set(six) - set(range(9, 14)) <= {8, 14}
    empty = sample_slices(np.zeros((40, 4, 4), np.uint8), 16, rng)
    assert empty.size == 16 and np.unique(empty).size == 16


def test_sample_slices_never_upsamples_in_z():
    label = np.ones((10, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(sample_slices(label, 16, np.random.default_rng(0)), np.arange(10))


# ---------------------------------------------------------------- resizing

def test_label_majority_vote_hand_example():
    label = np.array([[[1, 1, 0, 2],
                       [1, 0, 2, 2],
                       [0, 0, 3, 3],
                       [0, 5, 5, 3]]], dtype=np.uint8)
    # blocks: {1,1,1,0} -> 1, {0,2,2,2} -> 2, {0,0,0,5} -> 0, {3,3,5,3} -> 3
    np.testing.assert_array_equal(resize_in_plane(label, 2, is_label=True), [[[1, 2], [0, 3]]])
    tie = np.array([[[4, 4], [2, 2]]], dtype=np.uint8)  # 2 votes each: the lower label value wins
    np.testing.assert_array_equal(resize_in_plane(tie, 1, is_label=True), [[[2]]])


def test_label_majority_vote_with_a_non_integer_factor_matches_brute_force(rng):
    label = rng.integers(0, 3, (2, 10, 7)).astype(np.uint8)
    label[:, :5, :4] = 1  # some structure, so the votes are not all ties
    out = resize_in_plane(label, (4, 3), is_label=True)
    for k in range(2):
        for i in range(4):
            for j in range(3):  # footprint of output pixel (i, j): [floor(i H / h), ceil((i + 1) H / h))
                block = label[k, (i * 10) // 4:-((-(i + 1) * 10) // 4), (j * 7) // 3:-((-(j + 1) * 7) // 3)]
                assert out[k, i, j] == np.argmax(np.bincount(block.ravel(), minlength=3))


def test_label_resize_keeps_its_class_set_and_dtype(rng):
    label = np.zeros((5, 64, 64), dtype=np.int16)
    label[:, 8:40, 8:40] = 1
    label[:, 20:32, 20:32] = 2
    label[2:4, 48:60, 44:60] = 7
    out = resize_in_plane(label, 16, is_label=True)
    assert out.shape == (5, 16, 16) and out.dtype == np.int16
    assert set(np.unique(out)) == {0, 1, 2, 7}
    up = resize_in_plane(out, 32, is_label=True)
    assert set(np.unique(up)) == {0, 1, 2, 7} and up.shape == (5, 32, 32)
    with pytest.raises(CtsegError, match="integers"):
        resize_in_plane(label.astype(np.float32), 16, is_label=True)


def test_image_resize_is_the_area_mean(rng):
    image = rng.normal(0, 100, (3, 64, 48)).astype(np.float32)
    out = resize_in_plane(image, (16, 12), is_label=False)
    np.testing.assert_allclose(out, image.reshape(3, 16, 4, 12, 4).mean(axis=(2, 4)), rtol=1e-5, atol=1e-4)
    assert resize_in_plane(image.astype(np.int16), 32, is_label=False).dtype == np.float32


def test_preprocess_volume_is_normalize_then_area_mean_and_chunking_invisible(rng, monkeypatch):
    volume = rng.normal(0, 400, (9, 32, 32)).astype(np.float32)
    plan = IntensityPlan("organ", -160.0, 240.0, 30.0, 90.0)
    direct = preprocess_volume(volume, plan, 8)
    expected = normalize(volume, plan).reshape(9, 8, 4, 8, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(direct, expected, rtol=1e-5, atol=1e-5)
    out16 = np.zeros((9, 8, 8), dtype=np.float16)
    preprocess_volume(volume, plan, 8, out=out16)
    np.testing.assert_allclose(out16, direct, atol=2e-3, rtol=1e-3)
    label = (volume > 0).astype(np.uint8) + (volume > 300)
    whole = preprocess_label(label, 8)
    monkeypatch.setattr(slices, "_CHUNK_BYTES", 32 * 32 * 4 * 2)  # two slices per chunk
    np.testing.assert_array_equal(preprocess_volume(volume, plan, 8), direct)
    np.testing.assert_array_equal(preprocess_label(label, 8), whole)


def test_preprocess_label_rejects_values_outside_uint8():
    with pytest.raises(CtsegError, match="0..255"):
        preprocess_label(np.full((2, 4, 4), 300, dtype=np.int32), 2)
    with pytest.raises(CtsegError, match="non-integer"):
        preprocess_label(np.full((2, 4, 4), 0.5), 2)
    out = preprocess_label(np.ones((2, 4, 4), dtype=np.float64), 2)
    assert out.dtype == np.uint8 and out.min() == 1


def test_restore_in_plane_inverts_the_resize_geometry():
    # A linear ramp survives area-downsampling then bilinear restoring exactly, away from the border:
    # that only holds if both use the same pixel-centre convention.
    yy, xx = np.meshgrid(np.arange(64, dtype=np.float32), np.arange(48, dtype=np.float32), indexing="ij")
    ramp = np.stack([0.01 * yy + 0.02 * xx] * 3)  # (z, y, x)
    small = resize_in_plane(ramp, 16, is_label=False)  # (3, 16, 16)
    prob = np.stack([small, 1 - small])  # (C, z, 16, 16)
    back = restore_in_plane(prob, (64, 48))
    assert back.shape == (2, 3, 64, 48) and back.dtype == np.float32
    np.testing.assert_allclose(back[0, :, 4:-4, 3:-3], ramp[:, 4:-4, 3:-3], atol=1e-5)
    np.testing.assert_allclose(back[0] + back[1], 1.0, atol=1e-5)
    half = InPlaneResize((64, 48), (16, 16)).restore(prob, out_dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), back, atol=1e-3)
    tensor = restore_in_plane(torch.from_numpy(prob), (64, 48))
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), back, atol=1e-6)


def test_restore_in_plane_is_chunked_consistently(monkeypatch, rng):
    prob = rng.random((3, 7, 8, 8)).astype(np.float32)
    whole = restore_in_plane(prob, (24, 24))
    monkeypatch.setattr(slices, "_CHUNK_BYTES", 3 * 24 * 24 * 4 * 2)
    np.testing.assert_array_equal(restore_in_plane(prob, (24, 24)), whole)


def test_foreground_slices():
    label = np.zeros((6, 3, 3), dtype=np.uint8)
    label[[1, 4], 2, 2] = 3
    np.testing.assert_array_equal(foreground_slices(label), [1, 4])


# ---------------------------------------------------------------- crop after windowing

def body_phantom(z=6, h=40, w=60, box=(8, 30, 12, 44), lower=-200.0):
    """Air everywhere, a body rectangle (y0:y1, x0:x1) of soft tissue; returns HU volume and plan."""
    image = np.full((z, h, w), -1000.0, dtype=np.float32)
    y0, y1, x0, x1 = box
    image[:, y0:y1, x0:x1] = 40.0
    image[2, 0, 0] = 500.0  # one bright speck in one slice: not the windowed region
    plan = IntensityPlan("custom", lower, 300.0, 0.0, 100.0)
    return image, plan


def test_window_crop_box_is_the_square_around_the_windowed_region_with_margin():
    image, plan = body_phantom()
    y0, y1, x0, x1 = slices.window_crop_box(image, plan.lower, margin=0.0)
    assert (y1 - y0) == (x1 - x0) == 32  # the longer side (x: 12..44), a square
    assert (x0, x1) == (12, 44) and (y0 + y1) / 2 == (8 + 30) / 2
    y0, y1, x0, x1 = slices.window_crop_box(image, plan.lower, margin=0.25)
    assert (x0, x1) == (4, 52) and y1 - y0 == 48  # 32 * 1.5, reaching outside the 40 rows: padded
    assert slices.window_crop_box(np.full((3, 8, 8), -1000.0), plan.lower) is None


def test_crop_then_restore_puts_predictions_back_and_background_outside():
    image, plan = body_phantom()
    label = np.zeros(image.shape, dtype=np.uint8)
    label[:, 14:20, 20:30] = 1
    grid = slices.network_grid(image, plan, 32, "window")
    net_label = preprocess_label(label, 32, box=grid.box)
    net_image = preprocess_volume(image, plan, 32, box=grid.box)
    assert net_image.shape == net_label.shape == (6, 32, 32)
    assert net_image.min() == pytest.approx((plan.lower - plan.mean) / plan.std)  # air and padding: lower bound
    side = grid.box[1] - grid.box[0]  # network size = box side: no resampling, the crop alone is undone
    exact = InPlaneResize((40, 60), (side, side), grid.box)
    net_label = preprocess_label(label, side, box=grid.box)
    onehot = np.stack([net_label == 0, net_label == 1]).astype(np.float32)
    restored = exact.restore(onehot)
    assert restored.shape == (2, 6, 40, 60)
    np.testing.assert_array_equal(restored.argmax(0), label)
    y0, y1, x0, x1 = grid.box
    assert (restored[0, :, :, : max(x0, 0)] == 1).all() and (restored[1, :, :, x1:] == 0).all()
    torch_restored = slices.restore_in_plane(torch.from_numpy(onehot), (40, 60), box=grid.box)
    np.testing.assert_allclose(torch_restored.numpy(), restored, atol=1e-6)
    assert InPlaneResize.from_dict(json.loads(json.dumps(grid.to_dict()))) == grid
    assert slices.network_grid(image, plan, 32, "none").box is None


def test_oversampling_puts_a_rare_class_into_the_stack():
    label = np.zeros((60, 4, 4), dtype=np.uint8)
    label[:, 0, 0] = 1  # kidney on every slice
    label[30:32, 1, 1] = 2  # tumour on two slices only
    rng = np.random.default_rng(0)
    plain = [np.isin(sample_slices(label, 8, rng), [30, 31]).any() for _ in range(400)]
    rng = np.random.default_rng(0)
    over = [sample_slices(label, 8, rng, oversample=0.25) for _ in range(400)]
    with_tumour = np.mean([np.isin(s, [30, 31]).any() for s in over])
    assert np.mean(plain) < 0.35 and with_tumour > 0.55  # tumour drawn as the class about half of the time
    assert all(len(np.unique(s)) == 8 and np.all(np.diff(s) > 0) for s in over)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(sample_slices(label, 8, rng_a), sample_slices(label, 8, rng_b, oversample=0.0))


# ---------------------------------------------------------------- no windowing (Supplementary Tables S2/S3)

def test_window_none_keeps_raw_hu_and_the_windowed_arms_crop():
    """window none: nothing clipped, z-score of the raw foreground HU of the same subset, and the same crop box
    as the percentile window of the same cases (the paper: 'cropped ... to the same regions as obtained from
    windowing'); crop_hu replaces it by a fixed air threshold."""
    cases = [blob_case(f"c{i}", np.random.default_rng(i), fg_mean=100.0 + 40 * i) for i in range(3)]
    windowed = compute_intensity_plan(cases, PreprocessConfig(window="percentile"), np.random.default_rng(7))
    raw = compute_intensity_plan(cases, PreprocessConfig(window="none"), np.random.default_rng(7))
    assert raw.mode == "none" and not raw.clips and windowed.clips
    assert (raw.lower, raw.upper) == (windowed.lower, windowed.upper)  # the crop's window
    fg = np.concatenate([c.image.array[c.label.array > 0] for c in cases]).astype(np.float64)
    assert raw.mean == pytest.approx(fg.mean(), rel=1e-6) and raw.std == pytest.approx(fg.std(), rel=1e-6)
    assert raw.std > windowed.std  # the windowed statistics are those of clipped values
    image = cases[0].image.array
    x = normalize(image, raw)
    np.testing.assert_allclose(x, (image - raw.mean) / raw.std, rtol=1e-5, atol=1e-5)  # air stays at -1000 HU
    assert x.min() < (windowed.lower - raw.mean) / raw.std
    assert slices.network_grid(image, raw, 16, "window").box == slices.network_grid(image, windowed, 16, "window").box
    out = preprocess_volume(image, raw, 16, box=(-4, 28, -4, 28))  # padding outside the image reads as air
    assert out[0, 0, 0] == pytest.approx((-1000.0 - raw.mean) / raw.std, rel=1e-3)
    fixed = compute_intensity_plan(cases, PreprocessConfig(window="none", crop_hu=-500.0), np.random.default_rng(7))
    assert fixed.lower == -500.0 and fixed.mean == pytest.approx(raw.mean)
    assert IntensityPlan.from_dict(raw.to_dict()) == raw
