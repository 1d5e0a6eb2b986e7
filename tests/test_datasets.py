"""Dataset layouts (KiTS19, CHAOS CT, nnU-Net raw), open_dataset and `ctseg inspect`, on small fixtures."""
import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from ctseg.cli import main as cli_main
from ctseg.datasets import ChaosDataset, KiTS19Dataset, NnUNetRawDataset, detect_layout, open_dataset
from ctseg.datasets.chaos import write_chaos_case
from ctseg.datasets.kits19 import write_kits19_case
from ctseg.datasets.nnunet_raw import write_nnunet_case, write_nnunet_dataset_json
from ctseg.errors import CtsegError
from ctseg.io import Volume, read_volume, resample_to, to_canonical

SHAPE = (10, 20, 28)  # (z, y, x): non-square in-plane, like KiTS19's 512 x 796 cases
SPACING = (5.0, 0.75, 0.75)


def _canonical_case(rng, shape=SHAPE):
    """A CT-like canonical image (air, body, a 'kidney' with a 'tumour') and its label."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.4)) ** 2 < 1
    image = rng.normal(-1000, 8, size=shape)
    image[np.broadcast_to(body, shape)] = rng.normal(40, 15, size=np.count_nonzero(np.broadcast_to(body, shape)))
    label = np.zeros(shape, np.uint8)
    label[2:7, 6:12, 5:11] = 1
    label[3:5, 7:10, 6:9] = 2
    image[label == 1] += 120
    origin = (-10.5, 20.25, -300.0)
    return (Volume(image.astype(np.int16), SPACING, origin),
            Volume(label, SPACING, origin))


def _kits_affine(volume):
    """KiTS19's file orientation: data (slice, row, col), i -> inferior, j -> posterior, k -> left (RAS affine)."""
    sz, sy, sx = volume.spacing
    top = np.asarray(volume.origin) + np.array([0.0, 0.0, (volume.shape[0] - 1) * sz])  # LPS of the top slice
    return np.array([[0.0, 0.0, -sx, -top[0]], [0.0, -sy, 0.0, -top[1]], [-sz, 0.0, 0.0, top[2]], [0, 0, 0, 1]])


def _write_kits_like(folder, image, label, label_data=None, label_affine=None):
    folder.mkdir(parents=True)
    affine = _kits_affine(image)
    nib.save(nib.Nifti1Image(image.array[::-1].copy(), affine), str(folder / "imaging.nii.gz"))
    if label is not None:
        data = label.array[::-1].copy() if label_data is None else label_data
        nib.save(nib.Nifti1Image(data, affine if label_affine is None else label_affine),
                 str(folder / "segmentation.nii.gz"))


def test_kits19_reads_slice_first_files_into_canonical(tmp_path, rng):
    image, label = _canonical_case(rng)
    _write_kits_like(tmp_path / "case_00000", image, label)
    _write_kits_like(tmp_path / "case_00210", image, None)  # a test case
    (tmp_path / "kits.json").write_text("{}")
    ds = open_dataset(tmp_path)
    assert isinstance(ds, KiTS19Dataset) and ds.case_ids() == ["case_00000", "case_00210"] and len(ds) == 2
    assert read_volume(tmp_path / "case_00000" / "imaging.nii.gz").shape == SHAPE[::-1]  # (x, y, z) order on disk
    case = ds.load("case_00000")
    np.testing.assert_array_equal(case.image.array, image.array)
    np.testing.assert_array_equal(case.label.array, label.array)
    assert case.label.array.dtype == np.uint8
    np.testing.assert_allclose(case.image.origin, image.origin, atol=1e-4)
    np.testing.assert_array_equal(case.image.direction, np.eye(3))
    assert case.metadata["num_slices"] == SHAPE[0]
    assert case.metadata["spacing"] == pytest.approx(SPACING)
    assert case.metadata["slice_thickness"] == pytest.approx(5.0)
    assert case.metadata["slice_thickness_source"] == "spacing"
    assert case.metadata["warnings"] == []
    assert case.label.same_geometry(case.image)
    test_case = ds.load("case_00210")
    assert test_case.label is None
    assert [c.case_id for c in ds] == ds.case_ids()
    with pytest.raises(CtsegError, match="no case 'case_99999'"):
        ds.load("case_99999")
    (tmp_path / "repo").mkdir()
    shutil.move(tmp_path / "case_00000", tmp_path / "repo" / "data" / "case_00000")
    assert KiTS19Dataset(tmp_path / "repo").case_ids() == ["case_00000"]  # the kits19 repository's data/


def test_kits19_label_on_another_grid_is_resampled_by_geometry(tmp_path, rng):
    image, label = _canonical_case(rng)
    # segmentation stored with its row axis reversed (and the affine saying so)
    flipped = label.array[::-1, ::-1, :].copy()
    affine = _kits_affine(image)
    affine[:3, 3] += affine[:3, 1] * (SHAPE[1] - 1)
    affine[:3, 1] *= -1
    _write_kits_like(tmp_path / "case_00001", image, label, label_data=flipped, label_affine=affine)
    case = KiTS19Dataset(tmp_path).load("case_00001")
    np.testing.assert_array_equal(case.label.array, label.array)
    assert any("label resampled onto the image grid" in w for w in case.metadata["warnings"])


