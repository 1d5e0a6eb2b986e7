"""DICOM series reading: series choice, position order, spacing from positions, gaps, tilt, rescale, codecs."""
import logging
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from ctseg.dicom import list_dicom_series, read_dicom_files, read_dicom_series, write_dicom_series
from ctseg.errors import CtsegError
from ctseg.io import Volume, read_volume, resample_to, to_canonical


def _volume(rng, shape=(6, 24, 20), spacing=(2.5, 0.8, 0.75), direction=None):
    array = rng.integers(-1024, 1500, size=shape).astype(np.int16)
    return Volume(array, spacing=spacing, origin=(-120.0, -80.0, -300.0),
                  direction=np.eye(3) if direction is None else direction, slice_thickness=3.0)


def _assert_same(got: Volume, expected: Volume):
    np.testing.assert_array_equal(got.array, expected.array)
    assert got.same_geometry(expected, atol=1e-5)


def test_write_and_read_series_with_shuffled_names(tmp_path, rng):
    vol = _volume(rng)
    names = [f"{n:08x}" for n in rng.permutation(10**6)[: vol.shape[0]]]  # no order in the names
    write_dicom_series(vol, tmp_path, file_names=names)
    got = read_dicom_series(tmp_path)
    _assert_same(got, vol)
    assert got.array.dtype == np.int16
    assert got.slice_thickness == 3.0 and got.spacing[0] == pytest.approx(2.5)


def test_oblique_series_keeps_geometry(tmp_path, rng):
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    direction = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    vol = _volume(rng, direction=direction)
    write_dicom_series(vol, tmp_path)
    _assert_same(read_dicom_series(tmp_path), vol)


def test_two_series_stray_files_and_dicomdir(tmp_path, rng):
    a, b = _volume(rng, shape=(4, 16, 16)), _volume(rng, shape=(5, 16, 16))
    write_dicom_series(a, tmp_path / "a", series_uid="1.2.3.4", series_description="first")
    write_dicom_series(b, tmp_path / "b", series_uid="1.2.3.5", series_description="second")
    (tmp_path / "README.txt").write_text("not DICOM")
    (tmp_path / "a" / "notes").write_bytes(b"\x00\x01garbage" * 50)
    shutil.copy(next((tmp_path / "a").iterdir()), tmp_path / "DICOMDIR")  # named DICOMDIR: ignored
    series = list_dicom_series(tmp_path)
    assert [(s.series_uid, len(s.files)) for s in series] == [("1.2.3.4", 4), ("1.2.3.5", 5)]
    with pytest.raises(CtsegError, match=r"2 DICOM series found(.|\n)*1\.2\.3\.4(.|\n)*1\.2\.3\.5"):
        read_dicom_series(tmp_path)
    _assert_same(read_dicom_series(tmp_path, series_uid="1.2.3.5"), b)
    with pytest.raises(CtsegError, match="no series with SeriesInstanceUID '9.9'"):
        read_dicom_series(tmp_path, series_uid="9.9")


def test_missing_slice_is_detected_and_filled(tmp_path, rng, caplog):
    vol = _volume(rng, shape=(7, 16, 16))
    files = write_dicom_series(vol, tmp_path)
    files[3].unlink()
    with caplog.at_level(logging.WARNING):
        got = read_dicom_series(tmp_path)
    z3 = vol.origin[2] + 3 * 2.5
    assert any("missing slice" in r.message and f"{z3 - 2.5:.3f}" in r.message and f"{z3 + 2.5:.3f}" in r.message
               for r in caplog.records)
    assert got.meta["interpolated_slices"] == [3] and got.meta["slice_files"][3] is None
    assert got.same_geometry(vol, atol=1e-5)
    keep = [0, 1, 2, 4, 5, 6]
    np.testing.assert_array_equal(got.array[keep], vol.array[keep])
    expected = np.round((vol.array[2].astype(float) + vol.array[4]) / 2)
    np.testing.assert_array_equal(got.array[3], expected)


def test_irregular_spacing_tilt_and_duplicates_are_errors(tmp_path, rng):
    vol = _volume(rng, shape=(5, 16, 16))
    for case, edit in {
        "irregular": lambda k, ds: ds.ImagePositionPatient[2] + (0.9 if k == 4 else 0.0),
        "duplicate": lambda k, ds: ds.ImagePositionPatient[2] - (2.5 if k == 4 else 0.0),
    }.items():
        folder = tmp_path / case
        for k, path in enumerate(write_dicom_series(vol, folder)):
            ds = pydicom.dcmread(path)
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], edit(k, ds)]
            ds.save_as(path)
        with pytest.raises(CtsegError, match="non-uniform slice spacing" if case == "irregular" else "same position"):
            read_dicom_series(folder)
    folder = tmp_path / "tilt"
    for k, path in enumerate(write_dicom_series(vol, folder)):
        ds = pydicom.dcmread(path)  # positions slide along y: a 15 degree gantry tilt
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) +
                                   k * 2.5 * np.tan(np.radians(15)), ds.ImagePositionPatient[2]]
        ds.save_as(path)
    with pytest.raises(CtsegError, match=r"tilt\S* gantry tilt: slices are stacked 15.00 degrees"):
        read_dicom_series(folder)


