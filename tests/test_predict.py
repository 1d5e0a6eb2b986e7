"""Whole-volume inference: geometry round trip, sliding windows, ensembles, CLI, memory bound."""
import json
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from ctseg.cli import main as cli_main
from ctseg.config import ExperimentConfig
from ctseg.dicom import write_dicom_series
from ctseg.errors import CtsegError
from ctseg.dicom import read_dicom_series
from ctseg.io import Volume, read_volume, write_volume
from ctseg.inference.predict import predict_network, predict_volume, write_probabilities
from ctseg.preprocess.zstacks import blend_weights, window_starts
from ctseg.preprocess.slices import network_grid, preprocess_volume
from ctseg.preprocess.windowing import IntensityPlan
from ctseg.inference.trained import TrainedModel
from ctseg.runs import RUN_FORMAT

KITS = {0: "background", 1: "kidney", 2: "tumour"}
# x = HU / 100 after z-scoring: thresholds at 100 HU (x = 1) and 300 HU (x = 3)
PLAN = IntensityPlan(mode="custom", lower=-1000.0, upper=1000.0, mean=0.0, std=100.0)


class Threshold(nn.Module):
    """Known answer: 1x1 conv whose argmax is 0 below 100 HU, 1 in 100..300 HU, 2 above 300 HU."""

    def __init__(self, dim: int, n_out: int = 3, t1: float = 1.0, t2: float = 3.0, a: float = 20.0):
        super().__init__()
        self.conv = (nn.Conv2d if dim == 2 else nn.Conv3d)(1, n_out, 1)
        with torch.no_grad():
            if n_out == 3:
                self.conv.weight.copy_(torch.tensor([0.0, a, 2 * a]).view(3, 1, *[1] * dim))
                self.conv.bias.copy_(torch.tensor([0.0, -a * t1, -a * (t1 + t2)]))
            else:
                self.conv.weight.copy_(torch.tensor([0.0, a]).view(2, 1, *[1] * dim))
                self.conv.bias.copy_(torch.tensor([0.0, -a * t1]))

    def forward(self, x):
        return self.conv(x)


class Constant(nn.Module):
    """Same logits everywhere (tests the probability arithmetic)."""

    def __init__(self, logits, dim: int):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))
        self.dim = dim

    def forward(self, x):
        shape = [x.shape[0], len(self.logits), *x.shape[2:]]
        return self.logits.view(1, -1, *[1] * self.dim).expand(shape).clone()


def _member(module, dim="2d", size=32, target="multiclass", plan=PLAN, classes=KITS, run_dir=None):
    cfg = ExperimentConfig()
    cfg.model.dim = dim
    cfg.model.target = target
    cfg.preprocess.in_plane_size = size
    out_classes = classes if target == "multiclass" else {0: "background", 1: "foreground"}
    return TrainedModel(module, cfg, plan, out_classes, target, run_dir, dict(classes))


def _phantom_hu(shape, rng):
    """Air -1000, body 0 HU, a 200 HU 'kidney' and a 500 HU 'tumour' at asymmetric places."""
    z, y, x = shape
    hu = np.full(shape, -1000, np.int16)
    hu[:, 2:y - 2, 3:x - 3] = 0
    hu[z // 4: 3 * z // 4, y // 5: y // 2, x // 6: x // 2 + 3] = 200
    hu[z // 3: z // 2 + 1, y // 4: y // 3 + 1, x // 5: x // 3] = 500
    return hu + rng.integers(-20, 20, shape).astype(np.int16)


def _expected(hu):
    return np.where(hu > 300, 2, np.where(hu > 100, 1, 0)).astype(np.uint8)


def test_window_starts_and_weights():
    for z, win, ov in [(40, 16, 0.5), (16, 16, 0.5), (17, 16, 0.75), (100, 16, 0.0)]:
        starts = window_starts(z, win, ov)
        covered = np.zeros(z, int)
        for s in starts:
            covered[s:s + win] += 1
        assert covered.min() >= 1 and starts[-1] + win == z and starts[0] == 0
    assert window_starts(5, 16, 0.5) == [0]
    for mode in ("gaussian", "linear"):
        w = blend_weights(16, mode)
        assert w.shape == (16,) and w.min() > 0 and np.allclose(w, w[::-1]) and w.argmax() in (7, 8)


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, 1.0, -1.0]),
                                       np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)])
