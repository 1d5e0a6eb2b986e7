"""3D inference sees z as training does (issue 10, point 5): stack building, gaps, coverage, one implementation.

The model side is observed directly: a recording 3D model gets a volume whose slice i holds the value i, so the
stacks it is fed reveal their slice indices; training's stacks are read the same way from `draw_stacks` batches.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from ctseg.config import ExperimentConfig, parse_config
from ctseg.errors import CtsegError
from ctseg.inference.predict import predict_network
from ctseg.inference.windows import softmax_3d
from ctseg.preprocess.slices import sample_slices
from ctseg.preprocess.zstacks import (expected_gap, inference_stride, sampled_stacks, window_starts,
                                      z_stacks)
from ctseg.train.data import BatchPlan, draw_stacks, predict_cached
from ctseg.inference.trained import TrainedModel

W = 16


class Recorder(nn.Module):
    """3D model on volumes whose slice i holds the value i: records each stack's slice indices; foreground
    (class 1) on slices lo..hi, class 2 where a slice's stack neighbours are more than 1 apart (so the answer
    depends on the z-context)."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi, self.seen = lo, hi, []

    def forward(self, x):  # (B, 1, Z, S, S)
        idx = x[:, 0, :, 0, 0]
        self.seen.extend(np.rint(row.numpy()).astype(int) for row in idx.cpu())
        fg = ((x >= self.lo - 0.5) & (x <= self.hi + 0.5)).float()
        gap = torch.zeros_like(x)
        gap[:, :, 1:] = (x[:, :, 1:] - x[:, :, :-1]).abs()
        return torch.cat([torch.zeros_like(x), 10 * fg - 5, 10 * fg * (gap > 1.5).float() - 4], dim=1)


def _volume(z: int, size: int = 4) -> np.ndarray:
    return np.broadcast_to(np.arange(z, dtype=np.float32)[:, None, None], (z, size, size)).copy()


def _member(module, z_context: str) -> TrainedModel:
    cfg = ExperimentConfig()
    cfg.model.dim = "3d"
    cfg.predict.z_context = z_context
    return TrainedModel(module, cfg, None, {0: "background", 1: "kidney", 2: "tumour"}, "multiclass", None,
                        {0: "background", 1: "kidney", 2: "tumour"})


def _gaps(stacks) -> np.ndarray:
    return np.concatenate([np.diff(s) for s in stacks])


def _training_stacks(z: int, lo: int, hi: int, n: int = 400) -> list[np.ndarray]:
    """Slice indices of `n` training stacks of one volume with foreground on slices lo..hi, read from the
    images `draw_stacks` returns (the paper's sampler: no class oversampling, no simulated acquisition)."""
    label = np.zeros((z, 4, 4), np.uint8)
    label[lo:hi + 1] = 1
    cache = SimpleNamespace(load=lambda cid: SimpleNamespace(image=_volume(z), label=label))
    plan = BatchPlan("3d", W, 1, 1)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        image, _, _ = draw_stacks(cache, ["c"], plan, "multiclass", rng)
        out.append(np.rint(image[0, 0, :, 0, 0].numpy()).astype(int))
    return out


# --- the pure stack builder -----------------------------------------------------------------------------------