def test_per_slice_rescale(tmp_path, rng):
    vol = _volume(rng, shape=(4, 16, 16))
    rescale = [(1.0, -1024.0), (2.0, -2048.0), (0.5, -1000.0), (1.0, 0.0)]
    write_dicom_series(vol, tmp_path, rescale=rescale)
    stored = [pydicom.dcmread(p).pixel_array for p in sorted(tmp_path.iterdir())]
    assert not np.array_equal(stored[0], stored[1])  # really stored differently
    got = read_dicom_series(tmp_path)
    assert got.array.dtype == np.float32
    for k, (slope, _) in enumerate(rescale):
        np.testing.assert_allclose(got.array[k], vol.array[k], atol=slope / 2)


def _to_jpeg_lossless(path):
    """Re-encode a file's pixels as JPEG Lossless SV1 with GDCM (SimpleITK): pydicom has no encoder for it."""
    ds = pydicom.dcmread(path)
    tmp = path.with_suffix(".gdcm.dcm")
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(tmp))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(ds.pixel_array[None].astype(np.int16)))
    encoded = pydicom.dcmread(tmp)
    tmp.unlink()
    assert encoded.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encoded.PixelData
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEG2000Lossless, JPEGLSLossless, RLELossless])
def test_compressed_series(tmp_path, rng, syntax):
    vol = _volume(rng, shape=(3, 32, 32))
    if syntax == JPEGLosslessSV1:
        for path in write_dicom_series(vol, tmp_path):
            _to_jpeg_lossless(path)
    else:
        write_dicom_series(vol, tmp_path, transfer_syntax=syntax)
    for path in tmp_path.iterdir():
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    got = read_dicom_series(tmp_path)
    assert got.meta["transfer_syntax"] == syntax
    _assert_same(got, vol)


def test_bad_dicom_inputs(tmp_path, rng):
    with pytest.raises(CtsegError, match="nowhere.*no such folder"):
        read_dicom_series(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("hello")
    with pytest.raises(CtsegError, match="empty.*no DICOM image files"):
        read_dicom_series(tmp_path / "empty")
    files = write_dicom_series(_volume(rng, shape=(3, 16, 16)), tmp_path / "one")
    with pytest.raises(CtsegError, match="0000.dcm.*single DICOM slice.*2D"):
        read_dicom_files(files[:1])
    with pytest.raises(CtsegError, match="0000.dcm.*single DICOM file: pass the folder"):
        read_volume(files[0])
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 100])  # truncated pixel data
    with pytest.raises(CtsegError, match="0002.dcm"):
        read_dicom_series(tmp_path / "one")


def test_real_series(real_ct_dir):
    vol = read_volume(real_ct_dir / "DICOM_anon")
    assert vol.shape == (20, 512, 512)
    assert vol.array.min() == -1024 and vol.array.max() == 1839
    assert vol.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert vol.slice_thickness == 3.0
    assert vol.meta["series_uid"] == "" and vol.meta["transfer_syntax"] == JPEG2000Lossless
    np.testing.assert_array_equal(vol.direction, np.eye(3))
    names = [p.split("/")[-1] for p in vol.meta["slice_files"]]
    assert names == sorted(names, reverse=True)  # files sort by z descending; the volume runs upwards


def test_real_liver_mask_lands_on_the_liver_only_by_geometry(real_ct_dir):
    image = read_volume(real_ct_dir / "DICOM_anon")
    mask = read_volume(real_ct_dir / "liver_mask.nii.gz")
    assert mask.shape == image.shape and not mask.same_geometry(image)
    on_image = resample_to(mask, image)
    liver_hu = image.array[on_image.array > 0].mean()
    naive_hu = image.array[mask.array > 0].mean()  # arrays paired by index: y flipped
    assert 50 < liver_hu < 200
    assert not 50 < naive_hu < 200
    assert on_image.array.sum() == mask.array.sum()  # same grid up to a flip: no voxel lost
    canonical, _ = to_canonical(image)
    label, _ = to_canonical(on_image)
    # the liver is on the patient's right: canonical x runs to patient left, so low x
    xs = np.nonzero(label.array)[2]
    assert np.median(xs) < canonical.shape[2] / 2
