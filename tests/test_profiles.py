"""One profile vocabulary in every config (issue 19.1): ci = tiny smoke run, cpu = 2-core CPU size, full = paper
size; the demo's default is unchanged and its old name `small` still works; an unknown profile's error lists the
config's profiles and `--help` says where they live."""
import logging
from pathlib import Path

import pytest

from ctseg.cli import main as cli_main
from ctseg.commands.demo import PHANTOM, demo_config
from ctseg.config import config_to_dict, load_config
from ctseg.errors import CtsegError
from ctseg.experiment import apply_profile

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["demo.yaml", "paper-kits19.yaml", "paper-chaos.yaml"]


def _settings(cfg) -> dict:
    """The config as a dict without its list of profiles (which applying a profile empties)."""
    d = config_to_dict(cfg)
    d["experiment"].pop("profiles")
    return d


def _size(cfg) -> tuple:
    """What makes a run big: network input size, folds, training steps."""
    return (cfg.preprocess.in_plane_size, cfg.cv.n_folds, cfg.train.epochs * cfg.train.steps_per_epoch)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_has_ci_cpu_full_in_that_order_of_size(name):
    cfg = load_config(REPO / "configs" / name)
    assert set(cfg.experiment.profiles) == {"ci", "cpu", "full"}
    ci, cpu, full = (apply_profile(cfg, p) for p in ("ci", "cpu", "full"))
    assert _size(ci) < _size(cpu) < _size(full), (name, _size(ci), _size(cpu), _size(full))
    assert ci.cv.n_folds == 2 and ci.train.epochs * ci.train.steps_per_epoch <= 4  # a smoke run
    base = "cpu" if name == "demo.yaml" else "full"  # the profile the base settings are
    same = _settings(apply_profile(cfg, base))
    if base == "full":  # the paper configs' `full` = the base settings plus the no-windowing arm (issue 17 §5)
        assert same["experiment"].pop("variants") == {"nowindow": {"preprocess": {"window": "none"}}}
        same["experiment"]["variants"] = cfg.experiment.variants
    assert same == _settings(cfg)
    with pytest.raises(CtsegError, match="unknown profile 'small'; this config defines: ") as err:
        apply_profile(cfg, "small")  # the old name lives on in `ctseg demo` only
    assert all(p in str(err.value) for p in ("ci", "cpu", "full"))


def test_demo_default_is_the_cpu_base_and_small_still_works(caplog):
    path = REPO / "configs" / "demo.yaml"
    assert set(PHANTOM) == {"ci", "cpu", "full"}
    cpu, name = demo_config(path, "cpu")
    assert name == "cpu" and _settings(cpu) == _settings(load_config(path))
    with caplog.at_level(logging.WARNING):
        small, name = demo_config(path, "small")
    assert name == "cpu" and _settings(small) == _settings(cpu) and "deprecated" in caplog.text
    assert demo_config(path, "ci")[0].cv.n_folds == 2


@pytest.mark.parametrize("verb", ["demo", "experiment", "stress"])
def test_help_says_where_the_profiles_are(verb, capsys):
    with pytest.raises(SystemExit):
        cli_main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "experiment.profiles" in text and "ci" in text and "cpu" in text and "full" in text
