"""Slice skipping / interpolation as a simulated acquisition of the whole cached volume (ctseg.augment.acquisition)."""
from types import SimpleNamespace

import numpy as np
import pytest

from ctseg.augment import CTIAConfig
from ctseg.augment.acquisition import (INTERP, NONE, SKIP, acquire_stack, grid_centres, linear_weights,
                                       sample_acquisition, slab_weights)
from ctseg.config import ExperimentConfig
from ctseg.train.data import BatchPlan, draw_stacks


def _volume(z=20, s=4, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(z, s, s)).astype(np.float32) + np.arange(z, dtype=np.float32)[:, None, None]
    label = np.zeros((z, s, s), np.uint8)
    label[3:z - 3, 1:3, 1:3] = 1
    return image, label


def test_a_simulated_thick_slice_is_the_mean_of_the_source_slices_it_covers():
    image, _ = _volume()
    # factor 3, phase 0: slabs [-0.5, 2.5], [2.5, 5.5], ...: slab 1 covers source slices 3, 4, 5 exactly
    c = grid_centres(20, 3.0, 0.0)
    np.testing.assert_allclose(c[:3], [1.0, 4.0, 7.0])
    w = slab_weights(c, 3.0, 20)
    np.testing.assert_allclose(w[1] @ image.reshape(20, -1), image[3:6].mean(axis=0).ravel(), rtol=1e-6)
    # factor 1.5, phase 0.5: slab [0, 1.5] covers half of slice 0 and all of slice 1: partial-volume weights
    w = slab_weights(np.array([0.75]), 1.5, 20)
    np.testing.assert_allclose(w[0, :3], [1 / 3, 2 / 3, 0.0])
    # an intermediate position: linear between its neighbours
    np.testing.assert_allclose(linear_weights(np.array([2.3]), 20)[0, 2:4], [0.7, 0.3])


@pytest.mark.parametrize("mode,factor", [(SKIP, 2.5), (INTERP, 0.6)])
def test_acquired_stack_lies_on_the_simulated_grid(mode, factor):
    image, label = _volume(z=40)
    rng = np.random.default_rng(1)
    out, out_lab = acquire_stack(image, label, 8, mode, factor, 0.4 * factor, rng)
    assert out.shape == (8, 4, 4) and out.dtype == np.float32 and out_lab.dtype == np.uint8
    centres = grid_centres(40, factor, 0.4 * factor)
    # every output slice is one grid slice: its mean intensity (the slice index + noise mean) matches a centre
    means = out.mean(axis=(1, 2))
    w = slab_weights(centres, factor, 40) if mode == SKIP else linear_weights(centres, 40)
    grid = w @ image.reshape(40, -1)
    for m in means:
        assert np.min(np.abs(grid.mean(axis=1) - m)) < 1e-4
    assert out_lab.any(axis=(1, 2)).all()  # foreground slices preferred
    if mode == SKIP:  # 3D: a consistent grid, slices at least one slab apart
        picked = sorted(int(np.argmin(np.abs(grid.mean(axis=1) - m))) for m in means)
        assert np.all(np.diff(centres[picked]) >= factor - 1e-9)


def test_sampler_probabilities_and_draw_stacks_uses_the_volume():
    rng = np.random.default_rng(0)
    modes = [sample_acquisition(0.2, 2.0, 0.3, 0.5, rng) for _ in range(4000)]
    frac = {m: sum(x[0] == m for x in modes) / 4000 for m in (NONE, SKIP, INTERP)}
    assert abs(frac[SKIP] - 0.2) < 0.03 and abs(frac[INTERP] - 0.3) < 0.03
    assert all(1 < f <= 2 for m, f, _ in modes if m == SKIP) and all(0.5 <= f < 1 for m, f, _ in modes if m == INTERP)
    image, label = _volume()
    cache = SimpleNamespace(load=lambda cid: SimpleNamespace(image=image, label=label))
    cfg = ExperimentConfig.model_validate({"model": {"dim": "3d"}, "preprocess": {"num_slices": 6},
                                           "train": {"batch_size_3d": 1}})
    skip_all = CTIAConfig(slice_skip_p=1, slice_interp_p=0, slice_skip_max_factor=3, p_batch_3d=1)
    img, lab, _ = draw_stacks(cache, ["a"], BatchPlan.from_config(cfg), "multiclass", np.random.default_rng(3),
                              acquisition=skip_all)
    assert img.shape == (1, 1, 6, 4, 4)
    # slab means are not single source slices: the source slices' noise averages out
    single = image.reshape(20, -1)
    for sl in img[0, 0].reshape(6, -1).numpy():
        assert np.min(np.abs(single - sl).max(axis=1)) > 1e-3