def test_kits19_bad_labels(tmp_path, rng):
    image, label = _canonical_case(rng)
    bad = label.array[::-1].copy()
    bad[0, 0, 0] = 3
    _write_kits_like(tmp_path / "values" / "case_00002", image, label, label_data=bad)
    with pytest.raises(CtsegError, match=r"case_00002/segmentation.nii.gz.*label values \[3\]"):
        KiTS19Dataset(tmp_path / "values").load("case_00002")
    far = _kits_affine(image)
    far[:3, 3] += 1000.0
    _write_kits_like(tmp_path / "far" / "case_00003", image, label, label_affine=far)
    with pytest.raises(CtsegError, match=r"case_00003/segmentation.nii.gz.*does not overlap"):
        KiTS19Dataset(tmp_path / "far").load("case_00003")


def test_write_kits19_case_roundtrip(tmp_path, rng):
    image, label = _canonical_case(rng)
    write_kits19_case(tmp_path, "case_00007", image, label)
    case = open_dataset(tmp_path, layout="kits19").load("case_00007")
    np.testing.assert_array_equal(case.image.array, image.array)
    np.testing.assert_array_equal(case.label.array, label.array)


def test_chaos_layout_with_shuffled_numbers_and_root_variants(tmp_path, rng):
    image, label = _canonical_case(rng)
    ct = tmp_path / "CHAOS_Train_Sets" / "Train_Sets" / "CT"
    write_chaos_case(ct, "2", image, label, rng=rng)
    write_chaos_case(ct, "10", image, None)  # no Ground/: a test patient
    dicoms = sorted((ct / "2" / "DICOM_anon").iterdir())
    assert dicoms[0].name == "i0000,0000b.dcm" and len({pydicom.dcmread(p).SeriesInstanceUID for p in dicoms}) == 10
    zs = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in dicoms]
    assert zs != sorted(zs) and zs != sorted(zs, reverse=True)  # names do not follow position
    for root in (tmp_path / "CHAOS_Train_Sets", ct.parent, ct):
        ds = open_dataset(root)
        assert isinstance(ds, ChaosDataset) and ds.case_ids() == ["2", "10"]
    case = ds.load("2")
    np.testing.assert_array_equal(case.image.array, image.array)
    np.testing.assert_array_equal(case.label.array, label.array > 0)
    assert case.metadata["slice_thickness_source"] == "dicom"
    assert ds.classes == {0: "background", 1: "liver"}
    assert ds.load("10").label is None


def test_chaos_mask_problems(tmp_path, rng):
    image, label = _canonical_case(rng)
    write_chaos_case(tmp_path, "1", image, label)
    png = tmp_path / "1" / "Ground" / "liver_GT_004.png"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(png)
    with pytest.raises(CtsegError, match=r"liver_GT_004.png.*does not match its DICOM slice i0004,0000b.dcm"):
        ChaosDataset(tmp_path).load("1")
    png.unlink()
    with pytest.raises(CtsegError, match="Ground.*9 PNG masks for 10 DICOM files"):
        ChaosDataset(tmp_path).load("1")


def test_real_series_in_chaos_layout(tmp_path, real_ct_dir, rng):
    image = read_volume(real_ct_dir / "DICOM_anon")
    on_image = resample_to(read_volume(real_ct_dir / "liver_mask.nii.gz"), image)
    patient = tmp_path / "CT" / "7"
    (patient / "DICOM_anon").mkdir(parents=True)
    (patient / "Ground").mkdir()
    numbers = rng.permutation(image.shape[0])
    for k, (source, n) in enumerate(zip(image.meta["slice_files"], numbers)):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = generate_uid()  # CHAOS: one series UID per file
        ds.save_as(patient / "DICOM_anon" / f"i{n:04d},0000b.dcm")
        Image.fromarray(on_image.array[k] * 255).save(patient / "Ground" / f"liver_GT_{n:03d}.png")
    case = open_dataset(tmp_path).load("7")
    expected, _ = to_canonical(image)
    np.testing.assert_array_equal(case.image.array, expected.array)
    assert case.image.same_geometry(expected)
    np.testing.assert_array_equal(case.label.array, to_canonical(on_image)[0].array)
    assert 50 < case.image.array[case.label.array == 1].mean() < 200
    assert case.metadata["slice_thickness"] == 3.0 and case.metadata["spacing"][0] == pytest.approx(2.0)


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_nnunet_raw(tmp_path, rng, ending):
    image, label = _canonical_case(rng)
    classes = {0: "background", 1: "kidney", 2: "tumor"}
    write_nnunet_dataset_json(tmp_path, classes, num_training=2, file_ending=ending)
    write_nnunet_case(tmp_path, "kid_001", image, label, file_ending=ending)
    write_nnunet_case(tmp_path, "kid_002", image, label, file_ending=ending)
    write_nnunet_case(tmp_path, "kid_100", image, None, file_ending=ending)
    assert json.loads((tmp_path / "dataset.json").read_text())["labels"] == {"background": 0, "kidney": 1, "tumor": 2}
    ds = open_dataset(tmp_path)
    assert isinstance(ds, NnUNetRawDataset) and ds.classes == classes
    assert ds.case_ids() == ["kid_001", "kid_002", "kid_100"]
    case = ds.load("kid_002")
    np.testing.assert_array_equal(case.image.array, image.array)
    np.testing.assert_array_equal(case.label.array, label.array)
    assert ds.load("kid_100").label is None


