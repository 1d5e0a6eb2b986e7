import numpy as np
import pytest

from ctseg.evaluate.measure import max_feret_2d, measure_structures
from ctseg.io import Volume

KITS = {0: "background", 1: "kidney", 2: "tumour"}


def _sphere(shape, center, radius_mm, spacing):
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, center, spacing)], indexing="ij")
    return zz ** 2 + yy ** 2 + xx ** 2 <= radius_mm ** 2


def test_box_volume_diameter_centroid_hu_and_border():
    spacing = (2.5, 0.8, 0.8)
    lab = np.zeros((30, 60, 60), np.uint8)
    lab[5:15, 10:40, 20:45] = 1  # 10 x 30 x 25 voxels
    img = np.full(lab.shape, -100, np.int16)
    img[lab == 1] = 40
    origin = (-20.0, 10.0, 100.0)
    vol = Volume(lab, spacing, origin=origin)
    m = measure_structures(vol, vol.with_array(img), {0: "bg", 1: "liver"})["liver"]
    assert m["volume_ml"] == pytest.approx(10 * 30 * 25 * 2.5 * 0.8 * 0.8 / 1000)
    # outer boundary diagonal of a 30 x 25 voxel rectangle at 0.8 mm
    assert m["largest_axial_diameter_mm"] == pytest.approx(np.hypot(30 * 0.8, 25 * 0.8))
    centre_idx = np.array([(20 + 44) / 2, (10 + 39) / 2, (5 + 14) / 2])  # x, y, z index
    assert m["centroid_lps_mm"] == pytest.approx(list(np.array(origin) + centre_idx * np.array(spacing[::-1])))
    assert m["mean_hu"] == pytest.approx(40.0) and m["n_components"] == 1
    assert m["touches_border"] is False
    lab[0:3, 50:55, 50:55] = 1  # a second piece cut off by the first slice
    m2 = measure_structures(vol.with_array(lab), None, {0: "bg", 1: "liver"})["liver"]
    assert m2["n_components"] == 2 and m2["touches_border"] is True
    assert [c["touches_border"] for c in m2["components"]] == [False, True]
    assert m2["components"][1]["volume_ml"] == pytest.approx(3 * 25 * 2.5 * 0.64 / 1000)
    assert "mean_hu" not in m2


def test_sphere_and_two_tumours_counted_one_by_one():
    spacing = (1.0, 0.7, 0.7)
    shape = (60, 120, 120)
    lab = np.zeros(shape, np.uint8)
    kidney = _sphere(shape, (30, 60, 60), 20.0, spacing)
    lab[kidney] = 1
    t1 = _sphere(shape, (30, 45, 60), 6.0, spacing)
    t2 = _sphere(shape, (30, 80, 70), 4.0, spacing)
    lab[t1] = 2
    lab[t2] = 2
    vol = Volume(lab, spacing)
    m = measure_structures(vol, None, KITS)
    assert set(m) == {"kidney", "tumour", "total"}
    sphere_ml = 4 / 3 * np.pi * 20.0 ** 3 / 1000
    assert m["total"]["volume_ml"] == pytest.approx(sphere_ml, rel=0.01)
    # axial diameter of a 40 mm sphere measured on the outer boundary: 40 mm up to one pixel
    assert 40.0 - 0.7 <= m["total"]["largest_axial_diameter_mm"] <= 40.0 + 2 * 0.7
    tum = m["tumour"]
    assert tum["n_components"] == 2
    big, small = tum["components"]
    assert big["volume_ml"] == pytest.approx(4 / 3 * np.pi * 6.0 ** 3 / 1000, rel=0.03)
    assert small["volume_ml"] == pytest.approx(4 / 3 * np.pi * 4.0 ** 3 / 1000, rel=0.05)
    assert 12.0 - 0.7 <= big["largest_axial_diameter_mm"] <= 12.0 + 2 * 0.7
    assert big["centroid_lps_mm"] == pytest.approx([60 * 0.7, 45 * 0.7, 30.0], abs=0.05)
    assert not m["kidney"]["touches_border"]


def test_axial_plane_follows_direction():
    # the same box stored with the axial axis last (array axis 2 = S): diameter must stay in-plane
    spacing = (0.5, 0.5, 4.0)
    lab = np.zeros((40, 40, 20), np.uint8)
    lab[5:25, 5:15, 2:18] = 1  # 20 x 10 voxels in-plane at 0.5 mm, 16 slices of 4 mm
    direction = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)  # ITK axis x (array axis 2) -> S
    vol = Volume(lab, spacing, direction=direction)
    m = measure_structures(vol, None, {0: "bg", 1: "liver"})["liver"]
    assert m["largest_axial_diameter_mm"] == pytest.approx(np.hypot(10.0, 5.0))


def test_feret_single_pixel_and_empty():
    a = np.zeros((5, 5), bool)
    assert max_feret_2d(a, (1.0, 1.0)) == 0.0
    a[2, 2] = True
    assert max_feret_2d(a, (1.0, 2.0)) == pytest.approx(np.hypot(1.0, 2.0))


def test_max_feret_equals_brute_force_over_all_pixel_corners():
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(3)
    for _ in range(60):
        mask = rng.random((int(rng.integers(1, 25)), int(rng.integers(1, 25)))) < rng.uniform(0.02, 0.8)
        spacing = (float(rng.uniform(0.3, 3.0)), float(rng.uniform(0.3, 3.0)))
        r, c = np.nonzero(mask)
        corners = np.concatenate([np.stack([r + dr, c + dc], axis=1) for dr in (-0.5, 0.5) for dc in (-0.5, 0.5)])
        expected = pdist(corners * np.array(spacing)).max() if r.size else 0.0
        assert max_feret_2d(mask, spacing) == pytest.approx(expected, abs=1e-9)
