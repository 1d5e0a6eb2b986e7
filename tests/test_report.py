"""Report: tables laid out like the paper's Table 2, a computed headline, and an HTML page that renders."""
import collections
import csv
import dataclasses
import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctseg.evaluate.plots import overlay_slice_index, save_overlay_slice
from ctseg.evaluate.records import VolumeResult, display_name, thickness_group_of, thickness_labels
from ctseg.evaluate.report import (QUALITY_TITLE, headline, load_results, quality_flags, std_ratios, stat,
                                   write_report)

PAPER_ROWS = ["nnU-Net + MIA 2D", "nnU-Net + CTIA 2D", "nnU-Net + MIA 3D", "nnU-Net + CTIA 3D",
              "MS-D Net + MIA 2D", "MS-D Net + CTIA 2D", "MS-D Net + MIA 3D", "MS-D Net + CTIA 3D",
              "Stacked CNN + MIA", "Stacked CNN + CTIA"]
MODELS = [(a, d, g) for a in ("unet", "msd") for d in ("2d", "3d") for g in ("mia", "ctia")] + \
         [("stacked", "", "mia"), ("stacked", "", "ctia")]


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _records(tmp: Path, spread_mia: float, spread_ctia: float, n_cases: int = 12, seed: int = 0):
    """Synthetic per-volume results with known spread per augmentation, and overlay slices on disk."""
    rng = np.random.default_rng(seed)
    cases = [(f"case_{i:05d}", i * 3 // n_cases, [0.8, 1.25, 2.5, 5.0][i % 4], 20 + 7 * i) for i in range(n_cases)]
    records = []
    for arch, dim, aug in MODELS:
        spread = spread_mia if aug == "mia" else spread_ctia
        model = f"{arch}-{dim}-{aug}" if dim else f"{arch}-{aug}"
        for cid, fold, th, nz in cases:
            k = float(np.clip(0.9 + spread * rng.standard_normal(), 0, 1))
            t = float(np.clip(0.75 + 1.5 * spread * rng.standard_normal(), 0, 1))
            image = rng.normal(40, 20, size=(4, 48, 48)).astype(np.float32)
            gt = np.zeros((4, 48, 48), np.uint8)
            gt[2][_disk((48, 48), 24, 24, 10)] = 1
            gt[2][_disk((48, 48), 26, 20, 4)] = 2
            pred = np.zeros_like(gt)
            pred[2][_disk((48, 48), 24, 25, 9 + 3 * (1 - k))] = 1
            ov = save_overlay_slice(tmp / "overlays" / model / f"{cid}.npz", image, gt, pred, (th, 0.8, 0.8))
            records.append(VolumeResult(
                case_id=cid, fold=fold, model=model, arch=arch, dim=dim, aug=aug,
                dice={"kidney": k - 0.01, "tumour": t - 0.01, "total": (k + t) / 2},
                dice_paper={"kidney": k, "tumour": t, "total": (k + t) / 2 + 0.005},
                hd95={"kidney": 2.0 + 10 * (1 - k), "tumour": math.nan, "total": 3.0},
                slice_thickness=th, num_slices=nz, overlay=str(ov.relative_to(tmp))))
    return records


def _write_log(path: Path, n_epochs: int = 6):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["epoch,train_loss,val_loss,val_dice,time_s"]
    rows += [f"{e},{1 / (e + 1):.4f},{1.2 / (e + 1):.4f},{0.5 + 0.07 * e:.4f},{e * 3.1:.1f}" for e in range(n_epochs)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_stat_and_names():
    s = stat([0.9, 0.8, math.nan, 1.0, math.inf])
    assert s.n == 3 and s.mean == pytest.approx(0.9) and s.std == pytest.approx(np.std([0.9, 0.8, 1.0]))
    assert s.fmt() == "0.900 ± 0.082"
    assert stat([]).fmt() == "–"
    assert display_name("unet", "2d", "ctia") == "nnU-Net + CTIA 2D"
    assert display_name("stacked", "", "mia") == "Stacked CNN + MIA"
    assert thickness_labels((3.0, 1.5)) == ["<=1.5mm", "1.5-3mm", ">3mm"]
    assert [thickness_group_of(t, (1.5, 3.0)) for t in (1.5, 2.0, 5.0, None)] == [
        "<=1.5mm", "1.5-3mm", ">3mm", "unknown"]


def test_headline_follows_the_data(tmp_path):
    stable_ctia = _records(tmp_path / "a", spread_mia=0.04, spread_ctia=0.004)
    h = headline(stable_ctia, "dice_paper", ["kidney", "tumour", "total"])
    assert "lower than MIA" in h.text
    ratios = std_ratios(stable_ctia, "dice_paper", ["total"])
    assert len(ratios) == 5  # four single architectures and the stack
    assert all(r.ratio > 3 for r in ratios)
    gm = float(np.exp(np.mean(np.log([r.ratio for r in ratios]))))
    assert f"{gm:.1f}x lower" in h.text
    unstable_ctia = _records(tmp_path / "b", spread_mia=0.004, spread_ctia=0.04)
    assert "higher than MIA" in headline(unstable_ctia, "dice_paper", ["kidney", "tumour", "total"]).text
    mia = [r for r in stable_ctia if r.aug == "mia"]
    same = mia + [dataclasses.replace(r, aug="ctia", model=r.model.replace("mia", "ctia")) for r in mia]
    assert "about the same as MIA's (ratio 1.00)" in headline(same, "dice_paper", ["kidney", "tumour", "total"]).text


def test_overlay_slice_is_the_one_with_most_foreground():
    gt = np.zeros((5, 8, 8), np.uint8)
    gt[1, :2, :2] = 1
    gt[3, :4, :4] = 2
    assert overlay_slice_index(gt, np.zeros_like(gt)) == 3
    pred = np.zeros_like(gt)
    pred[4, 0, 0] = 1
    assert overlay_slice_index(np.zeros_like(gt), pred) == 4


def test_report_files_tables_and_rendering(tmp_path):
    records = _records(tmp_path, spread_mia=0.03, spread_ctia=0.005)
    logs = {"nnU-Net + CTIA 2D": [_write_log(tmp_path / "runs" / f"fold_{k}" / "log.csv") for k in range(3)]}
    config = {"name": "unit-test", "seed": 0, "cv": {"n_folds": 3}}
    html_path = write_report(records, tmp_path, config=config, log_csvs=logs, title="Kidney phantom")

    # results.csv: one row per volume x model
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == len(records) == 12 * len(MODELS)
    assert {"dice_kidney", "dice_paper_tumour", "hd95_total", "slice_thickness"} <= set(rows[0])
    # results.json round-trips the records; NaN is stored as null (valid JSON)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["records"][0]["hd95"]["tumour"] is None
    back = load_results(tmp_path / "results.json")
    assert [r.dice_paper for r in back] == [r.dice_paper for r in records]
    # results.md: Table 2 with every paper row in the paper's order, means over all volumes
    md = (tmp_path / "results.md").read_text()
    table2 = md.split("## Table 2")[1].split("## ")[0]
    positions = [table2.index(f"| {row} |") for row in PAPER_ROWS]
    assert positions == sorted(positions)
    k = np.array([r.dice_paper["kidney"] for r in records if r.model == "unet-2d-ctia"])
    assert f"| nnU-Net + CTIA 2D | {k.mean():.3f} ± {k.std():.3f} |" in table2
    for title in ("Table 2, read across folds", "Spread: MIA vs CTIA", "Per fold", "By slice thickness", "HD95"):
        assert f"## {title}" in md
    assert "fold 2" in md and ">3mm (n=3)" in md
    assert QUALITY_TITLE not in md and payload["quality_flags"] == []  # no ensemble agreement recorded
    assert (tmp_path / "config.yaml").read_text().startswith("name: unit-test")

    # index.html: self-contained (no external resources), every row present, images embedded
    page = html_path.read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    for row in PAPER_ROWS:
        assert f"<td>{row}</td>" in page
    n_images = page.count('<img src="data:image/png;base64,')
    assert n_images == 2 + len(MODELS) + 1  # box plots, one overlay per model, training curves
    assert page.index('class="headline"') < page.index("Table 2")

    _render_in_chromium(html_path, tmp_path, n_images)


def _ensemble_records():
    """Stacked ensembles (MIA, CTIA) whose two least agreeing of 20 volumes stand out, and single U-Nets (no
    agreement) on the same volumes."""
    records = []
    for aug in ("mia", "ctia"):
        for i in range(20):
            agreement = 0.98 - 0.004 * i if i < 18 else (0.62 if i == 18 else 0.41)
            d = 0.55 + 0.4 * agreement + (0.01 if i % 2 else -0.01)
            records.append(VolumeResult(
                case_id=f"case_{i:05d}", fold=i % 3, model=f"stacked-{aug}", arch="stacked", dim="", aug=aug,
                dice={"kidney": d, "total": d}, dice_paper={"kidney": d, "total": d + 0.002},
                slice_thickness=1.0 + i % 3, num_slices=30, agreement=agreement))
        records += [VolumeResult(case_id=f"case_{i:05d}", fold=i % 3, model=f"unet-2d-{aug}", arch="unet", dim="2d",
                                 aug=aug, dice={"kidney": 0.9, "total": 0.9}, dice_paper={"kidney": 0.9, "total": 0.9},
                                 slice_thickness=1.0, num_slices=30) for i in range(20)]
    return records


def test_report_quality_flag_section(tmp_path):
    """Stacked records with member agreement: flagged volumes listed with their Dice, Spearman stated, plot embedded."""
    from scipy.stats import spearmanr

    records = _ensemble_records()
    html_path = write_report(records, tmp_path, title="quality")
    md = (tmp_path / "results.md").read_text()
    section = md.split(f"## {QUALITY_TITLE}")[1].split("\n## ")[0]
    stacked = [r for r in records if r.model == "stacked-ctia"]
    rho = spearmanr([r.agreement for r in stacked], [r.dice_paper["total"] for r in stacked]).statistic
    ctia = section.split("### Stacked CNN + CTIA")[1]
    assert "2 of 20 volumes flagged" in ctia and f"ρ = {rho:.2f}" in ctia and "lower Dice" in ctia
    for r in stacked[18:]:
        assert f"| {r.case_id} | {r.fold} | {r.agreement:.3f} | {r.dice_paper['total']:.3f} |" in ctia
    assert ctia.index("case_00019") < ctia.index("case_00018")  # lowest agreement first
    assert "case_00017" not in ctia and "nnU-Net" not in section  # single models carry no agreement
    assert "### Stacked CNN + MIA" in section
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [q["model"] for q in payload["quality_flags"]] == ["stacked-mia", "stacked-ctia"]
    assert [f["case_id"] for f in payload["quality_flags"][1]["flagged"]] == ["case_00019", "case_00018"]
    assert {r["model"]: r["agreement"] for r in csv.DictReader(open(tmp_path / "results.csv"))
            if r["case_id"] == "case_00019"} == {"stacked-mia": "0.41", "stacked-ctia": "0.41",
                                                 "unet-2d-mia": "", "unet-2d-ctia": ""}
    page = html_path.read_text()
    quality = page.split(f">{QUALITY_TITLE}</h2>")[1].split("<h2>")[0]
    assert quality.count('<img src="data:image/png;base64,') == 2
    assert "<td>case_00019</td>" in quality and f"ρ = {rho:.2f}" in quality
    assert (tmp_path / "plots" / "agreement_stacked-ctia.png").stat().st_size > 5000
    few = quality_flags(stacked[:2], "total")[0]  # two volumes: no rank correlation to state
    assert few.n == few.n_corr == 2 and math.isnan(few.spearman) and "not computable" in few.finding()


def test_report_is_computed_once_for_all_files(tmp_path, monkeypatch):
    """write_report computes the headline, the quality flags and the std-ratio bootstraps once, and results.md,
    report/index.html and results.json show that same headline and the same quality findings."""
    from ctseg.evaluate import report

    calls = collections.Counter()

    def count_calls(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)

    for module, name in ((report.build, "headline"), (report.build, "quality_flags"), (report.statistics, "std_ratios")):
        count_calls(module, name)
    html_path = report.write_report(_ensemble_records(), tmp_path, title="once")
    assert calls == {"headline": 1, "quality_flags": 1, "std_ratios": len(report.BASELINE_AUGS)}  # one per baseline

    payload = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text().split("\n")
    page = html_path.read_text()
    head_html = re.search(r'<div class="headline"><b>(.*?)</b><ul>(.*?)</ul></div>', page)
    assert "about the same as MIA's (ratio 1.00)" in payload["headline"]["text"]  # same Dice for MIA and CTIA
    assert md[2] == f"**{payload['headline']['text']}**" and html.unescape(head_html[1]) == payload["headline"]["text"]
    details = payload["headline"]["details"]
    assert md[4:4 + len(details) + 1] == [f"- {d}" for d in details] + [""]
    assert [html.unescape(d) for d in re.findall("<li>(.*?)</li>", head_html[2])] == details
    assert len(payload["quality_flags"]) == 2
    for q in report.quality_flags(report.load_results(tmp_path / "results.json"), "total"):
        assert q.finding() in md and f"<p>{html.escape(q.finding())}</p>" in page


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise FileNotFoundError("headless Chromium is required: apt-get install -y chromium")
    return exe


def _render_in_chromium(html_path: Path, tmp: Path, n_images: int):
    """Headless Chromium: every image decodes (naturalWidth > 0) and the screenshot is a real page."""
    probe = tmp / "probe.html"
    probe.write_text(html_path.read_text().replace(
        "</body>", "<script>addEventListener('load',()=>{const ok=[...document.images].filter("
        "i=>i.complete&&i.naturalWidth>0).length;document.title='loaded:'+ok+'/'+document.images.length;});"
        "</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chrome-profile'}"]
    dom = subprocess.run([_chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert f"<title>loaded:{n_images}/{n_images}</title>" in dom.stdout, dom.stderr[-2000:]
    shot = tmp / "shot.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1400,3000", html_path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (3000, 1400)
    colors = np.unique(img.reshape(-1, 3)[::7], axis=0)
    assert len(colors) > 500, f"screenshot looks blank: {len(colors)} distinct colours"
    assert (img.std(axis=(0, 1)) > 20).all()


def test_table2_beside_the_paper_gives_both_std_definitions(tmp_path):
    from ctseg.evaluate.report import fold_mean_table, paper_table2_section, summary_table

    records = _records(tmp_path, spread_mia=0.03, spread_ctia=0.01)
    sec = paper_table2_section(records, ["kidney", "tumour", "total"])
    rows = {(r[0], r[1]): r for r in sec.rows}
    assert {name for name, _ in rows} == set(PAPER_ROWS)  # every model of the table, next to its paper row
    vol = summary_table(records, "dice_paper", ["tumour"])["unet-2d-ctia"]["tumour"]
    fold = fold_mean_table(records, "dice_paper", ["tumour"])["unet-2d-ctia"]["tumour"]
    assert vol.std != fold.std  # the two definitions differ on these data
    paper, ours_vol, ours_fold, diff = rows[("nnU-Net + CTIA 2D", "tumour")][2:]  # values, not strings
    assert (paper.mean, paper.std, ours_vol, ours_fold) == (0.844, 0.007, vol, fold)
    assert diff.value == pytest.approx(vol.mean - 0.844)
    text = {(r[0], r[1]): r for r in sec.text_rows()}[("nnU-Net + CTIA 2D", "tumour")]
    assert text[2:] == ["0.844 ± 0.007", vol.fmt(), fold.fmt(), f"{vol.mean - 0.844:+.3f}"]
    assert "std over volumes" in sec.header[3] and "fold means" in sec.header[4] and "headline" in sec.note
    assert paper_table2_section(records, ["tumour"]) is None
    # liver (Table 3, CHAOS): the paper's numbers are not in the text we hold; the section says so, no empty column
    liver = [dataclasses.replace(r, dice_paper={"liver": r.dice_paper["kidney"]}) for r in records]
    sec3 = paper_table2_section(liver, ["liver"])
    assert "not in the paper text" in sec3.note and "paper" not in " ".join(sec3.header)
    assert {r[0] for r in sec3.rows} == set(PAPER_ROWS) and all(r[2] != "–" for r in sec3.text_rows())
    h = headline(records, "dice_paper", ["kidney", "tumour", "total"])
    assert "std over volumes" in h.text
