"""`ctseg demo --profile ci` end to end through the real CLI: phantom data -> CV -> stress test -> report."""
import json
import os
import subprocess
import sys

DEMO_ROWS = ["nnU-Net + MIA 2D", "nnU-Net + CTIA 2D", "nnU-Net + no augmentation 2D"]


def test_demo_ci_profile(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}  # one torch thread, as in conftest.py
    proc = subprocess.run([sys.executable, "-m", "ctseg", "demo", "--profile", "ci", "--out", str(out)],
                          capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = out / "report" / "index.html"
    assert html.is_file()
    printed = " ".join(proc.stdout.replace("│", " ").split())
    assert f"report: {html.resolve()}" in printed
    page = html.read_text()
    md = (out / "results.md").read_text()
    table2 = md.split("## Table 2 — Dice, paper protocol")[1].split("\n## ")[0]
    for row in DEMO_ROWS:
        assert f"| {row} |" in table2, row
        assert f"<td>{row}</td>" in page, row
        assert row in proc.stdout, row  # the summary table printed at the end
    assert "nnU-Net + MIA 3D" not in table2 and "MS-D Net" not in table2  # the demo trains one architecture
    assert "Stress test: Dice vs severity" in page and "data:image/png;base64," in page
    stress = json.loads((out / "stress" / "summary.json").read_text())
    assert sorted(m["display"] for m in stress["models"]) == sorted(DEMO_ROWS) and stress["out_of_fold"]
    results = json.loads((out / "results.json").read_text())
    n_cases = len(json.loads((out / "data" / "phantom.json").read_text())["cases"])
    assert len(results["records"]) == len(DEMO_ROWS) * n_cases
    assert " ".join(results["headline"]["text"].split()) in printed
    if len(os.sched_getaffinity(0)) >= 2:  # --jobs auto: the runs after the first in parallel, one thread each
        assert "; 2 processes)" in printed
        threads = {json.loads(p.read_text())["versions"]["torch_threads"]
                   for p in out.glob("runs/*/fold_0/model/run.json")}
        assert threads == {"1"}, threads
    # a second run continues the finished demo without redoing anything
    again = subprocess.run([sys.executable, "-m", "ctseg", "demo", "--profile", "ci", "--out", str(out),
                            "--no-progress"], capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing 6 cases" in again.stdout
