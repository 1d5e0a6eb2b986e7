import math

import numpy as np
import pytest
import torch

from ctseg.train.losses import TanimotoCELoss


def _reference(logits: np.ndarray, target: np.ndarray, s: float) -> tuple[float, float]:
    """Tanimoto (per class over batch + voxels, mean over classes) and CE, by explicit loops."""
    k = logits.shape[1]
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    tani = []
    for c in range(k):
        pc, yc = p[:, c], (target == c).astype(np.float64)
        inter = (pc * yc).sum()
        tani.append(1 - (inter + s) / ((pc ** 2).sum() + (yc ** 2).sum() - inter + s))
    ce = []
    for idx in np.ndindex(target.shape):
        b, rest = idx[0], idx[1:]
        ce.append(-math.log(p[(b, target[idx]) + rest]))
    return float(np.mean(tani)), float(np.mean(ce))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 3, 4, 4)])
def test_matches_explicit_reference(shape):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    loss_fn = TanimotoCELoss(smooth=1e-5)
    tani, ce = loss_fn.terms(logits, target)
    ref_t, ref_ce = _reference(logits.numpy(), target.numpy(), 1e-5)
    assert tani.item() == pytest.approx(ref_t, rel=1e-5)
    assert ce.item() == pytest.approx(ref_ce, rel=1e-5)
    assert loss_fn(logits, target).item() == pytest.approx(0.6 * ref_t + 0.4 * ref_ce, rel=1e-5)


def test_uniform_prediction_closed_form():
    # logits 0 -> p = 1/2 for both classes; N voxels, n1 of class 1
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, :2, :3] = 1  # n1 = 6
    n, s = target.numel(), 1e-5
    counts = {0: n - 6, 1: 6}
    expected_t = np.mean([1 - (0.5 * c + s) / (0.25 * n + c - 0.5 * c + s) for c in counts.values()])
    tani, ce = TanimotoCELoss(smooth=s).terms(torch.zeros(2, 2, 4, 4), target)
    assert tani.item() == pytest.approx(expected_t, rel=1e-6)
    assert ce.item() == pytest.approx(math.log(2), rel=1e-6)


def test_perfect_prediction_is_zero_and_wrong_is_large():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 6, 8, 8), generator=g)
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 200 - 100
    loss_fn = TanimotoCELoss()
    assert loss_fn(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = torch.nn.functional.one_hot((target + 1) % 3, 3).movedim(-1, 1).float() * 200 - 100
    tani, ce = loss_fn.terms(wrong, target)
    assert tani.item() > 0.99 and ce.item() > 100


def test_weights_are_configurable_and_bf16_logits_work():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    target = torch.randint(0, 2, (2, 8, 8), generator=g)
    tani, ce = TanimotoCELoss().terms(logits, target)
    assert TanimotoCELoss(1.0, 0.0)(logits, target).item() == pytest.approx(tani.item())
    assert TanimotoCELoss(0.0, 1.0)(logits, target).item() == pytest.approx(ce.item())
    low = TanimotoCELoss()(logits.bfloat16(), target)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(0.6 * tani.item() + 0.4 * ce.item(), rel=2e-2)
    with pytest.raises(ValueError):
        TanimotoCELoss(smooth=0)


def test_gradient_flows_and_descends():
    g = torch.Generator().manual_seed(4)
    target = torch.randint(0, 3, (1, 8, 8), generator=g)
    logits = torch.randn(1, 3, 8, 8, generator=g, requires_grad=True)
    loss_fn = TanimotoCELoss()
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad / logits.grad.norm()
    assert loss_fn(stepped, target) < loss


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="disagree"):
        TanimotoCELoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
