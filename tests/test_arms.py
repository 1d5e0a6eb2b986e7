"""Augmentation arms as data (issue 16 §2): named lists of family steps in `augment.arms`, no code per arm."""
import pytest
import torch

from ctseg.augment import (ComposedAugmenter, CTIAConfig, CTIAugmenter, PaperMIAugmenter, acquisition_config,
                           build_augmenter)
from ctseg.config import AugmentConfig, ExperimentConfig, check_aug_names, parse_config
from ctseg.errors import CtsegError


def _batch(seed=0, b=2, z=4, s=32):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((b, 1, z, s, s), generator=g)
    label = torch.zeros((b, 1, z, s, s), dtype=torch.int64)
    label[..., 12:20, 12:20] = 1
    return image, label


def _aug(arms: dict, name: str, **sections) -> AugmentConfig:
    return AugmentConfig.model_validate({"name": name, "arms": arms, **sections})


def test_a_one_step_arm_is_the_family_augmenter_with_the_component_switched_off():
    cfg = _aug({"ctia-no-cwvrs": {"steps": [{"family": "ctia", "drop": ["cwvrs"]}]}}, "ctia-no-cwvrs")
    arm = build_augmenter(cfg, "2d")
    assert isinstance(arm, CTIAugmenter) and arm.cfg.cwvrs_p == 0 and arm.cfg.rotation_p == CTIAConfig().rotation_p
    ref = CTIAugmenter(CTIAConfig(cwvrs_p=0.0), "2d")
    image, label = _batch()
    a = arm(image, label, torch.Generator().manual_seed(3))
    b = ref(image, label, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_keep_switches_every_other_component_off_and_params_override():
    cfg = _aug({"mia-scale": {"steps": [{"family": "mia", "keep": ["scaling"], "params": {"scale_p": 1.0}}]}},
               "mia-scale")
    mia = cfg.step_config(cfg.arms["mia-scale"].steps[0])
    assert mia.scale_p == 1.0
    assert mia.rotation_p == mia.shear_p == mia.crop_p == mia.gamma_p == mia.noise_p == 0.0


def test_a_composed_arm_shares_one_gate_and_applies_every_step():
    zoom = {"family": "mia", "keep": ["scaling"], "params": {"scale_p": 1.0, "scale_range": [2.0, 2.0]}}
    ctia_none = {"family": "ctia", "keep": [], "params": {"p_batch_2d": 1.0}}
    cfg = _aug({"ctia+scale": {"steps": [ctia_none, zoom]}}, "ctia+scale")
    aug = build_augmenter(cfg, "2d")
    assert isinstance(aug, ComposedAugmenter)
    image, label = _batch()
    out, out_lab = aug(image, label, torch.Generator().manual_seed(0))
    # zoom 2 about the centre: the centred 8 x 8 square becomes ~16 x 16 on every slice
    area = (out_lab == 1).sum(dim=(-1, -2)).float()
    assert torch.all((area > 3.5 * 64) & (area < 4.5 * 64))
    # gate shut: only CTIA's ungated CWVRS may act; the labels never move, MIA never runs
    shut = _aug({"a": {"steps": [{"family": "ctia", "keep": ["cwvrs"], "params": {"p_batch_2d": 0.0, "cwvrs_p": 1.0}},
                                 zoom]}}, "a")
    out, out_lab = build_augmenter(shut, "2d")(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(out_lab, label) and not torch.equal(out, image)


def test_the_paper_arms_keep_their_names_and_behaviour():
    for name, cls in (("ctia", CTIAugmenter), ("mia", PaperMIAugmenter)):
        assert type(build_augmenter(AugmentConfig(name=name), "2d")) is cls
    robust = build_augmenter(AugmentConfig(name="robust"), "2d")  # the 160-step ablation's pick (docs/ABLATION.md §6)
    assert isinstance(robust, PaperMIAugmenter) and robust.cfg.rotation_p == 0 and robust.cfg.scale_p > 0
    with pytest.raises(ValueError, match="reserved"):
        _aug({"ctia": {"steps": [{"family": "mia"}]}}, "ctia")


def test_bad_arms_and_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="has no component"):
        _aug({"x": {"steps": [{"family": "ctia", "drop": ["scaling"]}]}}, "x")
    with pytest.raises(ValueError, match="unknown augmentation 'nope'"):
        AugmentConfig(name="nope")
    with pytest.raises(CtsegError, match="ctia-no-noise"):
        check_aug_names(_aug({"ctia-no-noise": {"steps": [{"family": "ctia", "drop": ["noise"]}]}}, "ctia"), ["nope"])
    with pytest.raises(CtsegError, match="experiment.augs"):
        parse_config({"experiment": {"augs": ["mia", "typo"]}})
    cfg = parse_config({"augment": {"arms": {"m": {"steps": [{"family": "mia", "drop": ["shear"]}]}}},
                        "experiment": {"augs": ["mia", "m"]}})
    assert isinstance(cfg, ExperimentConfig)


def test_the_acquisition_follows_the_arms_ctia_step():
    assert acquisition_config(AugmentConfig(name="mia")) is None
    assert acquisition_config(AugmentConfig(name="ctia")) == CTIAConfig()
    cfg = _aug({"no-z": {"steps": [{"family": "ctia", "drop": ["slice_skipping", "slice_interpolation"]}]},
                "ctia+crop": {"steps": [{"family": "ctia"}, {"family": "mia", "keep": ["crop"],
                                                             "params": {"p_batch_2d": 0.5}}]}}, "no-z")
    acq = acquisition_config(cfg)
    assert acq is not None and acq.slice_skip_p == acq.slice_interp_p == 0
    cfg.name = "ctia+crop"
    acq = acquisition_config(cfg)  # the composed arm's gate is its first step's
    assert acq is not None and acq.slice_skip_p == CTIAConfig().slice_skip_p and acq.p_batch_2d == 0.9
