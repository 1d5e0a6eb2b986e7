"""Predict the way people hold their data (issue 19.1): any dataset layout in, outputs by case id; a training
run, CV fold, whole CV run or stacked ensemble as --model (predict, stress, Python API); folder-predict name
collisions, resumed --stats, --stats .csv for one file, special-file targets, non-finite outputs, prefetch
within the one-file memory budget, --threads."""
import csv
import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctseg.cli import main as cli_main
from ctseg.config import config_to_dict, load_config, parse_config
from ctseg.datasets.chaos import write_chaos_case
from ctseg.datasets.phantom import write_phantom_dataset
from ctseg.errors import CtsegError
from ctseg.inference import load_models, predict_file, predict_folder
from ctseg.inference.folder import prefetch_plan
from ctseg.inference.cases import find_cases, header_shape
from ctseg.io import Volume, read_volume, write_volume
from ctseg.inference.predict import StackedModel, predict_network
from test_bad_inputs import ct_array, dicom, nifti, one_line_error, tiny_cache, tiny_msd_config, write_run

REPO = Path(__file__).resolve().parents[1]


def _predict(inp: Path, out: Path, *models: Path, extra: tuple[str, ...] = ()) -> int:
    return cli_main(["predict", "-i", str(inp), "-o", str(out), "--model", *map(str, models), "--device", "cpu",
                     "--no-progress", *extra])


# --- a ci-size experiment with stacking -------------------------------------------------------------------

@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """demo.yaml's ci profile with the paper's two stack member sets (3D MS-D Net on foreground, 2D U-Net
    multiclass), no augmentation, 4 phantom KiTS19 cases, 2 folds: ~15 s on one core."""
    from ctseg.experiment import apply_profile, run_experiment

    root = tmp_path_factory.mktemp("exp")
    data = write_phantom_dataset(root / "data", task="kidney", n_cases=4, layout="kits19", seed=3, size="small",
                                 num_slices=12)
    d = config_to_dict(apply_profile(load_config(REPO / "configs" / "demo.yaml"), "ci"))
    d["experiment"].update(archs=["unet"], dims=["2d"], augs=["none"], stack=True, stack_seeds=[])
    d["stack"]["members"] = [{"arch": "msd", "dim": "3d", "target": "foreground"},
                             {"arch": "unet", "dim": "2d", "target": "multiclass"}]
    d["stress"]["enabled"] = False
    run_experiment(parse_config(d, "test"), data, root / "out", progress=False)
    return data, root / "out"


def test_predict_kits19_folder_with_fold_cv_run_and_stack(experiment, tmp_path, capsys):
    data, out = experiment
    models = {"fold": out / "runs" / "unet-2d-none" / "fold_0", "cv": out / "runs" / "unet-2d-none",
              "stack": out / "stack" / "none"}
    for kind, model in models.items():
        assert _predict(data, tmp_path / kind, model) == 0, capsys.readouterr()
        assert "4 segmented, 0 skipped, 0 failed" in " ".join(capsys.readouterr().out.split())
        names = sorted(p.name for p in (tmp_path / kind).iterdir())
        assert names == [f"case_0000{i}.nii.gz" for i in range(4)]
        for name in names:
            seg, image = nib.load(tmp_path / kind / name), nib.load(data / name[:-7] / "imaging.nii.gz")
            assert seg.shape == image.shape and np.allclose(seg.affine, image.affine)
            assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}
    # a dataset given with a file output: the message's fix (a folder) is what works above
    assert _predict(data, tmp_path / "seg.nii.gz", models["cv"]) == 2
    assert "kits19 dataset" in (err := one_line_error(capsys.readouterr().err)) and "give -o a folder" in err


def test_stacked_prediction_is_members_then_meta_models(experiment):
    """The stack applies each member's folds (averaged), concatenates the maps and averages its fold meta-models,
    as `ctseg.models.stacking.predict_meta` does on the out-of-fold maps it was trained on."""
    from ctseg.models.stacking import predict_meta
    from ctseg.preprocess.slices import preprocess_volume

    data, out = experiment
    stack = load_models([out / "stack" / "none"], "cpu")
    assert isinstance(stack, StackedModel)
    assert [len(g) for g in stack.members] == [2, 2] and len(stack.metas) == 2
    assert [g[0].cfg.model.dim for g in stack.members] == ["3d", "2d"]  # stack.json order
    hu = read_volume(data / "case_00001" / "imaging.nii.gz")
    from ctseg.io import to_canonical

    canon = to_canonical(hu)[0].array
    inputs = [preprocess_volume(canon, m.plan, 32) for m in stack.models]
    probs, classes, dice = predict_network(inputs, stack, "cpu")
    assert classes == {0: "background", 1: "kidney", 2: "tumour"} and dice.shape == (2, 2)
    maps = [predict_network(inputs[2 * i:2 * i + 2], group, "cpu")[0].numpy() for i, group in enumerate(stack.members)]
    x = np.concatenate(maps)
    assert x.shape[0] == 2 + 3
    expected = np.mean([predict_meta(meta, x) for meta in stack.metas], axis=0)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(probs.numpy().sum(0), 1.0, atol=1e-5)


