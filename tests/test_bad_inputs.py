"""Hostile inputs (issue 12) and folder predict (issue 11.3): every bad input fails with one line that
names the file, a non-zero exit and nothing left behind; folder predict segments what it can.

Bad files are built here (nibabel, pydicom, numpy); models are real MS-D Nets from the model registry,
saved as `ctseg train` saves them, with weights that threshold HU (a known answer)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from ctseg.cli import main as cli_main
from ctseg.config import ExperimentConfig, config_to_dict
from ctseg.dicom import write_dicom_series
from ctseg.io import Volume, write_volume
from ctseg.models import build_model
from ctseg.preprocess.windowing import IntensityPlan
from ctseg.runs import RUN_FORMAT

REPO = Path(__file__).resolve().parents[1]
KITS = {0: "background", 1: "kidney", 2: "tumour"}
PLAN = IntensityPlan(mode="custom", lower=-1000.0, upper=1000.0, mean=0.0, std=100.0)


# --- builders ---------------------------------------------------------------------------------------------

def write_run(path: Path, classes=KITS, size: int = 32, status: str = "completed", weights_fn=None,
              num_classes: int | None = None, config_fn=None) -> Path:
    """A model folder as `ctseg train` writes it: a 2D MS-D Net (depth 2) whose 1x1 output convolution
    thresholds the input at 100 and 400 HU (z-scored: 1 and 4)."""
    cfg = ExperimentConfig()
    cfg.model.arch, cfg.model.dim = "msd", "2d"
    cfg.model.msd.depth = 2
    cfg.preprocess.in_plane_size = size
    if config_fn is not None:
        config_fn(cfg)
    n_out = num_classes or len(classes)
    net = build_model(cfg.model, 1, n_out)
    if cfg.model.arch == "msd":
        with torch.no_grad():
            net.final.weight.zero_()
            net.final.weight[:3, :1] = torch.tensor([0.0, 20.0, 40.0]).view(-1, 1, 1, 1)[:n_out]
            net.final.bias[:3].copy_(torch.tensor([0.0, -20.0, -100.0])[:n_out])
    state = net.state_dict()
    if weights_fn is not None:
        weights_fn(state)
    path.mkdir(parents=True)
    torch.save(state, path / "model_best.pt")
    info = {"format": RUN_FORMAT, "status": status, "config": config_to_dict(cfg), "intensity_plan": PLAN.to_dict(),
            "classes": {str(k): v for k, v in classes.items()},
            "dataset_classes": {str(k): v for k, v in classes.items()}, "target": "multiclass",
            "num_classes": num_classes or len(classes), "in_channels": 1}
    (path / "run.json").write_text(json.dumps(info))
    return path


def ct_array(shape=(8, 24, 24), seed=0) -> np.ndarray:
    """int16 HU (z, y, x): air, a body at 0 HU, a 200 HU block and a 500 HU block."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    hu = np.full(shape, -1000, np.int16)
    hu[:, 2:y - 2, 2:x - 2] = 0
    hu[1:z - 1, y // 4:y // 2, x // 4:x // 2] = 200
    hu[2:z - 2, y // 2:3 * y // 4, x // 2:3 * x // 4] = 500
    return hu + rng.integers(-10, 10, shape).astype(np.int16)


def nifti(path: Path, affine=None, data=None, qform=None, sform_code=1, qform_code=1) -> Path:
    data = ct_array() if data is None else data
    affine = np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.ascontiguousarray(data.T), None)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_qform(affine if qform is None else qform, code=qform_code)
    nib.save(img, path)
    return path


def dicom(folder: Path, edit=None, n=6, **kwargs) -> Path:
    """A CT series of `n` slices; `edit(datasets, paths)` may change the files after writing."""
    import pydicom

    vol = Volume(ct_array((n, 24, 24)), (2.0, 0.8, 0.8))
    paths = write_dicom_series(vol, folder, **kwargs)
    if edit is not None:
        datasets = [pydicom.dcmread(p) for p in paths]
        edit(datasets, paths)
        for ds, p in zip(datasets, paths):
            ds.save_as(p)
    return folder


def leftovers(folder: Path) -> list[str]:
    """Every file under `folder` (outputs and hidden temporaries)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("models") / "run")


def predict(inp: Path, out: Path, model: Path, *extra: str) -> int:
    return cli_main(["predict", "-i", str(inp), "-o", str(out), "--model", str(model), "--device", "cpu",
                     "--no-progress", *extra])


def one_line_error(err: str) -> str:
    """The last line of stderr, which must be the one-line error message."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


# --- 12.1 numeric options at the CLI boundary ---------------------------------------------------------------

@pytest.mark.parametrize("argv, option", [
    (["predict", "-i", "x.nii.gz", "-o", "y.nii.gz", "--model", "m", "--batch-size", "-3"], "--batch-size"),
    (["predict", "-i", "x.nii.gz", "-o", "y.nii.gz", "--model", "m", "--batch-size", "0"], "--batch-size"),
    (["predict", "-i", "x.nii.gz", "-o", "y.nii.gz", "--model", "m", "--overlap", "1.5"], "--overlap"),
    (["predict", "-i", "x.nii.gz", "-o", "y.nii.gz", "--model", "m", "--overlap", "nan"], "--overlap"),
    (["evaluate", "--pred", "a", "--ref", "b", "--tolerance", "-5"], "--tolerance"),
    (["stack", "--cv-dirs", "a", "--out", "b", "--top-k", "0"], "--top-k"),
    (["train", "--data", "a", "--out", "b", "--seed", "-1"], "--seed"),
    (["phantom", "--out", "a", "--seed", str(2**40)], "--seed"),
    (["train", "--data", "a", "--out", "b", "--epochs", "0"], "--epochs"),
    (["phantom", "--out", "a", "--cases", "-2"], "--cases"),
])
def test_numeric_options_refused_before_any_work(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_config_refuses_negative_huge_and_nonfinite_numbers(tmp_path, capsys):
    from ctseg.config import load_config
    from ctseg.errors import CtsegError

    for text, field in [("seed: -4\n", "seed"), ("seed: 99999999999999\n", "seed"), ("train:\n  lr: .inf\n", "lr"),
                        ("experiment:\n  seeds: [-1]\n", "seeds")]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(CtsegError, match=field) as exc:
            load_config(path)
        assert str(path) in str(exc.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert cli_main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--config", str(binary)]) == 2
    assert str(binary) in one_line_error(capsys.readouterr().err)


# --- 12.1 geometry sanity, where volumes are read -----------------------------------------------------------

SHEARED = [[0.8, 0.0, 0.9, 0.0], [0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0, 0, 0, 1]]
RANK_DEFICIENT = [[0.8, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0, 0, 0, 1]]


@pytest.mark.parametrize("name, build, message", [
    ("sheared", lambda p: nifti(p, SHEARED), "sheared"),
    ("rank_deficient", lambda p: nifti(p, RANK_DEFICIENT), "rank-deficient"),
    ("nan_sform", lambda p: nifti(p, np.diag([0.8, np.nan, 2.0, 1.0]), qform=np.diag([0.8, 0.8, 2.0, 1.0])),
     "NaN"),
    ("inf_origin", lambda p: nifti(p, [[0.8, 0, 0, np.inf], [0, 0.8, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]],
                                   qform=np.diag([0.8, 0.8, 2.0, 1.0])), "NaN or infinite"),
    ("tiny_spacing", lambda p: nifti(p, np.diag([0.0003, 0.8, 2.0, 1.0])), "implausible voxel spacing"),
    ("huge_spacing", lambda p: nifti(p, np.diag([0.8, 0.8, 2890.0, 1.0])), "implausible voxel spacing"),
    ("zero_spacing", lambda p: nifti(p, np.diag([0.8, 0.0, 2.0, 1.0]), qform=np.eye(4), qform_code=0),
     "zero-length"),
    ("rgb", lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]),
                                               np.eye(4)), p), "RGB"),
    ("sheared_mha", None, "sheared"),
])
def test_unusable_geometry_is_refused_naming_the_file(name, build, message, tmp_path, model, capsys):
    out_dir = tmp_path / "out"
    if name == "sheared_mha":
        import SimpleITK as sitk

        src = tmp_path / "CT [arterial].mha"
        image = sitk.GetImageFromArray(ct_array())
        image.SetDirection((1.0, 0.0, 0.3, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(image, str(src))
    else:
        src = tmp_path / "CT [arterial].nii.gz"
        build(src)
    assert predict(src, out_dir / "seg.nii.gz", model, "--stats", str(out_dir / "stats.json")) == 2
    err = one_line_error(capsys.readouterr().err)
    assert str(src) in err and message in err  # bracketed file name survives the rich markup
    assert leftovers(out_dir) == []


def test_qform_sform_disagreement_warns_which_is_used(tmp_path, model, caplog):
    src = nifti(tmp_path / "ct.nii.gz", np.diag([0.8, 0.8, 2.0, 1.0]),
                qform=np.array([[0.8, 0, 0, 30.0], [0, 0.8, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]))
    assert predict(src, tmp_path / "seg.nii.gz", model) == 0
    err = caplog.text
    assert "disagree" in err and "using the sform" in err and "30.00 mm" in err
    assert np.allclose(nib.load(tmp_path / "seg.nii.gz").affine, np.diag([0.8, 0.8, 2.0, 1.0]))


# --- 12.1 / 12.2 / 12.6 DICOM -------------------------------------------------------------------------------

def _drop_rescale_on_third(datasets, paths):
    del datasets[2].RescaleSlope
    del datasets[2].RescaleIntercept


def _iop(values):
    def edit(datasets, paths):
        for ds in datasets:
            ds.ImageOrientationPatient = values
    return edit


def _malformed_pixel_spacing(datasets, paths):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    tag = Tag(0x00280030)  # PixelSpacing, written as raw bytes: pydicom refuses to build the bad value
    datasets[1]._dict[tag] = RawDataElement(tag, "DS", 8, b"0.8\\abc ", 0, False, True)


def _no_pixel_spacing(datasets, paths):
    for ds in datasets:
        del ds.PixelSpacing


@pytest.mark.parametrize("edit, message, bad_file", [
    (_drop_rescale_on_third, "RescaleSlope is missing on this slice", 2),
    (_iop([0, 0, 0, 0, 0, 0]), "zero-length direction", 0),
    (_iop([1, 0, 0, 0.276, 0.961, 0]), "non-orthogonal orientation", 0),
    (_malformed_pixel_spacing, "PixelSpacing is malformed", 1),
    (_no_pixel_spacing, "PixelSpacing is missing", 0),
])
def test_broken_dicom_series_refused_naming_the_slice(edit, message, bad_file, tmp_path, model, capsys):
    folder = dicom(tmp_path / "series", edit)
    out_dir = tmp_path / "out"
    assert predict(folder, out_dir / "seg.nii.gz", model) == 2
    err = one_line_error(capsys.readouterr().err)
    assert message in err and f"{bad_file:04d}.dcm" in err, err
    assert "gantry tilt" not in err
    assert leftovers(out_dir) == []


def test_dicom_mr_modality_refused_unless_forced(tmp_path, model, capsys):
    def to_mr(datasets, paths):
        for ds in datasets:
            ds.Modality = "MR"

    folder = dicom(tmp_path / "series", to_mr)
    assert predict(folder, tmp_path / "seg.nii.gz", model) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "Modality is 'MR'" in err and str(folder) in err and not (tmp_path / "seg.nii.gz").exists()
    assert predict(folder, tmp_path / "seg.nii.gz", model, "--force") == 0


def test_position_less_slice_is_named_and_chaos_one_slice_series_stack(tmp_path, model, caplog):
    def drop_position(datasets, paths):
        del datasets[3].ImagePositionPatient

    folder = dicom(tmp_path / "chaos", drop_position, uid_per_file=True)
    assert predict(folder, tmp_path / "seg.nii.gz", model) == 0
    err = caplog.text
    assert "0003.dcm" in err and "without ImagePositionPatient" in err
    assert "single-slice series" in err and "read as one volume" in err
    assert nib.load(tmp_path / "seg.nii.gz").shape == (24, 24, 6)


def test_chaos_mask_out_of_pattern_or_duplicate_is_refused(tmp_path):
    from ctseg.datasets.chaos import ChaosDataset, write_chaos_case
    from ctseg.errors import CtsegError

    image = Volume(ct_array((4, 24, 24)), (2.0, 0.8, 0.8))
    label = image.with_array((image.array > 100).astype(np.uint8))
    folder = write_chaos_case(tmp_path / "CT", "1", image, label)
    ground = folder / "Ground"
    (ground / "liver_GT_002.png").rename(ground / "liver_GT_abc.png")
    with pytest.raises(CtsegError, match="no slice number") as exc:
        ChaosDataset(tmp_path / "CT").load("1")
    assert "liver_GT_abc.png" in str(exc.value)
    (ground / "liver_GT_abc.png").rename(ground / "liver_GT_2.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(ground / "liver_GT_0002.png")
    (ground / "liver_GT_003.png").unlink()
    with pytest.raises(CtsegError, match="also used by"):
        ChaosDataset(tmp_path / "CT").load("1")


# --- 12.1 models that contradict their weights or diverged --------------------------------------------------

def _small_unet(cfg):
    cfg.model.arch, cfg.model.unet.n_stages, cfg.model.unet.base_features = "unet", 3, 2


def _nan_weights(state):
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))


@pytest.mark.parametrize("kwargs, message, where", [
    ({"weights_fn": _nan_weights}, "NaN or infinite", "model_best.pt"),
    ({"num_classes": 7}, "num_classes 7", "run.json"),
    ({"classes": {**KITS, 3: "cyst", 299: "x"}, "num_classes": 3}, "num_classes 3", "run.json"),
    ({"config_fn": _small_unet, "size": 30}, "not divisible by the U-Net's stride 4", "run.json"),
    ({"config_fn": lambda cfg: setattr(cfg.data, "task", "liver")}, "a liver config trained on other labels",
     "run.json"),
])
def test_models_contradicting_their_weights_are_refused(kwargs, message, where, tmp_path, capsys):
    run = write_run(tmp_path / "bad", **kwargs)
    src = nifti(tmp_path / "ct.nii.gz")
    assert predict(src, tmp_path / "out" / "seg.nii.gz", run) == 2
    err = one_line_error(capsys.readouterr().err)
    assert message in err and where in err
    assert leftovers(tmp_path / "out") == []


def test_unfinished_run_is_used_with_a_warning(tmp_path, caplog):
    run = write_run(tmp_path / "running", status="running")
    assert predict(nifti(tmp_path / "ct.nii.gz"), tmp_path / "seg.nii.gz", run) == 0
    assert "'running', not 'completed'" in caplog.text and str(run) in caplog.text


class TinyDataset:
    """Two labelled 6 x 32 x 32 cases (`labelled=False`: test cases without labels)."""

    classes = KITS
    root = None

    def __init__(self, ids=("a", "b"), labelled=True):
        self.ids, self.labelled = list(ids), labelled

    def case_ids(self):
        return list(self.ids)

    def load(self, case_id):
        from ctseg.datasets.base import Case

        hu = ct_array((6, 32, 32), seed=len(case_id)).astype(np.float32)
        label = np.where(hu > 400, 2, np.where(hu > 100, 1, 0)).astype(np.uint8)
        return Case(case_id, Volume(hu, (2.0, 1.0, 1.0), slice_thickness=2.0),
                    Volume(label, (2.0, 1.0, 1.0)) if self.labelled else None,
                    {"num_slices": 6, "spacing": (2.0, 1.0, 1.0), "slice_thickness": 2.0})

    def __iter__(self):
        return (self.load(c) for c in self.ids)

    def __len__(self):
        return len(self.ids)


def tiny_cache(root: Path, **kwargs) -> Path:
    from ctseg.preprocess.cache import build_cache

    cfg = ExperimentConfig()
    cfg.preprocess.in_plane_size, cfg.preprocess.subset_size = 32, 2
    build_cache(TinyDataset(**kwargs), root, cfg, np.random.default_rng(0), progress=False)
    return root


def test_diverging_training_stops_with_status_diverged(tmp_path, capsys):
    tiny_cache(tmp_path / "cache")
    config = tmp_path / "diverge.yaml"
    config.write_text("preprocess: {in_plane_size: 32, subset_size: 2}\n"
                      "model: {arch: msd, msd: {depth: 2, max_dilation: 2}}\n"
                      "train: {lr: 1.0e+30, epochs: 2, steps_per_epoch: 2, batch_size_2d: 4, val_fraction: 0.0,"
                      " device: cpu}\n")
    run = tmp_path / "run"
    rc = cli_main(["train", "--data", str(tmp_path / "cache"), "--out", str(run), "--config", str(config),
                   "--no-progress"])
    assert rc == 2
    assert "training diverged" in one_line_error(capsys.readouterr().err)
    assert json.loads((run / "run.json").read_text())["status"] == "diverged"
    assert not (run / "model_best.pt").exists()


# --- 12.1 evaluate -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, ref, classes, message, bad", [
    ("outside", "ok", "kits", "outside the classes", "pred"),
    ("float", "ok", "kits", "non-integer", "pred"),
    ("ok", "ct", "kits", "outside the classes", "ref"),
    ("ok", "ok", "0=x", "at least one foreground class", None),
])
def test_evaluate_refuses_what_would_score_zero_silently(pred, ref, classes, message, bad, tmp_path, capsys):
    labels = (ct_array() > 100).astype(np.uint8) + (ct_array() > 400)
    arrays = {"ok": labels, "outside": labels * 3, "float": labels.astype(np.float32) * 0.5, "ct": ct_array()}
    paths = {}
    for role, key in (("pred", pred), ("ref", ref)):
        paths[role] = tmp_path / role / "case.nii.gz"
        write_volume(Volume(arrays[key], (2.0, 0.8, 0.8)), paths[role])
    rc = cli_main(["evaluate", "--pred", str(paths["pred"]), "--ref", str(paths["ref"]), "--classes", classes,
                   "--no-distances", "--out", str(tmp_path / "eval.json")])
    assert rc == 2
    err = one_line_error(capsys.readouterr().err)
    assert message in err and (bad is None or str(paths[bad]) in err)
    assert not (tmp_path / "eval.json").exists()