@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_label_on_input_grid_any_orientation(direction, dim, rng):
    # in-plane size 32 == the canonical in-plane size, so the known-answer model must be exact
    hu = _phantom_hu((20, 32, 32), rng)
    vol = Volume(hu, (2.5, 0.8, 0.7), origin=(-12.0, 30.0, 7.5), direction=direction, slice_thickness=3.0,
                 meta={"path": "x"})
    model = _member(Threshold(2 if dim == "2d" else 3), dim=dim, size=32)
    res = predict_volume(vol, model, device="cpu")
    assert res.label.same_geometry(vol) and res.label.array.dtype == np.uint8
    assert res.label.slice_thickness == 3.0
    np.testing.assert_array_equal(res.label.array, _expected(hu))
    assert res.classes == KITS and res.agreement is None


def test_3d_sliding_window_short_and_long_volumes(rng):
    for z in (5, 40, 16):
        hu = _phantom_hu((z, 24, 24), rng)
        model = _member(Threshold(3), dim="3d", size=24)
        for blend in ("gaussian", "linear"):
            res = predict_volume(Volume(hu, (1.0, 1.0, 1.0)), model, device="cpu", overlap=0.5, blend=blend,
                                 batch_size=3)
            np.testing.assert_array_equal(res.label.array, _expected(hu))
    # blended probabilities of a constant model are exactly its softmax (weights normalised)
    const = _member(Constant([0.0, 1.0, 2.0], 3), dim="3d", size=24)
    probs, _, _ = predict_network(np.zeros((37, 24, 24), np.float32), const, device="cpu", overlap=0.75)
    np.testing.assert_allclose(probs[:, :, 3, 3].T, np.tile(torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0), (37, 1)),
                               rtol=1e-5)


def test_single_slice_and_resampled_network_size(rng):
    hu = _phantom_hu((1, 64, 48), rng)
    hu[0, 10:40, 10:30] = 500
    vol = Volume(hu, (5.0, 0.7, 0.7))
    for dim in ("2d", "3d"):
        res = predict_volume(vol, _member(Threshold(2 if dim == "2d" else 3), dim=dim, size=16), device="cpu")
        assert res.label.shape == (1, 64, 48)
        # at 16 x 16 the network sees a blurred copy: the bright block is found, not voxel-exact
        inside = res.label.array[0, 14:36, 14:26]
        assert (inside == 2).mean() > 0.9 and (res.label.array[0, :, 40:] == 0).all()


def test_probabilities_and_ensemble_rule(tmp_path, rng):
    hu = _phantom_hu((6, 24, 24), rng)
    vol = Volume(hu, (2.0, 1.0, 1.0), origin=(1.0, 2.0, 3.0), direction=np.diag([1.0, -1.0, 1.0]))
    multi = _member(Constant([0.0, 1.0, 2.0], 2), size=24)
    fg = _member(Constant([1.0, 0.0], 2), size=24, target="foreground")
    res = predict_volume(vol, [multi, fg], device="cpu", return_probabilities=True)
    pa = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0).numpy()
    pb = torch.softmax(torch.tensor([1.0, 0.0]), 0).numpy()
    bg = (pa[0] + pb[0]) / 2
    expected = np.array([bg, *((1 - bg) * pa[1:] / pa[1:].sum())])
    assert res.probabilities.shape == (3, *vol.shape) and res.probabilities.dtype == np.float16
    np.testing.assert_allclose(res.probabilities[:, 2, 5, 7], expected, atol=2e-3)
    np.testing.assert_allclose(res.probabilities.astype(np.float32).sum(axis=0), 1.0, atol=3e-3)
    assert res.agreement == 0.0  # the multiclass member calls everything tumour, the other background
    path = write_probabilities(res, tmp_path / "probs.nii.gz")
    img = nib.load(path)
    assert img.shape == (24, 24, 6, 3)
    np.testing.assert_allclose(img.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine_lps, atol=1e-5)
    np.testing.assert_allclose(img.get_fdata()[7, 5, 2], expected, atol=3e-3)
    # only-foreground ensembles give two classes
    only_fg = predict_volume(vol, [fg, fg], device="cpu")
    assert only_fg.classes == {0: "background", 1: "foreground"}


