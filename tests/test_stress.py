"""Acquisition-shift stress test: each perturbation against a hand-computed case, then `ctseg stress` end to end
on a tiny trained model (out-of-fold and --model modes, continue / refuse, bad input) and the report section."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ctseg.cli import main
from ctseg.config import load_config
from ctseg.cv import run_cv
from ctseg.datasets.phantom import generate_case, to_kits19_orientation, write_phantom_dataset
from ctseg.experiment import apply_profile
from ctseg.io import Volume, resample_to, to_canonical
from ctseg.stress.perturb import (DegenerateSeverity, contrast_shift_map, correlated_noise, ct_noise_power_spectrum,
                                  estimate_noise_hu, hu_gain, hu_offset, resample_pixel_spacing, reslice_thickness,
                                  rotate_in_plane)

REPO = Path(__file__).resolve().parents[1]


def _step_volume(n=20, spacing=1.0, edge_after=10, kits=False):
    """Slices 0..edge_after are 0 HU, the rest 100 HU; label 1 where 100 HU."""
    arr = np.zeros((n, 6, 7), dtype=np.float32)
    arr[edge_after + 1:] = 100.0
    img = Volume(arr, (spacing, 0.8, 0.8), (10.0, -5.0, 30.0), np.eye(3), spacing)
    lab = Volume((arr > 50).astype(np.uint8), img.spacing, img.origin, img.direction, spacing)
    if kits:
        return to_kits19_orientation(img), to_kits19_orientation(lab)
    return img, lab


def test_thickness_is_changed_along_the_slice_axis_of_the_pipeline_for_an_oblique_scan():
    """A strongly oblique direction whose largest S component (index axis 1) is not the axis `to_canonical`
    makes the slice axis (index axis 0, by the best permutation): the perturbation reslices the latter."""
    direction = np.array([[0.531, -0.123, 0.839], [0.534, -0.72, -0.443], [0.659, 0.683, -0.317]])
    arr = np.zeros((6, 7, 12), dtype=np.float32)
    img = Volume(arr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction)
    lab = Volume(arr.astype(np.uint8), img.spacing, img.origin, direction)
    assert img.slice_axis() == 2  # index axis 0 is array axis 2; index axis 1 (array axis 1) has the largest S part
    out = reslice_thickness(img, lab, 3.0)
    assert out.image.shape == (6, 7, 4) and out.image.spacing[2] == 3.0


def _ramp_box_mean(a, b, edge=10.0):
    """Mean over [a, b] of the linear interpolant of the step: 0 up to z=edge, 100 from edge+1, linear between."""
    def integral(z):  # antiderivative of the ramp function
        if z <= edge:
            return 0.0
        if z <= edge + 1:
            return 50.0 * (z - edge) ** 2
        return 50.0 + 100.0 * (z - edge - 1)
    return (integral(b) - integral(a)) / (b - a)


def test_reslice_step_edge_partial_volume_profile():
    img, lab = _step_volume()
    out = reslice_thickness(img, lab, 3.0)
    assert out.score_on == "original" and out.image.spacing[0] == 3.0 and out.image.slice_thickness == 3.0
    # extent 20 mm (-0.5..19.5 in slice-index mm) tiled by 6 slices of 3 mm, centred: first edge at 0.5 mm
    z0 = out.image.origin[2] - img.origin[2]
    centres = z0 + 3.0 * np.arange(out.image.shape[0])
    assert out.image.shape[0] == 6 and centres[0] == pytest.approx(2.0)
    expected = [_ramp_box_mean(c - 1.5, c + 1.5) for c in centres]
    assert np.allclose(out.image.array[:, 3, 3], expected, atol=1e-4)
    # by hand: the slice over [9.5, 12.5] mm holds 0.5 mm of 0, the 1 mm ramp (mean 50), 1.5 mm of 100
    assert out.image.array[3, 0, 0] == pytest.approx((0 * 0.5 + 50 * 1.0 + 100 * 1.5) / 3.0, abs=1e-4)
    assert out.image.array[0, 0, 0] == 0.0 and out.image.array[-1, 0, 0] == pytest.approx(100.0)


def test_resliced_label_is_nearest_neighbour_of_original_and_kits_orientation():
    img, lab = _step_volume(n=20, edge_after=7)
    out = reslice_thickness(img, lab, 2.5)   # centres at 0.75, 3.25, ...: never half-way between native slices
    ref = resample_to(lab, out.label, order=0)
    assert np.array_equal(out.label.array, ref.array) and out.label.same_geometry(out.image)
    # KiTS19 voxel order (slices on the last array axis, I-P-L affine): the slice axis comes from the geometry
    kimg, klab = _step_volume(n=20, edge_after=7, kits=True)
    assert kimg.slice_axis() == 2 and img.slice_axis() == 0
    kout = reslice_thickness(kimg, klab, 2.5)
    assert kout.image.shape[2] == out.image.shape[0] and kout.image.spacing[2] == 2.5
    canon, _ = to_canonical(kout.image)
    assert np.allclose(canon.array, out.image.array) and np.allclose(canon.origin, out.image.origin)
    assert np.array_equal(to_canonical(kout.label)[0].array, out.label.array)
    with pytest.raises(DegenerateSeverity, match="leave 1 slice"):
        reslice_thickness(img, lab, 15.0)
    with pytest.raises(DegenerateSeverity, match="thinner"):
        reslice_thickness(img, lab, 0.5)


def test_noise_correlation_matches_target_nps():
    rng = np.random.default_rng(1)
    noise = correlated_noise((192, 192), 24, 20.0, rng)
    assert abs(noise.std() / 20.0 - 1) < 0.1
    # target autocorrelation = inverse FFT of the NPS (Wiener-Khinchin), normalised at lag 0
    target = np.fft.ifft2(ct_noise_power_spectrum((224, 224))).real
    target /= target[0, 0]
    n = noise.astype(np.float64) - noise.mean()
    for lag in (1, 2):
        measured = float((n[:, :, lag:] * n[:, :, :-lag]).mean() / (n * n).mean())
        assert abs(measured - target[0, lag]) < 0.1 * abs(target[0, lag]), (lag, measured, target[0, lag])
    assert target[0, 1] > 0.2  # CT-like: correlated (white noise: 0)


def test_noise_estimate_from_homogeneous_regions():
    rng = np.random.default_rng(2)
    arr = np.full((6, 96, 96), -1000.0, dtype=np.float32)
    arr[:, 16:80, 16:80] = 40.0
    arr += rng.standard_normal(arr.shape).astype(np.float32) * 12.0
    est = estimate_noise_hu(Volume(arr, (2.0, 0.8, 0.8)))
    assert abs(est / 12.0 - 1) < 0.1


def test_offset_gain_exact_and_contrast_by_label():
    img, lab = _step_volume()
    assert np.array_equal(hu_offset(img, lab, -60).image.array, img.array - 60)
    assert np.array_equal(hu_gain(img, lab, 1.1).image.array, img.array * np.float32(1.1))
    arr = np.full((4, 24, 24), 40.0, dtype=np.float32)
    label = np.zeros(arr.shape, dtype=np.uint8)
    label[:, 4:10, 4:10] = 2
    shift = contrast_shift_map(Volume(arr, (1, 1, 1)), Volume(label, (1, 1, 1)), {0: "background", 1: "kidney",
                                                                                  2: "tumour"})
    assert shift[2, 6, 6] == pytest.approx(-50.0, abs=1) and shift[2, 20, 20] == pytest.approx(10.0, abs=0.5)


def test_rotation_and_pixel_spacing_keep_geometry():
    arr = np.full((3, 40, 40), -1000.0, dtype=np.float32)
    arr[:, 10:30, 18:22] = 50.0
    img = Volume(arr, (2.0, 1.0, 1.0), (5.0, 6.0, 7.0))
    lab = Volume((arr > 0).astype(np.uint8), img.spacing, img.origin)
    rot = rotate_in_plane(img, lab, 90.0)
    assert np.array_equal(rot.label.array[1, 18:22, 10:30], np.ones((4, 20), np.uint8)) and rot.image.same_geometry(img)
    fov = resample_pixel_spacing(img, lab, 2 * 40 / 512.0)   # native 512-equivalent is 40/512: factor 2
    assert fov.image.spacing == (2.0, 2.0, 2.0) and fov.image.shape == img.shape

    def centre(v):
        return np.asarray(v.origin) + v.direction @ (np.asarray(v.spacing[::-1]) * (np.asarray(v.shape[::-1]) - 1) / 2)
    assert np.allclose(centre(fov.image), centre(img))
    assert fov.label.array.sum() == pytest.approx(lab.array.sum() / 4, rel=0.15)


def _kidney_volume(z=23, y=70, x=61):
    rng = np.random.default_rng(4)
    hu = rng.integers(-1000, 1500, (z, y, x)).astype(np.int16)
    hu[:, 10:60, 8:55] = rng.normal(40, 12, (z, 50, 47)).round().astype(np.int16)
    label = np.zeros(hu.shape, np.uint8)
    label[3:19, 20:45, 15:40] = 1
    label[6:12, 25:33, 20:30] = 2
    spacing, direction = (2.5, 0.8, 0.7), np.array([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]])  # slice axis: array axis 2
    return Volume(hu, spacing, direction=direction), Volume(label, spacing, direction=direction)


def test_perturbations_chunked_and_int16_match_whole_float32(monkeypatch):
    """Every axis gives the same bits when computed in small chunks and from the stored int16 image as in one
    piece from a float32 copy (what the stress test did before it kept the image as stored)."""
    import ctseg.stress.perturb as perturb

    img16, lab = _kidney_volume()
    img32 = img16.with_array(img16.array.astype(np.float32))
    kits = {0: "background", 1: "kidney", 2: "tumour"}
    cases = [("thickness-factor", 2.0), ("dose", 3.0), ("hu-offset", 30.0), ("hu-gain", 0.9), ("contrast", 0.75),
             ("rotation", 15.0), ("pixel-spacing", 0.7)]

    def run(image):
        noise = estimate_noise_hu(image)
        return [perturb.AXES[a].apply(image, lab, s, rng=np.random.default_rng(7), classes=kits, noise_hu=noise)
                for a, s in cases]

    whole = run(img32)
    monkeypatch.setattr(perturb, "_CHUNK_BYTES", 5000)  # a few rows / slices per chunk
    for chunked in (run(img32), run(img16)):
        for (a, _), p, q in zip(cases, whole, chunked):
            assert p.image.array.dtype == q.image.array.dtype == np.float32, a
            assert np.array_equal(p.image.array, q.image.array) and np.array_equal(p.label.array, q.label.array), a
            assert p.image.same_geometry(q.image), a


def test_thickness_and_contrast_work_memory_is_bounded():
    """Reslicing and the contrast map allocate about their output, not float64 copies of the whole volume."""
    import tracemalloc

    import ctseg.stress.perturb as perturb

    rng = np.random.default_rng(0)
    img = Volume(rng.normal(40, 20, (200, 64, 64)).astype(np.float32), (1.0, 0.8, 0.8))  # 3.3 MB
    lab = Volume((img.array > 60).astype(np.uint8), img.spacing)
    chunk, perturb._CHUNK_BYTES = perturb._CHUNK_BYTES, 2**20
    try:
        for axis, severity in (("thickness-factor", 1.5), ("contrast", 1.0)):
            tracemalloc.start()
            perturb.AXES[axis].apply(img, lab, severity, classes={0: "background", 1: "kidney"})
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 2.5 * img.array.nbytes + 3 * 2**20, (axis, peak / img.array.nbytes)
    finally:
        perturb._CHUNK_BYTES = chunk


def test_prediction_resampled_to_the_original_grid_as_resample_to():
    """The stress runner's nearest-neighbour resampling of a prediction on a resliced grid (no copy of the
    reference's voxels) gives `ctseg.io.resample_to`'s labels, in the KiTS19 voxel order too."""
    from ctseg.stress.runner import _resampled

    for kits in (False, True):
        img, lab = _step_volume(n=21, edge_after=7, kits=kits)
        out = reslice_thickness(img, lab, 2.0)  # centres half-way between native slices: ties in the rounding
        pred = out.label.with_array(np.random.default_rng(1).integers(0, 3, out.label.shape).astype(np.uint8))
        array, keep = _resampled(pred, lab)
        assert np.array_equal(array, resample_to(pred, lab, order=0).array) and keep is not None
    assert _resampled(lab, lab)[0] is lab.array


def test_memory_mapped_pages_dropped_while_read(tmp_path):
    """`mapped_pages_dropped`: a whole pass over a memory-mapped array reads the same values, and its pages leave
    the process's resident memory (RssFile) instead of staying mapped."""
    from ctseg.runtime import drop_mapped_pages, mapped_pages_dropped

    def rss_file_mib():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    array = np.random.default_rng(0).integers(-1000, 1000, (64, 512, 512)).astype(np.int16)  # 32 MiB
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    before = rss_file_mib()
    assert np.array_equal(np.asarray(mapped[:, ::-1], dtype=np.float32), array[:, ::-1].astype(np.float32))
    assert rss_file_mib() - before > 24  # read: resident
    drop_mapped_pages(mapped[3:5])  # a view drops its whole mapping
    assert rss_file_mib() - before < 8
    with mapped_pages_dropped(mapped, array):  # arrays that are not mapped are left alone
        total = sum(int(np.asarray(mapped[z:z + 2]).astype(np.int64).sum()) for z in range(0, 64, 2))
    assert total == int(array.astype(np.int64).sum()) and rss_file_mib() - before < 8


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("stress")
    data = write_phantom_dataset(root / "data", task="kidney", n_cases=4, layout="kits19", seed=3, size="small",
                                 in_plane=48)
    cfg = apply_profile(load_config(REPO / "configs" / "demo.yaml"), "ci")
    run_cv(cfg, data, root / "cv", progress=False)
    return root, data


