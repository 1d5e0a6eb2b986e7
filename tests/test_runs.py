"""Run-folder records (`ctseg.runs`): round trips, folders written by older ctseg versions, named errors."""
import json

import pytest

from ctseg.errors import CtsegError
from ctseg.runs import CVRun, StackMember, StackRun, TrainingRun, previous_sources, training_completed

PLAN = {"lower": -100.0, "upper": 300.0, "mean": 50.0, "std": 80.0, "subset_ids": ["c"]}


def _run(**changes) -> TrainingRun:
    fields = dict(status="completed", config={"seed": 0}, intensity_plan=PLAN, classes={0: "background", 1: "kidney"},
                  target="multiclass", num_classes=2, in_channels=1, dataset_classes={0: "background", 1: "kidney"},
                  train_ids=["a", "b"], val_ids=["d"], best_metric=0.5)
    return TrainingRun(**{**fields, **changes})


def test_training_run_round_trip_and_lineage(tmp_path):
    _run(error="x").write(tmp_path)
    info = json.loads((tmp_path / "run.json").read_text())
    assert list(info)[:3] == ["format", "status", "config"] and info["format"] == "ctseg.run"
    assert info["classes"] == {"0": "background", "1": "kidney"} and info["error"] == "x"
    back = TrainingRun.read(tmp_path)
    assert back == _run(error="x")
    assert back.lineage() == {"weights_fitted_on": ["a", "b"], "checkpoint_selected_on": ["d"],
                              "intensity_plan_fitted_on": ["c"]}
    assert back.trained_on() == {"a", "b", "c", "d"}
    assert not training_completed(tmp_path)  # no model_best.pt
    (tmp_path / "model_best.pt").write_bytes(b"")
    assert training_completed(tmp_path)


def test_training_run_of_an_old_writer_loads(tmp_path):
    """run.json before dataset_classes, provenance and validation ids existed; status 'finished'."""
    old = {"format": "ctseg.run", "status": "finished", "config": {}, "intensity_plan": {"lower": 0.0},
           "classes": {"0": "background", "1": "liver"}, "target": "multiclass", "num_classes": 2,
           "in_channels": 1, "train_ids": ["a"], "val_ids": None, "best_metric": None}
    (tmp_path / "run.json").write_text(json.dumps(old))
    run = TrainingRun.read(tmp_path)
    assert run.dataset_classes == {} and run.provenance is None and run.val_ids == [] and run.best_metric is None
    assert run.lineage()["intensity_plan_fitted_on"] == [] and run.status == "finished"
    assert not training_completed(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{", "JSONDecodeError"),
    ("[1]", "expected a JSON object"),
    (json.dumps({"format": "ctseg.cv"}), "expected 'ctseg.run'"),
    (json.dumps({"format": "ctseg.run", "config": {}}), "KeyError"),
])
def test_training_run_errors_name_the_file(tmp_path, text, message):
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(CtsegError, match=message) as err:
        TrainingRun.read(tmp_path)
    assert str(tmp_path / "run.json") in str(err.value)


def test_cv_run_round_trip_and_old_manifest(tmp_path):
    run = CVRun(name="unet-2d-ctia", arch="unet", dim="2d", target="multiclass", aug="ctia", data="/d",
                layout="auto", cache="/c", folds_file="/f.json", n_folds=3, seed=1, variant="seed 1",
                sources={"a": "sig"}, path=tmp_path)
    run.write()
    assert CVRun.read(tmp_path) == run and previous_sources(tmp_path) == {"a": "sig"}
    assert run.model_dir(2) == tmp_path / "fold_2" / "model"
    old = {k: v for k, v in run.to_json().items() if k not in ("sources", "seed", "variant", "layout")}
    (tmp_path / "cv.json").write_text(json.dumps(old))
    back = CVRun.read(tmp_path)
    assert (back.sources, back.seed, back.variant, back.layout) == (None, 0, "", "auto")
    assert previous_sources(tmp_path) is None and previous_sources(tmp_path / "nothing") is None
    with pytest.raises(CtsegError, match="no cv.json"):
        CVRun.read(tmp_path / "nothing")


def test_stack_run_round_trip_and_old_record(tmp_path):
    stack = StackRun(aug="ctia", n_folds=2, members=(StackMember("m", tmp_path / "m", "unet", "2d", "multiclass",
                                                                0.9, (0, 1)),),
                     top_k=1, selection="per fold", meta_training="nested", folds_file="/f.json",
                     provenance={"version": 1}, candidates=({"name": "m", "set": "unet-2d-multiclass"},),
                     folds=({"fold": 0},), stack={"top_k": 1}, path=tmp_path)
    stack.write()
    assert StackRun.read(tmp_path) == stack
    old = {"format": "ctseg.stack", "aug": "ctia", "n_folds": 2, "top_k": 1,
           "members": [{"name": "m", "path": "/x", "arch": "unet", "dim": "2d", "target": "multiclass",
                        "val_score": None}], "stack": {}}
    (tmp_path / "stack.json").write_text(json.dumps(old))
    back = StackRun.read(tmp_path)
    assert back.candidates == () and back.members[0].folds == () and back.provenance is None
    (tmp_path / "stack.json").write_text(json.dumps({**old, "members": []}))
    with pytest.raises(CtsegError, match="no members") as err:
        StackRun.read(tmp_path)
    assert str(tmp_path / "stack.json") in str(err.value)
