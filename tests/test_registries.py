"""Registries (`ctseg.registry`): a toy augmentation, network and dataset layout registered from a test module
(`toy_components`, no other file edited) are CLI choices, own their config sections, and run through
`phantom`, `inspect`, `train` and `predict`; plugins load from CTSEG_PLUGINS."""
import json
import sys

import numpy as np
import pytest
import torch
import yaml

import toy_components
from ctseg.cli import main
from ctseg.config import ExperimentConfig, config_to_dict, family_augs, parse_config
from ctseg.errors import CtsegError
from ctseg.io import read_volume
from ctseg.registry import AUGMENTERS, LAYOUTS, NETWORKS, STRESS_AXES, load_plugins
from ctseg.resources import parameter_count


@pytest.fixture
def toys():
    toy_components.register()
    yield
    toy_components.unregister()


def test_toy_sections_are_validated_and_saved(toys):
    cfg = parse_config({"augment": {"name": "toyflip", "toyflip": {"p": 0.25}},
                        "model": {"arch": "toynet", "toynet": {"hidden": 3}}, "data": {"layout": "toyflat"}})
    assert cfg.augment.section("toyflip").p == 0.25 and cfg.model.section("toynet").hidden == 3
    assert cfg.augment.section("ctia").noise_p == 0.5  # the built-in sections stay as they were
    d = config_to_dict(cfg)
    assert d["augment"]["toyflip"]["p"] == 0.25 and d["model"]["toynet"] == {"hidden": 3}
    assert parse_config(d) == cfg  # saved and read back
    cfg.augment.name = "ctia"  # an assignment keeps the registered sections' settings
    assert cfg.augment.section("toyflip").p == 0.25
    assert "toyflip" in family_augs() and "toyflip" in cfg.augment.known_names()
    for bad, where in (({"model": {"arch": "toynet", "toynet": {"hidden": 0}}}, r"model\.toynet\.hidden: Input should be greater"),
                       ({"augment": {"toyflop": {}}}, "unknown key"),
                       ({"model": {"arch": "toynot"}}, "unknown network 'toynot'")):
        with pytest.raises(CtsegError, match=where):
            parse_config(bad)
    # memory: the network's own estimate, never the U-Net formula
    assert parameter_count(cfg.model, 3) == 9 * 3 + 3 * 3


def test_toy_components_are_cli_choices_and_the_builtins_stay_first(toys):
    assert list(NETWORKS)[:2] == ["unet", "msd"] and list(LAYOUTS)[:3] == ["nnunet", "kits19", "chaos"]
    assert list(AUGMENTERS)[:4] == ["ctia", "mia", "nnunet", "none"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])


def test_toy_components_through_phantom_inspect_train_predict(toys, tmp_path, capsys):
    data, run, seg = tmp_path / "data", tmp_path / "run", tmp_path / "seg.nii.gz"
    assert main(["phantom", "--layout", "toyflat", "--cases", "3", "--out", str(data), "--no-progress"]) == 0
    assert (data / "toy.json").is_file() and len(list(data.glob("*_img.nii.gz"))) == 3
    capsys.readouterr()
    assert main(["inspect", str(data), "--json"]) == 0  # detected as the toy layout
    info = json.loads(capsys.readouterr().out)
    assert "toyflat" in json.dumps(info)
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"layout": "toyflat"},
        "preprocess": {"in_plane_size": 32, "num_slices": 8, "subset_size": 2},
        "augment": {"name": "toyflip", "toyflip": {"p": 1.0}},
        "model": {"arch": "toynet", "toynet": {"hidden": 3}},
        "train": {"batch_size_2d": 2, "epochs": 1, "steps_per_epoch": 2, "device": "cpu"}}))
    assert main(["train", "--data", str(data), "--out", str(run), "--config", str(config), "--no-progress"]) == 0
    saved = json.loads((run / "run.json").read_text())["config"]  # the toy sections saved with the model
    assert saved["model"]["toynet"] == {"hidden": 3} and saved["augment"]["toyflip"]["p"] == 1.0
    image = data / "toy00_img.nii.gz"
    assert main(["predict", "-i", str(image), "--model", str(run), "-o", str(seg), "--device", "cpu"]) == 0
    out, ref = read_volume(seg), read_volume(image)
    assert out.shape == ref.shape and set(np.unique(out.array)) <= {0, 1, 2}


def test_toy_augmentation_is_sampler_plus_pure_function(toys):
    aug = AUGMENTERS["toyflip"].builder(toy_components.ToyFlipConfig(p=1.0), "2d", None)
    image = torch.arange(2 * 1 * 2 * 3 * 4, dtype=torch.float32).view(2, 1, 2, 3, 4)
    label = (image > 20).long()
    params = aug.sample(image, torch.Generator().manual_seed(0))
    assert params.tolist() == [True, True]
    out, lab = aug.apply(image, label, params, torch.Generator())
    assert torch.equal(out, image.flip(-1)) and torch.equal(lab, label.flip(-1))
    with pytest.raises(TypeError, match="abstract"):
        type("Half", (toy_components.Augmenter,), {"apply": lambda *a: a})()


def test_plugins_load_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "ctseg_toy_plugin.py").write_text(
        "from dataclasses import replace\n"
        "from ctseg.registry import STRESS_AXES\n"
        "STRESS_AXES.register(replace(STRESS_AXES['hu-offset'], name='toy-offset'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CTSEG_PLUGINS", "ctseg_toy_plugin")
    try:
        load_plugins()
        assert "toy-offset" in STRESS_AXES
        cfg = ExperimentConfig.model_validate({"stress": {"axes": ["toy-offset"], "severities": {"toy-offset": [5.0]}}})
        assert cfg.stress.axes == ["toy-offset"]
    finally:
        STRESS_AXES.unregister("toy-offset")
        sys.modules.pop("ctseg_toy_plugin", None)
    monkeypatch.setenv("CTSEG_PLUGINS", "ctseg_no_such_plugin")
    with pytest.raises(CtsegError, match="ctseg_no_such_plugin"):
        load_plugins()