def test_nnunet_v1_labels_and_bad_values(tmp_path, rng):
    image, label = _canonical_case(rng)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"},
                                                       "modality": {"0": "CT"}}))
    write_nnunet_case(tmp_path, "liver_0", image, label)  # label has a 2: not a class here
    ds = open_dataset(tmp_path)
    assert ds.classes == {0: "background", 1: "liver"}
    with pytest.raises(CtsegError, match=r"labelsTr/liver_0.nii.gz.*label values \[2\]"):
        ds.load("liver_0")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "both": [1, 2]}}))
    with pytest.raises(CtsegError, match="dataset.json.*region-based"):
        open_dataset(tmp_path)


def test_open_dataset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtsegError, match="empty.*empty folder"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(CtsegError, match="missing.*no such folder"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(CtsegError, match="other.*no known dataset layout"):
        detect_layout(tmp_path / "other")
    with pytest.raises(CtsegError, match="no KiTS19 cases"):
        open_dataset(tmp_path / "other", layout="kits19")
    with pytest.raises(CtsegError, match="unknown layout 'msd'"):
        open_dataset(tmp_path / "other", layout="msd")


def _flat(text):
    return " ".join(text.split())


def test_inspect_command(tmp_path, rng, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    image, label = _canonical_case(rng)
    write_kits19_case(tmp_path, "case_00000", image, label)
    write_kits19_case(tmp_path, "case_00001", image, None)
    assert cli_main(["inspect", str(tmp_path)]) == 0
    out = _flat(capsys.readouterr().out)
    assert "no problems found" in out and "case_00000" in out and "case_00001" in out
    kidney_ml = np.count_nonzero(label.array == 1) * np.prod(SPACING) / 1000
    assert f"{kidney_ml:.1f}" in out

    nan = image.array.astype(np.float32)
    nan[0, 0, 0] = np.nan
    write_kits19_case(tmp_path, "case_00002", image.with_array(nan), label)
    raw = image.with_array(np.clip(image.array.astype(np.int32) + 1024, 0, 4095).astype(np.uint16))  # not HU
    write_kits19_case(tmp_path, "case_00003", raw, label)
    assert cli_main(["inspect", str(tmp_path)]) == 1
    out = _flat(capsys.readouterr().out)
    assert "case_00002: failed to load" in out and "NaN or infinite" in out
    assert "case_00003: image: no negative values" in out
    assert "1 of 4 case(s) failed to load" in out

    (tmp_path / "empty").mkdir()
    assert cli_main(["inspect", str(tmp_path / "empty")]) == 2
    assert "empty folder" in capsys.readouterr().err


def _ctseg_piped(*argv):
    """`ctseg argv...` in a subprocess with stdout a pipe and no COLUMNS: what `| less` or `> file` gets."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run([sys.executable, "-m", "ctseg", *argv], capture_output=True, text=True, env=env, timeout=120)


def test_inspect_piped_prints_the_whole_table_json_and_csv(tmp_path, rng):
    import csv
    import io

    image, label = _canonical_case(rng)
    for i in range(2):
        write_kits19_case(tmp_path, f"case_{i:05d}", image, label)
    kidney_ml = np.count_nonzero(label.array == 1) * np.prod(SPACING) / 1000
    shape = "×".join(map(str, image.shape))

    table = _ctseg_piped("inspect", str(tmp_path))
    assert table.returncode == 0, table.stderr
    assert max(map(len, table.stdout.splitlines())) > 80  # wider than rich's 80-column fallback...
    assert "…" not in table.stdout and "\x1b[" not in table.stdout  # ...and nothing cut, no colour codes
    row = next(line for line in table.stdout.splitlines() if "case_00001" in line)
    assert shape in row and "5/0.75/0.75" in row and f"{kidney_ml:.1f}" in row

    as_json = _ctseg_piped("inspect", str(tmp_path), "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["layout"] == "kits19" and data["problems"] == [] and len(data["rows"]) == 2
    first = data["rows"][0]
    assert (first["shape_z"], first["shape_y"], first["shape_x"]) == image.shape
    assert first["spacing_z_mm"] == 5.0 and first["thickness_mm"] == 5.0 and first["error"] is None
    assert first["kidney_ml"] == pytest.approx(kidney_ml, abs=1e-3)
    assert first["hu_min"] == image.array.min() and first["hu_max"] == image.array.max()

    as_csv = _ctseg_piped("inspect", str(tmp_path), "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in data["rows"]]
    assert float(rows[1]["tumour_ml"]) == pytest.approx(data["rows"][1]["tumour_ml"])