def test_ensemble_agreement_and_refusals(rng, caplog):
    hu = _phantom_hu((8, 32, 32), rng)
    vol = Volume(hu, (2.0, 1.0, 1.0))
    a = _member(Threshold(2), size=32)
    b = _member(Threshold(2, t1=4.0, t2=6.0), size=32)  # only the 500 HU block is foreground
    res = predict_volume(vol, [a, b], device="cpu")
    fa, fb = _expected(hu) > 0, hu > 400
    assert res.agreement == pytest.approx(2 * (fa & fb).sum() / (fa.sum() + fb.sum()), abs=1e-6)
    assert res.member_dice.shape == (2, 2)
    # members with their own intensity plans (the folds of a CV): each sees its own normalisation, one crop box
    other_plan = IntensityPlan(mode="custom", lower=-1000.0, upper=1000.0, mean=-300.0, std=100.0)  # body: foreground
    c = _member(Threshold(2), size=32, plan=other_plan)
    mixed = predict_volume(vol, [a, c], device="cpu")
    box = network_grid(hu, a.plan, 32, a.cfg.preprocess.crop).box
    own = [predict_network(preprocess_volume(hu, m.plan, 32, box=box), m, device="cpu")[0].argmax(0) != 0
           for m in (a, c)]
    shared = predict_network(preprocess_volume(hu, a.plan, 32, box=box), c, device="cpu")[0].argmax(0) != 0

    def dice(p, q):
        return float(2 * (p & q).sum() / (p.sum() + q.sum()))

    assert mixed.agreement == pytest.approx(dice(*own), abs=1e-6) != pytest.approx(dice(own[0], shared), abs=1e-3)
    # a member whose plan crops this volume to another box (window lower bound -500 HU: the body only) is named in a
    # warning (a CV run's folds carry slightly different windows) and sees the first member's box
    tight = IntensityPlan(mode="custom", lower=-500.0, upper=1000.0, mean=0.0, std=100.0)
    assert network_grid(hu, tight, 32, "window").box != box
    with caplog.at_level("WARNING"):
        predict_volume(vol, [a, _member(Threshold(2), size=32, plan=tight)], device="cpu")
    assert "its plan would crop this volume to" in caplog.text
    with pytest.raises(CtsegError, match="classes"):
        predict_volume(vol, [a, _member(Threshold(2, n_out=2), size=32, classes={0: "bg", 1: "liver"})],
                       device="cpu")
    with pytest.raises(CtsegError, match="in-plane size"):
        predict_volume(vol, [a, _member(Threshold(2), size=16)], device="cpu")
    with pytest.raises(CtsegError, match="outputs 2 channels"):
        predict_volume(vol, _member(Threshold(2, n_out=2), size=32), device="cpu")


def test_dicom_input_flipped_rows_reversed_files(tmp_path, rng):
    hu = _phantom_hu((10, 32, 32), rng)
    written = Volume(hu, (2.0, 0.75, 0.75), origin=(50.0, -20.0, 100.0), direction=np.diag([-1.0, 1.0, 1.0]))
    names = [f"{k:04d}.dcm" for k in range(10)][::-1]
    write_dicom_series(written, tmp_path / "ser", file_names=names)
    vol = read_dicom_series(tmp_path / "ser")
    res = predict_volume(vol, _member(Threshold(2), size=32), device="cpu")
    assert res.label.same_geometry(vol)
    np.testing.assert_array_equal(res.label.array, _expected(vol.array))


# ------------------------------------------------------------------------------------------------ CLI


