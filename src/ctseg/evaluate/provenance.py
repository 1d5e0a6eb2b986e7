"""Provenance of everything that can influence a score, and a checker that proves no test fold leaked.

Each artefact records, in its JSON, the case ids it was fitted or chosen on (issue 17):

- `fold_<k>/model/run.json`, "provenance": `weights_fitted_on` (training cases), `checkpoint_selected_on`
  (validation cases the best epoch was chosen on), `intensity_plan_fitted_on` (the plan's subset);
- `fold_<k>/provenance.json` (CV and stack folders): the fold's test cases and what scored them;
- `stack.json`, "folds": per test fold, every candidate's validation score, the cases it was computed on
  (`selected_on`) and the members kept;
- `stack/.../fold_<k>/meta_training.json`: the cases the meta-model was fitted on and, for each member map it
  learnt from, what the map's producing model was fitted and chosen on.

`check_leaks(folder)` reads a finished experiment, CV or stack folder and proves, from these records and the
folds file, that no test case of fold k entered anything scored on fold k. Its outcome is "clean", "leak"
(each finding names the file and the cases) or "unproven" (a record is missing, e.g. a folder made before
provenance existed). `ctseg check-leaks FOLDER` prints it (exit 0 clean, 1 leak, 3 unproven);
`ctseg experiment` and `ctseg stack` run it at the end.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from ctseg.errors import CtsegError

EXIT_CODES = {"clean": 0, "leak": 1, "unproven": 3}
_MODEL_PARTS = (("weights_fitted_on", "train_ids", "weights fitted on"),
                ("checkpoint_selected_on", "val_ids", "checkpoint selected on"),
                ("intensity_plan_fitted_on", None, "intensity plan fitted on"))


@dataclass(frozen=True)
class Finding:
    """One problem: a leak (a test case of fold k influenced something scored on fold k) or a missing record."""

    kind: Literal["leak", "unproven"]
    file: Path
    message: str

    def __str__(self) -> str:
        return f"{'LEAK' if self.kind == 'leak' else 'cannot prove'}: {self.file}: {self.message}"


@dataclass
class LeakCheck:
    """Outcome of `check_leaks`: findings, and what was proven clean (one line per artefact family)."""

    root: Path
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def status(self) -> Literal["clean", "leak", "unproven"]:
        if any(f.kind == "leak" for f in self.findings):
            return "leak"
        if self.findings or not self.checked:
            return "unproven"
        return "clean"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def add(self, kind: Literal["leak", "unproven"], file: Path, message: str) -> None:
        f = Finding(kind, Path(file), message)
        if f not in self.findings:
            self.findings.append(f)

    def summary(self) -> str:
        n = len(self.checked)
        if self.status == "clean":
            return f"no leak: {n} scored fold(s) checked; no test case of fold k influenced anything scored on fold k"
        if self.status == "leak":
            return f"LEAK: {sum(f.kind == 'leak' for f in self.findings)} finding(s) in {self.root}"
        if not self.checked and not self.findings:
            return f"cannot prove: nothing scored found in {self.root}"
        return f"cannot prove: no provenance for {len(self.findings)} artefact(s) in {self.root} (made before " \
               "provenance records existed?); re-run them to prove the protocol"

    def to_json(self) -> dict:
        return {"status": self.status, "summary": self.summary(), "checked": self.checked,
                "findings": [{"kind": f.kind, "file": str(f.file), "message": f.message} for f in self.findings]}


def _cases(ids: Iterable[str], limit: int = 6) -> str:
    ids = sorted(ids)
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def _read(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CtsegError(f"unreadable ({type(err).__name__}: {err})", path) from None


class _Folds:
    """Test cases per fold, from a folds file."""

    def __init__(self, path: Path):
        from ctseg.evaluate.folds import load_folds

        self.path = path
        self.folds = load_folds(path)

    def test(self, k: int) -> set[str]:
        return set(self.folds.test_ids(k))


def _open_folds(path: Path | None, lc: LeakCheck, where: Path) -> _Folds | None:
    if path is None or not Path(path).is_file():
        lc.add("unproven", where, f"the folds file {path} is missing: the test cases of each fold are unknown")
        return None
    return _Folds(Path(path))


# --------------------------------------------------------------------------------------------- models
def model_lineage(run: dict) -> dict[str, set[str]]:
    """What a training record says its model was fitted and chosen on: the explicit provenance and the
    run's own fields together (a case in either counts)."""
    prov = run.get("provenance") or {}
    raw = {"weights_fitted_on": run.get("train_ids") or [], "checkpoint_selected_on": run.get("val_ids") or [],
           "intensity_plan_fitted_on": (run.get("intensity_plan") or {}).get("subset_ids") or []}
    return {key: set(prov.get(key) or []) | set(raw[key]) for key, _, _ in _MODEL_PARTS}