def test_split_volumes_balances_voxels_and_keeps_every_volume(trained):
    from ctseg.datasets import open_dataset
    from ctseg.inference.cases import header_shape
    from ctseg.stress.runner import split_volumes

    _, data = trained
    dataset = open_dataset(data, "kits19")
    ids = dataset.case_ids()
    size = {c: int(np.prod(header_shape(dataset.image_path(c)))) for c in ids}
    assert len(set(size.values())) > 1  # the phantom's cases differ in slice count
    parts = split_volumes(dataset, ids, 2)
    assert sorted(c for p in parts for c in p) == sorted(ids) and all(p == sorted(p) for p in parts)
    loads = [sum(size[c] for c in p) for p in parts]
    # the largest-first greedy split: no part exceeds the ideal half by more than the largest volume
    assert max(loads) - sum(loads) / 2 <= max(size.values())
    assert max(loads) <= max(sum(size[c] for c in ids[i::2]) for i in range(2))  # never worse than round-robin
    assert split_volumes(dataset, ids, 10) == [[c] for c in sorted(ids, key=lambda c: (-size[c], c))]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_phantom_reacquisition_keeps_anatomy():
    base = generate_case(np.random.SeedSequence([3, 1]), size="small", in_plane=48)
    again = generate_case(np.random.SeedSequence([3, 1]), size="small", in_plane=48, acquisition={})
    noisy = generate_case(np.random.SeedSequence([3, 1]), size="small", in_plane=48,
                          acquisition={"noise_sigma": 2 * base.metadata["acquisition"]["noise_sigma"]})
    assert np.array_equal(base.image.array, again.image.array)
    assert np.array_equal(base.label.array, noisy.label.array) and not np.array_equal(base.image.array,
                                                                                     noisy.image.array)


