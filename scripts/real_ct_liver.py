"""Phantom-trained liver model on the real CT fixture: `ctseg predict` end to end, Dice, geometry, figure.

1. `ctseg phantom --task liver --layout chaos` (small phantom CHAOS set, DICOM + PNG masks);
2. `ctseg train`: 2D U-Net (small widths), CTIA, binary liver (target foreground), 128 x 128, on CPU;
3. `ctseg predict` on tests/data/real-ct-liver/DICOM_anon (JPEG 2000, empty SeriesInstanceUID)
   to NIfTI (+ --stats) and to DICOM-SEG;
4. compares with the fixture's liver_mask.nii.gz (resampled by physical position onto the prediction
   grid with `ctseg.io.resample_to`; that mask's y axis is flipped relative to the series), checks the
   output's geometry against the input's and writes docs/real_ct_liver.png (3 axial slices, window
   [-160, 240] HU, radiological display, predicted and reference contours) and <out>/summary.json.

Nothing here looks at the reference before the prediction is written: the model and its settings are
fixed in advance (phantom data only).

Usage: .venv/bin/python scripts/real_ct_liver.py [--out results/real_ct_liver] [--cases 14] [--epochs 8]
       [--steps 40] [--figure docs/real_ct_liver.png]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import yaml  # noqa: E402

from ctseg.evaluate.metrics import dice  # noqa: E402
from ctseg.io import read_volume, resample_to, to_canonical  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "data" / "real-ct-liver"
WINDOW = (-160, 240)

# fixed before looking at the real series: the paper's CHAOS preprocessing (percentile window of the
# training foreground), a U-Net small enough for a 2-core CPU, CTIA with the paper's defaults
CONFIG = {
    "name": "real-ct-liver",
    "seed": 0,
    "data": {"layout": "chaos", "task": "liver"},
    "preprocess": {"window": "percentile", "subset_size": 8, "in_plane_size": 128},
    "augment": {"name": "ctia"},
    "model": {"arch": "unet", "dim": "2d", "target": "foreground",
              "unet": {"n_stages": 5, "base_features": 16, "max_features": 128}},
    "train": {"batch_size_2d": 12, "val_fraction": 0.15, "device": "cpu", "lr": 1e-3},
}


def _cli(argv: list[str], check: bool = True) -> tuple[float, int, str]:
    """Run `ctseg argv...` as a subprocess; returns (seconds, exit status, stderr).

    stdout streams through; stderr is echoed and kept (the CLI's error messages go there). One torch
    thread: on a shared 2-core machine two threads were ~5x slower per training step (measured).
    """
    print("$ ctseg " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ctseg", *argv], stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"ctseg {argv[0]} failed with exit status {proc.returncode}")
    return seconds, proc.returncode, " ".join(proc.stderr.split())


def geometry_report(pred, image) -> dict:
    """Size, spacing, origin and direction of the prediction vs the input, and whether each is equal."""
    rows = {"shape_zyx": (pred.shape, image.shape), "spacing_zyx_mm": (pred.spacing, image.spacing),
            "origin_xyz_lps_mm": (pred.origin, image.origin),
            "direction": (np.asarray(pred.direction).ravel(), np.asarray(image.direction).ravel())}
    out = {}
    for key, (a, b) in rows.items():
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        out[key] = {"output": a.round(6).tolist(), "input": b.round(6).tolist(),
                    "equal": bool(a.shape == b.shape and np.allclose(a, b, atol=1e-4))}
    return out


def dicom_seg_report(path: Path, n_source: int) -> dict:
    """What the DICOM-SEG says about itself: frames, segments, and whether it references the source series."""
    ds = pydicom.dcmread(path)
    refs = [item for series in ds.get("ReferencedSeriesSequence", [])
            for item in series.get("ReferencedInstanceSequence", [])]
    return {"sop_class": str(ds.SOPClassUID.name), "frames": int(ds.NumberOfFrames),
            "segments": [str(s.SegmentLabel) for s in ds.SegmentSequence],
            "rows_cols": [int(ds.Rows), int(ds.Columns)], "referenced_instances": len(refs),
            "source_instances": n_source, "bytes": path.stat().st_size}


def make_figure(image, pred, ref, score: float, out: Path, title: str) -> None:
    """3 axial slices (window [-160, 240] HU) with predicted (red) and reference (cyan) liver contours.

    Arrays are shown canonical (direction identity, LPS): column index grows towards patient left,
    so patient right is on the image left (radiological display); row index grows posterior.
    """
    img, _ = to_canonical(image)
    p, _ = to_canonical(pred)
    r, _ = to_canonical(ref)
    z = img.shape[0]
    ks = [int(round(f * (z - 1))) for f in (0.15, 0.5, 0.85)]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 5.2), dpi=80)
    for ax, k in zip(axes, ks):
        ax.imshow(img.array[k], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="lanczos")
        if r.array[k].any():
            ax.contour(r.array[k] > 0, levels=[0.5], colors="cyan", linewidths=1.2)
        if p.array[k].any():
            ax.contour(p.array[k] > 0, levels=[0.5], colors="red", linewidths=1.2)
        zmm = img.origin[2] + k * img.spacing[0]
        ax.set_title(f"slice {k + 1}/{z} (z = {zmm:.1f} mm)", fontsize=10)
        ax.text(4, 24, "R", color="yellow", fontsize=12, fontweight="bold")
        ax.text(img.shape[2] - 24, 24, "L", color="yellow", fontsize=12, fontweight="bold")
        ax.axis("off")
    axes[0].plot([], [], color="red", label="prediction (phantom-trained)")
    axes[0].plot([], [], color="cyan", label="reference (TotalSegmentator, model-made)")
    axes[0].legend(loc="lower left", fontsize=8, framealpha=0.8)
    fig.suptitle(f"{title}\nliver Dice vs reference = {score:.3f}   (window [{WINDOW[0]}, {WINDOW[1]}] HU, "
                 "radiological display: patient right on image left)", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "real_ct_liver")
    parser.add_argument("--cases", type=int, default=14, help="phantom CHAOS cases")
    parser.add_argument("--seed", type=int, default=0, help="phantom dataset seed")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "real_ct_liver.png")
    parser.add_argument("--fresh", action="store_true", help="delete --out first (else reuse data and run)")
    args = parser.parse_args()

    out = args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data, run, pred_dir = out / "phantom_chaos", out / "run", out / "pred"
    seconds = {}
    cfg = dict(CONFIG, preprocess={**CONFIG["preprocess"], "subset_size": min(8, args.cases)},
               train={**CONFIG["train"], "epochs": args.epochs, "steps_per_epoch": args.steps})
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    if not (data / "phantom.json").is_file():
        seconds["phantom"], _, _ = _cli(["phantom", "--task", "liver", "--layout", "chaos", "--cases", str(args.cases),
                                   "--seed", str(args.seed), "--size", "small", "--out", str(data), "--no-progress"])
    if not (run / "model_best.pt").is_file():
        seconds["train"], _, _ = _cli(["train", "--data", str(data), "--out", str(run), "--config", str(out / "config.yaml"),
                                 "--cache", str(out / "cache"), "--no-progress"])
    nifti, seg, stats_path = pred_dir / "liver_pred.nii.gz", pred_dir / "liver_pred_seg.dcm", pred_dir / "stats.json"
    series = REAL / "DICOM_anon"
    seconds["predict_nifti"], _, _ = _cli(["predict", "-i", str(series), "-o", str(nifti), "--model", str(run),
                                     "--stats", str(stats_path), "--device", "cpu", "--overwrite", "--no-progress"])
    # the fixture's SOPInstanceUIDs are empty: a DICOM-SEG cannot reference its source; recorded either way
    seconds["predict_dicom_seg"], seg_rc, seg_err = _cli(
        ["predict", "-i", str(series), "-o", str(seg), "--model", str(run), "--output-type", "dicom-seg",
         "--device", "cpu", "--overwrite", "--no-progress"], check=False)

    image = read_volume(series)
    pred = read_volume(nifti)
    ref = resample_to(read_volume(REAL / "liver_mask.nii.gz"), pred, order=0)
    score = dice(pred.array > 0, ref.array > 0)
    stats = json.loads(stats_path.read_text())
    voxel_ml = float(np.prod(pred.spacing)) / 1000
    run_info = json.loads((run / "run.json").read_text())
    summary = {
        "dice_vs_reference": round(score, 4),
        "liver_ml": {"predicted": round(float((pred.array > 0).sum()) * voxel_ml, 1),
                     "reference": round(float((ref.array > 0).sum()) * voxel_ml, 1)},
        "geometry": geometry_report(pred, image),
        "dicom_seg": dicom_seg_report(seg, len(list(series.iterdir()))) if seg_rc == 0 else
        {"exit_status": seg_rc, "message": seg_err},
        "stats_json": stats,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "train": {"cases": args.cases, "epochs": args.epochs, "steps_per_epoch": args.steps,
                  "best_val_dice_phantom": run_info.get("best_metric"), "config": cfg},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    make_figure(image, pred, ref, score, args.figure,
                f"ctseg predict on the real CT fixture with a 2D U-Net trained on {args.cases} phantom CHAOS cases")
    print(json.dumps({k: summary[k] for k in ("dice_vs_reference", "liver_ml", "seconds")}, indent=1))
    print("geometry equal:", {k: v["equal"] for k, v in summary["geometry"].items()})
    print(f"wrote {out / 'summary.json'} and {args.figure}")


if __name__ == "__main__":
    main()