def _check_model(run_json: Path, k: int, test: set[str], lc: LeakCheck, what: str) -> None:
    run = _read(run_json)
    if not isinstance(run, dict):
        lc.add("unproven", run_json, f"{what}: the training record is missing")
        return
    if not isinstance(run.get("provenance"), dict):
        lc.add("unproven", run_json, f"{what}: no provenance record (trained before provenance existed)")
    for key, label in ((key, label) for key, _, label in _MODEL_PARTS):
        bad = model_lineage(run)[key] & test
        if bad:
            lc.add("leak", run_json, f"{what}: {label} test case(s) of fold {k}: {_cases(bad)}")


def _check_scores(fdir: Path, k: int, test: set[str], lc: LeakCheck) -> None:
    """results.json holds only fold k's test cases; provenance.json names the same test cases as the folds file."""
    results = _read(fdir / "results.json")
    bad = sorted({str(r.get("case_id")) for r in results or [] if r.get("case_id") not in test or r.get("fold") != k})
    if bad:
        lc.add("leak", fdir / "results.json", f"scores case(s) that are not test cases of fold {k}: {_cases(bad)}")
    prov = _read(fdir / "provenance.json")
    if not isinstance(prov, dict):
        lc.add("unproven", fdir / "provenance.json", f"fold {k}: no provenance record of what scored this fold")
    elif set(prov.get("test_cases") or []) != test:
        lc.add("leak", fdir / "provenance.json", f"fold {k} was scored with other test cases than the folds file's "
               f"(differ: {_cases(set(prov.get('test_cases') or []) ^ test)}): its models' held-out set is not "
               "the fold")


# ------------------------------------------------------------------------------------------ CV folders
def _check_cv(run_dir: Path, lc: LeakCheck, folds: _Folds | None = None) -> None:
    info = _read(run_dir / "cv.json")
    if not isinstance(info, dict):
        raise CtsegError("not a cross-validation folder (no cv.json)", run_dir)
    folds = folds or _open_folds(Path(info["folds_file"]) if info.get("folds_file") else None, lc, run_dir / "cv.json")
    if folds is None:
        return
    for k in range(int(info["n_folds"])):
        fdir = run_dir / f"fold_{k}"
        if not (fdir / "results.json").is_file():
            continue
        test = folds.test(k)
        _check_model(fdir / "model" / "run.json", k, test, lc, f"fold {k} model")
        _check_scores(fdir, k, test, lc)
        prov = _read(fdir / "provenance.json")
        cache = (prov.get("scored_with") or {}).get("cache") if isinstance(prov, dict) else None
        plan = _read(Path(cache) / "plan.json") if cache else None
        if isinstance(plan, dict):  # the subset and the pool it was drawn from
            bad = (set(plan.get("subset") or []) | set(plan.get("train_ids") or [])) & test
            if bad:
                lc.add("leak", Path(str(cache)) / "plan.json",
                       f"the intensity plan of fold {k} was drawn from test case(s) of fold {k}: {_cases(bad)}")
        lc.checked.append(f"{run_dir.name} fold {k}: weights, checkpoint selection, intensity plan, scores")


# --------------------------------------------------------------------------------------- stack folders
def _check_stack(stack_dir: Path, lc: LeakCheck, folds: _Folds | None = None) -> None:
    path = stack_dir / "stack.json"
    info = _read(path)
    if not isinstance(info, dict):
        raise CtsegError("not a stack folder (no stack.json)", stack_dir)
    if not isinstance(info.get("folds"), list) or not info.get("provenance"):
        lc.add("unproven", path, "no per-fold selection record (made before provenance existed): the top-k "
               "selection may have used every fold's validation cases, test folds included")
        return
    folds = folds or _open_folds(Path(info["folds_file"]) if info.get("folds_file") else None, lc, path)
    if folds is None:
        return
    paths = {c["name"]: Path(c["path"]) for c in info.get("candidates", []) if c.get("path")}
    for entry in info["folds"]:
        k = int(entry["fold"])
        fdir = stack_dir / f"fold_{k}"
        if not (fdir / "results.json").is_file():
            continue
        test = folds.test(k)
        if set(entry.get("test_cases") or []) != test:
            lc.add("leak", path, f"fold {k}: the selection was made for other test cases than the folds file's")
        for c in entry.get("candidates", []):
            chosen_on = set(c.get("selected_on") or [])
            run_json = paths.get(c["name"], Path("?")) / f"fold_{k}" / "model" / "run.json"
            run = _read(run_json) if c["name"] in paths else None
            if isinstance(run, dict):
                chosen_on |= set(run.get("val_ids") or [])
            bad = chosen_on & test
            if bad:
                lc.add("leak", path, f"fold {k}: candidate {c['name']} was ranked on test case(s) of fold {k}: "
                       f"{_cases(bad)}")
        for name in entry.get("members", []):
            _check_model(paths.get(name, Path("?")) / f"fold_{k}" / "model" / "run.json", k, test, lc,
                         f"stack member {name}, fold {k} model (scores fold {k})")
        _check_meta(fdir / "meta_training.json", k, test, paths, lc)
        _check_scores(fdir, k, test, lc)
        lc.checked.append(f"{stack_dir.name} fold {k}: member selection, members, meta-model, scores")


