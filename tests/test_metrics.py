import math

import numpy as np
import pytest

from ctseg.evaluate.metrics import (dice, dice_paper_protocol, dice_per_class, evaluate_volume, fold_mean_std, hd95,
                                    structures, summarize, surface_dice)

KITS = {0: "background", 1: "kidney", 2: "tumour"}


def test_dice_known_masks():
    a = np.zeros((4, 10, 10), bool)
    b = np.zeros_like(a)
    a[:, :5] = True      # 200 voxels
    b[:, 3:8] = True     # 200 voxels, overlap 2 rows = 80
    assert dice(a, b) == pytest.approx(2 * 80 / 400)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0  # empty-empty convention
    # paper formula with probabilities: 2 sum(p y) / (sum p^2 + sum y^2)
    p = np.array([0.5, 1.0, 0.0])
    y = np.array([1.0, 1.0, 0.0])
    assert dice(p, y) == pytest.approx(2 * 1.5 / (1.25 + 2.0))
    # binary as float equals binary as bool
    assert dice(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(dice(a, b))


def test_dice_per_class_kits_total_is_union():
    ref = np.zeros((2, 8, 8), np.uint8)
    ref[:, 1:5, 1:5] = 1
    ref[:, 2:4, 2:4] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # tumour called kidney
    d = dice_per_class(pred, ref, KITS)
    assert set(d) == {"kidney", "tumour", "total"}
    assert d["total"] == 1.0 and d["tumour"] == 0.0
    assert d["kidney"] == pytest.approx(2 * 24 / (32 + 24))
    assert structures({0: "bg", 1: "liver"}) == {"liver": (1,)}


def test_paper_protocol_drops_background_slices_and_accepts_probabilities():
    ref = np.zeros((6, 8, 8), np.uint8)
    ref[2:4, 2:6, 2:6] = 1
    pred = ref.copy()
    pred[5, 0:4, 0:4] = 1  # false positive on a background-only slice: ignored by the paper's protocol
    assert dice_paper_protocol(pred, ref, {0: "bg", 1: "liver"})["liver"] == 1.0
    assert dice_per_class(pred, ref, {0: "bg", 1: "liver"})["liver"] < 1.0
    probs = np.stack([1.0 - ref, ref]).astype(np.float32) * 0.8 + 0.1  # soft: 0.9 / 0.1
    got = dice_paper_protocol(probs, ref, {0: "bg", 1: "liver"})["liver"]
    p, y = probs[1, 2:4], ref[2:4].astype(float)
    assert got == pytest.approx(2 * (p * y).sum() / ((p ** 2).sum() + (y ** 2).sum()), rel=1e-5)


def test_hd95_known_shift_and_surface_dice():
    a = np.zeros((20, 40, 40), bool)
    a[5:15, 10:30, 10:30] = True
    b = np.roll(a, 3, axis=2)  # shift 3 voxels along x
    spacing = (2.0, 1.0, 0.5)
    assert hd95(a, b, spacing) == pytest.approx(1.5, abs=1e-4)   # 3 voxels x 0.5 mm
    c = np.roll(a, 2, axis=0)
    assert hd95(a, c, spacing) == pytest.approx(4.0, abs=1e-4)   # 2 slices x 2 mm
    assert hd95(a, a, spacing) == 0.0
    assert hd95(a, np.zeros_like(a), spacing) == math.inf
    assert hd95(np.zeros_like(a), np.zeros_like(a), spacing) == 0.0
    assert surface_dice(a, b, spacing, tolerance_mm=2.0) == pytest.approx(1.0)
    sd = surface_dice(a, b, spacing, tolerance_mm=1.0)
    assert 0.5 < sd < 1.0


def test_evaluate_volume_records_and_summaries():
    records = []
    for i in range(6):
        ref = np.zeros((8, 16, 16), np.uint8)
        ref[2:6, 4:12, 4:12] = 1
        ref[3:5, 6:9, 6:9] = 2
        pred = ref.copy()
        pred[2:6, 4:12, 4 + i % 3] = 0  # a varying error
        records += evaluate_volume(pred, ref, KITS, (3.0, 1.0, 1.0), case_id=f"c{i}", fold=i % 2,
                                   slice_thickness=[1.0, 2.0, 5.0][i % 3], distances=(i == 0))
    assert len(records) == 18
    assert {"hd95", "surface_dice"} <= set(records[0]) and "hd95" not in records[3]
    overall = summarize(records)
    assert set(overall) == {"kidney", "tumour", "total"} and overall["kidney"]["n"] == 6
    kid = [r["dice"] for r in records if r["structure"] == "kidney"]
    assert overall["kidney"]["mean"] == pytest.approx(np.mean(kid))
    assert overall["kidney"]["std"] == pytest.approx(np.std(kid))
    by_thick = summarize(records, by="thickness_group")
    assert set(by_thick) == {"<=1.5mm", "1.5-3mm", ">3mm"}
    by_fold = summarize(records, by="fold")
    assert set(by_fold) == {0, 1}
    fm = fold_mean_std(records)
    assert fm["kidney"]["n"] == 2
    assert fm["kidney"]["mean"] == pytest.approx(np.mean([by_fold[0]["kidney"]["mean"], by_fold[1]["kidney"]["mean"]]))


def test_cli_evaluate_folders_with_folds(tmp_path, capsys):
    import json

    from ctseg.cli import main as cli_main
    from ctseg.evaluate.folds import load_or_create_folds
    from ctseg.io import Volume, write_volume

    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    meta = {}
    for i, thick in enumerate([1.0, 2.0, 4.0, 5.0]):
        ref = np.zeros((10, 20, 20), np.uint8)
        ref[2:8, 4:14, 4:14] = 1
        ref[4:6, 6:9, 6:9] = 2
        pred = np.roll(ref, i, axis=2)
        write_volume(Volume(ref, (thick, 1.0, 1.0)), tmp_path / "ref" / f"c{i}.nii.gz")
        write_volume(Volume(pred, (thick, 1.0, 1.0)), tmp_path / "pred" / f"c{i}.nii.gz")
        meta[f"c{i}"] = {"num_slices": 10, "slice_thickness": thick}
    load_or_create_folds(tmp_path / "folds.json", meta, n_folds=2, mode="sorted")
    out = tmp_path / "metrics.json"
    assert cli_main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                     "--folds", str(tmp_path / "folds.json"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    kid = [r for r in data["records"] if r["structure"] == "kidney"]
    assert [r["dice"] for r in kid][0] == 1.0 and kid[1]["dice"] < 1.0
    assert kid[1]["hd95"] == pytest.approx(1.0)
    assert set(data["summary"]["dice"]["by_fold"]) == {"0", "1"}
    assert set(data["summary"]["dice"]["by_thickness_group"]) == {"<=1.5mm", "1.5-3mm", ">3mm"}
    assert data["summary"]["dice"]["over_folds"]["total"]["n"] == 2
    assert "kidney" in capsys.readouterr().out
    # a missing prediction is named
    (tmp_path / "pred" / "c3.nii.gz").unlink()
    assert cli_main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                     "--out", str(out), "--overwrite"]) == 2
    assert "c3" in capsys.readouterr().err