def test_cli_stress_cv_out_of_fold_continue_refuse(trained, capsys):
    root, data = trained
    out = root / "stress"
    args = ["stress", "--cv-dir", str(root / "cv"), "--out", str(out), "--axes", "thickness-factor", "hu-offset",
            "phantom-dose", "--severity", "thickness-factor=2,40", "--severity", "hu-offset=-60,60",
            "--severity", "phantom-dose=3", "--max-volumes", "3", "--no-progress"]
    assert main(args) == 0
    rows = _rows(out / "rows.csv")
    summary = json.loads((out / "summary.json").read_text())
    settings = json.loads((out / "settings.json").read_text())
    assert len(settings["volumes"]) == 3 and (out / "curves.png").stat().st_size > 10_000
    assert len(rows) == 3 * (3 + 3 + 2)
    # out of fold: each volume was predicted by the fold model that did not train on it
    folds = json.loads((root / "cv" / "folds.json").read_text())["folds"]
    for cid in settings["volumes"]:
        k = next(i for i, f in enumerate(folds) if cid in f)
        trained_on = json.loads((root / "cv" / f"fold_{k}" / "model" / "run.json").read_text())["train_ids"]
        assert cid not in trained_on
    # 40 x native thickness leaves < 2 slices: skipped with a message naming the case
    skipped = [r for r in rows if r["skipped"]]
    assert {r["severity"] for r in skipped} == {"40"} and all(f"case {r['case_id']}" in " ".join(summary["skipped"])
                                                              for r in skipped)
    assert "skipped" in capsys.readouterr().err
    ax = summary["axes"]["hu-offset"]["models"]["unet-2d-ctia"]
    dice = {s["severity"]: s["dice"]["total"]["mean"] for s in ax["severities"]}
    assert ax["gap"]["total"]["gap"] == pytest.approx(dice[0.0] - (dice[-60.0] + dice[60.0]) / 2, abs=1e-9)
    clean_total = [float(r["dice_total"]) for r in rows if r["axis"] == "hu-offset" and r["clean"] == "1"]
    assert ax["severities"][0]["failure_rate"] == pytest.approx(np.mean(np.array(clean_total) < 0.5))
    assert ax["severities"][0]["dice"]["total"]["worst"] == pytest.approx(min(clean_total), abs=1e-6)
    assert {r["score_on"] for r in rows if r["axis"] == "thickness-factor" and not r["skipped"]} == {"original"}
    assert not list(out.glob(".scratch-*"))  # the memory-mapped volumes are removed with their folder
    # continue: nothing recomputed; other settings: refused, folder untouched
    before = (out / "rows.csv").read_text()
    assert main(args) == 0 and (out / "rows.csv").read_text() == before
    assert main(args[:-3] + ["--max-volumes", "2", "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err and (out / "rows.csv").read_text() == before


def test_cli_stress_model_mode_and_class_mismatch(trained, tmp_path, capsys):
    root, data = trained
    fold = root / "cv" / "fold_0"
    assert main(["stress", "--model", str(fold), str(root / "cv" / "fold_1" / "model"), "--model", str(fold),
                 "--data", str(data), "--out", str(tmp_path / "m"), "--axes", "dose", "--severity", "dose=2",
                 "--max-volumes", "1", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert [m["display"] for m in summary["models"]] == ["nnU-Net + CTIA 2D (ensemble of 2)", "nnU-Net + CTIA 2D"]
    liver = write_phantom_dataset(tmp_path / "liver", task="liver", n_cases=1, layout="nnunet", seed=1, size="small",
                                  in_plane=32, num_slices=8)
    assert main(["stress", "--model", str(fold), "--data", str(liver), "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained on classes" in err and not (tmp_path / "x").exists()
    assert main(["stress", "--model", str(fold), "--data", str(data), "--out", str(tmp_path / "y"),
                 "--axes", "warp"]) == 2
    assert "unknown stress axes ['warp']" in capsys.readouterr().err


def test_experiment_runs_stress_and_report_renders(tmp_path):
    """run_experiment with stress enabled: out-of-fold stress of each table run, headline gaps per axis, report
    section with the curves, rendered in headless Chromium."""
    from test_report import _render_in_chromium

    from ctseg.config import config_to_dict, parse_config
    from ctseg.experiment import run_experiment

    data = write_phantom_dataset(tmp_path / "data", task="kidney", n_cases=4, layout="kits19", seed=4, size="small",
                                 in_plane=48)
    d = config_to_dict(apply_profile(load_config(REPO / "configs" / "demo.yaml"), "ci"))
    d["experiment"].update(archs=["unet"], dims=["2d"], augs=["ctia", "mia"], stack=False)
    cfg = parse_config(d)
    html_path = run_experiment(cfg, data, tmp_path / "out", progress=False)
    summary = json.loads((tmp_path / "out" / "stress" / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["unet-2d-ctia", "unet-2d-mia"]
    assert list(summary["axes"]) == ["thickness-factor", "hu-offset"]
    md = (tmp_path / "out" / "results.md").read_text()
    head = md.split("## ")[0]
    for axis, a in summary["axes"].items():
        for name, e in a["models"].items():
            g = e["gap"]["total"]
            assert f"{g['gap']:+.3f} [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]" in head, (axis, name)
    assert "Stress test: acquisition shifts — robustness gap" in md and "failure rate" in md
    page = html_path.read_text()
    assert "Stress test: Dice vs severity" in page and page.count("data:image/png;base64,") >= 1
    _render_in_chromium(html_path, tmp_path, page.count("<img "))