def _check_meta(path: Path, k: int, test: set[str], paths: dict[str, Path], lc: LeakCheck) -> None:
    meta = _read(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("provenance"), dict):
        lc.add("unproven", path, f"fold {k}: no provenance record of what the meta-model learnt from")
        return
    fitted = set(meta["provenance"].get("meta_model_fitted_on") or []) | set(meta.get("training_cases") or [])
    if fitted & test:
        lc.add("leak", path, f"the meta-model scored on fold {k} was fitted on its test case(s): "
               f"{_cases(fitted & test)}")
    leaks: dict[tuple[str, int], tuple[set[str], set[str]]] = {}
    for cid, maps in (meta.get("maps") or {}).items():
        for m in maps:
            seen = set(m.get("member_trained_on") or []) | set(m.get("member_selected_on") or []) | \
                set(m.get("member_plan_fitted_on") or [])
            run = _read(paths[m["member"]] / f"fold_{m['fold']}" / "model" / "run.json") \
                if m.get("member") in paths else None
            if isinstance(run, dict):
                seen |= set().union(*model_lineage(run).values())
            bad = seen & test
            if bad:
                cases, inputs = leaks.setdefault((m["member"], int(m["fold"])), (set(), set()))
                cases |= bad
                inputs.add(cid)
    for (member, j), (cases, inputs) in sorted(leaks.items()):
        lc.add("leak", path, f"the meta-model scored on fold {k} learnt from {member}'s maps of {len(inputs)} "
               f"case(s) (e.g. {_cases(inputs, 3)}) made by its fold-{j} model, which was fitted or chosen on test "
               f"case(s) of fold {k}: {_cases(cases)} (stack.meta_training: oof is not nested)")


# ------------------------------------------------------------------------------------------- entry point
def check_leaks(folder: str | Path) -> LeakCheck:
    """Prove (or refute) for a finished experiment, CV or stack folder that no test case of fold k influenced
    anything scored on fold k; see the module docstring. CtsegError when the folder is none of these."""
    root = Path(folder)
    if not root.is_dir():
        raise CtsegError("folder not found", root)
    lc = LeakCheck(root)
    if (root / "cv.json").is_file():
        _check_cv(root, lc)
    elif (root / "stack.json").is_file():
        _check_stack(root, lc)
    else:
        runs = sorted(p.parent for p in root.glob("runs/*/cv.json"))
        stacks = sorted(p.parent for p in root.glob("stack/*/stack.json"))
        if not runs and not stacks:
            raise CtsegError("neither an experiment folder (runs/*/cv.json, stack/*/stack.json), a CV folder "
                             "(cv.json) nor a stack folder (stack.json)", root)
        folds = _open_folds(root / "folds.json", lc, root)
        if folds is None:
            return lc
        for d in runs:
            _check_cv(d, lc, folds)
        for d in stacks:
            _check_stack(d, lc, folds)
    return lc


def enforce_no_leak(folder: str | Path) -> LeakCheck:
    """`check_leaks` at the end of `ctseg experiment` / `ctseg stack`: writes `leak_check.json` into the folder,
    raises CtsegError on a leak (naming the files and cases), logs a warning when it cannot prove."""
    import logging

    from ctseg.fileutil import atomic_write_text

    result = check_leaks(folder)
    atomic_write_text(Path(folder) / "leak_check.json", json.dumps(result.to_json(), indent=1))
    if result.status == "leak":
        lines = [str(f) for f in result.findings if f.kind == "leak"]
        raise CtsegError(f"{result.summary()}:\n  " + "\n  ".join(lines[:10])
                         + (f"\n  ... {len(lines) - 10} more in leak_check.json" if len(lines) > 10 else ""), folder)
    if result.status == "unproven":
        logging.getLogger(__name__).warning("%s", result.summary())
    return result