# --- 12.3 check before compute, leave nothing behind --------------------------------------------------------

def test_every_output_checked_before_inference(tmp_path, model, capsys):
    src = nifti(tmp_path / "ct.nii.gz")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert predict(src, out_dir / "seg.nii.gz", model, "--probabilities", str(out_dir / "p.mha")) == 2
    assert "p.mha" in one_line_error(capsys.readouterr().err)
    (out_dir / "taken.json").write_text("{}")
    assert predict(src, out_dir / "seg.nii.gz", model, "--stats", str(out_dir / "taken.json")) == 2
    assert "--overwrite" in one_line_error(capsys.readouterr().err)
    assert leftovers(out_dir) == ["taken.json"]


def test_stale_temporaries_are_swept_and_stats_only_when_asked(tmp_path, model, capsys):
    src = nifti(tmp_path / "ct.nii.gz")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stale = [out_dir / ".tmp-0badc0de-seg.nii.gz", out_dir / ".tmp-0badc0de-stats.json"]
    fresh = out_dir / ".tmp-12345678-seg.nii.gz"  # another run may be writing it right now
    for p in [*stale, fresh]:
        p.write_bytes(b"partial")
    for p in stale:
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    assert predict(src, out_dir / "seg.nii.gz", model, "--stats", str(out_dir / "stats.json")) == 0
    assert leftovers(out_dir) == [fresh.name, "seg.nii.gz", "stats.json"]
    assert "volume mL" in capsys.readouterr().out
    assert predict(src, out_dir / "seg2.nii.gz", model) == 0
    assert "volume mL" not in capsys.readouterr().out