def _kits_oriented(path, data_isl, slice_mm, pixel_mm):
    """Write `data_isl` as KiTS19 stores it: nibabel axis 0 is the slice axis, affine I-P-L (case_00160)."""
    import nibabel as nib

    affine = np.array([[0.0, 0.0, -pixel_mm, 0.0], [0.0, -pixel_mm, 0.0, 0.0], [-slice_mm, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 1.0]])
    nib.save(nib.Nifti1Image(data_isl, affine), str(path))


@pytest.mark.parametrize("slice_mm, pixel_mm, group", [(0.5, 0.92, "<=1.5mm"), (5.0, 0.8, ">3mm")])
def test_cli_evaluate_takes_the_slice_axis_from_the_geometry(tmp_path, slice_mm, pixel_mm, group):
    """KiTS19 files keep the slice axis first in nibabel order (the last of our (z, y, x) array): the
    thickness is that axis' spacing, not spacing[0]; non-square slices (32 x 48 here, 512 x 796 in KiTS19)."""
    import json

    from ctseg.cli import main as cli_main
    from ctseg.io import read_volume

    ref = np.zeros((24, 32, 48), np.uint8)  # (slices, rows, columns) in nibabel order
    ref[6:18, 8:24, 10:30] = 1
    pred = ref.copy()
    pred[6:9] = 0  # three of twelve slices missed: Dice 2 * 9 / 21
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    _kits_oriented(tmp_path / "ref" / "case_00160.nii.gz", ref, slice_mm, pixel_mm)
    _kits_oriented(tmp_path / "pred" / "case_00160.nii.gz", pred, slice_mm, pixel_mm)
    vol = read_volume(tmp_path / "ref" / "case_00160.nii.gz")
    assert vol.shape == (48, 32, 24) and vol.slice_axis() == 2 and vol.slice_spacing_mm() == pytest.approx(slice_mm)
    out = tmp_path / "metrics.json"
    assert cli_main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                     "--out", str(out), "--no-distances"]) == 0
    (rec,) = [r for r in json.loads(out.read_text())["records"] if r["structure"] == "kidney"]
    assert rec["slice_thickness"] == pytest.approx(slice_mm)
    assert rec["thickness_group"] == group
    assert rec["dice"] == pytest.approx(18 / 21)


