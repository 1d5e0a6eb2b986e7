"""The paper's experiment, ci profile, end to end on phantom data: every Table 2 row, out-of-fold stacking,
finished parts skipped."""
import json
from pathlib import Path

import pytest

from ctseg.config import load_config
from ctseg.cv import run_cv
from ctseg.datasets.phantom import write_phantom_dataset
from ctseg.errors import CtsegError
from ctseg.evaluate.folds import load_folds
from ctseg.evaluate.report import load_results
from ctseg.experiment import apply_profile, candidates_per_set, run_configs, run_experiment

REPO = Path(__file__).resolve().parents[1]
PAPER_ROWS = ["nnU-Net + MIA 2D", "nnU-Net + CTIA 2D", "nnU-Net + MIA 3D", "nnU-Net + CTIA 3D",
              "MS-D Net + MIA 2D", "MS-D Net + CTIA 2D", "MS-D Net + MIA 3D", "MS-D Net + CTIA 3D",
              "Stacked CNN + MIA", "Stacked CNN + CTIA"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    data = write_phantom_dataset(root / "data", task="kidney", n_cases=5, layout="kits19", seed=3, size="small")
    cfg = apply_profile(load_config(REPO / "configs" / "paper-kits19.yaml"), "ci")
    out = root / "out"
    html = run_experiment(cfg, data, out, progress=False)
    return cfg, data, out, html


def test_profiles_and_matrix():
    cfg = load_config(REPO / "configs" / "paper-kits19.yaml")
    table, extra = run_configs(cfg)
    augs = ("mia", "nnunet", "ctia", "none")
    assert len(table) == 16 and {(c.model.arch, c.model.dim, c.augment.name) for c in table} == {
        (a, d, g) for a in ("unet", "msd") for d in ("2d", "3d") for g in augs}
    # the paper's 3D MS-D Nets on kidney+tumour vs background are not in the table: extra runs for the stack,
    # 8 seeds of them and 7 more seeds of the 2D U-Nets, per augmentation
    assert sorted({(c.model.arch, c.model.dim, c.model.target) for c in extra}) == [
        ("msd", "3d", "foreground"), ("unet", "2d", "multiclass")]
    assert len(extra) == 4 * (8 + 7)
    # the full profile's no-windowing arm (Supplementary Tables S2/S3): every table run again, raw HU, not stacked
    full_table, full_extra = run_configs(apply_profile(cfg, "full"))
    arm = [c for c in full_table if c.experiment.variant == "nowindow"]
    assert len(full_table) == 32 and len(arm) == 16 and len(full_extra) == len(extra)
    assert all(c.preprocess.window == "none" and c.preprocess.crop == "window" for c in arm)
    from ctseg.cv import RunIdentity
    assert {RunIdentity.of(c).name for c in arm} == {RunIdentity.of(c).name + "-nowindow" for c in table}
    assert candidates_per_set(apply_profile(cfg, "full"), full_table + full_extra, "ctia") == \
        candidates_per_set(cfg, table + extra, "ctia")  # the arm adds no stack candidates
    ci = apply_profile(cfg, "ci")
    assert ci.cv.n_folds == 2 and ci.preprocess.in_plane_size == 32 and ci.experiment.profiles == {}
    assert ci.model.msd.width == cfg.model.msd.width  # untouched keys survive the merge
    with pytest.raises(CtsegError, match="unknown profile 'huge'"):
        apply_profile(cfg, "huge")
    for name in ("paper-chaos.yaml", "demo.yaml"):
        c = load_config(REPO / "configs" / name)
        for profile in c.experiment.profiles:
            apply_profile(c, profile)


@pytest.mark.parametrize("name", ["paper-kits19.yaml", "paper-chaos.yaml"])
def test_full_profiles_give_top_k_a_real_choice(name):
    """The paper's 'top-5 models based on their validation score': every stack member set of every augmentation
    has more candidate runs than top_k keeps, and the paper's four augmentations are in the matrix."""
    cfg = load_config(REPO / "configs" / name)
    assert cfg.stack.top_k == 5 and cfg.experiment.augs == ["mia", "nnunet", "ctia", "none"]
    table, extra = run_configs(cfg)
    for aug in cfg.experiment.augs:
        counts = candidates_per_set(cfg, table + extra, aug)
        assert len(counts) == 2 and all(n >= 8 > cfg.stack.top_k for n in counts.values()), (aug, counts)


def test_small_experiment_table_has_every_row(experiment):
    cfg, data, out, html = experiment
    md = (out / "results.md").read_text()
    table2 = md.split("## Table 2 — Dice, paper protocol")[1].split("\n## ")[0]
    for row in PAPER_ROWS + ["Averaged members + MIA", "Averaged members + CTIA", "MS-D Net + CTIA 3D (foreground)",
                             "nnU-Net + nnU-Net DA 2D", "MS-D Net + no augmentation 3D", "Stacked CNN + nnU-Net DA"]:
        assert f"| {row} |" in table2, row
    # the paper's numbers beside ours, both std definitions
    beside = md.split("## Table 2 beside the paper")[1].split("\n## ")[0]
    assert "| nnU-Net + CTIA 2D | tumour | 0.844 ± 0.007 |" in beside and "std over fold means" in beside
    # the stack's candidates, their validation scores, which were kept
    sel = md.split("## Stacked CNN: candidates and the top-k kept")[1].split("\n## ")[0]
    for aug in ("MIA", "nnU-Net DA", "CTIA", "no augmentation"):
        rows = [r for r in sel.splitlines() if r.startswith(f"| {aug} |")]
        # top 1 of 2 per set and test fold: each fold keeps one run of each of the two sets
        assert len(rows) == 4 and sum(r.count(",") + 1 for r in rows if "| folds " in r) == 2 * 2, rows
    records = load_results(out / "results.json")
    n_cases = len(json.loads((data / "phantom.json").read_text())["cases"])
    by_model = {}
    for r in records:
        by_model.setdefault(r.model, set()).add(r.case_id)
    # 16 table runs, per augmentation 3 stack-only runs (seed 0 and 1 MS-D 3D foreground, seed 1 U-Net 2D), 8 ensembles
    assert len(by_model) == 16 + 4 * 3 + 8 and all(len(c) == n_cases for c in by_model.values())
    fg = [r for r in records if r.model == "msd-3d-ctia-fg"]
    assert all(set(r.dice) == {"total"} for r in fg)
    assert html.is_file() and html.read_text().count("data:image/png;base64,") >= 3
    # ensembles carry their members' agreement per volume (the quality flag), single models do not
    for r in records:
        if r.arch in ("stacked", "average"):
            assert r.agreement is not None and 0.0 <= r.agreement <= 1.0, r
        else:
            assert r.agreement is None, r
    assert "## Quality flag: ensemble disagreement" in md and "### Stacked CNN + CTIA" in md
    assert (out / "config.yaml").is_file() and (out / "results.csv").is_file()


def test_stacking_is_selected_per_fold_and_nested(experiment):
    """For each test fold k: the members are the top-1 per set by their fold-k models' validation Dice, all
    candidates ranked on the same validation cases (none in fold k); the meta-model learnt only from maps of those
    validation cases made by the fold-k members (nothing it saw has seen fold k). Checked against the members' own
    training records; the leak checker proves the whole experiment clean."""
    from ctseg.evaluate.provenance import check_leaks

    cfg, data, out, _ = experiment
    folds = load_folds(out / "folds.json")
    for aug in ("mia", "nnunet", "ctia", "none"):
        stack = json.loads((out / "stack" / aug / "stack.json").read_text())
        assert len(stack["candidates"]) == 4 and stack["meta_training"] == "nested"
        paths = {c["name"]: Path(c["path"]) for c in stack["candidates"]}
        for k, entry in enumerate(stack["folds"]):
            test = set(folds.test_ids(k))
            kept = [c for c in entry["candidates"] if c["selected"]]
            assert len(kept) == 2 and sorted(c["name"] for c in kept) == sorted(entry["members"])
            for c in kept:  # top-1 by the fold-k validation score within its set
                assert c["val_score"] == max(o["val_score"] for o in entry["candidates"] if o["set"] == c["set"])
            val = {tuple(c["selected_on"]) for c in entry["candidates"]}
            assert len(val) == 1 and not set(next(iter(val))) & test  # same cases for all, none in fold k
            for c in entry["candidates"]:
                run = json.loads((paths[c["name"]] / f"fold_{k}" / "model" / "run.json").read_text())
                assert tuple(run["val_ids"]) == tuple(c["selected_on"])
                assert c["val_score"] == pytest.approx(run["best_metric"])
            meta = json.loads((out / "stack" / aug / f"fold_{k}" / "meta_training.json").read_text())
            assert meta["eval_fold"] == k and set(meta["test_cases"]) == test
            assert set(meta["training_cases"]) == set(next(iter(val)))  # the members' validation cases
            for case, maps in meta["maps"].items():
                assert {m["member"] for m in maps} == set(entry["members"])
                for m in maps:
                    run = json.loads((paths[m["member"]] / f"fold_{m['fold']}" / "model" / "run.json").read_text())
                    assert m["fold"] == k and case not in run["train_ids"]
                    assert not (set(run["train_ids"]) | set(run["val_ids"])) & test
                    assert set(run["train_ids"]) == set(m["member_trained_on"])
    result = check_leaks(out)
    assert result.status == "clean", [str(f) for f in result.findings]
    assert json.loads((out / "leak_check.json").read_text())["status"] == "clean"


def test_finished_parts_are_skipped(experiment):
    cfg, data, out, _ = experiment
    run_dir = out / "runs" / "unet-2d-ctia"
    weights = {p: p.stat().st_mtime_ns for p in run_dir.glob("fold_*/model/model_best.pt")}
    fold0 = (run_dir / "fold_0" / "results.json").stat().st_mtime_ns
    (run_dir / "fold_1" / "results.json").unlink()
    unet_cfg = next(c for c in run_configs(cfg)[0] if (c.model.arch, c.model.dim, c.augment.name) == ("unet", "2d", "ctia"))
    records = run_cv(unet_cfg, data, run_dir, cache_dir=out / "cache", folds_file=out / "folds.json", progress=False)
    assert {r.fold for r in records} == {0, 1}
    assert (run_dir / "fold_1" / "results.json").is_file()
    assert (run_dir / "fold_0" / "results.json").stat().st_mtime_ns == fold0  # done fold untouched
    assert {p: p.stat().st_mtime_ns for p in weights} == weights  # no training repeated
    other = unet_cfg.model_copy(update={"seed": unet_cfg.seed}, deep=True)
    other.train.lr = 0.5
    with pytest.raises(CtsegError, match="another configuration"):
        run_cv(other, data, run_dir, cache_dir=out / "cache", folds_file=out / "folds.json", progress=False)


def test_jobs_auto_shares_the_cpus(monkeypatch):
    """`--jobs auto`: one worker per usable CPU for the runs after the first, 1 for one run; each worker's torch
    threads are the CPUs shared out, or OMP_NUM_THREADS when set."""
    import os

    from ctseg.cli import build_parser
    from ctseg.experiment import experiment_jobs
    from ctseg.runtime import auto_jobs, worker_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [auto_jobs(n, "cpu") for n in (0, 1, 2, 9)] == [1, 1, 2, 4]
    assert [worker_threads(j) for j in (1, 2, 3, 8)] == [4, 2, 1, 1]
    demo = load_config(REPO / "configs" / "demo.yaml")  # none, MIA, CTIA: 2 runs after the first
    assert experiment_jobs(demo, "auto", "cpu") == 2 and experiment_jobs(demo, 3, "cpu") == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert worker_threads(2) == 1
    parser = build_parser()
    assert parser.parse_args(["demo", "--jobs", "auto"]).jobs == "auto"
    assert parser.parse_args(["experiment", "--config", "c", "--out", "o", "--jobs", "2"]).jobs == 2
    with pytest.raises(SystemExit) as bad:
        parser.parse_args(["demo", "--jobs", "0"])
    assert bad.value.code == 2