def test_python_api_predicts_file_and_folder_with_stack(experiment, tmp_path):
    data, out = experiment
    stack = load_models(out / "stack" / "none", "cpu")
    done = predict_file(data / "case_00002" / "imaging.nii.gz", tmp_path / "one.nii.gz", stack,
                        stats=tmp_path / "one.json")
    assert done.result.agreement is not None and read_volume(tmp_path / "one.nii.gz").shape == \
        read_volume(data / "case_00002" / "imaging.nii.gz").shape
    result = predict_folder(data, tmp_path / "all", [out / "stack" / "none"])  # paths load lazily
    assert result.layout == "kits19" and result.count("done") == 4
    np.testing.assert_array_equal(read_volume(tmp_path / "all" / "case_00002.nii.gz").array,
                                  read_volume(tmp_path / "one.nii.gz").array)


def test_stress_takes_fold_cv_and_stack_folders(experiment, tmp_path):
    from ctseg.config import StressConfig
    from ctseg.stress.runner import model_specs_from_dirs, run_stress

    data, out = experiment
    specs = model_specs_from_dirs([[out / "runs" / "unet-2d-none" / "fold_0"], [out / "runs" / "unet-2d-none"],
                                   [out / "stack" / "none"]])
    assert [len(s.members) for s in specs] == [1, 2, 4] and specs[2].stack is not None
    cfg = StressConfig(axes=["hu-offset"], severities={"hu-offset": [60.0]}, max_volumes=1, n_boot=100)
    run_stress(specs, data, tmp_path / "stress", cfg, device="cpu", progress=False)
    with (tmp_path / "stress" / "rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {s.name for s in specs} and len(rows) == 3 * 2
    assert all(0.0 <= float(r["dice_kidney"]) <= 1.0 for r in rows)
    assert cli_main(["stress", "--model", str(out / "stack" / "none"), str(out / "runs" / "unet-2d-none"),
                     "--data", str(data), "--out", str(tmp_path / "s2"), "--no-progress"]) == 2


def test_model_folder_messages_point_to_what_works(experiment, tmp_path, capsys):
    data, out = experiment
    case = data / "case_00000" / "imaging.nii.gz"
    # the experiment folder itself: the message lists the model folders below it, and one of them works
    assert _predict(case, tmp_path / "a.nii.gz", out) == 2
    err = one_line_error(capsys.readouterr().err)
    listed = str(out / "runs" / "msd-3d-none-fg")
    assert "model folders below it" in err and listed in err
    assert _predict(case, tmp_path / "a.nii.gz", Path(listed)) == 0
    # a CV run with an unfinished fold: give the finished fold folders instead
    cv = tmp_path / "cv"
    shutil.copytree(out / "runs" / "unet-2d-none", cv)
    (cv / "fold_1" / "model" / "model_best.pt").unlink()
    assert _predict(case, tmp_path / "b.nii.gz", cv) == 2
    assert "give the finished fold folders (fold_<k>)" in one_line_error(capsys.readouterr().err)
    assert _predict(case, tmp_path / "b.nii.gz", cv / "fold_0") == 0
    # load_trained on a CV folder points to load_models, which loads it
    from ctseg.inference.trained import load_trained

    with pytest.raises(CtsegError, match="load it with ctseg.inference.load_models"):
        load_trained(out / "runs" / "unet-2d-none")
    assert len(load_models(out / "runs" / "unet-2d-none")) == 2
    assert load_trained(out / "runs" / "unet-2d-none" / "fold_1").run_dir.name == "model"
    # a stack with an unfinished fold
    half = tmp_path / "half"
    shutil.copytree(out / "stack" / "none", half)
    (half / "fold_1" / "meta.pt").unlink()
    assert _predict(case, tmp_path / "f.nii.gz", half) == 2
    assert "has no meta-model (meta.pt)" in one_line_error(capsys.readouterr().err)
    # a stack is used alone
    assert _predict(case, tmp_path / "c.nii.gz", out / "stack" / "none", cv / "fold_0") == 2
    assert "used alone" in one_line_error(capsys.readouterr().err)
    # a moved experiment: members are found under its runs/ by name
    moved = tmp_path / "moved"
    shutil.copytree(out / "runs", moved / "runs")
    shutil.copytree(out / "stack", moved / "stack")
    meta = json.loads((moved / "stack" / "none" / "stack.json").read_text())
    for m in meta["members"]:
        m["path"] = str(tmp_path / "gone" / m["name"])
    (moved / "stack" / "none" / "stack.json").write_text(json.dumps(meta))
    assert _predict(case, tmp_path / "d.nii.gz", moved / "stack" / "none") == 0
    shutil.rmtree(moved / "runs" / "unet-2d-none")
    assert _predict(case, tmp_path / "e.nii.gz", moved / "stack" / "none") == 2
    assert "stack member 'unet-2d-none' not found" in one_line_error(capsys.readouterr().err)


# --- layouts and names -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("models") / "run")


def _expected(hu: np.ndarray) -> np.ndarray:
    return np.where(hu > 400, 2, np.where(hu > 100, 1, 0)).astype(np.uint8)


def test_nnunet_raw_dataset_and_images_ts_folder_named_by_case_id(tmp_path, model, capsys):
    root = tmp_path / "Dataset001"
    (root / "dataset.json").parent.mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "tumour": 2},
                                                   "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    write_volume(Volume(ct_array(seed=1), (2.0, 0.8, 0.8)), root / "imagesTr" / "tr1_0000.nii.gz")
    write_volume(Volume(_expected(ct_array(seed=1)), (2.0, 0.8, 0.8)), root / "labelsTr" / "tr1.nii.gz")
    write_volume(Volume(ct_array(seed=2), (2.0, 0.8, 0.8)), root / "imagesTs" / "ts1_0000.nii.gz")
    assert _predict(root, tmp_path / "all", model) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["tr1.nii.gz", "ts1.nii.gz"]
    np.testing.assert_array_equal(read_volume(tmp_path / "all" / "ts1.nii.gz").array, _expected(ct_array(seed=2)))
    assert _predict(root / "imagesTs", tmp_path / "ts", model) == 0  # nnU-Net's channel suffix is dropped
    assert [p.name for p in (tmp_path / "ts").iterdir()] == ["ts1.nii.gz"]
    capsys.readouterr()


