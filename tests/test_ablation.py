"""The augmentation ablation end to end (issue 16 §4-6): configs/ablation.yaml's ci profile on a tiny phantom,
two worker processes, out-of-fold population-shift stress test, the pre-registered rule, report section."""
import json
from pathlib import Path

import numpy as np
import pytest

from ctseg.cli import main
from ctseg.config import SelectionConfig
from ctseg.datasets.phantom import write_phantom_dataset
from ctseg.evaluate.ablation import paired_ci, select, split_volumes

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ablation.yaml"


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    data = write_phantom_dataset(root / "data", task="kidney", n_cases=6, layout="kits19", seed=5, size="small",
                                 in_plane=48)
    rc = main(["experiment", "--config", str(CONFIG), "--profile", "ci", "--data", str(data), "--out",
               str(root / "out"), "--jobs", "2", "--no-progress"])
    assert rc == 0
    return root / "out"


def test_every_arm_and_seed_is_trained_and_stressed_out_of_fold(ablation):
    runs = sorted(p.name for p in (ablation / "runs").iterdir())
    assert len(runs) == 10 and "unet-2d-ctia+scaling-s1" in runs   # 5 arms x 2 seeds
    settings = json.loads((ablation / "stress" / "settings.json").read_text())
    assert len(settings["models"]) == 10 and set(settings["axes"]) == {"pop-habitus", "pop-phase"}
    assert (ablation / "stress" / "part-0").is_dir() and (ablation / "stress" / "part-1").is_dir()
    rows = (ablation / "stress" / "rows.csv").read_text().splitlines()
    assert len(rows) - 1 == 10 * len(settings["volumes"]) * 4   # models x volumes x (2 axes x (clean + 1))


def test_the_rule_chooses_on_validation_and_reports_on_test(ablation):
    result = json.loads((ablation / "ablation" / "ablation.json").read_text())
    val, test = result["volumes"]["validation"], result["volumes"]["test"]
    assert val and test and not set(val) & set(test) and sorted(val + test) == result["volumes"]["all"]
    by_arm = {a["arm"]: a for a in result["validation"]}
    best = max(by_arm.values(), key=lambda a: a["shifted"])["shifted"]
    chosen = by_arm[result["chosen"]]
    assert chosen["shifted"] >= best - 0.005
    for part in ("arms", "validation", "test"):
        assert [a["arm"] for a in result[part]] == ["none", "mia", "ctia", "ctia-no-cwvrs", "ctia+scaling"]
        for a in result[part]:
            assert sorted(a["seeds"]) == [0, 1] and len(a["seed_shifted"]) == 2
    eff = {a["arm"]: a for a in result["arms"]}
    assert eff["ctia-no-cwvrs"]["reference"] == "ctia" and "shifted" in eff["ctia-no-cwvrs"]["effect"]
    assert "mia" in eff["ctia"]["vs"] and "ctia" in eff["mia"]["vs"]
    assert (ablation / "ablation" / "effects.png").stat().st_size > 5000


def test_the_report_shows_the_ablation(ablation):
    html = (ablation / "report" / "index.html").read_text()
    assert "Ablation — effect of each component" in html and "Ablation: effect of each augmentation component" in html
    md = (ablation / "results.md").read_text()
    assert "Rule (written before the runs)" in md and "Ablation — test volumes" in md


def test_selection_rule_ties_go_to_the_smaller_gap():
    from ctseg.evaluate.ablation import ArmStats

    def arm(name, shifted, gap, steps=1):
        return ArmStats(name, name, None, steps, [0], 4, 0.9, (0, 0), shifted, (0, 0), {}, gap, (0, 0), 0.5, "x",
                        0.0, {0: shifted})

    rule = SelectionConfig(tie_margin=0.01)
    winner, why = select([arm("a", 0.80, 0.10), arm("b", 0.795, 0.05), arm("c", 0.70, 0.0)], rule)
    assert winner.arm == "b" and "tied" in why[1]
    winner, _ = select([arm("a", 0.80, 0.10), arm("b", 0.78, 0.05)], rule)
    assert winner.arm == "a"


def test_split_is_per_fold_and_paired_ci_covers_a_known_difference():
    folds = [["a", "b", "c", "d"], ["e", "f"], ["g"]]
    val, test = split_volumes(folds, list("abcdefg"), 0.5, 0)
    assert len(set(val) & set("abcd")) == 2 and len(set(val) & set("ef")) == 1 and sorted(val + test) == list("abcdefg")
    d = np.random.default_rng(0).normal(0.05, 0.02, size=200)
    mean, lo, hi = paired_ci(d, 2000, np.random.default_rng(1))
    assert lo < 0.05 < hi and hi - lo < 0.01


def test_an_ablation_without_effects_reports_without_the_figure(ablation, tmp_path):
    """Only the paper's arms (e.g. the training-length profiles): no arm ablates another, so no effects.png; the
    report must not ask for it (it did: 'effects.png: No such file or directory' after all the work)."""
    import shutil

    from ctseg.evaluate.ablation import report_parts

    shutil.copytree(ablation / "ablation", tmp_path / "abl")
    (tmp_path / "abl" / "effects.png").unlink()
    lines, tables, effects = report_parts(tmp_path / "abl")
    assert effects is None and lines and tables
