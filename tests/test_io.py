"""ctseg.io: geometry round trips (NIfTI via nibabel, NRRD, MHA), canonical orientation, resampling, HU checks."""
import gzip
import itertools

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctseg.errors import CtsegError
from ctseg.io import (Volume, check_hu_plausibility, from_canonical, read_volume, resample_to, to_canonical,
                      write_volume)


def _rotation(rng, max_deg):
    """A random rotation of at most `max_deg` degrees (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


KITS19_AFFINE = np.array([[0.0, 0.0, -0.919, 171.0], [0.0, -0.919, 0.0, 230.0], [-5.0, 0.0, 0.0, 120.0], [0, 0, 0, 1]])


def generated_affines(rng):
    """RAS affines: every axis permutation x flips (non-square spacing), oblique ones, and KiTS19's."""
    out = []
    for perm in itertools.permutations(range(3)):
        flips = rng.choice([-1.0, 1.0], size=3)
        rot = np.zeros((3, 3))
        rot[list(perm), range(3)] = flips
        out.append((f"perm{perm}", rot))
    for i in range(3):
        perm = rng.permutation(3)
        rot = np.zeros((3, 3))
        rot[perm, range(3)] = rng.choice([-1.0, 1.0], size=3)
        out.append((f"oblique{i}", _rotation(rng, 30) @ rot))
    affines = []
    for name, rot in out:
        a = np.eye(4)
        a[:3, :3] = rot @ np.diag(rng.uniform(0.5, 5.0, size=3))
        a[:3, 3] = rng.uniform(-300, 300, size=3)
        affines.append((name, a))
    affines.append(("kits19", KITS19_AFFINE))
    return affines


def _save_nifti(data, affine, path, qcode=1, scode=2):
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    nib.save(img, str(path))


def _world_of(volume, index_zyx):
    return volume.affine_lps[:3, :3] @ np.asarray(index_zyx[::-1], float) + volume.affine_lps[:3, 3]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_roundtrip_through_canonical_is_exact(tmp_path, rng, suffix):
    for name, affine in generated_affines(rng):
        data = rng.integers(-1024, 2000, size=(7, 6, 5)).astype(np.int16)  # (i, j, k): non-cubic
        src = tmp_path / f"{name}{suffix}"
        _save_nifti(data, affine, src)
        vol = read_volume(src)
        canonical, reo = to_canonical(vol)

        # canonical: axis 0 is the axial (S) axis, direction ~ identity in LPS, voxels only moved
        assert np.all(np.diag(canonical.direction) > 0.8), name
        if not name.startswith("oblique"):
            np.testing.assert_array_equal(canonical.direction, np.eye(3))
        s_axis = int(np.argmax(np.abs(vol.direction[2])))  # ITK axis along S in the file
        assert canonical.spacing[0] == pytest.approx(vol.spacing[::-1][s_axis])
        for index in [(0, 0, 0), (1, 2, 3), tuple(n - 1 for n in canonical.shape)]:
            world = _world_of(canonical, index)
            original_index = np.linalg.solve(vol.affine_lps[:3, :3], world - vol.affine_lps[:3, 3])
            ijk = np.round(original_index).astype(int)
            np.testing.assert_allclose(original_index, ijk, atol=1e-4)
            assert canonical.array[index] == vol.array[tuple(ijk[::-1])]

        back = from_canonical(canonical, reo)
        out = tmp_path / f"out_{name}{suffix}"
        write_volume(back, out)
        a, b = nib.load(str(src)), nib.load(str(out))
        for form in ("get_qform", "get_sform"):
            fa, ca = getattr(a, form)(coded=True)
            fb, cb = getattr(b, form)(coded=True)
            np.testing.assert_array_equal(fa, fb)
            assert ca == cb
        assert b.get_data_dtype() == np.int16
        np.testing.assert_array_equal(np.asanyarray(b.dataobj), data)


