"""The preprocessed cache: round trip, skip/rebuild, corruption, settings mismatch (ctseg.preprocess.cache)."""
import json
import logging
import shutil

import numpy as np
import pytest

from ctseg.config import ExperimentConfig
from ctseg.datasets.base import Case
from ctseg.errors import CtsegError
from ctseg.io import Volume
from ctseg.preprocess.cache import CaseCache, build_cache
from ctseg.preprocess.slices import (InPlaneResize, foreground_slices, network_grid, preprocess_label,
                                     preprocess_volume)
from ctseg.preprocess.windowing import draw_subset


class InMemoryDataset:
    """The Dataset protocol over Cases built in the test; counts loads."""

    def __init__(self, cases):
        self.root = "memory://test"
        self.classes = {0: "background", 1: "kidney", 2: "tumour"}
        self._cases = {c.case_id: c for c in cases}
        self.loads = []

    def case_ids(self):
        return list(self._cases)

    def load(self, case_id):
        self.loads.append(case_id)
        return self._cases[case_id]

    def __iter__(self):
        return (self.load(i) for i in self.case_ids())

    def __len__(self):
        return len(self._cases)


def synthetic_case(case_id, seed, z, labelled=True):
    rng = np.random.default_rng(seed)
    image = np.full((z, 48, 48), -1000, dtype=np.int16)
    image[:, 4:44, 6:42] = rng.normal(40, 25, (z, 40, 36)).astype(np.int16)
    label = np.zeros(image.shape, dtype=np.uint8)
    z0 = int(rng.integers(1, z // 3))
    label[z0:z0 + z // 2, 12:30, 10:26] = 1
    label[z0 + 1:z0 + 4, 16:24, 14:22] = 2
    image[label == 1] = rng.normal(160, 30, int((label == 1).sum())).astype(np.int16)
    image[label == 2] = rng.normal(70, 30, int((label == 2).sum())).astype(np.int16)
    spacing = (float(1 + seed % 3), 0.7, 0.7)
    vol = Volume(image, spacing=spacing, origin=(-10.0, 5.0, 100.0), slice_thickness=spacing[0])
    lab = Volume(label, spacing=spacing, origin=(-10.0, 5.0, 100.0)) if labelled else None
    return Case(case_id, vol, lab, {"num_slices": z, "spacing": spacing, "slice_thickness": spacing[0]})


@pytest.fixture
def dataset():
    return InMemoryDataset([synthetic_case(f"case_{i:05d}", i, z=10 + 3 * i) for i in range(4)])


def small_cfg(**pp):
    return ExperimentConfig.model_validate({"preprocess": {"in_plane_size": 16, "subset_size": 2, **pp}})


def files_mtimes(root):
    return {p.name: p.stat().st_mtime_ns for p in sorted((root / "cases").iterdir())}


def test_round_trip_equals_direct_preprocessing(dataset, tmp_path):
    cfg = small_cfg()
    report = build_cache(dataset, tmp_path, cfg, np.random.default_rng(0), progress=False)
    assert sorted(report.built) == dataset.case_ids() and not report.skipped
    cache = CaseCache(tmp_path, cfg)
    assert cache.case_ids() == dataset.case_ids() and cache.classes == dataset.classes
    assert cache.plan == report.plan and len(cache.plan.subset_ids) == 2
    for case_id in cache.case_ids():
        case = dataset._cases[case_id]
        cached = cache.load(case_id)
        z = case.image.shape[0]
        assert isinstance(cached.image, np.memmap) and cached.image.dtype == np.float16
        assert cached.image.shape == (z, 16, 16) and cached.label.shape == (z, 16, 16)
        meta = cached.meta
        grid = network_grid(case.image.array, cache.plan, 16, cfg.preprocess.crop)
        assert InPlaneResize.from_dict(meta["in_plane"]) == grid
        direct = preprocess_volume(case.image.array, cache.plan, 16, box=grid.box)
        np.testing.assert_allclose(cached.image.astype(np.float32), direct, rtol=1e-3, atol=2e-3)
        np.testing.assert_array_equal(cached.label, preprocess_label(case.label.array, 16, box=grid.box))
        assert meta["original_shape"] == [z, 48, 48] and meta["num_slices"] == z
        assert meta["spacing"] == list(case.image.spacing) and meta["slice_thickness"] == case.image.slice_thickness
        assert meta["origin"] == [-10.0, 5.0, 100.0] and meta["in_plane"]["original_yx"] == [48, 48]
        assert meta["foreground_slices"] == foreground_slices(cached.label).tolist() != []
        assert meta["labels_present"] == [0, 1, 2]
    info = json.loads((tmp_path / "plan.json").read_text())
    assert info["intensity_plan"] == cache.plan.to_dict() and info["dataset"] == "memory://test"
    assert set(info["versions"]) == {"ctseg", "numpy", "torch"}
    # the statistics: the subset drawn by the same generator, its clipped foreground voxels
    assert list(cache.plan.subset_ids) == draw_subset(dataset.case_ids(), 2, np.random.default_rng(0))
    fg = np.concatenate([dataset._cases[i].image.array[dataset._cases[i].label.array > 0]
                         for i in cache.plan.subset_ids]).astype(np.float64)
    assert (cache.plan.lower, cache.plan.upper) == pytest.approx(tuple(np.percentile(fg, (0.6, 99.0))))
    assert cache.plan.mean == pytest.approx(np.clip(fg, cache.plan.lower, cache.plan.upper).mean())


def test_rerun_skips_and_changed_setting_rebuilds(dataset, tmp_path):
    build_cache(dataset, tmp_path, small_cfg(), np.random.default_rng(0), progress=False)
    before = files_mtimes(tmp_path)
    dataset.loads.clear()
    again = build_cache(dataset, tmp_path, small_cfg(), np.random.default_rng(0), progress=False)
    assert again.plan_reused and not again.built and sorted(again.skipped) == dataset.case_ids()
    assert dataset.loads == [] and files_mtimes(tmp_path) == before
    # sampling-only settings do not invalidate the cache
    same = build_cache(dataset, tmp_path, small_cfg(num_slices=8), np.random.default_rng(0), progress=False)
    assert not same.built
    # a different window recomputes the plan and rebuilds every case
    changed = build_cache(dataset, tmp_path, small_cfg(percentiles=(1.0, 95.0)), np.random.default_rng(0),
                          progress=False)
    assert not changed.plan_reused and sorted(changed.built) == dataset.case_ids()
    assert changed.plan.percentiles == (1.0, 95.0)
    after = files_mtimes(tmp_path)
    assert all(after[name] != before[name] for name in before)
    # a different in-plane size: other shapes, and the old config is refused
    resized = build_cache(dataset, tmp_path, small_cfg(in_plane_size=8), np.random.default_rng(0), progress=False)
    assert len(resized.built) == 4 and CaseCache(tmp_path).load("case_00000").image.shape[1:] == (8, 8)
    with pytest.raises(CtsegError, match="in_plane_size: cache has 8, config wants 16"):
        CaseCache(tmp_path, small_cfg())


def test_corrupted_file_is_detected_and_rebuilt(dataset, tmp_path, caplog):
    cfg = small_cfg()
    build_cache(dataset, tmp_path, cfg, np.random.default_rng(0), progress=False)
    image_path = tmp_path / "cases" / "case_00001_image.npy"
    data = bytearray(image_path.read_bytes())
    data[-5] ^= 0xFF  # same size, one voxel changed
    image_path.write_bytes(bytes(data))
    with pytest.raises(CtsegError, match="checksum mismatch.*ctseg preprocess"):
        CaseCache(tmp_path).load("case_00001")
    label_path = tmp_path / "cases" / "case_00002_label.npy"
    label_path.write_bytes(label_path.read_bytes()[:-10])
    with pytest.raises(CtsegError, match="corrupted"):
        CaseCache(tmp_path).load("case_00002")
    with caplog.at_level(logging.WARNING, logger="ctseg.preprocess.cache"):
        report = build_cache(dataset, tmp_path, cfg, np.random.default_rng(0), progress=False)
    assert sorted(report.repaired) == ["case_00001", "case_00002"] == sorted(report.built)
    assert "corrupted" in caplog.text
    cache = CaseCache(tmp_path)
    image = dataset._cases["case_00001"].image.array
    direct = preprocess_volume(image, cache.plan, 16, box=network_grid(image, cache.plan, 16, cfg.preprocess.crop).box)
    np.testing.assert_allclose(cache.load("case_00001").image.astype(np.float32), direct, rtol=1e-3, atol=2e-3)


def test_stale_case_file_is_refused_on_load(dataset, tmp_path):
    build_cache(dataset, tmp_path, small_cfg(), np.random.default_rng(0), progress=False)
    meta_path = tmp_path / "cases" / "case_00003.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CtsegError, match="stale"):
        CaseCache(tmp_path).load("case_00003")


def test_statistics_use_only_training_cases(dataset, tmp_path):
    train = ["case_00001", "case_00003"]
    report = build_cache(dataset, tmp_path, small_cfg(), np.random.default_rng(5), train_ids=train, progress=False)
    assert report.plan.subset_ids == tuple(train)
    assert sorted(report.built) == dataset.case_ids()  # every case is cached, only the statistics are restricted
    with pytest.raises(CtsegError, match="not in the dataset"):
        build_cache(dataset, tmp_path, small_cfg(), np.random.default_rng(5), train_ids=["case_x"], progress=False)


def test_subset_larger_than_dataset_errors(dataset, tmp_path):
    with pytest.raises(CtsegError, match="only 4 are available"):
        build_cache(dataset, tmp_path, small_cfg(subset_size=5), np.random.default_rng(0), progress=False)
    assert not (tmp_path / "plan.json").exists()


def test_unlabelled_case_and_missing_cache(tmp_path):
    data = InMemoryDataset([synthetic_case("a", 0, 12), synthetic_case("b", 1, 9, labelled=False)])
    build_cache(data, tmp_path / "c", small_cfg(subset_size=1), np.random.default_rng(0), train_ids=["a"],
                progress=False)
    cached = CaseCache(tmp_path / "c").load("b")
    assert cached.label is None and cached.meta["has_label"] is False and cached.image.shape == (9, 16, 16)
    with pytest.raises(CtsegError, match="no plan.json"):
        CaseCache(tmp_path / "nothing")
    with pytest.raises(CtsegError, match="not in this cache"):
        CaseCache(tmp_path / "c").load("zzz")


def test_cli_preprocess_on_a_kits19_folder(tmp_path, capsys):
    from ctseg.cli import main
    from ctseg.config import load_config
    from ctseg.datasets.kits19 import write_kits19_case

    data = tmp_path / "kits"
    for i in range(3):
        case = synthetic_case(f"case_{i:05d}", i, z=8 + i)
        write_kits19_case(data, case.case_id, case.image, case.label)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("preprocess:\n  in_plane_size: 16\n  subset_size: 2\n")
    out = tmp_path / "cache"
    argv = ["preprocess", str(data), "--out", str(out), "--config", str(cfg_path), "--seed", "3", "--no-progress"]
    assert main(argv) == 0
    assert "3 built, 0 up to date" in capsys.readouterr().out
    cache = CaseCache(out, load_config(out / "config.yaml"))
    assert cache.case_ids() == ["case_00000", "case_00001", "case_00002"]
    assert cache.load("case_00002").image.shape == (10, 16, 16) and load_config(out / "config.yaml").seed == 3
    assert main(argv) == 0 and "0 built, 3 up to date" in capsys.readouterr().out
    cfg_path.write_text("preprocess:\n  subset_size: 7\n")
    assert main(["preprocess", str(data), "--out", str(out), "--config", str(cfg_path), "--no-progress"]) == 2
    assert "only 3 are available" in " ".join(capsys.readouterr().err.split())


def test_fold_plans_use_only_the_folds_training_cases(tmp_path):
    """No test case's voxels enter its fold's intensity plan: the plan is drawn from the fold's training cases,
    stays the same when the test cases' intensities change, and equal plans share one cache folder."""
    from ctseg.cv.run import fold_cache, fold_cache_dir
    from ctseg.evaluate.folds import Folds

    cases = [synthetic_case(f"case_{i:05d}", i, z=8 + i) for i in range(6)]
    folds = Folds(mode="sorted", n_folds=2, folds=[[c.case_id for c in cases[:3]], [c.case_id for c in cases[3:]]],
                  case_meta={})
    cfg = small_cfg(window="percentile")
    plans = {}
    for k in range(2):
        cache = fold_cache(InMemoryDataset(cases), cfg, tmp_path / "cache", folds, k, progress=False)
        info = json.loads((cache.root / "plan.json").read_text())
        assert not set(info["subset"]) & set(folds.test_ids(k))
        assert set(info["subset"]) <= set(folds.train_ids(k)) and len(info["subset"]) == 2
        assert cache.root == fold_cache_dir(cfg, tmp_path / "cache", folds, k)
        plans[k] = cache.plan
    assert plans[0] != plans[1] and len(list((tmp_path / "cache").glob("plan-*"))) == 2
    # fold 0 with its test cases made 300 HU brighter: the same plan, the same (reused) folder
    bright = [Case(c.case_id, Volume(c.image.array.astype(np.int32) + 300, spacing=c.image.spacing,
                                     origin=c.image.origin, slice_thickness=c.image.slice_thickness),
                   c.label, c.metadata) if i < 3 else c for i, c in enumerate(cases)]
    other = InMemoryDataset(bright)
    again = fold_cache(other, cfg, tmp_path / "cache", folds, 0, progress=False)
    assert again.root == fold_cache_dir(cfg, tmp_path / "cache", folds, 0) and again.plan == plans[0]
    shutil.rmtree(again.root)
    rebuilt = fold_cache(other, cfg, tmp_path / "cache", folds, 0, progress=False)  # recomputed from scratch
    assert rebuilt.plan == plans[0]


def test_parallel_build_is_byte_identical_to_serial(tmp_path):
    """`workers=2` (spawned processes) writes the same bytes as a serial build, every cached file."""
    from ctseg.datasets.kits19 import KiTS19Dataset, write_kits19_case

    for i in range(3):
        case = synthetic_case(f"case_{i:05d}", i, z=8 + 2 * i)
        write_kits19_case(tmp_path / "kits", case.case_id, case.image, case.label)
    dataset = KiTS19Dataset(tmp_path / "kits")
    serial = build_cache(dataset, tmp_path / "serial", small_cfg(), np.random.default_rng(0), progress=False)
    parallel = build_cache(dataset, tmp_path / "parallel", small_cfg(), np.random.default_rng(0), progress=False,
                           workers=2)
    assert parallel.built == serial.built == dataset.case_ids()
    names = sorted(p.name for p in (tmp_path / "serial" / "cases").iterdir())
    assert len(names) == 9 and names == sorted(p.name for p in (tmp_path / "parallel" / "cases").iterdir())
    for name in names:
        assert (tmp_path / "serial" / "cases" / name).read_bytes() == (tmp_path / "parallel" / "cases" / name).read_bytes()
    plans = [json.loads((tmp_path / d / "plan.json").read_text()) for d in ("serial", "parallel")]
    for plan in plans:
        plan.pop("created")
    assert plans[0] == plans[1]
    with pytest.raises(CtsegError, match="workers must be >= 1"):
        build_cache(dataset, tmp_path / "x", small_cfg(), np.random.default_rng(0), progress=False, workers=0)


PREPROCESS_MEMORY_SCRIPT = """
import sys
from pathlib import Path

import numpy as np

from ctseg.config import ExperimentConfig
from ctseg.datasets import open_dataset
from ctseg.preprocess.cache import build_cache


def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


base = status("VmRSS")
cfg = ExperimentConfig.model_validate({"preprocess": {"in_plane_size": 128, "subset_size": 1}})
build_cache(open_dataset(sys.argv[1]), sys.argv[2], cfg, np.random.default_rng(0), progress=False)
print(base, status("VmHWM"))
"""


def test_preprocess_peak_memory_is_a_small_multiple_of_the_volume(tmp_path):
    """Reading a KiTS19-oriented .nii.gz (reoriented on load), the intensity plan and the cache write hold at
    most ~4 copies of the int16 volume's bytes at once (no whole-volume float32 or int64 temporaries)."""
    import subprocess
    import sys

    import nibabel as nib

    shape = (192, 512, 512)  # KiTS19 order: slices first (96 MiB int16)
    image = np.full(shape, -1000, np.int16)
    image[:, 100:400, 120:420] = 40
    label = np.zeros(shape, np.uint8)
    label[80:140, 200:260, 200:280] = 1
    image[80:140, 200:260, 200:280] = 100 + np.arange(80, dtype=np.int16)  # a spread of kidney HU
    affine = np.array([[0.0, 0.0, -0.8, 0.0], [0.0, -0.8, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    (tmp_path / "kits" / "case_00000").mkdir(parents=True)
    for name, array in (("imaging.nii.gz", image), ("segmentation.nii.gz", label)):
        nib.save(nib.Nifti1Image(array, affine), str(tmp_path / "kits" / "case_00000" / name))
    script = tmp_path / "measure.py"
    script.write_text(PREPROCESS_MEMORY_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "kits"), str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    base, peak = map(int, out.stdout.split())
    assert (tmp_path / "cache" / "cases" / "case_00000_image.npy").is_file()
    assert peak - base <= 4 * image.nbytes, f"peak {(peak - base) / image.nbytes:.1f} x the int16 volume above start"