@pytest.mark.parametrize("z", [16, 17, 40, 100, 203, 500])
def test_strided_stacks_cover_every_slice_at_training_mean_gap(z):
    stride = inference_stride(z, W)
    st = z_stacks(z, W, stride)
    assert st.index.shape[1] == W and st.index.min() == 0 and st.index.max() == z - 1
    assert (np.diff(st.index, axis=1) == st.stride).all() and st.stride == stride
    assert (st.coverage() > 0).all()
    # training's mean gap over all z slices (a volume without foreground), by simulation and in closed form
    rng = np.random.default_rng(1)
    sim = np.mean([np.diff(sample_slices(None, W, rng, num_slices=z)).mean() for _ in range(300)])
    assert sim == pytest.approx(expected_gap(z, W), rel=0.03)
    assert abs(stride - expected_gap(z, W)) <= (0.5 if stride < z // W else 1.0)  # rounded; capped at z // W


def test_contiguous_stacks_are_the_sliding_windows():
    st = z_stacks(40, W, 1, overlap=0.5)
    assert [int(s[0]) for s in st.index] == window_starts(40, W, 0.5) == [0, 8, 16, 24]
    assert (np.diff(st.index, axis=1) == 1).all() and (st.coverage() > 0).all()
    assert st.weight[0].argmax() in (7, 8) and st.weight.min() > 0


def test_short_volumes_pad_with_zero_weight():
    for st in (z_stacks(5, W, 3), sampled_stacks(np.array([1, 2]), 5, W, 4, np.random.default_rng(0))):
        assert st.index.shape == (1, W) and st.index[0, :5].tolist() == [0, 1, 2, 3, 4] and (st.index[0, 5:] == 4).all()
        assert (st.weight[0, :5] == 1).all() and (st.weight[0, 5:] == 0).all()
        np.testing.assert_array_equal(st.coverage(), np.ones(5))


def test_sampled_stacks_are_drawn_as_training_draws():
    # fewer than 16 foreground slices: training's own top-up rule (same generator -> same slices)
    z, fg = 60, np.array([20, 21, 22, 25, 26])
    label = np.zeros((z, 1, 1), np.uint8)
    label[fg] = 1
    st = sampled_stacks(fg, z, W, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(st.index[0], sample_slices(label, W, np.random.default_rng(7)))
    assert len(st) == 1
    # many foreground slices: every foreground slice covered by each draw, nothing else covered
    fg = np.arange(40, 140)
    st = sampled_stacks(fg, 200, W, 3, np.random.default_rng(0))
    cov = st.coverage()
    assert (cov[fg] >= 3).all() and (np.delete(cov, fg) == 0).all()
    assert all(np.all(np.diff(s) > 0) for s in st.index)  # sorted, distinct
    with pytest.raises(ValueError):
        sampled_stacks(np.array([250]), 200, W, 1, np.random.default_rng(0))


# --- the stacks the model is fed --------------------------------------------------------------------------------

@pytest.mark.parametrize("z, lo, hi", [(200, 40, 139), (90, 30, 60)])
def test_inference_gaps_match_training_gaps(z, lo, hi):
    """The z gaps of the stacks a 3D model sees at inference follow training's (`draw_stacks`) distribution."""
    train = _training_stacks(z, lo, hi)
    train_gaps = _gaps(train)
    f = hi - lo + 1
    assert train_gaps.mean() == pytest.approx(expected_gap(f, W), rel=0.05)

    rec = Recorder(lo, hi)
    predict_network(_volume(z), _member(rec, "sampled"), "cpu", batch_size=1)
    first = z_stacks(z, W, inference_stride(z, W))
    n_first = len(first)
    np.testing.assert_array_equal(np.stack(rec.seen[:n_first]), first.index)  # the first pass, as built
    # the second pass: stacks drawn from the foreground slices the first pass found, by the pure builder
    expected = sampled_stacks(np.arange(lo, hi + 1), z, W, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(np.stack(rec.seen[n_first:]), expected.index)
    # that builder's gaps follow training's distribution, not just its mean: gap histograms and stack spans
    # agree (Kolmogorov-Smirnov distance; 400 training stacks against ~400 inference stacks)
    many = list(sampled_stacks(np.arange(lo, hi + 1), z, W, max(1, 400 * W // f), np.random.default_rng(1)).index)
    inf_gaps = _gaps(many)
    assert inf_gaps.mean() == pytest.approx(train_gaps.mean(), rel=0.03)
    for a, b in ((inf_gaps, train_gaps), (np.array([s[-1] - s[0] for s in many]),
                                          np.array([s[-1] - s[0] for s in train]))):
        grid = np.arange(0, max(a.max(), b.max()) + 1)
        cdf = lambda v: np.searchsorted(np.sort(v), grid, side="right") / v.size  # noqa: E731
        assert np.abs(cdf(a) - cdf(b)).max() < 0.1

    rec = Recorder(lo, hi)
    predict_network(_volume(z), _member(rec, "strided"), "cpu", batch_size=1)
    second = rec.seen[n_first:]
    stride = inference_stride(z, W, f)
    assert set(_gaps(second).tolist()) == {stride} and abs(stride - train_gaps.mean()) <= 0.5
    assert set(np.concatenate(second).tolist()) == set(range(z))  # every slice, once per chain window

    rec = Recorder(lo, hi)
    predict_network(_volume(z), _member(rec, "contiguous"), "cpu", batch_size=1)
    assert set(_gaps(rec.seen).tolist()) == {1}  # the old sliding window: gap 1, what training never shows


@pytest.mark.parametrize("z", [7, 16, 45, 130])
@pytest.mark.parametrize("mode", ["sampled", "strided", "contiguous"])
def test_predict_and_validation_agree(z, mode):
    """Inference (`ctseg.inference.windows`) and validation (`predict_cached`) share stacks, blending, passes."""
    image = _volume(z) + np.random.default_rng(z).normal(0, 0.05, (z, 4, 4)).astype(np.float32)
    lo, hi = z // 4, z // 2
    probs, _, _ = predict_network(image, _member(Recorder(lo, hi), mode), "cpu", batch_size=1)
    cfg = ExperimentConfig().predict.model_copy(update={"z_context": mode})
    label = predict_cached(Recorder(lo, hi), image, "3d", torch.device("cpu"), 3, chunk=W, predict=cfg)
    np.testing.assert_array_equal(label, probs.argmax(0).numpy())
    assert label.shape == (z, 4, 4) and (label == 0).any() and (label != 0).any()
    if hi - lo + 1 > 2 * W:  # the z-context changes the answer: class 2 marks slices seen next to non-adjacent ones
        assert (label == 2).any() != (mode == "contiguous")


def test_softmax_3d_weights_normalise():
    """A constant model's blended output is exactly its softmax, whatever the passes and stacks."""

    class Constant(nn.Module):
        def forward(self, x):
            logits = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1, 1)
            return logits.expand(x.shape[0], 3, *x.shape[2:]).clone()

    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    for mode in ("sampled", "strided", "contiguous"):
        out = torch.empty((3, 77, 4, 4))
        softmax_3d(Constant(), torch.zeros((77, 4, 4)), W, out, z_context=mode)
        torch.testing.assert_close(out[:, :, 0, 0].T, expected.expand(77, 3))


def test_config_default_and_old_models():
    cfg = parse_config({"model": {"dim": "3d"}})  # a model saved before predict.z_context existed
    assert cfg.predict.z_context == "sampled" and cfg.predict.z_draws == 4
    with pytest.raises(CtsegError, match="z_context"):
        parse_config({"predict": {"z_context": "sliding"}})