def test_nifti_geometry_matches_simpleitk(tmp_path, rng):
    for name, affine in generated_affines(rng):
        path = tmp_path / f"{name}.nii.gz"
        _save_nifti(rng.normal(size=(5, 6, 7)).astype(np.float32), affine, path, qcode=1, scode=1)
        ours, theirs = read_volume(path), sitk.ReadImage(str(path))
        np.testing.assert_allclose(ours.spacing, theirs.GetSpacing()[::-1], rtol=1e-5)
        np.testing.assert_allclose(ours.origin, theirs.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(ours.direction.flatten(), theirs.GetDirection(), atol=1e-5)
        np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(theirs))


def test_new_nifti_gets_qform_and_sform(tmp_path):
    vol = Volume(np.zeros((3, 4, 5), np.uint8), spacing=(2.5, 0.7, 0.8), origin=(10.0, -20.0, 30.0),
                 direction=np.diag([1.0, -1.0, 1.0]))
    write_volume(vol, tmp_path / "x.nii.gz")
    img = nib.load(str(tmp_path / "x.nii.gz"))
    expected_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine_lps
    for form in (img.get_qform(coded=True), img.get_sform(coded=True)):
        np.testing.assert_allclose(form[0], expected_ras, atol=1e-5)
        assert form[1] == 1
    back = read_volume(tmp_path / "x.nii.gz")
    assert back.same_geometry(vol, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_formats_roundtrip_through_canonical(tmp_path, rng, suffix):
    for name, affine in generated_affines(rng):
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        spacing_xyz = np.linalg.norm(lps[:3, :3], axis=0)
        vol = Volume(rng.integers(-1024, 3000, size=(5, 6, 7)).astype(np.int16), spacing=spacing_xyz[::-1],
                     origin=lps[:3, 3], direction=lps[:3, :3] / spacing_xyz)
        write_volume(vol, tmp_path / f"a{suffix}")
        read = read_volume(tmp_path / f"a{suffix}")
        canonical, reo = to_canonical(read)
        write_volume(from_canonical(canonical, reo), tmp_path / f"b{suffix}")
        again = read_volume(tmp_path / f"b{suffix}")
        for got in (read, again):
            np.testing.assert_array_equal(got.array, vol.array)
            assert got.array.dtype == np.int16
            np.testing.assert_allclose(got.affine_lps, vol.affine_lps, rtol=0, atol=1e-9)
        # ITK stores direction * spacing in NRRD and splits them on reading: equal to the last bit or two
        np.testing.assert_allclose(again.affine_lps, read.affine_lps, rtol=1e-15, atol=1e-13)


def test_from_canonical_refuses_wrong_shape():
    # ITK x runs inferior->superior, z runs left: the slice axis is the array's last axis
    vol = Volume(np.arange(120).reshape(4, 5, 6), spacing=(1.0, 2.0, 3.0),
                 direction=np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    canonical, reo = to_canonical(vol)
    assert canonical.shape == reo.canonical_shape == (6, 5, 4)
    assert canonical.spacing == (3.0, 2.0, 1.0)
    np.testing.assert_array_equal(from_canonical(canonical, reo).array, vol.array)
    with pytest.raises(ValueError, match="canonical shape"):
        from_canonical(vol, reo)


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    vol = Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), spacing=(1, 1, 1))
    target = tmp_path / "v.mha"
    write_volume(vol, target)
    bad = Volume(np.zeros((3, 4, 5), dtype=np.float16), spacing=(1, 1, 1))  # SimpleITK refuses float16
    with pytest.raises(TypeError, match="float16"):
        write_volume(bad, target)
    np.testing.assert_array_equal(read_volume(target).array, vol.array)  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mha"]
    with pytest.raises(CtsegError, match="cannot write"):
        write_volume(vol, tmp_path / "v.png")