def _thick_volume(z: int, fg: int, s: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(z, s, s) image with the slice index as intensity; `fg` foreground slices in the middle."""
    image = np.broadcast_to(np.arange(z, dtype=np.float32)[:, None, None], (z, s, s)).copy()
    label = np.zeros((z, s, s), np.uint8)
    start = (z - fg) // 2
    label[start:start + fg, 1:3, 1:3] = 1
    return image, label


@pytest.mark.parametrize("z,fg,factor", [(100, 24, 1.6), (60, 20, 1.3), (60, 10, 3.0), (40, 12, 2.0),
                                         (30, 8, 2.5), (100, 24, 0.7)])
def test_short_foreground_is_topped_up_with_its_neighbours_as_the_normal_sampler_does(z, fg, factor):
    """Issue 16: fewer than 16 foreground slices on the simulated grid (thick or short volumes) keep all of them and
    the grid slices nearest to them, not a uniform draw over the whole grid; foreground share and z-gaps then match
    the normal sampler's on a volume with the same foreground."""
    from ctseg.preprocess.slices import sample_slices

    image, label = _thick_volume(z, fg)
    rng = np.random.default_rng(0)
    mode = SKIP if factor > 1 else INTERP
    for draw in range(20):
        phase = float(rng.uniform(0, factor))
        centres = grid_centres(z, factor, phase)
        nearest = np.clip(np.rint(centres).astype(int), 0, z - 1)
        grid_fg = int(label[nearest].any(axis=(1, 2)).sum())
        out, out_lab = acquire_stack(image, label, 16, mode, factor, phase, rng)
        share = out_lab.any(axis=(1, 2)).mean()
        # the normal sampler on a volume whose foreground is the grid's: same share
        ref_image, ref_label = _thick_volume(centres.size, grid_fg)
        ref = sample_slices(ref_label, 16, np.random.default_rng(draw))
        assert share == pytest.approx(ref_label[ref].any(axis=(1, 2)).mean())
        assert share == pytest.approx(min(grid_fg, 16) / min(16, centres.size))
        # z-gaps: the chosen grid slices form one run of neighbours around the foreground (gap one slab)
        picked = np.array([int(np.argmin(np.abs(centres - c))) for c in
                           (out.mean(axis=(1, 2)) if mode == INTERP else _slab_centres(out, centres, factor, z))])
        gaps = np.diff(np.sort(picked))
        ref_gaps = np.diff(ref)
        if grid_fg < 16:
            assert gaps.max() == ref_gaps.max() == 1


def _slab_centres(out: np.ndarray, centres: np.ndarray, factor: float, z: int) -> np.ndarray:
    """The centre of the slab each output slice came from (slab means of the slice-index image are unique)."""
    grid = slab_weights(centres, factor, z) @ np.arange(z, dtype=np.float64)
    return np.array([centres[int(np.argmin(np.abs(grid - m)))] for m in out.mean(axis=(1, 2))])


def test_acquired_stacks_keep_the_class_oversampling():
    """Issue 16: stacks from a simulated acquisition are drawn by the same rule as the others, class oversampling
    included (before, a CTIA-only stack never oversampled the rare tumour class)."""
    z = 80
    label = np.zeros((z, 4, 4), np.uint8)
    label[10:70, 1:3, 1:3] = 1
    label[39, 0, 0] = 2  # a small tumour on 1 of 60 foreground slices
    image = np.zeros((z, 4, 4), np.float32)
    rng = np.random.default_rng(0)
    with_tumour = [bool((acquire_stack(image, label, 16, SKIP, 1.2, 0.3, rng, oversample=0.33)[1] == 2).any())
                   for _ in range(200)]
    without = [bool((acquire_stack(image, label, 16, SKIP, 1.2, 0.3, rng)[1] == 2).any()) for _ in range(200)]
    assert np.mean(with_tumour) > np.mean(without) + 0.2