def test_output_folder_that_cannot_exist_is_one_line(tmp_path, model, capsys):
    src = nifti(tmp_path / "ct.nii.gz")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert predict(src, blocker / "seg.nii.gz", model) == 2
    assert str(blocker) in one_line_error(capsys.readouterr().err)


# SIGINT back to Python's KeyboardInterrupt: a shell starts background jobs (make test &, nohup) with SIGINT
# ignored, and Python then keeps it ignored; this test is about what ctseg does when Ctrl-C does arrive.
_SIGNAL_SCRIPT = """
import signal
import sys
import torch
signal.signal(signal.SIGINT, signal.default_int_handler)
torch.set_num_threads(1)
from ctseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_predict_leaves_nothing(sig, code, tmp_path, model):
    """A 128 x 256 x 256 volume and a 256-pixel model: inference takes 2-4 s on one thread, the signal
    arrives 0.3 s into it (after the -v log line that announces it)."""
    hu = np.tile(ct_array((8, 32, 32)), (16, 8, 8))  # 128 x 256 x 256
    src = tmp_path / "big.nii"
    write_volume(Volume(hu, (1.0, 0.8, 0.8)), src)
    run = write_run(tmp_path / "big_model", size=256)
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SIGNAL_SCRIPT, "-v", "predict", "-i", str(src), "-o",
                             str(out_dir / "seg.nii.gz"), "--stats", str(out_dir / "stats.json"), "--model", str(run),
                             "--device", "cpu", "--no-progress"], stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "segmenting" in line:
            break
    time.sleep(0.3)
    assert proc.poll() is None, "".join(seen) + "predict ended before the signal: make the volume larger"
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == code, "".join(seen) + rest
    assert leftovers(out_dir) == []


# --- 11.3 folder in, folder out -----------------------------------------------------------------------------

def test_folder_predict_mix_of_good_bad_and_other_files(tmp_path, model, capsys):
    import csv

    cases = tmp_path / "cases"
    cases.mkdir()
    nifti(cases / "a.nii.gz")
    write_volume(Volume(ct_array(seed=1), (2.0, 0.8, 0.8)), cases / "b.mha")
    dicom(cases / "c_dicom")
    nifti(cases / "d [bad].nii.gz", RANK_DEFICIENT)
    (cases / "notes.txt").write_text("not an image")
    out, table = tmp_path / "segs", tmp_path / "stats.csv"
    assert predict(cases, out, model, "--stats", str(table)) == 1
    captured = capsys.readouterr()
    err, text = " ".join(captured.err.split()), " ".join(captured.out.split())
    assert "d [bad].nii.gz" in err and "rank-deficient" in err and "notes.txt" in err
    assert "3 segmented, 0 skipped, 1 failed" in text
    assert leftovers(out) == ["a.nii.gz", "b.mha", "c_dicom.nii.gz"]
    rows = list(csv.DictReader(table.open()))
    assert {r["case"] for r in rows} == {"a", "b", "c_dicom"}
    assert {r["structure"] for r in rows} == {"kidney", "tumour", "total"}
    kidney = next(r for r in rows if r["case"] == "a" and r["structure"] == "kidney")
    assert float(kidney["volume_ml"]) > 0
    seg = nib.load(out / "a.nii.gz")
    expected = np.where(ct_array() > 400, 2, np.where(ct_array() > 100, 1, 0)).T
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected)
    # a second run skips what exists, retries the failure
    assert predict(cases, out, model) == 1
    assert "0 segmented, 3 skipped, 1 failed" in " ".join(capsys.readouterr().out.split())
    (cases / "d [bad].nii.gz").unlink()
    assert predict(cases, out, model, "--overwrite") == 0
    assert "3 segmented, 0 skipped, 0 failed" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("content, message", [
    ({}, "the folder is empty"),
    ({"readme.txt": "x", "scan.png": "y"}, "found only 2 other file(s): readme.txt, scan.png"),
])
def test_folder_predict_with_nothing_to_segment(content, message, tmp_path, model, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, text in content.items():
        (cases / name).write_text(text)
    assert predict(cases, tmp_path / "segs", model) == 2
    err = one_line_error(capsys.readouterr().err)
    assert message in err and str(cases) in err
    assert not (tmp_path / "segs").exists()


# --- 12.2 tracebacks become one line; 12.5 never overwrite or mix; 12.6 say what was skipped ---------------

def _nnunet(root: Path, meta_bytes: bytes) -> Path:
    write_volume(Volume(ct_array(), (2.0, 0.8, 0.8)), root / "imagesTr" / "c1_0000.nii.gz")
    write_volume(Volume((ct_array() > 100).astype(np.uint8), (2.0, 0.8, 0.8)), root / "labelsTr" / "c1.nii.gz")
    (root / "dataset.json").write_bytes(meta_bytes)
    return root / "dataset.json"


@pytest.mark.parametrize("meta, message", [
    (b'[{"labels": {"background": 0}}]', "must hold a JSON object"),
    (b'{"labels": {"background": 0, "kidney": 1}, "channel_names": 5, "file_ending": ".nii.gz"}',
     '"channel_names" must map'),
    ('{"name": "r\u00e9nal", "labels": {"background": 0, "kidney": 1}}'.encode("latin-1").replace(
        b"\\u00e9", "\u00e9".encode("latin-1")), "not UTF-8"),
])
def test_nnunet_dataset_json_variants(meta, message, tmp_path, capsys):
    path = _nnunet(tmp_path / "ds", meta)
    assert cli_main(["inspect", str(tmp_path / "ds")]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert message in err and str(path) in err


def test_nnunet_segmentation_without_image_is_named(tmp_path, caplog):
    from ctseg.datasets.nnunet_raw import NnUNetRawDataset

    _nnunet(tmp_path / "ds", b'{"labels": {"background": 0, "kidney": 1}, "file_ending": ".nii.gz"}')
    orphan = tmp_path / "ds" / "labelsTr" / "c2.nii.gz"
    orphan.write_bytes((tmp_path / "ds" / "labelsTr" / "c1.nii.gz").read_bytes())
    assert NnUNetRawDataset(tmp_path / "ds").case_ids() == ["c1"]
    assert str(orphan) in caplog.text and "without its image" in caplog.text


def test_kits_folders_with_unusable_names_are_named(tmp_path, caplog):
    from ctseg.datasets.kits19 import KiTS19Dataset

    for name in ("case_00000", "case 1", "case_0000é"):
        write_volume(Volume(ct_array(), (2.0, 0.8, 0.8)), tmp_path / name / "imaging.nii.gz")
    write_volume(Volume(np.zeros((8, 24, 24), np.uint8), (2.0, 0.8, 0.8)),
                 tmp_path / "case_00002" / "segmentation.nii.gz")
    assert KiTS19Dataset(tmp_path).case_ids() == ["case_00000"]
    assert "case 1: skipped" in caplog.text and "case_0000é: skipped" in caplog.text
    assert "case_00002/segmentation.nii.gz: skipped: a segmentation without imaging.nii.gz" in caplog.text


@pytest.mark.parametrize("kind", ["json", "nifti"])
def test_report_on_a_file_that_is_not_results(kind, tmp_path, capsys):
    path = tmp_path / ("other.json" if kind == "json" else "ct.nii.gz")
    if kind == "json":
        path.write_text('{"a": 1}')
    else:
        nifti(path)
    assert cli_main(["report", str(path), "--out", str(tmp_path / "report")]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "not a ctseg results file" in err and str(path) in err
    assert leftovers(tmp_path / "report") == []


def test_damaged_cache_plan_is_one_line(tmp_path, capsys):
    root = tiny_cache(tmp_path / "cache")
    plan = json.loads((root / "plan.json").read_text())
    del plan["intensity_plan"]
    (root / "plan.json").write_text(json.dumps(plan))
    assert cli_main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "damaged" in err and str(root / "plan.json") in err
    assert not (tmp_path / "run").exists()


def test_cache_without_labelled_cases_says_why(tmp_path, capsys):
    root = tiny_cache(tmp_path / "cache", labelled=False)
    config = tmp_path / "c.yaml"
    config.write_text("preprocess: {in_plane_size: 32, subset_size: 2}\n")
    assert cli_main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--config", str(config),
                     "--no-progress"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "no training cases" in err and "2 have no label" in err and str(root) in err


def test_killed_preprocess_temporaries_are_swept(tmp_path):
    from ctseg.preprocess.cache import CASES_DIR

    root = tiny_cache(tmp_path / "cache")
    stale = root / CASES_DIR / ".tmp-0badc0de-a_image.npy"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    tiny_cache(root)
    assert not stale.exists()


@pytest.mark.parametrize("layout", ["bad_npy", "pickled_npy"])
def test_broken_out_of_fold_maps_are_named(layout, tmp_path):
    from ctseg.errors import CtsegError
    from ctseg.models.stacking import MemberPrediction

    path = tmp_path / "oof.npy"
    if layout == "bad_npy":
        np.save(path, np.zeros((2, 4, 8, 8), np.float16))
        path.write_bytes(path.read_bytes()[:200])  # truncated
    else:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CtsegError, match="cannot read out-of-fold member map") as exc:
        MemberPrediction("c1", "unet-2d", 0, path, frozenset()).load()
    assert str(path) in str(exc.value)


def test_phantom_and_preprocess_never_write_into_what_exists(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "case_00000").mkdir()
    assert cli_main(["phantom", "--out", str(data), "--cases", "1", "--no-progress"]) == 2
    assert "not empty" in one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in data.iterdir()) == ["case_00000"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli_main(["phantom", "--out", str(afile), "--cases", "1", "--no-progress"]) == 2
    assert str(afile) in one_line_error(capsys.readouterr().err)
    assert cli_main(["preprocess", str(data), "--out", str(data), "--no-progress"]) == 2
    assert "dataset folder" in one_line_error(capsys.readouterr().err)
    assert cli_main(["preprocess", str(data), "--out", str(afile), "--no-progress"]) == 2
    assert "is a file" in one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in data.iterdir()) == ["case_00000"]


# --- 12.4 resource guards ---------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, lower", [
    ("train: {batch_size_2d: 100000, device: cpu}", "train.batch_size_2d"),
    ("model: {arch: msd, msd: {depth: 100000000}}\ntrain: {device: cpu}", "model.msd.depth"),
])
def test_training_that_cannot_fit_in_memory_is_refused(setting, lower, tmp_path, capsys):
    root = tiny_cache(tmp_path / "cache")
    config = tmp_path / "c.yaml"
    config.write_text(f"preprocess: {{in_plane_size: 32, subset_size: 2}}\n{setting}\n")
    t0 = time.perf_counter()
    assert cli_main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--config", str(config),
                     "--no-progress"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "GiB but" in err and "available" in err and lower in err
    assert time.perf_counter() - t0 < 10
    run_json = tmp_path / "run" / "run.json"
    assert not run_json.exists() or json.loads(run_json.read_text())["status"] != "running"


def test_inference_that_cannot_fit_in_memory_is_refused(tmp_path, capsys):
    run = write_run(tmp_path / "huge", size=200_000)
    src = nifti(tmp_path / "ct.nii.gz")
    assert predict(src, tmp_path / "out" / "seg.nii.gz", run) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "GiB but" in err and "--batch-size" in err and str(src) in err
    assert leftovers(tmp_path / "out") == []


def test_outputs_follow_the_umask(tmp_path, model):
    from ctseg.config import save_config
    from ctseg.models.weights import atomic_torch_save

    previous = os.umask(0o027)
    try:
        save_config(ExperimentConfig(), tmp_path / "config.yaml")
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "model.pt")
        assert predict(nifti(tmp_path / "ct.nii.gz"), tmp_path / "seg.nii.gz", model,
                       "--stats", str(tmp_path / "stats.json")) == 0
    finally:
        os.umask(previous)
    for name in ("config.yaml", "model.pt", "seg.nii.gz", "stats.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


_FULL_DISK_SCRIPT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from ctseg.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_full_disk_during_predict_is_one_line_and_leaves_nothing(tmp_path, model):
    """A file-size limit makes every write past 1500 bytes fail, as a full disk (ENOSPC) would."""
    src = nifti(tmp_path / "ct.nii.gz")
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_SCRIPT, "1500", "predict", "-i", str(src), "-o",
                           str(out_dir / "seg.nii.gz"), "--probabilities", str(out_dir / "p.nii.gz"), "--stats",
                           str(out_dir / "stats.json"), "--model", str(model), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = one_line_error(proc.stderr)
    assert "File too large" in err and str(out_dir) in err
    assert leftovers(out_dir) == []


def tiny_msd_config(tmp_path, train: str):
    """A config file for a depth-2 MS-D Net on 32 x 32 slices, CPU, with `train` (YAML flow items) as its training."""
    config = tmp_path / "c.yaml"
    config.write_text("preprocess: {in_plane_size: 32, subset_size: 2}\n"
                      "model: {arch: msd, msd: {depth: 2, max_dilation: 2}}\n"
                      f"train: {{{train}, device: cpu}}\n")
    return config


def test_sigterm_during_training_leaves_a_final_status(tmp_path):
    root = tiny_cache(tmp_path / "cache")
    config = tiny_msd_config(tmp_path, "epochs: 1000, steps_per_epoch: 2, batch_size_2d: 2, val_fraction: 0.0")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SIGNAL_SCRIPT, "-v", "train", "--data", str(root), "--out",
                             str(run), "--config", str(config), "--no-progress"], stderr=subprocess.PIPE, text=True,
                            env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "epoch 2:" in line:
            break
    assert proc.poll() is None, "".join(seen)
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 143, "".join(seen) + rest
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_folder_and_file_modes_point_to_each_other(tmp_path, model, capsys):
    series = dicom(tmp_path / "series")
    assert predict(series, tmp_path / "segs", model) == 2
    assert "one DICOM series" in one_line_error(capsys.readouterr().err)
    cases = tmp_path / "cases"
    cases.mkdir()
    nifti(cases / "a.nii.gz")
    assert predict(cases, tmp_path / "seg.nii.gz", model) == 2
    assert "give -o a folder" in one_line_error(capsys.readouterr().err)
    assert predict(series, tmp_path / "seg.nii.gz", model) == 0


def test_full_disk_during_training_names_the_file_and_records_failed(tmp_path):
    """Under a 10 kB file-size limit run.json (4 kB) and the weights (3 kB) fit, checkpoint.pt (24 kB) does not."""
    root = tiny_cache(tmp_path / "cache")
    config = tiny_msd_config(tmp_path, "epochs: 1, steps_per_epoch: 1, batch_size_2d: 2")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_SCRIPT, "10000", "train", "--data", str(root), "--out",
                           str(run), "--config", str(config), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = one_line_error(proc.stderr)
    assert str(run / "checkpoint.pt") in err and "cannot write" in err
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
