"""Stacked ensemble: out-of-fold discipline, a meta-model that learns, plain averaging."""
from pathlib import Path

import numpy as np
import pytest
import torch

from ctseg.config import StackMemberSetConfig
from ctseg.errors import CtsegError
from ctseg.evaluate.metrics import dice_per_class
from ctseg.models.stacking import (MemberPrediction, MemberRun, StackingMetaModel, average_members,
                                   check_out_of_fold, load_meta_model, meta_training_cases, nested_meta_cases,
                                   predict_meta,
                                   save_meta_model, select_members, stack_inputs, train_meta_model,
                                   vote_matrix)
from ctseg.train.losses import TanimotoCELoss

CLASSES = {0: "background", 1: "kidney", 2: "tumour"}


def _label(rng, z=6, s=32):
    y = np.zeros((z, s, s), np.uint8)
    yy, xx = np.mgrid[:s, :s]
    for k in range(1, z - 1):
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 9)
        y[k][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        y[k][(yy - cy) ** 2 + (xx - cx - r // 2) ** 2 <= (r // 2) ** 2] = 2
    return y


def _soft(label, num_classes, rng, noise=0.3, swap=False):
    """Noisy softmax maps (K, Z, S, S) around `label`; swap exchanges classes 1 and 2 (a biased member)."""
    lab = label.copy()
    if swap:
        lab[label == 1], lab[label == 2] = 2, 1
    logits = 3.0 * np.eye(num_classes, dtype=np.float32)[lab].transpose(3, 0, 1, 2)
    logits += noise * 3.0 * rng.standard_normal(logits.shape).astype(np.float32)
    e = np.exp(logits - logits.max(0, keepdims=True))
    return (e / e.sum(0, keepdims=True)).astype(np.float16)


def test_meta_model_shapes_and_start_as_weighting():
    m = StackingMetaModel(5, 3, hidden=8)
    x = torch.rand(2, 5, 16, 16)
    out = m(x)
    assert out.shape == (2, 3, 16, 16)
    # the context branch starts at zero: the initial model is exactly the 1x1 weighting of log-probabilities
    assert torch.allclose(out, m.weighting(torch.log(x.clamp_min(1e-4))))


def test_out_of_fold_checks(tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, np.zeros((2, 3, 8, 8), np.float16))
    ok = MemberPrediction("case_a", "unet-2d", 0, path, frozenset({"case_b", "case_c"}))
    leak = MemberPrediction("case_b", "unet-2d", 1, path, frozenset({"case_b", "case_c"}))
    check_out_of_fold([ok])
    with pytest.raises(CtsegError, match="trained on case 'case_b'"):
        check_out_of_fold([ok, leak])
    with pytest.raises(CtsegError, match="not out-of-fold"):
        stack_inputs("case_b", {"case_b": [leak]}, ["unet-2d"])
    with pytest.raises(CtsegError, match="no out-of-fold prediction from member"):
        stack_inputs("case_a", {"case_a": [ok]}, ["unet-2d", "msd-3d"])
    x, used = stack_inputs("case_a", {"case_a": [ok]}, ["unet-2d"])
    assert x.shape == (2, 3, 8, 8) and used == [ok]
    fold_of = {"a": 0, "b": 0, "c": 1, "d": 2}
    assert meta_training_cases(fold_of, 0) == ["c", "d"]
    assert meta_training_cases(fold_of, 1) == ["a", "b", "d"]
    with pytest.raises(CtsegError):
        meta_training_cases({"a": 0}, 0)


def test_select_members_top_k_per_set():
    runs = [MemberRun(f"unet-{i}", Path("."), "unet", "2d", "multiclass", "ctia", s)
            for i, s in enumerate([0.7, 0.9, 0.8, float("nan")])]
    runs += [MemberRun("msd-0", Path("."), "msd", "3d", "foreground", "ctia", 0.5)]
    sets = [StackMemberSetConfig(arch="msd", dim="3d", target="foreground"),
            StackMemberSetConfig(arch="unet", dim="2d", target="multiclass")]
    assert [m.name for m in select_members(runs, sets, top_k=2)] == ["msd-0", "unet-1", "unet-2"]
    with pytest.raises(CtsegError, match="no finished run for stack member set msd-2d"):
        select_members(runs, [StackMemberSetConfig(arch="msd", dim="2d")], top_k=2)


def test_select_members_per_fold_uses_only_that_folds_scores():
    """Per-fold selection (issue 17): the ranking for test fold k uses the fold-k models' validation scores only;
    the mean over folds would pick another member here."""
    a = MemberRun("unet-a", Path("."), "unet", "2d", "multiclass", "ctia", 0.75, (0.9, 0.6), (("c1",), ("c4",)))
    b = MemberRun("unet-b", Path("."), "unet", "2d", "multiclass", "ctia", 0.80, (0.7, 0.9), (("c1",), ("c4",)))
    sets = [StackMemberSetConfig(arch="unet", dim="2d", target="multiclass")]
    assert [m.name for m in select_members([a, b], sets, top_k=1)] == ["unet-b"]  # mean over folds
    assert [m.name for m in select_members([a, b], sets, top_k=1, fold=0)] == ["unet-a"]
    assert [m.name for m in select_members([a, b], sets, top_k=1, fold=1)] == ["unet-b"]
    with pytest.raises(CtsegError, match="no validation score for fold 2"):
        select_members([a, b], sets, top_k=1, fold=2)


def test_nested_meta_cases_are_held_out_from_every_member():
    train = ["a", "b", "c", "d", "e"]
    assert nested_meta_cases(train, [["a", "b", "c"], ["a", "b", "c"]], 0) == ["d", "e"]
    assert nested_meta_cases(train, [["a", "b", "c"], ["a", "b", "d"]], 0) == ["e"]  # any member's weights exclude
    with pytest.raises(CtsegError, match="val_fraction"):
        nested_meta_cases(train, [train], 0)


def test_select_members_top5_by_validation_score_among_8():
    scores = [0.81, 0.92, 0.77, 0.88, 0.95, 0.70, 0.90, 0.86]
    runs = [MemberRun(f"unet-2d-ctia-s{i}", Path("."), "unet", "2d", "multiclass", "ctia", s)
            for i, s in enumerate(scores)]
    runs += [MemberRun(f"msd-3d-ctia-fg-s{i}", Path("."), "msd", "3d", "foreground", "ctia", 0.5 + i / 100)
             for i in range(8)]
    sets = [StackMemberSetConfig(arch="msd", dim="3d", target="foreground"),
            StackMemberSetConfig(arch="unet", dim="2d", target="multiclass")]
    chosen = select_members(runs, sets, top_k=5)
    unets = [m for m in chosen if m.arch == "unet"]
    assert [m.val_score for m in unets] == sorted(scores, reverse=True)[:5]
    assert [m.name for m in chosen if m.arch == "msd"] == [f"msd-3d-ctia-fg-s{i}" for i in (7, 6, 5, 4, 3)]


def test_average_members_mixed_targets():
    rng = np.random.default_rng(0)
    y = _label(rng)
    multi = _soft(y, 3, rng).astype(np.float32)
    fg = np.stack([multi[0] * 0.5, 1 - multi[0] * 0.5])  # a foreground member, more confident in foreground
    avg = average_members([multi, fg], ["multiclass", "foreground"], 3)
    assert avg.shape == multi.shape
    np.testing.assert_allclose(avg.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(avg[0], (multi[0] + fg[0]) / 2, atol=1e-6)
    # the foreground share is split in the multiclass member's proportions
    ratio = avg[1] / np.maximum(avg[1] + avg[2], 1e-6)
    np.testing.assert_allclose(ratio, multi[1] / (multi[1] + multi[2]), atol=1e-3)
    with pytest.raises(ValueError, match="multiclass member"):
        average_members([fg], ["foreground"], 3)
    binary = average_members([fg, fg], ["foreground", "foreground"], 2)
    np.testing.assert_allclose(binary, fg, atol=1e-6)


def test_meta_model_learns_what_averaging_cannot(tmp_path):
    """One member is good, one systematically swaps kidney and tumour: the meta-model learns to use the
    good one (or undo the swap); plain averaging is dragged down."""
    rng = np.random.default_rng(1)
    labels = [_label(rng) for _ in range(6)]
    inputs = [np.concatenate([_soft(y, 3, rng, noise=0.5), _soft(y, 3, rng, noise=0.2, swap=True)]) for y in labels]
    torch.manual_seed(0)
    model = train_meta_model(inputs[:4], labels[:4], 3, loss=TanimotoCELoss(), steps=120, batch_size=8, lr=1e-2,
                             hidden=8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "meta.pt"
    save_meta_model(model, path)
    model = load_meta_model(path)
    stacked, averaged = [], []
    for x, y in zip(inputs[4:], labels[4:]):
        p = predict_meta(model, x)
        assert p.shape == (3, *y.shape)
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-4)
        stacked.append(dice_per_class(p.argmax(0), y, CLASSES)["tumour"])
        a = average_members([x[:3].astype(np.float32), x[3:].astype(np.float32)], ["multiclass", "multiclass"], 3)
        averaged.append(dice_per_class(a.argmax(0), y, CLASSES)["tumour"])
    assert np.mean(stacked) > 0.9
    assert np.mean(stacked) > np.mean(averaged) + 0.2


def test_vote_matrix_starts_the_meta_model_at_the_members_geometric_mean():
    rng = np.random.default_rng(2)
    y = _label(rng)
    multi = _soft(y, 3, rng, noise=0.4).astype(np.float32)
    fg = np.stack([multi[0], 1 - multi[0]]).astype(np.float16).astype(np.float32)  # as stored
    w = vote_matrix(["multiclass", "foreground"], 3)
    assert w.shape == (3, 5)
    np.testing.assert_allclose(w.sum(1), [1.0, 1.0, 1.0])  # every class hears every member once
    model = StackingMetaModel(5, 3, hidden=4, init_weight=w)
    p = predict_meta(model, np.concatenate([multi, fg]).astype(np.float16))
    log_multi, log_fg = np.log(np.clip(multi, 1e-4, None)), np.log(np.clip(fg, 1e-4, None))
    geo = (log_multi + np.stack([log_fg[0], log_fg[1], log_fg[1]])) / 2
    np.testing.assert_array_equal(p.argmax(0), geo.argmax(0))
    with pytest.raises(ValueError, match="init_weight"):
        StackingMetaModel(4, 3, init_weight=w)