def test_one_kits19_case_folder_is_one_case(tmp_path, model):
    from ctseg.datasets.kits19 import write_kits19_case

    image = Volume(ct_array((6, 24, 24), seed=4), (2.0, 0.8, 0.8))
    folder = write_kits19_case(tmp_path / "kits", "case_00007", image, Volume(_expected(image.array), image.spacing))
    assert _predict(folder, tmp_path / "seg.nii.gz", model) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "seg.nii.gz").array, _expected(image.array))


def test_chaos_dataset_predicted_per_patient(tmp_path, model):
    image = Volume(ct_array((6, 24, 24), seed=3), (2.0, 0.8, 0.8))
    write_chaos_case(tmp_path / "CT", "7", image, Volume(_expected(image.array), image.spacing))
    write_chaos_case(tmp_path / "CT", "12", image, None)
    result = predict_folder(tmp_path, tmp_path / "out", model)
    assert result.layout == "chaos" and [o.case.case_id for o in result.outcomes] == ["7", "12"]
    seg = read_volume(tmp_path / "out" / "12.nii.gz")
    assert seg.shape == image.shape
    np.testing.assert_array_equal(np.sort(seg.array, axis=None), np.sort(_expected(image.array), axis=None))


def test_name_collisions_are_refused_before_any_work(tmp_path, model, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    nifti(cases / "a.nii.gz")
    dicom(cases / "a")
    assert _predict(cases, tmp_path / "segs", model) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "a/ and a.nii.gz are both case 'a'" in err and "rename one" in err
    assert not (tmp_path / "segs").exists()
    (cases / "a.nii.gz").rename(cases / "b.nii.gz")  # the fix the message asks for
    assert _predict(cases, tmp_path / "segs", model) == 0
    nifti(cases / "B.nii")  # differs only in case: one file on macOS / Windows, one table key
    with pytest.raises(CtsegError, match="B.nii and b.nii.gz are both case"):
        find_cases(cases)


def test_subfolder_of_images_in_a_plain_folder_says_how_to_segment_it(tmp_path, model, capsys):
    cases = tmp_path / "cases"
    (cases / "inner").mkdir(parents=True)
    nifti(cases / "inner" / "x.nii.gz")
    nifti(cases / "y.nii.gz")
    assert _predict(cases, tmp_path / "segs", model) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "segment it on its own (ctseg predict -i" in out
    assert _predict(cases / "inner", tmp_path / "inner_segs", model) == 0
    assert (tmp_path / "inner_segs" / "x.nii.gz").is_file()


# --- --stats -----------------------------------------------------------------------------------------------

def test_resumed_folder_run_tables_every_case(tmp_path, model, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    nifti(cases / "a.nii.gz")
    assert _predict(cases, tmp_path / "segs", model) == 0
    nifti(cases / "b.nii.gz", data=ct_array(seed=5))
    assert _predict(cases, tmp_path / "segs", model, extra=("--stats", str(tmp_path / "resumed.csv"))) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "1 segmented, 1 skipped, 0 failed" in text and "1 measured from their existing outputs" in text
    assert _predict(cases, tmp_path / "fresh", model, extra=("--stats", str(tmp_path / "fresh.csv"))) == 0
    resumed, fresh = (tmp_path / "resumed.csv").read_text(), (tmp_path / "fresh.csv").read_text()
    assert resumed == fresh and {r["case"] for r in csv.DictReader(fresh.splitlines())} == {"a", "b"}
    # an existing output on another grid cannot be measured: that case fails, and --overwrite (as said) redoes it
    write_volume(Volume(np.zeros((3, 24, 24), np.uint8), (2.0, 0.8, 0.8)), tmp_path / "segs" / "a.nii.gz")
    assert _predict(cases, tmp_path / "segs", model, extra=("--stats", str(tmp_path / "third.csv"))) == 1
    assert "pass --overwrite to segment again" in " ".join(capsys.readouterr().out.split())
    assert _predict(cases, tmp_path / "segs", model, extra=("--stats", str(tmp_path / "third.csv"),
                                                            "--overwrite")) == 0
    assert (tmp_path / "third.csv").read_text() == fresh


def test_stats_of_one_file_follow_the_suffix(tmp_path, model, capsys):
    src = nifti(tmp_path / "ct.nii.gz")
    assert _predict(src, tmp_path / "s1.nii.gz", model, extra=("--stats", str(tmp_path / "m.csv"))) == 0
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert {r["structure"] for r in rows} == {"kidney", "tumour", "total"} and {r["case"] for r in rows} == {"ct"}
    assert _predict(src, tmp_path / "s2.nii.gz", model, extra=("--stats", str(tmp_path / "m.txt"))) == 2
    assert ".json" in one_line_error(capsys.readouterr().err) and not (tmp_path / "s2.nii.gz").exists()
    assert _predict(src, tmp_path / "s2.nii.gz", model, extra=("--stats", str(tmp_path / "m.json"))) == 0
    assert set(json.loads((tmp_path / "m.json").read_text())["structures"]) == {"kidney", "tumour", "total"}


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_file_targets_are_refused_and_kept(kind, tmp_path, model, capsys):
    src = nifti(tmp_path / "ct.nii.gz")
    if kind == "fifo":
        target = tmp_path / "stats.json"
        os.mkfifo(target)
    else:
        target = Path("/dev/null")  # a character device on every POSIX system
    before = os.stat(target).st_mode
    for extra in ((), ("--overwrite",)):  # the message never suggests --overwrite for these
        assert _predict(src, tmp_path / "seg.nii.gz", model, extra=("--stats", str(target), *extra)) == 2
        err = one_line_error(capsys.readouterr().err)
        assert ("FIFO" if kind == "fifo" else "character device") in err and "--overwrite" not in err
    assert os.stat(target).st_mode == before and not stat.S_ISREG(before)
    assert not (tmp_path / "seg.nii.gz").exists() and not list(tmp_path.glob(".*"))
    if kind == "fifo":  # as the label output too
        os.mkfifo(tmp_path / "seg.nii.gz")
        assert _predict(src, tmp_path / "seg.nii.gz", model, extra=("--overwrite",)) == 2
        assert "FIFO" in one_line_error(capsys.readouterr().err)
        assert stat.S_ISFIFO(os.stat(tmp_path / "seg.nii.gz").st_mode)


# --- finite weights, non-finite outputs ----------------------------------------------------------------------

def _overflowing(state):
    """Finite weights whose output overflows float32: every logit of the 1x1 output convolution is ~1e38 x HU."""
    state["final.weight"][:, :1] = 3e38


def test_finite_weights_with_non_finite_outputs_fail_loudly(tmp_path, model, capsys):
    bad = write_run(tmp_path / "bad", weights_fn=_overflowing)
    assert all(torch.isfinite(t).all() for t in torch.load(bad / "model_best.pt").values() if t.is_floating_point())
    src = nifti(tmp_path / "ct.nii.gz")
    assert _predict(src, tmp_path / "seg.nii.gz", model, bad) == 2  # one bad member of an ensemble
    err = one_line_error(capsys.readouterr().err)
    assert "NaN or infinite" in err and str(bad) in err and not (tmp_path / "seg.nii.gz").exists()
    cases = tmp_path / "cases"
    cases.mkdir()
    nifti(cases / "a.nii.gz")
    assert _predict(cases, tmp_path / "segs", bad) == 1
    assert "NaN or infinite" in " ".join(capsys.readouterr().out.split())
    assert _predict(src, tmp_path / "seg.nii.gz", model) == 0  # left out of the ensemble, as the message says


def test_validation_with_non_finite_outputs_ends_diverged(tmp_path, capsys):
    """One Adam step at lr 1e37 keeps the weights finite (and the epoch's loss, computed before the step), but the
    network's outputs overflow: the run must not end 'completed'."""
    tiny_cache(tmp_path / "cache", ids=("a", "b", "c", "d"))
    config = tiny_msd_config(tmp_path, "lr: 1.0e+37, epochs: 1, steps_per_epoch: 1, batch_size_2d: 4, "
                                       "val_fraction: 0.5")
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(tmp_path / "cache"), "--out", str(run), "--config", str(config),
                     "--no-progress", "--threads", "1"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "training diverged" in err and "NaN or infinite" in err and "validation case" in err
    assert json.loads((run / "run.json").read_text())["status"] == "diverged"
    config.write_text(config.read_text().replace("1.0e+37", "1.0e-3"))  # "lower train.lr"
    assert cli_main(["train", "--data", str(tmp_path / "cache"), "--out", str(tmp_path / "run2"), "--config",
                     str(config), "--no-progress", "--threads", "1"]) == 0
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["status"] == "completed"


# --- memory and threads ------------------------------------------------------------------------------------

def test_prefetch_only_within_the_largest_case_budget(tmp_path, model):
    folder = tmp_path / "cases"
    folder.mkdir()
    for name, z in (("a", 4), ("b", 40), ("c", 4), ("d", 4)):
        nifti(folder / f"{name}.nii.gz", data=ct_array((z, 24, 24)))
    dicom(folder / "e")
    cases, _, _ = find_cases(folder)
    assert [header_shape(c.path) for c in cases] == [(4, 24, 24), (40, 24, 24), (4, 24, 24), (4, 24, 24), None]
    from ctseg.inference.folder import _case_sizes

    models = load_models(model, "cpu")
    peaks, inputs = _case_sizes(cases[:4], models, None)
    # a small case's peak plus the big input fits the big case's budget; the big case's peak plus anything does not
    assert prefetch_plan(peaks, inputs) == [True, False, True, False]
    assert prefetch_plan(*_case_sizes(cases, models, None)) == [False] * 5  # a size unknown: never
    big_alone = peaks[1] + inputs[1]
    assert peaks[0] + inputs[0] + inputs[1] <= big_alone < peaks[1] + inputs[1] + inputs[2]


def test_prefetch_only_when_the_memory_available_now_holds_it():
    """The prefetch check reads the real limits: under a `ulimit -v` leaving ~64 MiB of address space, a
    prefetch of 1 GiB does not fit and a small one does; on CUDA the computation's peak does not count."""
    import resource

    from ctseg.inference.folder import prefetch_fits
    from ctseg.resources import _proc_field

    cpu = torch.device("cpu")
    assert prefetch_fits(2**20, 2**20, cpu) and not prefetch_fits(None, 2**20, cpu)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = _proc_field("/proc/self/status", "VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (used + 64 * 2**20, hard))
    try:
        fits = [prefetch_fits(2**30, 2**20, cpu), prefetch_fits(2**20, 2**30, cpu), prefetch_fits(2**20, 2**20, cpu),
                prefetch_fits(2**30, 2**20, torch.device("cuda"))]
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert fits == [False, False, True, True]


def test_threads_option_and_default(tmp_path, model, monkeypatch):
    from ctseg.runtime import default_threads

    src = nifti(tmp_path / "ct.nii.gz")
    before = torch.get_num_threads()
    try:
        assert _predict(src, tmp_path / "seg.nii.gz", model, extra=("--threads", "1")) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
    from ctseg.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["stress", "--model", "m", "--data", "d", "--out", "o", "--threads", "2"]).threads == 2
    assert parser.parse_args(["train", "--data", "d", "--out", "o", "--threads", "2"]).threads == 2
