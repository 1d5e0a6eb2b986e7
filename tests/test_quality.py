"""Ensemble quality flag: member agreement (mean pairwise Dice of foreground masks), the unusual-disagreement rule."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ctseg.evaluate.quality import FlagRule, flag_unusual, foreground_mask, member_agreement
from ctseg.evaluate.records import VolumeResult
from ctseg.inference.windows import argmax_uint8


def _probs(label: np.ndarray, n_classes: int, confidence: float = 0.9) -> np.ndarray:
    """(C, *label.shape) probabilities whose argmax is `label`."""
    p = np.full((n_classes, *label.shape), (1 - confidence) / (n_classes - 1), dtype=np.float32)
    for c in range(n_classes):
        p[c][label == c] = confidence
    return p


def test_identical_members_agree_fully_and_disjoint_members_not_at_all():
    lab = np.zeros((3, 8, 8), np.uint8)
    lab[1, 2:5, 2:6] = 1
    lab[2, 4:7, 1:3] = 2
    assert member_agreement([_probs(lab, 3), _probs(lab, 3, 0.6), _probs(lab, 3, 0.99)]) == 1.0
    a = np.zeros((3, 8, 8), np.uint8)
    b = np.zeros((3, 8, 8), np.uint8)
    a[0, :4] = 1
    b[2, 4:] = 2
    assert member_agreement([_probs(a, 3), _probs(b, 3)]) == 0.0


def test_agreement_is_the_mean_of_pairwise_dice_across_member_kinds():
    """A multiclass member (3 channels) and foreground members (2 channels): foreground = argmax != 0, so a
    kidney/tumour split does not count as disagreement; the value is the mean of the three pairwise Dice."""
    multi = np.zeros((2, 10, 10), np.uint8)
    multi[0, 0:4, 0:5] = 1  # 20 voxels
    multi[0, 4:6, 0:5] = 2  # 10 voxels -> foreground 30
    fg_same = (multi > 0).astype(np.uint8)
    fg_other = np.zeros_like(multi)
    fg_other[0, 3:9, 0:5] = 1  # 30 voxels, 15 shared with the others
    agreement = member_agreement([_probs(multi, 3), _probs(fg_same, 2), _probs(fg_other, 2)])
    assert agreement == pytest.approx((1.0 + 2 * (2 * 15 / 60)) / 3)


def test_foreground_mask_matches_predict_argmax_including_ties():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=(4, 6, 6)).transpose(3, 0, 1, 2).astype(np.float32)
    p[:, 0, 0, :3] = [[0.4, 0.4, 0.2], [0.4, 0.2, 0.4], [0.3, 0.35, 0.35]]  # ties: background wins the first
    ref = (argmax_uint8(torch.from_numpy(p)) != 0).numpy()
    assert np.array_equal(foreground_mask(p), ref)
    assert not foreground_mask(p)[0, 0, 0] and foreground_mask(p)[0, 0, 2]


def test_bad_member_maps_are_refused():
    lab = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="at least two members"):
        member_agreement([_probs(lab, 2)])
    with pytest.raises(ValueError, match="different grids"):
        member_agreement([_probs(lab, 2), _probs(np.zeros((3, 4, 4), np.uint8), 2)])


def test_flag_unusual_finds_the_outliers_of_a_constructed_distribution():
    # the bulk: quantiles of a normal distribution (mean 0.9, sd 0.02), so none lies beyond 2.4 sd
    bulk = {f"case_{i:03d}": float(0.9 + 0.02 * norm.ppf((i + 0.5) / 60)) for i in range(60)}
    agreements = {**bulk, "mild": 0.86, "odd": 0.75, "bad": 0.30, "nan": math.nan}
    med = np.median(list(agreements.values())[:-1])
    assert med == pytest.approx(0.9, abs=0.01)
    flagged = flag_unusual(agreements)
    assert flagged == {"odd", "bad", "nan"}  # 0.86 is within 3 robust stds of the bulk
    assert FlagRule(mad_k=1.0).threshold(list(agreements.values())) > 0.86
    assert "mild" in flag_unusual(agreements, FlagRule(mad_k=1.0))
    assert flag_unusual(agreements, FlagRule(mad_k=40.0, floor=0.0)) == {"nan"}


def test_flag_floor_and_minimum_spread():
    # every volume disagrees badly and alike: the robust rule finds nothing unusual, the floor flags them all
    poor = {f"c{i}": 0.40 + 0.001 * i for i in range(10)}
    assert flag_unusual(poor) == set(poor)
    assert flag_unusual(poor, FlagRule(floor=0.0)) == set()
    # most volumes agree exactly (MAD = 0): a hair below the median is not unusual, a clear drop is
    exact = {**{f"c{i}": 1.0 for i in range(10)}, "hair": 0.995, "drop": 0.90}
    assert flag_unusual(exact) == {"drop"}
    assert flag_unusual(exact, FlagRule(min_scale=0.0)) == {"hair", "drop"}
    assert flag_unusual({}) == set()


def test_volume_result_json_round_trip_with_and_without_agreement():
    base = dict(case_id="case_00001", fold=1, model="stacked-ctia", arch="stacked", dim="", aug="ctia",
                dice={"kidney": 0.9, "total": math.nan}, dice_paper={"kidney": 0.91}, hd95={"kidney": 2.5})
    with_agreement = VolumeResult(**base, agreement=0.8125)
    back = VolumeResult.from_json(json.loads(json.dumps(with_agreement.to_json(), allow_nan=False)))
    assert back.agreement == 0.8125 and back.dice_paper == with_agreement.dice_paper
    single = VolumeResult(**base)
    d = json.loads(json.dumps(single.to_json(), allow_nan=False))
    assert d["agreement"] is None and VolumeResult.from_json(d).agreement is None
    d.pop("agreement")  # a results file written before the field existed
    old = VolumeResult.from_json(d)
    assert old.agreement is None and old.case_id == "case_00001" and math.isnan(old.dice["total"])
