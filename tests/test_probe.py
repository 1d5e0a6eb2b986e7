"""The 2026-12-03 probe (issue 19, section 3): stale caches and runs, concurrent writers, special files,
overflow, degenerate geometry, broken DICOM, ambiguous lists, tracebacks, full disks and caches written
into datasets. Every bad input is built here; every failure is one line naming the file, exit status 2,
nothing half-written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctseg.cli import main as cli_main
from ctseg.datasets.kits19 import write_kits19_case
from ctseg.io import Volume
from test_bad_inputs import REPO, ct_array, leftovers, model, one_line_error, predict  # noqa: F401 (fixture)

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
SMALL = "preprocess: {in_plane_size: 32, subset_size: 2}\n"
TINY_TRAIN = (SMALL + "model: {arch: msd, msd: {depth: 2, max_dilation: 2}}\n"
              "train: {epochs: 1, steps_per_epoch: 1, batch_size_2d: 2, val_fraction: 0.0, device: cpu}\n"
              "cv: {n_folds: 2, distances: false}\n")


def kits(root: Path, n: int = 2, seed: int = 0, shape=(6, 32, 32)) -> Path:
    """A KiTS19-layout dataset of `n` labelled cases (kidney above 100 HU, tumour above 400 HU)."""
    for i in range(n):
        hu = ct_array(shape, seed=seed + i)
        label = np.where(hu > 400, 2, np.where(hu > 100, 1, 0)).astype(np.uint8)
        write_kits19_case(root, f"case_{i:05d}", Volume(hu, (2.0, 1.0, 1.0)), Volume(label, (2.0, 1.0, 1.0)))
    return root


def config(tmp_path: Path, text: str = SMALL) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def cached_label(cache: Path, case_id: str) -> np.ndarray:
    return np.load(cache / "cases" / f"{case_id}_label.npy")


# --- stale caches and runs ------------------------------------------------------------------------------------

def test_preprocess_rebuilds_a_case_whose_label_changed(tmp_path, capsys):
    data, cache = kits(tmp_path / "kits"), tmp_path / "cache"
    argv = ["preprocess", str(data), "--out", str(cache), "--config", str(config(tmp_path)), "--no-progress"]
    assert cli_main(argv) == 0
    assert cached_label(cache, "case_00000").any()
    seg = data / "case_00000" / "segmentation.nii.gz"
    write_kits19_case(tmp_path / "zeroed", "case_00000", Volume(ct_array((6, 32, 32)), (2.0, 1.0, 1.0)),
                      Volume(np.zeros((6, 32, 32), np.uint8), (2.0, 1.0, 1.0)))
    os.replace(tmp_path / "zeroed" / "case_00000" / "segmentation.nii.gz", seg)
    capsys.readouterr()
    assert cli_main(argv) == 0  # the case is in the intensity subset: the plan, hence every case, is redone
    assert "2 built, 0 up to date" in capsys.readouterr().out
    assert not cached_label(cache, "case_00000").any()
    assert cli_main(argv) == 0
    assert "0 built, 2 up to date" in capsys.readouterr().out


def test_cache_rebuilds_a_changed_case_outside_the_intensity_subset(tmp_path, capsys):
    data, cache = kits(tmp_path / "kits", n=3), tmp_path / "cache"
    ids = tmp_path / "ids.txt"
    ids.write_text("case_00000\ncase_00001\n")
    argv = ["preprocess", str(data), "--out", str(cache), "--config", str(config(tmp_path)), "--train-ids", str(ids),
            "--no-progress"]
    assert cli_main(argv) == 0
    seg = data / "case_00002" / "segmentation.nii.gz"
    write_kits19_case(tmp_path / "zeroed", "case_00002", Volume(ct_array((6, 32, 32)), (2.0, 1.0, 1.0)),
                      Volume(np.zeros((6, 32, 32), np.uint8), (2.0, 1.0, 1.0)))
    os.replace(tmp_path / "zeroed" / "case_00002" / "segmentation.nii.gz", seg)
    capsys.readouterr()
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "1 built, 2 up to date" in out and "1 rebuilt as their files changed" in out
    assert not cached_label(cache, "case_00002").any()


def test_train_on_other_data_with_the_same_cache_rebuilds_it(tmp_path):
    cache = tmp_path / "cache"
    cfg = config(tmp_path, TINY_TRAIN)
    for name, seed in (("a", 0), ("b", 7)):
        data = kits(tmp_path / name, seed=seed, shape=(6, 32, 32) if name == "a" else (8, 32, 32))
        assert cli_main(["train", "--data", str(data), "--cache", str(cache), "--out", str(tmp_path / f"run_{name}"),
                         "--config", str(cfg), "--no-progress"]) == 0
        assert cached_label(cache, "case_00000").shape[0] == (6 if name == "a" else 8)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory) -> Path:
    """A finished 2-fold cross-validation of a depth-2 MS-D Net on 4 tiny KiTS19 cases."""
    root = tmp_path_factory.mktemp("cv")
    out = root / "cv"
    assert cli_main(["cv", "--data", str(kits(root / "a", n=4)), "--out", str(out), "--config",
                     str(config(root, TINY_TRAIN)), "--no-progress"]) == 0
    return out


def test_cv_on_other_data_into_the_same_folder_is_refused(cv_run, tmp_path, capsys):
    out, cfg = cv_run, config(tmp_path, TINY_TRAIN)
    before = (out / "cv.json").read_text()
    assert cli_main(["cv", "--data", str(kits(tmp_path / "b", n=4, seed=9)), "--out", str(out), "--config",
                     str(cfg), "--no-progress"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "cross-validation of other data" in err and "4 case(s) differ" in err and str(out / "cv.json") in err
    assert (out / "cv.json").read_text() == before


# --- one writer per output folder -----------------------------------------------------------------------------

def test_second_writer_of_an_output_folder_is_refused(tmp_path, capsys):
    from ctseg.fileutil import output_lock

    data = kits(tmp_path / "kits")
    busy = tmp_path / "busy"
    argvs = [["train", "--data", str(data), "--out", str(busy), "--no-progress"],
             ["cv", "--data", str(data), "--out", str(tmp_path / "cv"), "--fold", "0", "--no-progress"],
             ["phantom", "--out", str(busy), "--cases", "1", "--no-progress"],
             ["preprocess", str(data), "--out", str(busy), "--no-progress"]]
    with output_lock(busy), output_lock(tmp_path / "cv" / "fold_0"):
        for argv in argvs:
            assert cli_main(argv) == 2, argv
            err = one_line_error(capsys.readouterr().err)
            assert "another ctseg process (pid %d) is writing into this folder" % os.getpid() in err, err
    assert not busy.exists() and not list(tmp_path.rglob(".*lock"))
    with output_lock(busy):  # released: the next writer gets it
        pass


# --- special files, ambiguous lists -------------------------------------------------------------------------

def label_file(path: Path) -> Path:
    from ctseg.io import write_volume

    hu = ct_array()
    return write_volume(Volume(np.where(hu > 400, 2, np.where(hu > 100, 1, 0)).astype(np.uint8), (2.0, 0.8, 0.8)),
                        path)


def test_writers_refuse_to_replace_a_fifo(tmp_path, capsys):
    from ctseg.errors import CtsegError
    from ctseg.fileutil import atomic_write_text

    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)
    with pytest.raises(CtsegError, match="device, FIFO or socket"):
        atomic_write_text(fifo, "{}")
    seg = label_file(tmp_path / "seg.nii.gz")
    assert cli_main(["evaluate", "--pred", str(seg), "--ref", str(seg), "--out", str(fifo), "--overwrite",
                     "--no-distances"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert str(fifo) in err and "FIFO" in err
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "seg.nii.gz"]


@pytest.mark.parametrize("classes, message", [("1=a,2=a", "name 'a' empty or given twice"),
                                              ("1=a,1=b", "value 1 given twice"), ("1=a,2=", "name '' empty")])
def test_evaluate_refuses_ambiguous_classes(classes, message, tmp_path, capsys):
    seg = label_file(tmp_path / "seg.nii.gz")
    assert cli_main(["evaluate", "--pred", str(seg), "--ref", str(seg), "--classes", classes, "--no-distances"]) == 2
    assert message in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("extra, message", [
    (["--severity", "dose=-2"], "dose severities must be > 0 and <= 20, got -2"),
    (["--severity", "dose=0"], "dose severities must be > 0"),
    (["--axes", "thickness", "--severity", "thickness=-5"], "thickness severities must be 0 (native) to 100 mm"),
    (["--axes", "rotation", "--severity", "rotation=1e6"], "rotation severities must be -180 to 180"),
    (["--axes", "pixel-spacing", "--severity", "pixel-spacing=0.001"], "pixel-spacing severities must be 0"),
    (["--axes", "hu-gain", "--severity", "hu-gain=-1"], "hu-gain severities must be > 0"),
    (["--severity", "dose=2,,3"], "no empty items"),
    (["--axes", "dose", "--severity", "thickness=3"], "axis 'thickness' is not among the axes to run"),
])
def test_stress_severities_are_range_checked(extra, message, tmp_path, capsys):
    argv = ["stress", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
            "--no-progress"]
    assert cli_main(argv + (["--axes", "dose"] if "--axes" not in extra else []) + extra) == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", [["--seed", "-1"], ["--batch-size", "0"], ["--max-volumes", "0"]])
def test_stress_numeric_options_are_usage_errors(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["stress", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"), *option])
    assert exc.value.code == 2 and option[0] in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("stress: {seed: -1}\n", "stress.seed"),
    ("stress: {n_boot: 1000000000}\n", "stress.n_boot"),
    ("train: {loss_tanimoto_weight: 0, loss_ce_weight: 0}\n", "both 0"),
    ("train:\n  epochs: 2\n  epochs: 3\n", "duplicate key 'epochs'"),
    ("experiment:\n  profiles: {x: {train: {epochs: 0}}}\n", "profile 'x'"),
    ("experiment:\n  profiles: {x: {}}\n", "unknown profile 'y'"),
])
def test_bad_configs_are_one_line_naming_the_file(text, message, tmp_path, capsys):
    cfg = config(tmp_path, text)
    profile = ["--profile", "y" if "unknown" in message else "x"] if "profile" in text else []
    assert cli_main(["stress", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"), "--config", str(cfg),
                     *profile, "--axes", "dose"]) == 2
    err = capsys.readouterr().err  # a configuration's errors are listed one a line under the file's name
    assert err.startswith(f"error: {cfg}") and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_plan_json_holding_a_list_is_one_line(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli_main(["preprocess", str(kits(tmp_path / "kits")), "--out", str(cache), "--config",
                     str(config(tmp_path)), "--no-progress"]) == 0
    (cache / "plan.json").write_text("[1, 2]")
    assert cli_main(["train", "--data", str(cache), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "damaged (a JSON list" in err and str(cache / "plan.json") in err
    from ctseg.errors import CtsegError
    from ctseg.preprocess.windowing import IntensityPlan

    with pytest.raises(CtsegError, match="must be a JSON object") as exc:
        IntensityPlan.from_dict([1, 2], cache / "plan.json")
    assert str(cache / "plan.json") in str(exc.value)


def test_train_ids_with_a_bom_and_duplicate_lines(tmp_path, caplog):
    data, cache = kits(tmp_path / "kits", n=3), tmp_path / "cache"
    ids = tmp_path / "ids.txt"
    ids.write_bytes("\ufeffcase_00000\ncase_00001\ncase_00000\n".encode("utf-8"))
    assert cli_main(["preprocess", str(data), "--out", str(cache), "--config", str(config(tmp_path)),
                     "--train-ids", str(ids), "--no-progress"]) == 0
    plan = json.loads((cache / "plan.json").read_text())
    assert plan["train_ids"] == ["case_00000", "case_00001"] and plan["subset"] == ["case_00000", "case_00001"]
    assert "1 duplicate line(s) ignored (case_00000)" in caplog.text and str(ids) in caplog.text


# --- values and geometry that reading must refuse ----------------------------------------------------------------

def _slope_nifti(path: Path) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(ct_array().T), np.diag([0.8, 0.8, 2.0, 1.0]))
    img.header.set_slope_inter(1e38, 0)
    nib.save(img, path)
    return path


def _huge_mha(path: Path) -> Path:
    import SimpleITK as sitk

    array = ct_array().astype(np.float64)
    array[3, 10, 10] = 1e300
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _zero_pixdim(path: Path) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(ct_array().T), None)
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    img.header["pixdim"][1:4] = 0
    nib.save(img, path)
    return path


@pytest.mark.parametrize("build, name, message", [
    (_slope_nifti, "slope.nii.gz", "voxels are beyond the float32 range"),
    (_huge_mha, "huge.mha", "1 voxels are beyond the float32 range"),
    (_zero_pixdim, "zero.nii", "voxel size (pixdim) [0.0, 0.0, 0.0] has a zero and neither sform nor qform"),
])
def test_unrepresentable_values_and_unknown_voxel_size_are_refused(build, name, message, tmp_path, model, capsys):
    path = build(tmp_path / name)
    assert predict(path, tmp_path / "out" / "seg.nii.gz", model) == 2
    err = one_line_error(capsys.readouterr().err)
    assert message in err and str(path) in err
    assert leftovers(tmp_path / "out") == []


def test_damaged_dicom_slice_is_named(tmp_path, caplog):
    from ctseg.dicom import write_dicom_series
    from ctseg.errors import CtsegError
    from ctseg.dicom import read_dicom_files
    from ctseg.io import read_volume

    paths = write_dicom_series(Volume(ct_array((6, 24, 24)), (2.0, 0.8, 0.8)), tmp_path / "series")
    damaged = Path(paths[2])
    damaged.write_bytes(b"\0" * 128 + b"DICM" + np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    read_volume(tmp_path / "series")
    assert f"{damaged}: skipped: damaged: a DICOM preamble (DICM) but no readable DICOM header" in caplog.text
    with pytest.raises(CtsegError, match="damaged") as exc:
        read_dicom_files(paths)
    assert str(damaged) in str(exc.value)


# --- tracebacks that become one line ------------------------------------------------------------------------

_ULIMIT_V_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_AS)[1]))
from ctseg.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_training_under_ulimit_v_is_refused_by_the_memory_guard(tmp_path):
    """A step estimated at ~5 GiB under a 3.5 GiB address-space limit: refused with the limit as what is available
    (not MemAvailable, which may be far larger), before torch fails to allocate."""
    import re

    from test_bad_inputs import tiny_cache

    root = tiny_cache(tmp_path / "cache")
    cfg = config(tmp_path, SMALL + "model: {arch: msd, msd: {depth: 2, max_dilation: 2}}\n"
                 "train: {batch_size_2d: 60000, epochs: 1, steps_per_epoch: 1, device: cpu}\n")
    proc = subprocess.run([sys.executable, "-c", _ULIMIT_V_SCRIPT, str(int(3.5 * 2**30)), "train", "--data",
                           str(root), "--out", str(tmp_path / "run"), "--config", str(cfg), "--no-progress"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = one_line_error(proc.stderr)
    available = float(re.search(r"but ([\d.]+) GiB are available", err).group(1))
    assert "train.batch_size_2d" in err and available < 3.5, err


def test_phantom_case_count_is_bounded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["phantom", "--out", str(tmp_path / "p"), "--cases", "100000000"])
    assert exc.value.code == 2 and "--cases: must be in 1..10000, got 100000000" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_non_ascii_path_on_an_ascii_terminal_and_each_log_line_once(tmp_path):
    """`inspect` of a folder named 'dätä' with PYTHONIOENCODING=ascii prints escapes instead of a traceback; the
    warning nibabel logs (pixdim 0 with an sform) comes out once, not once per handler."""
    import nibabel as nib

    data = kits(tmp_path / "dätä", n=1)
    image = data / "case_00000" / "imaging.nii.gz"
    img = nib.load(image)
    fixed = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, header=img.header)
    fixed.header["pixdim"][1:4] = 0
    nib.save(fixed, image)
    proc = subprocess.run([sys.executable, "-m", "ctseg.cli", "inspect", str(data)], capture_output=True,
                          env={**ENV, "PYTHONIOENCODING": "ascii", "COLUMNS": "200"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "d\\xe4t\\xe4" in proc.stdout.decode("ascii")
    assert proc.stderr.decode("ascii").count("pixdim[1,2,3] should be non-zero") == 1, proc.stderr


def test_dicom_seg_of_a_chaos_patient_is_one_line(tmp_path, model, capsys):
    from ctseg.datasets.chaos import write_chaos_case

    hu = ct_array((6, 24, 24))
    patient = write_chaos_case(tmp_path / "CT", "1", Volume(hu, (2.0, 0.8, 0.8)),
                               Volume((hu > 100).astype(np.uint8), (2.0, 0.8, 0.8)))
    out = tmp_path / "out"
    assert predict(patient, out / "seg.dcm", model, "--output-type", "dicom-seg") == 2
    err = one_line_error(capsys.readouterr().err)
    assert "a DICOM-SEG references one series, but these 6 slices carry 6 SeriesInstanceUIDs" in err, err
    assert str(patient) in err and leftovers(out) == []


# --- outputs written into datasets ----------------------------------------------------------------------------

def test_outputs_inside_or_around_a_dataset_are_refused(tmp_path, capsys):
    data = kits(tmp_path / "kits")
    before = leftovers(data)
    for argv, message in [
        (["preprocess", str(data), "--out", str(data / "case_00000")], "--out is inside the dataset folder"),
        (["preprocess", str(data), "--out", str(tmp_path)], "--out contains the dataset folder"),
        (["train", "--data", str(data), "--cache", str(data), "--out", str(tmp_path / "run")],
         "--cache is inside the dataset folder"),
        (["train", "--data", str(data), "--out", str(data / "run")], "--out is inside the dataset folder"),
        (["cv", "--data", str(data), "--cache", str(data), "--out", str(tmp_path / "cv")],
         "--cache is inside the dataset folder"),
        (["demo", "--out", str(data), "--profile", "ci"], "--out is a dataset folder"),
    ]:
        assert cli_main([*argv, "--no-progress"]) == 2, argv
        err = one_line_error(capsys.readouterr().err)
        assert message in err, err
    assert leftovers(data) == before and sorted(p.name for p in tmp_path.iterdir()) == ["kits"]


# --- full disk and partial output -------------------------------------------------------------------------------

_FSIZE_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from ctseg.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_with_file_size_limit(limit: int, *argv: str) -> subprocess.CompletedProcess:
    """The CLI with every write past `limit` bytes failing (EFBIG), as a full disk (ENOSPC) would."""
    return subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(limit), *argv], capture_output=True, text=True,
                          env=ENV, timeout=120)


def hidden(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*")] if folder.exists() else []


def test_preprocess_on_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path):
    """The cached image (6 x 32 x 32 float16, 12 kB) does not fit under 8 kB: ENOSPC-like, never SIGBUS."""
    cache = tmp_path / "cache"
    proc = run_with_file_size_limit(8000, "preprocess", str(kits(tmp_path / "kits")), "--out", str(cache),
                                    "--config", str(config(tmp_path)), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    err = one_line_error(proc.stderr)
    assert "cannot write (File too large)" in err and str(cache / "cases") in err and ".tmp" not in err
    assert hidden(cache) == [] and not (cache / "plan.json").exists()


def test_phantom_on_a_full_disk_names_the_file_and_leaves_no_folder(tmp_path):
    out = tmp_path / "phantom"
    proc = run_with_file_size_limit(20000, "phantom", "--out", str(out), "--cases", "2", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    err = one_line_error(proc.stderr)
    assert "cannot write (File too large)" in err and str(out) in err and ".tmp" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_report_that_fails_leaves_nothing_new(cv_run, tmp_path, capsys):
    out = tmp_path / "report"
    proc = run_with_file_size_limit(3000, "report", str(cv_run), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    err = one_line_error(proc.stderr)
    assert "cannot write (File too large)" in err and str(out) in err and ".tmp" not in err
    assert not out.exists()
    moved = tmp_path / "cv"
    shutil.copytree(cv_run, moved)
    overlay = next(moved.glob("fold_0/overlays/*.npz"))
    overlay.unlink()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli_main(["report", str(moved), "--out", str(out)]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert str(overlay) in err
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt"]


def test_write_errors_name_the_output_not_its_temporary(tmp_path, capsys):
    """A 245-character name is valid; its temporary (`.tmp-<hex>-` before it) is too long for the file system."""
    seg = label_file(tmp_path / "seg.nii.gz")
    out = tmp_path / ("e" * 240 + ".json")
    assert cli_main(["evaluate", "--pred", str(seg), "--ref", str(seg), "--out", str(out), "--no-distances"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert str(out) in err and ".tmp" not in err and "File name too long" in err


def test_stress_skips_unlabelled_cases_with_a_count(tmp_path, model, caplog):
    data = kits(tmp_path / "kits", n=2)
    write_kits19_case(data, "case_00002", Volume(ct_array((6, 32, 32)), (2.0, 1.0, 1.0)), None)
    out = tmp_path / "stress"
    assert cli_main(["stress", "--model", str(model), "--data", str(data), "--out", str(out), "--axes", "hu-offset",
                     "--severity", "hu-offset=30", "--device", "cpu", "--no-progress"]) == 0
    assert "1 unlabelled case(s) skipped" in caplog.text and "2 left" in caplog.text
    assert json.loads((out / "settings.json").read_text())["volumes"] == ["case_00000", "case_00001"]