def _write_run_dir(path, dim="2d", size=32, classes=KITS, target="multiclass"):
    """A model folder as `ctseg train` writes it (run.json + model_best.pt): a real MS-D Net whose final
    1x1 convolution reads only the input channel, with the `Threshold` weights: a known answer."""
    from ctseg.config import config_to_dict
    from ctseg.models import build_model

    cfg = ExperimentConfig()
    cfg.model.dim, cfg.model.target, cfg.model.arch = dim, target, "msd"
    cfg.model.msd.depth = 2
    cfg.preprocess.in_plane_size = size
    net = build_model(cfg.model, 1, len(classes))
    known = Threshold(2 if dim == "2d" else 3, n_out=len(classes))
    with torch.no_grad():
        net.final.weight.zero_()
        net.final.weight[:, :1] = known.conv.weight
        net.final.bias.copy_(known.conv.bias)
    path.mkdir(parents=True)
    torch.save(net.state_dict(), path / "model_best.pt")
    info = {"format": RUN_FORMAT, "status": "finished", "config": config_to_dict(cfg),
            "intensity_plan": PLAN.to_dict(), "classes": {str(k): v for k, v in classes.items()},
            "dataset_classes": {str(k): v for k, v in classes.items()}, "target": target,
            "num_classes": len(classes), "in_channels": 1}
    (path / "run.json").write_text(json.dumps(info))
    return path