def test_resample_to_uses_geometry_not_indices(rng):
    image = Volume(np.zeros((6, 8, 10), np.int16), spacing=(2.0, 1.0, 1.5), origin=(5.0, -3.0, 12.0))
    label = np.zeros((6, 8, 10), np.uint8)
    label[1:3, 2:5, 6:9] = 1
    label[4, 0, 0] = 2
    # the same label stored with its y axis flipped: origin moves to the last row, direction y -> -y
    flipped = Volume(label[:, ::-1, :].copy(), spacing=image.spacing,
                     origin=(5.0, -3.0 + 7 * 1.0, 12.0), direction=np.diag([1.0, -1.0, 1.0]))
    assert not np.array_equal(flipped.array, label)
    on_image = resample_to(flipped, image)
    assert on_image.same_geometry(image)
    np.testing.assert_array_equal(on_image.array, label)
    # a label on a coarser grid: nearest neighbour keeps label values only
    coarse = resample_to(on_image, Volume(np.zeros((3, 4, 5)), spacing=(4.0, 2.0, 3.0), origin=image.origin))
    assert set(np.unique(coarse.array)) <= {0, 1, 2}
    far = Volume(label, spacing=image.spacing, origin=(500.0, 0.0, 0.0), meta={"path": "far.nii.gz"})
    with pytest.raises(CtsegError, match="far.nii.gz.*does not overlap"):
        resample_to(far, image)


def _ct_like(rng, shape=(8, 32, 32)):
    a = rng.normal(-1000, 10, size=shape).astype(np.int16)
    a[:, 6:26, 6:26] = rng.normal(40, 20, size=(shape[0], 20, 20)).astype(np.int16)
    a[:, 14:18, 14:18] = 700
    return a


def test_hu_plausibility(rng):
    ct = Volume(_ct_like(rng), spacing=(1, 1, 1))
    assert check_hu_plausibility(ct) == []
    raw = ct.with_array((ct.array.astype(np.int32) + 1024).astype(np.uint16))  # stored values, no rescale
    assert any("no negative values" in w for w in check_hu_plausibility(raw))
    mr = ct.with_array(rng.uniform(0, 1, size=ct.shape).astype(np.float32))
    warnings = check_hu_plausibility(mr)
    assert any("too narrow" in w for w in warnings) and any("no negative" in w for w in warnings)
    shifted = ct.with_array(ct.array.astype(np.int32) - 1000)  # wrong intercept: air at -2000
    assert any("far below -1000" in w for w in check_hu_plausibility(shifted))
    padded = ct.array.copy()
    padded[:, :3] = -3024  # padding outside the scan circle is not air and must not trigger a warning
    assert check_hu_plausibility(ct.with_array(padded)) == []


def test_bad_inputs_raise_ctseg_error_naming_the_file(tmp_path, rng):
    with pytest.raises(CtsegError, match="missing.nii.gz.*no such file"):
        read_volume(tmp_path / "missing.nii.gz")

    nan = rng.normal(size=(4, 5, 6)).astype(np.float32)
    nan[1, 2, 3] = np.nan
    nan[0, 0, 0] = np.inf
    _save_nifti(nan, np.eye(4), tmp_path / "nan.nii.gz")
    with pytest.raises(CtsegError, match="nan.nii.gz.*2 voxels are NaN or infinite"):
        read_volume(tmp_path / "nan.nii.gz")

    _save_nifti(np.zeros((16, 16), np.int16), np.eye(4), tmp_path / "flat.nii.gz")
    with pytest.raises(CtsegError, match="flat.nii.gz.*expected a 3D volume.*2D"):
        read_volume(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "flat.mha"))
    with pytest.raises(CtsegError, match="flat.mha.*expected a 3D volume"):
        read_volume(tmp_path / "flat.mha")

    _save_nifti(rng.integers(0, 100, size=(40, 40, 40)).astype(np.int16), np.eye(4), tmp_path / "ok.nii.gz")
    raw = gzip.decompress((tmp_path / "ok.nii.gz").read_bytes())
    (tmp_path / "truncated.nii.gz").write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    with pytest.raises(CtsegError, match="truncated.nii.gz.*cannot read NIfTI"):
        read_volume(tmp_path / "truncated.nii.gz")

    (tmp_path / "garbage.nii").write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(CtsegError, match="garbage.nii"):
        read_volume(tmp_path / "garbage.nii")
    (tmp_path / "garbage.mha").write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(CtsegError, match="garbage.mha.*cannot read image"):
        read_volume(tmp_path / "garbage.mha")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(CtsegError, match="image.png.*unsupported file type"):
        read_volume(tmp_path / "image.png")
