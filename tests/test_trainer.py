"""Trainer tests on tiny synthetic CT cases (helpers are reused by test_distributed.py).

Each case: air (-1000 HU) around an elliptic body (40 HU), an enhanced "kidney" ellipsoid (180 HU, label 1)
holding a "tumour" sphere (90 HU, label 2), Gaussian noise; 64 x 64 in-plane, cached at 32 x 32.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ctseg.cli import main as cli_main
from ctseg.config import ExperimentConfig, save_config
from ctseg.datasets.base import Case
from ctseg.errors import CtsegError
from ctseg.io import Volume
from ctseg.preprocess.cache import CaseCache, build_cache
from ctseg.train.checkpoint import capture_rng_state, load_resume_state, restore_rng_state, save_resume_state
from ctseg.evaluate.metrics import dice
from ctseg.train.data import BatchPlan, TrainStream, predict_cached, validate_cases
from ctseg.inference.trained import load_trained
from ctseg.train.splits import fold_validation_split, split_validation
from ctseg.train.trainer import train_model

SPACING = (2.0, 1.0, 1.0)


def dice_scores(pred, truth, classes):
    """Dice of each label value, as validation computes it."""
    return {k: dice(pred == k, truth == k) for k in classes}


def synthetic_case(case_id: str, seed: int, num_slices: int, size: int = 64, foreground: bool = True) -> Case:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(np.arange(num_slices), np.arange(size), np.arange(size), indexing="ij")
    c = size / 2
    image = np.full((num_slices, size, size), -1000.0, dtype=np.float32)
    image[((yy - c) / (0.44 * size)) ** 2 + ((xx - c) / (0.38 * size)) ** 2 < 1] = 40.0
    label = np.zeros(image.shape, dtype=np.uint8)
    if foreground:
        cz, cy, cx = num_slices / 2, c + rng.integers(-3, 4), 0.35 * size + rng.integers(-3, 4)
        organ = ((zz - cz) / (num_slices / 3)) ** 2 + ((yy - cy) / (0.14 * size)) ** 2 \
            + ((xx - cx) / (0.11 * size)) ** 2 < 1
        tumour = ((zz - cz) / 4) ** 2 + ((yy - cy) / (0.07 * size)) ** 2 + ((xx - cx) / (0.07 * size)) ** 2 < 1
        image[organ], label[organ] = 180.0, 1
        image[tumour], label[tumour] = 90.0, 2
    image += rng.normal(0.0, 15.0, image.shape).astype(np.float32)
    meta = {"num_slices": num_slices, "spacing": SPACING, "slice_thickness": SPACING[0]}
    return Case(case_id, Volume(image, SPACING, slice_thickness=SPACING[0]), Volume(label, SPACING), meta)


class SyntheticDataset:
    """In-memory dataset of `synthetic_case`s; `slices[i]` slices for case i."""

    classes = {0: "background", 1: "kidney", 2: "tumour"}
    root = None

    def __init__(self, slices: list[int], foreground: bool = True):
        self.slices, self.foreground = slices, foreground
        self.ids = [f"case{i:02d}" for i in range(len(slices))]

    def case_ids(self) -> list[str]:
        return list(self.ids)

    def load(self, case_id: str) -> Case:
        i = self.ids.index(case_id)
        return synthetic_case(case_id, i, self.slices[i], foreground=self.foreground)

    def __iter__(self):
        return (self.load(c) for c in self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def tiny_config(**train) -> ExperimentConfig:
    """3-stage U-Net with 8 base features on 32 x 32 slices, batch 8, few steps."""
    cfg = ExperimentConfig()
    cfg.preprocess.in_plane_size = 32
    cfg.preprocess.subset_size = 2
    cfg.model.unet.n_stages = 3
    cfg.model.unet.base_features = 8
    cfg.model.msd.depth = 6
    cfg.model.msd.max_dilation = 3
    cfg.train.batch_size_2d = 8
    cfg.train.epochs = 2
    cfg.train.steps_per_epoch = 4
    cfg.train.device = "cpu"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def make_cache(root: Path, slices: list[int], foreground: bool = True) -> CaseCache:
    build_cache(SyntheticDataset(slices, foreground), root, tiny_config(), np.random.default_rng(0), progress=False)
    return CaseCache(root)


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> CaseCache:
    """Four cases of 24, 20, 30 and 12 slices (the last shorter than a 16-slice stack)."""
    return make_cache(tmp_path_factory.mktemp("cache"), [24, 20, 30, 12])


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# --- data -----------------------------------------------------------------------------------------------------

def test_2d_batches_hold_foreground_slices_and_3d_stacks_are_padded(cache):
    cfg = tiny_config()
    cfg.augment.name = "none"
    assert len(cache.meta("case02")["foreground_slices"]) >= 16
    stream = TrainStream(cache, ["case02"], cfg, rank=0, start=0, stop=3, augment_here=True)
    items = list(stream)
    assert [(i["epoch"], i["step"]) for i in items] == [(0, 0), (0, 1), (0, 2)]
    for item in items:
        assert item["image"].shape == (8, 1, 32, 32) and item["image"].dtype == torch.float32
        assert item["label"].shape == (8, 32, 32) and item["label"].dtype == torch.int64
        assert (item["label"].flatten(1).max(1).values > 0).all()  # background-only slices excluded
    cfg.model.dim, cfg.train.batch_size_3d = "3d", 1
    stream3 = TrainStream(cache, ["case03"], cfg, rank=0, start=0, stop=1, augment_here=True)
    item = next(iter(stream3))
    assert item["image"].shape == (1, 1, 16, 32, 32) and item["label"].shape == (1, 16, 32, 32)
    image = torch.from_numpy(np.asarray(cache.load("case03").image, dtype=np.float32))
    assert torch.equal(item["image"][0, 0, :12], image)  # all 12 slices in order, then the last repeated
    assert all(torch.equal(item["image"][0, 0, k], image[-1]) for k in range(12, 16))
    assert BatchPlan.from_config(tiny_config(batch_size_2d=28)) == BatchPlan("2d", 16, 2, 28)


def test_stream_depends_on_seed_rank_and_position_only(cache):
    cfg = tiny_config()
    raw = dict(augment_here=False)
    a = TrainStream(cache, cache.case_ids(), cfg, rank=0, start=0, stop=6, **raw)
    b = TrainStream(cache, cache.case_ids(), cfg, rank=0, start=4, stop=6, **raw)  # resumed at epoch 1
    c = TrainStream(cache, cache.case_ids(), cfg, rank=1, start=0, stop=6, **raw)
    first, resumed, other = list(a), list(b), list(c)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(first[4:], resumed))
    assert (resumed[0]["epoch"], resumed[0]["step"]) == (1, 0)
    assert not torch.equal(first[0]["image"], other[0]["image"])


def test_validation_helpers():
    pred = np.array([0, 1, 1, 2, 0])
    truth = np.array([0, 1, 0, 2, 2])
    assert dice_scores(pred, truth, [1, 2, 3]) == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    train, val = split_validation([f"c{i}" for i in range(10)], 0.2, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and len(train) == 8
    assert split_validation([f"c{i}" for i in range(10)], 0.2, seed=0) == (train, val)
    assert split_validation(["a"], 0.2, seed=0) == (["a"], [])


def test_fold_validation_split_depends_on_fold_and_data_not_on_model_seed():
    ids = [f"c{i:02d}" for i in range(40)]
    fit, val = fold_validation_split(ids, 0.2, fold=1)
    assert len(val) == 8 and sorted(fit + val) == ids and not set(fit) & set(val)
    assert fold_validation_split(list(reversed(ids)), 0.2, fold=1) == (fit, val)  # order of the ids is irrelevant
    others = [fold_validation_split(ids, 0.2, fold=k)[1] for k in (0, 2, 3)]
    assert all(o != val for o in others)  # another fold draws another split
    assert fold_validation_split(ids[:-1], 0.2, fold=1)[1] != val  # other training cases, other draw
    assert fold_validation_split(ids, 0.0, fold=1) == (ids, [])


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    import random
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


# --- training -------------------------------------------------------------------------------------------------

class PhantomDataset(SyntheticDataset):
    """One small phantom kidney case (owner B's generator) at 64 x 64 x 24."""

    def __init__(self):
        self.ids = ["phantom0"]

    def load(self, case_id: str) -> Case:
        from ctseg.datasets.phantom import generate_case

        return generate_case(0, "kidney", "small", in_plane=64, num_slices=24, case_id=case_id)


def test_tiny_unet_overfits_one_phantom_case(tmp_path):
    cfg = tiny_config(epochs=3, steps_per_epoch=50, lr=5e-3)
    cfg.preprocess.in_plane_size, cfg.preprocess.subset_size = 64, 1
    cfg.preprocess.exclude_background_slices = False  # see every slice: Dice is scored on all of them
    cfg.augment.name, cfg.model.target = "none", "foreground"
    build_cache(PhantomDataset(), tmp_path / "cache", cfg, np.random.default_rng(0), progress=False)
    cache = CaseCache(tmp_path / "cache")
    result = train_model(cfg, cache, ["phantom0"], [], tmp_path / "run", progress=False)
    assert result.epochs_run == 3 and np.isnan(result.best_metric)  # no validation cases: best = last
    losses = [h["train_loss"] for h in result.history]
    assert losses[2] < losses[1] < losses[0]
    trained = load_trained(tmp_path / "run")
    case = cache.load("phantom0")
    pred = predict_cached(trained.module, case.image, "2d", torch.device("cpu"), 2)
    truth = (np.asarray(case.label) > 0).astype(np.uint8)
    assert truth.sum() > 300  # kidney + tumour voxels at 64 x 64
    assert dice_scores(pred, truth, [1])[1] > 0.9


def test_run_folder_contents_and_load_trained(cache, tmp_path):
    cfg = tiny_config(epochs=2, steps_per_epoch=3)
    out = tmp_path / "run"
    result = train_model(cfg, cache, ["case00", "case01", "case02"], ["case03"], out, progress=False)
    assert {p.name for p in out.iterdir()} == {"model_best.pt", "model_last.pt", "checkpoint.pt", "run.json",
                                                "log.csv"}
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["epochs_run"] == 2
    assert info["classes"] == {"0": "background", "1": "kidney", "2": "tumour"} and info["num_classes"] == 3
    assert info["train_ids"] == ["case00", "case01", "case02"] and info["val_ids"] == ["case03"]
    assert info["intensity_plan"] == cache.plan.to_dict() and info["config"]["train"]["steps_per_epoch"] == 3
    assert set(info["versions"]) == {"ctseg", "torch", "numpy", "python", "torch_threads"}
    assert info["versions"]["torch_threads"] == str(torch.get_num_threads()) and len(info["dataset_fingerprint"]) == 64
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["3", "6"]
    assert set(rows[0]) == {"epoch", "step", "train_loss", "val_dice_kidney", "val_dice_tumour", "val_dice_mean",
                            "lr", "seconds"}
    best = max(float(r["val_dice_mean"]) for r in rows)
    assert result.best_metric == pytest.approx(best) and 0.0 <= best <= 1.0
    assert [h["train_loss"] for h in result.history] == [pytest.approx(float(r["train_loss"])) for r in rows]

    trained = load_trained(out)
    assert not trained.module.training and trained.target == "multiclass" and trained.classes[2] == "tumour"
    assert trained.plan.to_dict() == cache.plan.to_dict()
    best_epoch = info["best_epoch"]
    assert state_dicts_equal(trained.module.state_dict(), weights(out / "model_best.pt"))
    assert state_dicts_equal(weights(out / "model_best.pt"), weights(out / "model_last.pt")) == (best_epoch == 2)
    x = torch.from_numpy(np.asarray(cache.load("case03").image[:4], dtype=np.float32))[:, None]
    with torch.no_grad():
        assert trained.module(x).shape == (4, 3, 32, 32)

    with pytest.raises(CtsegError, match="already holds a training run"):
        train_model(cfg, cache, ["case00", "case01", "case02"], ["case03"], out, progress=False)
    (out / "model_best.pt").unlink()
    with pytest.raises(CtsegError, match="model_best.pt is missing"):
        load_trained(out)
    with pytest.raises(CtsegError, match="run.json is missing"):
        load_trained(tmp_path)


def test_resume_after_kill_matches_uninterrupted_run_bitwise(cache, tmp_path):
    ids, val = ["case00", "case01", "case02"], ["case03"]
    straight = tiny_config(epochs=4, steps_per_epoch=3)
    train_model(straight, cache, ids, val, tmp_path / "straight", progress=False)

    first_half = tiny_config(epochs=2, steps_per_epoch=3)  # "killed" after epoch 2
    train_model(first_half, cache, ids, val, tmp_path / "resumed", progress=False)
    (tmp_path / "resumed" / "model_last.pt").unlink()  # the kill may leave anything behind but checkpoint.pt
    second_half = tiny_config(epochs=4, steps_per_epoch=3, num_workers=2)  # loader workers: same stream
    result = train_model(second_half, cache, ids, val, tmp_path / "resumed", resume=True, progress=False)

    assert result.epochs_run == 4
    for name in ("model_last.pt", "model_best.pt"):
        assert state_dicts_equal(weights(tmp_path / "straight" / name), weights(tmp_path / "resumed" / name))
    a = load_resume_state(tmp_path / "straight" / "checkpoint.pt")
    b = load_resume_state(tmp_path / "resumed" / "checkpoint.pt")
    assert a["global_step"] == b["global_step"] == 12
    assert all(torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
               for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))
    def timeless(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert timeless(a["history"]) == timeless(b["history"])
    rows = list(csv.DictReader((tmp_path / "resumed" / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]


def test_augmenting_in_the_training_loop_equals_augmenting_in_the_loader(cache, tmp_path):
    """augment_on "device" (the GPU path: raw stacks to the device, augment there) draws the same stream."""
    runs = {}
    for where in ("cpu", "device"):
        cfg = tiny_config(epochs=1, steps_per_epoch=3, augment_on=where)
        cfg.augment.ctia.rotation_p = 1.0  # make sure the augmentation acts
        train_model(cfg, cache, ["case00", "case02"], [], tmp_path / where, progress=False)
        runs[where] = weights(tmp_path / where / "model_last.pt")
    assert state_dicts_equal(runs["cpu"], runs["device"])


def test_runs_saved_before_predict_z_context_load_and_resume(cache, tmp_path):
    """Checkpoints and run.json written before `predict` existed: defaults fill it in (no spurious difference)."""
    ids, out = ["case00", "case01"], tmp_path / "run"
    cfg = tiny_config(epochs=1, steps_per_epoch=2)
    cfg.model.dim = "3d"
    train_model(cfg, cache, ids, ["case02"], out, progress=False)
    state = load_resume_state(out / "checkpoint.pt")
    old = json.loads(state["config"])
    del old["predict"]
    state["config"] = json.dumps(old)
    save_resume_state(out / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    info = json.loads((out / "run.json").read_text())
    del info["config"]["predict"]
    (out / "run.json").write_text(json.dumps(info))
    assert load_trained(out).cfg.predict.z_context == "sampled"
    cfg.train.epochs = 2
    assert train_model(cfg, cache, ids, ["case02"], out, resume=True, progress=False).epochs_run == 2


def test_resume_refuses_another_config_and_corrupt_checkpoints(cache, tmp_path):
    ids, val = ["case00", "case01"], ["case02"]
    out = tmp_path / "run"
    train_model(tiny_config(epochs=1, steps_per_epoch=2), cache, ids, val, out, progress=False)
    other = tiny_config(epochs=3, steps_per_epoch=2, lr=2e-3)
    other.augment.name = "mia"
    with pytest.raises(CtsegError, match="another configuration") as err:
        train_model(other, cache, ids, val, out, resume=True, progress=False)
    differences = str(err.value).split("Differences:")[1]
    assert "train.lr" in differences and "augment.name" in differences and "train.epochs" not in differences
    with pytest.raises(CtsegError, match="val_ids"):
        train_model(tiny_config(epochs=3, steps_per_epoch=2), cache, ids, ["case03"], out, resume=True,
                     progress=False)

    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])  # truncated by a crash of the disk, say
    with pytest.raises(CtsegError, match="corrupt"):
        train_model(tiny_config(epochs=3, steps_per_epoch=2), cache, ids, val, out, resume=True, progress=False)
    torch.save({"format": "ctseg.train.checkpoint", "payload": Path("/etc/passwd")}, ckpt)  # arbitrary object
    with pytest.raises(CtsegError, match="other than tensors"):
        load_resume_state(ckpt)
    torch.save({"conv.weight": torch.zeros(2)}, ckpt)  # a PyTorch file, but not ours
    with pytest.raises(CtsegError, match="not a ctseg training checkpoint"):
        load_resume_state(ckpt)


def test_dataset_without_foreground_is_refused(tmp_path):
    empty = make_cache(tmp_path / "cache", [18, 18], foreground=False)
    with pytest.raises(CtsegError, match="no foreground"):
        train_model(tiny_config(), empty, empty.case_ids(), [], tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_3d_msd_net_foreground_target(cache, tmp_path):
    cfg = tiny_config(epochs=1, steps_per_epoch=2)
    cfg.model.arch, cfg.model.dim, cfg.model.target = "msd", "3d", "foreground"
    result = train_model(cfg, cache, ["case00", "case01"], ["case02", "case03"], tmp_path / "run", progress=False)
    assert list(result.history[0]["val_dice"]) == ["foreground"]
    trained = load_trained(tmp_path / "run")
    assert trained.classes == {0: "background", 1: "foreground"} and trained.target == "foreground"
    pred = predict_cached(trained.module, cache.load("case02").image, "3d", torch.device("cpu"), 2)
    assert pred.shape == (30, 32, 32) and pred.dtype == np.uint8


def test_cli_trains_a_fold_from_a_cache(cache, tmp_path):
    cfg = tiny_config(epochs=1, steps_per_epoch=2)
    cfg.cv.n_folds = 2
    save_config(cfg, tmp_path / "cfg.yaml")
    data = tmp_path / "cache"
    shutil.copytree(cache.root, data)
    out = tmp_path / "run"
    base = ["train", "--data", str(data), "--config", str(tmp_path / "cfg.yaml"), "--arch", "unet", "--dim", "2d",
            "--aug", "ctia", "--no-progress"]
    argv = base + ["--fold", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    folds = json.loads((tmp_path / "folds.json").read_text())["folds"]
    info = json.loads((out / "run.json").read_text())
    assert sorted(info["train_ids"] + info["val_ids"]) == sorted(folds[0])
    assert not set(info["train_ids"] + info["val_ids"]) & set(folds[1])
    # the fold's validation split, the one `ctseg cv` uses for every run of the fold
    assert (info["train_ids"], info["val_ids"]) == fold_validation_split(folds[0], cfg.train.val_fraction, 1)
    assert info["provenance"]["checkpoint_selected_on"] == info["val_ids"]
    assert info["provenance"]["weights_fitted_on"] == info["train_ids"]
    assert cli_main(argv + ["--epochs", "2", "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())["epochs_run"] == 2
    assert cli_main(base + ["--fold", "2", "--out", str(tmp_path / "r2")]) == 2  # fold out of range
    with pytest.raises(SystemExit):
        cli_main(["train", "--data", str(data), "--out", str(out), "--arch", "resnet"])


def test_cli_preprocesses_a_raw_dataset_once(tmp_path):
    from ctseg.datasets.nnunet_raw import write_nnunet_dataset_json
    from ctseg.io import write_volume

    raw = tmp_path / "raw"
    data = SyntheticDataset([20, 18, 22])
    for case in data:
        write_volume(case.image, raw / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        write_volume(case.label, raw / "labelsTr" / f"{case.case_id}.nii.gz")
    write_nnunet_dataset_json(raw, data.classes, len(data))
    save_config(tiny_config(epochs=1, steps_per_epoch=2), tmp_path / "cfg.yaml")
    argv = ["train", "--data", str(raw), "--config", str(tmp_path / "cfg.yaml"), "--no-progress"]
    assert cli_main(argv + ["--out", str(tmp_path / "runs" / "a")]) == 0
    cache_dir = tmp_path / "runs" / "cache"
    stamps = {p.name: p.stat().st_mtime_ns for p in (cache_dir / "cases").iterdir()}
    assert len(stamps) == 3 * 3  # image, label, record per case
    assert cli_main(argv + ["--out", str(tmp_path / "runs" / "b"), "--target", "foreground"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (cache_dir / "cases").iterdir()} == stamps  # reused
    info = json.loads((tmp_path / "runs" / "b" / "run.json").read_text())
    assert info["target"] == "foreground" and info["config"]["data"]["path"] == str(raw)
    assert sorted(info["train_ids"] + info["val_ids"]) == data.case_ids()


def test_cli_fold_on_a_raw_dataset_uses_the_folds_own_intensity_plan(tmp_path):
    """`ctseg train --fold K` on raw data: the plan comes from fold K's training cases only (as `ctseg cv`)."""
    from ctseg.datasets.nnunet_raw import write_nnunet_dataset_json
    from ctseg.io import write_volume

    raw = tmp_path / "raw"
    data = SyntheticDataset([20, 18, 22, 16, 24, 19])
    for case in data:
        write_volume(case.image, raw / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        write_volume(case.label, raw / "labelsTr" / f"{case.case_id}.nii.gz")
    write_nnunet_dataset_json(raw, data.classes, len(data))
    cfg = tiny_config(epochs=1, steps_per_epoch=1)
    cfg.cv.n_folds = 2
    save_config(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "runs" / "f1"
    assert cli_main(["train", "--data", str(raw), "--config", str(tmp_path / "cfg.yaml"), "--no-progress",
                     "--fold", "1", "--out", str(out)]) == 0
    folds = json.loads((tmp_path / "runs" / "folds.json").read_text())["folds"]
    info = json.loads((out / "run.json").read_text())
    plans = list((tmp_path / "runs" / "cache").glob("plan-*/plan.json"))
    assert len(plans) == 1
    subset = json.loads(plans[0].read_text())["subset"]
    assert info["intensity_plan"]["subset_ids"] == subset and not set(subset) & set(folds[1])
    assert not set(info["train_ids"] + info["val_ids"]) & set(folds[1])


class _Says(torch.nn.Module):
    """A 2D 'network' whose argmax is class 1 inside a fixed square of every slice (background elsewhere)."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3, *x.shape[2:])
        out[:, 1, 8:24, 8:24] = 5.0
        return out


@pytest.mark.parametrize("slices", ["foreground", "all"])
def test_checkpoint_selection_dice_on_the_paper_protocols_slices(cache, slices):
    """train.val_slices foreground: the validation Dice ignores the reference's background slices (as Table 2's
    paper protocol does), so false positives there do not change it; all: the whole volume."""
    cfg = tiny_config()
    cfg.train.val_slices = slices
    got = validate_cases(_Says(), cache, ["case00"], cfg, torch.device("cpu"), 3)["case00"]
    label = np.asarray(cache.load("case00").label).astype(np.int64)
    pred = np.zeros_like(label)
    pred[:, 8:24, 8:24] = 1
    keep = label.reshape(label.shape[0], -1).any(1)
    assert 0 < keep.sum() < len(keep)  # the case has background slices: the two protocols differ
    want = dice_scores(pred[keep], label[keep], [1, 2]) if slices == "foreground" else dice_scores(pred, label, [1, 2])
    assert got == pytest.approx(want)
    other = dice_scores(pred, label, [1, 2]) if slices == "foreground" else dice_scores(pred[keep], label[keep], [1, 2])
    assert got[1] != pytest.approx(other[1])