def test_cli_nifti_keeps_affine_and_refuses_bad_input(tmp_path, rng, capsys):
    hu = _phantom_hu((12, 32, 32), rng).astype(np.int16)
    # NIfTI stored in an unusual orientation with a scanner qform (code 1) and an aligned sform (code 2)
    affine = np.array([[0.0, 0.0, -2.0, 40.0], [0.7, 0.0, 0.0, -10.0], [0.0, -0.7, 0.0, 25.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    src = tmp_path / "ct.nii.gz"
    nib.save(img, src)
    run = _write_run_dir(tmp_path / "run")
    out, stats = tmp_path / "out" / "seg.nii.gz", tmp_path / "stats.json"
    rc = cli_main(["predict", "-i", str(src), "-o", str(out), "--model", str(run), "--device", "cpu",
                   "--stats", str(stats), "--no-progress"])
    assert rc == 0
    seg = nib.load(out)
    assert seg.shape == img.shape and np.allclose(seg.affine, affine)
    assert int(seg.header["qform_code"]) == 1 and int(seg.header["sform_code"]) == 2
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(seg.dataobj), _expected(np.asarray(img.dataobj)))
    report = json.loads(stats.read_text())
    assert set(report["structures"]) == {"kidney", "tumour", "total"}
    # existing output without --overwrite
    assert cli_main(["predict", "-i", str(src), "-o", str(out), "--model", str(run), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # MR-like intensities refused unless --force
    mr = tmp_path / "mr.nii.gz"
    write_volume(Volume(np.abs(hu).astype(np.int16) + 5, (2.0, 0.7, 0.7)), mr)
    assert cli_main(["predict", "-i", str(mr), "-o", str(tmp_path / "mr_seg.nii.gz"), "--model", str(run),
                     "--device", "cpu", "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli_main(["predict", "-i", str(mr), "-o", str(tmp_path / "mr_seg.nii.gz"), "--model", str(run),
                     "--device", "cpu", "--no-progress", "--force"]) == 0
    # model folder without weights
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text((run / "run.json").read_text())
    assert cli_main(["predict", "-i", str(src), "-o", str(tmp_path / "b.nii.gz"), "--model", str(broken),
                     "--device", "cpu"]) == 2
    assert "model_best.pt" in capsys.readouterr().err
    # dicom-seg needs DICOM input
    assert cli_main(["predict", "-i", str(src), "-o", str(tmp_path / "s.dcm"), "--model", str(run),
                     "--output-type", "dicom-seg"]) == 2
    assert "DICOM folder" in capsys.readouterr().err
    # output folder cannot be created (its parent is a file)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert cli_main(["predict", "-i", str(src), "-o", str(blocker / "x.nii.gz"), "--model", str(run)]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_cli_dicom_folder_with_two_series(tmp_path, rng, capsys):
    hu = _phantom_hu((6, 32, 32), rng)
    vol = Volume(hu, (2.0, 0.8, 0.8))
    write_dicom_series(vol, tmp_path / "dcm", file_names=[f"a{k}.dcm" for k in range(6)], series_uid="1.2.3.4")
    write_dicom_series(vol, tmp_path / "dcm", file_names=[f"b{k}.dcm" for k in range(6)], series_uid="1.2.3.5")
    run = _write_run_dir(tmp_path / "run")
    out = tmp_path / "seg.nii.gz"
    args = ["predict", "-i", str(tmp_path / "dcm"), "-o", str(out), "--model", str(run), "--device", "cpu",
            "--no-progress"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "1.2.3.4" in err and "1.2.3.5" in err and "--series" in err
    assert cli_main(args + ["--series", "1.2.3.5", "--probabilities", str(tmp_path / "p.nii.gz")]) == 0
    seg = read_volume(out)
    assert seg.same_geometry(read_dicom_series(tmp_path / "dcm", "1.2.3.5"))
    np.testing.assert_array_equal(seg.array, _expected(hu))
    assert nib.load(tmp_path / "p.nii.gz").shape == (32, 32, 6, 3)


# --------------------------------------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    import numpy as np, torch
    from torch import nn
    torch.set_num_threads(2)
    from ctseg.config import ExperimentConfig
    from ctseg.io import Volume
    from ctseg.inference.predict import predict_volume
    from ctseg.preprocess.windowing import IntensityPlan
    from ctseg.inference.trained import TrainedModel

    vol = Volume(np.full((1000, 512, 512), -1000, np.int16), (1.0, 0.8, 0.8), direction=np.diag([1.0, -1.0, 1.0]))
    vol.array[100:900, 150:350, 100:300] = 200
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = ExperimentConfig()
    cfg.preprocess.in_plane_size = 128
    net = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.0, 20.0, 40.0]).view(3, 1, 1, 1))
        net.bias.copy_(torch.tensor([0.0, -20.0, -80.0]))
    plan = IntensityPlan(mode="custom", lower=-1000.0, upper=1000.0, mean=0.0, std=100.0)
    model = TrainedModel(net, cfg, plan, {0: "bg", 1: "kidney", 2: "tumour"}, "multiclass", None)
    t = time.perf_counter()
    res = predict_volume(vol, model, device="cpu")
    seconds = time.perf_counter() - t
    ok = res.label.same_geometry(vol) and res.label.array[500, 250, 200] == 1 and res.label.array[50, 250, 200] == 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(base / 2**20, peak / 2**20, seconds, ok)
""")


@pytest.mark.parametrize("lower", [100.000003, 99.99999, 99.5, 100.0, -160.3])
def test_integer_and_float32_volumes_get_the_same_box_when_the_bounds_agree(lower, rng):
    """`box_same_for_integers` says exactly when an int16 volume and its float32 copy are cropped alike (the
    stress test then predicts the stored int16 volume instead of a float32 copy: the same labels)."""
    from ctseg.preprocess.slices import box_same_for_integers, window_crop_box

    hu = np.full((6, 40, 40), -1000, np.int16)
    hu[:, 5:35, 5:35] = 100
    hu[:, 12:20, 12:20] = 300
    same = window_crop_box(hu, lower) == window_crop_box(hu.astype(np.float32), lower)
    assert same == box_same_for_integers(lower) and same == (lower != 100.000003)  # float32(100.000003) = 100
    if same:
        plan = IntensityPlan(mode="custom", lower=lower, upper=400.0, mean=0.0, std=100.0)
        model = _member(Threshold(2), plan=plan)
        model.cfg.preprocess.crop = "window"
        vol = Volume(hu, (2.0, 0.8, 0.8))
        a = predict_volume(vol, model, device="cpu").label.array
        assert np.array_equal(a, predict_volume(vol.with_array(hu.astype(np.float32)), model, device="cpu").label.array)


@pytest.mark.parametrize("box", [(3, 40, 5, 42), (-6, 31, 20, 57), (40, 60, -5, 10), None])
@pytest.mark.parametrize("chunk_bytes", [None, 20000])
def test_network_input_normalises_only_the_box(box, chunk_bytes, rng, monkeypatch):
    """The same bits as normalising the whole slice and cropping it (the fill outside the grid included), in one
    chunk or in several that reuse one work buffer (the last one shorter)."""
    import ctseg.preprocess.slices as slices
    from ctseg.preprocess.slices import crop_in_plane, resize_in_plane
    from ctseg.preprocess.windowing import normalize

    hu = rng.integers(-1100, 1400, (5, 48, 44)).astype(np.int16)
    plan = IntensityPlan(mode="organ", lower=-160.3, upper=240.0, mean=51.7, std=61.3)
    ref = normalize(hu, plan)
    if box is not None:
        ref = crop_in_plane(ref, box, np.float32((plan.fill_hu - plan.mean) / plan.std))
    if chunk_bytes is not None:
        monkeypatch.setattr(slices, "_CHUNK_BYTES", chunk_bytes)  # 2 slices per chunk
    assert np.array_equal(preprocess_volume(hu, plan, 16, box=box), resize_in_plane(ref, 16, is_label=False))
    out = np.zeros((5, 48, 44), np.float32)
    assert normalize(hu, plan, out=out) is out and np.array_equal(out, normalize(hu, plan))


@pytest.mark.parametrize("box", [(3, 40, 5, 42), (-6, 31, 20, 57), (40, 60, -5, 10)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_label_restored_in_the_box_equals_the_full_grid_argmax(box, as_tensor, rng):
    """The label is the argmax over the box only (background outside): the same labels as restoring every
    class to the whole grid first (the path kept for --probabilities), boxes reaching outside the grid included."""
    from ctseg.inference.predict import restore_label

    probs = torch.softmax(torch.from_numpy(rng.normal(0, 2, (3, 9, 12, 12)).astype(np.float32)), dim=0)
    probs[:, 0] = 1 / 3  # exact ties: the lower class wins in both
    probs[:, 5] = torch.tensor([0.9, 0.06, 0.04])[:, None, None]  # sure background: skipped, all 0
    probs[:, 6, :6] = torch.tensor([0.4, 0.35, 0.25])[:, None, None]  # partly sure: resized
    probs = probs if as_tensor else probs.numpy()
    fast, full = np.full((9, 48, 44), 7, np.uint8), np.full((9, 48, 44), 7, np.uint8)
    restore_label(probs, (48, 44), fast, box=box)
    restore_label(probs, (48, 44), full, [np.empty((9, 48, 44), np.float16) for _ in range(3)], box=box)
    assert np.array_equal(fast, full) and len(np.unique(fast)) > 1


def _restore_both(probs, shape, box):
    """(labels of `restore_label` without probabilities, labels of the whole-box path kept for --probabilities)."""
    from ctseg.inference.restore import restore_label

    fast, full = np.full(shape, 7, np.uint8), np.full(shape, 7, np.uint8)
    restore_label(probs, shape[1:], fast, box=box)
    restore_label(probs, shape[1:], full, [np.empty(shape, np.float16) for _ in range(probs.shape[0])], box=box)
    return fast, full


@pytest.mark.parametrize("slope, size", [(2.0, 64), (20.0, 128)])
def test_sparse_restore_equals_whole_box_on_real_ct(real_ct_dir, slope, size):
    """On the real CT's network probabilities (a soft and a sharp threshold model), the labels made from the
    pixels whose class is not already sure (`ctseg.inference.restore`) equal the argmax of the whole box
    interpolated: the crop box, no box, and a box reaching outside the grid; float32 tensors and float16 arrays."""
    vol = read_volume(real_ct_dir / "DICOM_anon")
    grid = network_grid(vol.array, PLAN, size, "window")
    x = preprocess_volume(vol.array, PLAN, size, box=grid.box)
    probs, _, _ = predict_network(x, _member(Threshold(2, a=slope), size=size), "cpu")
    for box in (grid.box, None, (-30, 470, 40, 530)):
        for p in (probs, probs.numpy().astype(np.float16)):
            fast, full = _restore_both(p, vol.shape, box)
            assert np.array_equal(fast, full)
    assert len(np.unique(fast)) == 3


@pytest.mark.parametrize("branch", ["default", "torch-only", "dense"])
def test_sparse_restore_branches_equal_whole_box(branch, monkeypatch, rng):
    """Each way `ctseg.inference.restore` labels an undecided pixel gives the whole-box argmax: float64
    interpolation (default), torch's own passes on gathered columns (every undecided pixel a near tie, a single
    column included), the whole chunk (dense); with exact ties, near ties (1e-7) and sure regions."""
    import ctseg.inference.restore as restore

    if branch == "torch-only":
        monkeypatch.setattr(restore, "_NEAR_ULPS", 1e9)  # every gap is near
    if branch == "dense":
        monkeypatch.setattr(restore, "_DENSE_FRACTION", 0.0)
    logits = ndimage.gaussian_filter(rng.normal(0, 1, (3, 6, 16, 16)), (0, 0, 2, 2)) * 30
    probs = torch.softmax(torch.from_numpy(logits.astype(np.float32)), dim=0)
    probs[:, 1, 4:12] = torch.tensor([0.3, 0.35, 0.35])[:, None, None]  # exact ties: the lower class wins
    probs[:, 2, :8] = torch.tensor([0.2, 0.4, 0.4 + 1e-7])[:, None, None]  # near ties
    probs[:, 3] = torch.tensor([0.9, 0.06, 0.04])[:, None, None]  # sure background everywhere
    probs[:, 4] = torch.tensor([0.1, 0.8, 0.1])[:, None, None]
    probs[:, 4, 7, 7] = torch.tensor([0.1, 0.45, 0.45])  # one undecided spot: single columns
    for box in [(3, 90, 5, 95), (-6, 61, 20, 57), (10, 30, -5, 60)]:
        fast, full = _restore_both(probs, (6, 80, 88), box)
        assert np.array_equal(fast, full)
    assert {0, 1, 2} <= set(np.unique(full).tolist())


def test_vertical_pass_of_gathered_columns_equals_the_whole_resize():
    """The column gather the restore relies on (`_separable_matches`), a single column included: torch's
    antialiased resize of a 1-pixel-wide image is wrong, so one column is gathered twice."""
    from ctseg.inference.restore import _bilinear, _horizontal_pass, _separable_matches, _vertical_pass

    x = torch.softmax(torch.randn((2, 3, 12, 12), generator=torch.Generator().manual_seed(1)), dim=1)
    full = _bilinear(x, (37, 41))
    tmp = _horizontal_pass(x, 41)
    for n, k in [([1], [5]), ([0, 1], [40, 0]), ([1, 1, 0], [3, 4, 3])]:
        cols = _vertical_pass(tmp, torch.tensor(n), torch.tensor(k), 37)
        assert torch.equal(cols, full[n, :, :, k].permute(1, 2, 0))
    assert _separable_matches(3, (12, 12), (37, 41))


@pytest.mark.slow
def test_memory_bounded_on_512x512x1000(tmp_path):
    """A 512 x 512 x 1000 int16 CT (500 MB) predicts with peak RSS <= 2.0 GiB (input included)."""
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    base_gib, peak_gib, seconds, ok = out.stdout.split()
    assert ok == "True"
    assert float(peak_gib) <= 2.0, f"peak RSS {float(peak_gib):.2f} GiB (input alone {float(base_gib):.2f} GiB)"


def test_real_ct_series_geometry(real_ct_dir):
    """The real liver CT (JPEG 2000, empty UIDs, overlapping slices): the label overlays the series exactly."""
    vol = read_volume(real_ct_dir / "DICOM_anon")
    res = predict_volume(vol, _member(Threshold(2), size=128), device="cpu")
    assert res.label.same_geometry(vol) and res.label.shape == (20, 512, 512)
    # regions bright / dark over a 9 x 9 neighbourhood survive the 4x down- and upsampling: a flip would not
    local = ndimage.uniform_filter(vol.array.astype(np.float32), size=(1, 9, 9))
    bright = local > 450
    assert bright.sum() > 1000 and (res.label.array[bright] == 2).mean() > 0.85
    assert (res.label.array[:, ::-1][bright] == 2).mean() < 0.5  # the same check fails for a y-flipped label
    assert (res.label.array[ndimage.maximum_filter(vol.array, size=(1, 9, 9)) < 50] == 0).mean() > 0.99