def test_dice_per_class_counts_equal_masks(monkeypatch):
    """The chunked count of value pairs gives the masks' Dice exactly, chunk size and absent classes included;
    values outside 0..255 fall back to the masks."""
    import ctseg.evaluate.metrics as metrics

    rng = np.random.default_rng(2)
    pred = rng.choice([0, 0, 1, 2], size=(7, 11, 13)).astype(np.uint8)
    ref = rng.choice([0, 1, 1, 3], size=(7, 11, 13)).astype(np.int16)
    classes = {0: "background", 1: "kidney", 2: "tumour", 3: "cyst", 4: "absent"}

    def by_masks(p, r):
        return {name: dice(metrics._mask(p, v), metrics._mask(r, v)) for name, v in metrics.structures(classes).items()}

    monkeypatch.setattr(metrics, "_CONFUSION_CHUNK", 50)
    assert dice_per_class(pred, ref, classes) == by_masks(pred, ref)
    assert dice_per_class(pred, pred, classes)["absent"] == 1.0
    assert metrics.label_confusion(pred, ref).sum() == pred.size
    big = ref.copy()
    big[0, 0, 0] = 300
    assert metrics.label_confusion(pred, big) is None
    assert dice_per_class(pred, big, classes) == by_masks(pred, big)


@pytest.mark.parametrize("n_values, dtypes", [(3, (np.uint8, np.uint8)), (16, (np.int16, np.uint8)),
                                              (17, (np.uint8, np.int64)), (200, (np.int32, np.uint8)),
                                              (2, (np.bool_, np.bool_))])
def test_label_confusion_equals_pairs_counted_one_by_one(n_values, dtypes, monkeypatch):
    """The pair counts (uint8 codes and torch.bincount up to 16 values, intp codes above) equal counting each
    (prediction, reference) pair directly, across chunks."""
    import ctseg.evaluate.metrics as metrics

    rng = np.random.default_rng(n_values)
    pred = rng.integers(0, n_values, (9, 7, 5)).astype(dtypes[0])
    ref = rng.integers(0, n_values, (9, 7, 5)).astype(dtypes[1])
    monkeypatch.setattr(metrics, "_CONFUSION_CHUNK", 70)
    counts = metrics.label_confusion(pred, ref)
    k = 1 + max(int(pred.max()), int(ref.max()))
    expected = np.zeros((k, k), np.int64)
    np.add.at(expected, (pred.astype(np.int64).ravel(), ref.astype(np.int64).ravel()), 1)
    assert counts.dtype == np.int64 and np.array_equal(counts, expected)
