"""Provenance records and the leak checker (issue 17): a clean tiny experiment with stacking passes, a deliberate
leak (the non-nested meta-model, an edited record) is caught naming the file and the case, an old folder without
records cannot be proven, and `ctseg check-leaks` exits accordingly."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctseg.cli import main
from ctseg.config import config_to_dict, load_config, parse_config
from ctseg.cv import run_stack
from ctseg.datasets.phantom import write_phantom_dataset
from ctseg.errors import CtsegError
from ctseg.evaluate.folds import load_folds
from ctseg.evaluate.provenance import check_leaks
from ctseg.experiment import apply_profile, run_experiment

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**stack):
    cfg = apply_profile(load_config(REPO / "configs" / "demo.yaml"), "ci")
    d = config_to_dict(cfg)
    d["experiment"].update(archs=["unet"], dims=["2d"], augs=["ctia"], seeds=[0], stack_seeds=[1], stack=True,
                           variants={"nowindow": {"preprocess": {"window": "none"}}})
    d["stack"].update(top_k=1, members=[{"arch": "unet", "dim": "2d", "target": "multiclass"}], **stack)
    d["stress"]["enabled"] = False
    return parse_config(d)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    data = write_phantom_dataset(root / "data", task="kidney", n_cases=6, layout="kits19", seed=0, size="small")
    out = root / "exp"
    run_experiment(tiny_config(), data, out, progress=False)
    return data, out


def test_clean_experiment_with_stacking_passes(tiny):
    data, out = tiny
    result = check_leaks(out)
    assert result.status == "clean", [str(f) for f in result.findings]
    assert result.exit_code == 0 and len(result.checked) == 4 * 2  # 3 CV runs + 1 stack, 2 folds each
    saved = json.loads((out / "leak_check.json").read_text())  # written by the experiment itself
    assert saved["status"] == "clean"
    folds = load_folds(out / "folds.json")
    stack = json.loads((out / "stack" / "ctia" / "stack.json").read_text())
    for k, entry in enumerate(stack["folds"]):
        test = set(folds.test_ids(k))
        # per-fold selection: both candidates ranked on the same validation cases, none in fold k
        chosen_on = {tuple(c["selected_on"]) for c in entry["candidates"]}
        assert len(chosen_on) == 1 and not set(next(iter(chosen_on))) & test and next(iter(chosen_on))
        best = max(entry["candidates"], key=lambda c: c["val_score"])
        assert entry["members"] == [best["name"]]
        # nested meta-model: learnt from the fold-k member's validation cases, made by the fold-k model
        meta = json.loads((out / "stack" / "ctia" / f"fold_{k}" / "meta_training.json").read_text())
        assert meta["mode"] == "nested" and set(meta["training_cases"]) == set(next(iter(chosen_on)))
        for maps in meta["maps"].values():
            for m in maps:
                assert m["fold"] == k and not (set(m["member_trained_on"]) | set(m["member_selected_on"])) & test


def test_checker_catches_the_non_nested_meta_model(tiny, tmp_path):
    data, out = tiny
    cfg = tiny_config(meta_training="oof")
    runs = [p for p in sorted((out / "runs").iterdir()) if not p.name.endswith("-nowindow")]
    stack = tmp_path / "stack-oof"
    run_stack(runs, stack, cfg.stack, progress=False)
    result = check_leaks(stack)
    assert result.status == "leak" and result.exit_code == 1
    leaks = [f for f in result.findings if f.kind == "leak"]
    folds = load_folds(out / "folds.json")
    assert {f.file.name for f in leaks} == {"meta_training.json"}
    # the message names the fold, the member, the producing model's fold and a test case of the scored fold
    msg = next(f.message for f in leaks if f.file.parent.name == "fold_0")
    assert "scored on fold 0" in msg and "fold-1 model" in msg and folds.test_ids(0)[0] in msg
    assert main(["check-leaks", str(stack), "--quiet"]) == 1
    assert main(["check-leaks", str(out), "--quiet"]) == 0


def test_failed_stack_leaves_nothing_behind(tiny, tmp_path):
    """A stack run that fails in its first fold (a member's out-of-fold map is missing) removes its fold folder,
    stack.json and the output folder it made; into an existing folder, it leaves that folder as it was."""
    data, out = tiny
    runs = tmp_path / "runs"
    shutil.copytree(out / "runs" / "unet-2d-ctia", runs / "unet-2d-ctia")
    folds = load_folds(out / "folds.json")
    (runs / "unet-2d-ctia" / "fold_0" / "oof" / f"{folds.test_ids(0)[0]}.npy").unlink()
    stack = tmp_path / "stack"
    with pytest.raises((CtsegError, OSError)):
        run_stack([runs / "unet-2d-ctia"], stack, tiny_config().stack, progress=False)
    assert not stack.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises((CtsegError, OSError)):
        run_stack([runs / "unet-2d-ctia"], existing, tiny_config().stack, progress=False)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


def test_checker_catches_an_edited_record_and_names_file_and_case(tiny, tmp_path):
    data, out = tiny
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    folds = load_folds(copy / "folds.json")
    victim = folds.test_ids(1)[0]
    run_json = copy / "runs" / "unet-2d-ctia" / "fold_1" / "model" / "run.json"
    run = json.loads(run_json.read_text())
    run["provenance"]["checkpoint_selected_on"].append(victim)  # as if a test case had chosen the checkpoint
    run_json.write_text(json.dumps(run))
    result = check_leaks(copy)
    assert result.status == "leak"
    hit = [f for f in result.findings if f.kind == "leak" and f.file == run_json]
    assert hit and victim in hit[0].message and "checkpoint selected on" in hit[0].message
    # a stack selection scored on a test case is caught in stack.json
    stack_json = copy / "stack" / "ctia" / "stack.json"
    info = json.loads(stack_json.read_text())
    info["folds"][0]["candidates"][0]["selected_on"].append(folds.test_ids(0)[0])
    stack_json.write_text(json.dumps(info))
    assert any(f.file == stack_json and folds.test_ids(0)[0] in f.message for f in check_leaks(copy).findings)


def test_old_folders_without_provenance_cannot_be_proven(tiny, tmp_path, capsys):
    data, out = tiny
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    for p in copy.rglob("provenance.json"):
        p.unlink()
    for p in copy.glob("runs/*/fold_*/model/run.json"):
        run = json.loads(p.read_text())
        del run["provenance"]
        p.write_text(json.dumps(run))
    stack_json = copy / "stack" / "ctia" / "stack.json"
    info = json.loads(stack_json.read_text())
    for key in ("folds", "provenance"):
        del info[key]
    stack_json.write_text(json.dumps(info))
    result = check_leaks(copy)
    assert result.status == "unproven" and result.exit_code == 3
    assert "cannot prove" in result.summary() and "no provenance" in result.summary()
    assert any(f.file == stack_json and "per-fold selection" in f.message for f in result.findings)
    assert main(["check-leaks", str(copy), "--quiet"]) == 3
    assert "cannot prove" in capsys.readouterr().out
    with pytest.raises(CtsegError, match="neither an experiment folder"):
        check_leaks(tmp_path)


def test_no_windowing_arm_runs_with_the_windowed_arms_crop(tiny):
    """The `nowindow` variant arm: its own run (reported, not stacked), a plan without clipping whose crop boxes
    are the windowed arm's for every case."""
    from ctseg.evaluate.report import load_results
    from ctseg.preprocess.cache import CaseCache

    data, out = tiny
    models = {r.model for r in load_results(out / "results.json")}
    assert "unet-2d-ctia-nowindow" in models and "unet-2d-ctia" in models
    stack = json.loads((out / "stack" / "ctia" / "stack.json").read_text())
    assert all(not c["name"].endswith("nowindow") for c in stack["candidates"])
    for k in range(2):
        plain = json.loads((out / "runs" / "unet-2d-ctia" / f"fold_{k}" / "provenance.json").read_text())
        raw = json.loads((out / "runs" / "unet-2d-ctia-nowindow" / f"fold_{k}" / "provenance.json").read_text())
        a, b = CaseCache(plain["scored_with"]["cache"]), CaseCache(raw["scored_with"]["cache"])
        assert a.root != b.root and b.plan.mode == "none" and a.plan.mode == "percentile"
        assert b.plan.subset_ids == a.plan.subset_ids and b.plan.lower == a.plan.lower
        for cid in a.case_ids():
            assert a.meta(cid)["in_plane"] == b.meta(cid)["in_plane"]  # the same crop
        img = np.asarray(b.load(a.case_ids()[0]).image, dtype=np.float32)
        assert img.min() < (a.plan.lower - b.plan.mean) / b.plan.std - 1.0  # air below the window: not clipped
