"""`ctseg predict` on the real CT fixture (JPEG 2000, empty UIDs): the written mask has the input's geometry.

A tiny liver model is trained for one step on a tiny phantom CHAOS set through `ctseg train`; its
prediction is meaningless as a segmentation, only its geometry is tested (Dice: scripts/real_ct_liver.py).
"""
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from ctseg.cli import main as cli_main
from ctseg.datasets.phantom import write_phantom_dataset
from ctseg.io import read_volume, resample_to

TINY = {
    "seed": 0,
    "data": {"layout": "chaos", "task": "liver"},
    "preprocess": {"subset_size": 2, "in_plane_size": 32},
    "augment": {"name": "none"},
    "model": {"arch": "unet", "dim": "2d", "target": "foreground",
              "unet": {"n_stages": 2, "base_features": 4, "max_features": 8}},
    "train": {"batch_size_2d": 2, "epochs": 1, "steps_per_epoch": 1, "val_fraction": 0.0, "device": "cpu"},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A liver U-Net trained for one step on a tiny phantom CHAOS set with `ctseg train`."""
    root = tmp_path_factory.mktemp("real_ct")
    data = write_phantom_dataset(root / "chaos", task="liver", n_cases=2, layout="chaos", seed=0, size="small",
                                 in_plane=32, num_slices=8)
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = root / "run"
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--config", str(root / "tiny.yaml"),
                     "--cache", str(root / "cache"), "--no-progress"]) == 0
    return run


@pytest.fixture
def prediction(tiny_run, real_ct_dir, tmp_path):
    """(DICOM folder, predicted NIfTI) from `ctseg predict` on the real series."""
    series, out = real_ct_dir / "DICOM_anon", tmp_path / "pred" / "liver.nii.gz"
    assert cli_main(["predict", "-i", str(series), "-o", str(out), "--model", str(tiny_run), "--device", "cpu",
                     "--no-progress"]) == 0
    return series, out


def _affine_ras_from_dicom_headers(folder) -> np.ndarray:
    """NIfTI (RAS) affine of the series straight from the DICOM tags, independent of ctseg.io."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    iop = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    headers.sort(key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))))
    first, last = (np.asarray(h.ImagePositionPatient, dtype=float) for h in (headers[0], headers[-1]))
    row_mm, col_mm = (float(v) for v in headers[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_mm          # voxel i: along a row (next column)
    lps[:3, 1] = iop[3:] * row_mm          # voxel j: down a column (next row)
    lps[:3, 2] = (last - first) / (len(headers) - 1)
    lps[:3, 3] = first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_predicted_mask_has_exactly_the_input_geometry(prediction):
    series, out = prediction
    image, mask = read_volume(series), read_volume(out)
    assert mask.shape == image.shape == (20, 512, 512)
    assert mask.spacing == pytest.approx(image.spacing, abs=1e-6)
    assert mask.spacing == pytest.approx((2.0, 0.9765625, 0.9765625), abs=1e-6)  # 2 mm apart, not 3 mm thick
    assert mask.origin == pytest.approx(image.origin, abs=1e-4)
    np.testing.assert_allclose(mask.direction, image.direction, atol=1e-6)
    assert mask.array.dtype == np.uint8 and set(np.unique(mask.array)) <= {0, 1}


def test_nifti_affine_equals_the_dicom_derived_affine(prediction):
    series, out = prediction
    img = nib.load(str(out))
    expected = _affine_ras_from_dicom_headers(series)
    np.testing.assert_allclose(img.affine, expected, atol=1e-4)
    np.testing.assert_allclose(img.get_qform(), expected, atol=1e-4)
    assert img.shape == (512, 512, 20)


def test_prediction_overlays_the_reference_mask_in_physical_space(prediction, real_ct_dir):
    """SimpleITK's own reading of the output, resampled onto the (y-flipped) reference grid, equals ours."""
    _, out = prediction
    pred = read_volume(out)
    # preconditions that make the comparison able to fail: a non-constant, up-down asymmetric mask
    assert 0 < int(pred.array.sum()) < pred.array.size, "the tiny model predicted a constant mask"
    assert not np.array_equal(pred.array, pred.array[:, ::-1]), "prediction is symmetric in y"

    ref_path = real_ct_dir / "liver_mask.nii.gz"
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(out)), sitk.ReadImage(str(ref_path)),
                                                   sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    ours = resample_to(pred, read_volume(ref_path), order=0).array
    np.testing.assert_array_equal(by_sitk, ours)
    # the two grids hold the same voxel centres with y reversed: exact, so resampling is a pure flip
    np.testing.assert_array_equal(ours, pred.array[:, ::-1, :])
    assert not np.array_equal(ours, pred.array)  # pairing by index would be wrong
