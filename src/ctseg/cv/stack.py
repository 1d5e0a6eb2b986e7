"""The stacked ensemble over finished cross-validation runs: `run_stack(cv_dirs, out_dir)`.

It builds the stacked CNN (see `ctseg.models.stacking`), its members chosen per test fold (the top k of each
member set by the validation Dice of their fold models) and its meta-model nested, and scores it, and the
plain average of the same members, on the same folds (`ctseg.cv.scoring`). Both records of a test volume carry
the members' agreement on it (`ctseg.evaluate.quality.member_agreement` of their out-of-fold maps), the
report's quality flag. The folder it writes is a `ctseg.runs.StackRun`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import yaml

from ctseg.config import StackConfig, parse_config
from ctseg.cv.run import close_fold, fold_cache_dir, read_fold_results, save_npy, write_fold_provenance
from ctseg.cv.scoring import score_volume
from ctseg.errors import CtsegError
from ctseg.evaluate.folds import load_folds
from ctseg.evaluate.quality import member_agreement
from ctseg.evaluate.records import ModelIdentity, VolumeResult
from ctseg.fileutil import atomic_write_text
from ctseg.inference.predict import predict_network
from ctseg.inference.trained import load_trained
from ctseg.progress import progress_bar
from ctseg.runs import PROVENANCE_VERSION, CVRun, StackMember, StackRun, TrainingRun, fold_dir
from ctseg.runtime import resolve_device

if TYPE_CHECKING:
    from ctseg.models.stacking import MemberRun
    from ctseg.preprocess.cache import CaseCache


def member_run(run_dir: str | Path) -> MemberRun:
    """A finished CV folder as a `MemberRun`: each fold model's best validation Dice and the cases it was
    computed on (per-fold selection), and their mean (the report's summary)."""
    from ctseg.models.stacking import MemberRun

    info = CVRun.read(run_dir)
    scores, val_ids = [], []
    for k in range(info.n_folds):
        if not (info.fold_dir(k) / "results.json").is_file():
            raise CtsegError(f"fold {k} of this cross-validation has not finished; finish it before stacking",
                             run_dir)
        run = info.fold_run(k)
        scores.append(math.nan if run.best_metric is None else run.best_metric)
        val_ids.append(tuple(sorted(run.val_ids)))
    finite = [s for s in scores if math.isfinite(s)]
    return MemberRun(info.name, Path(run_dir).resolve(), info.arch, info.dim, info.target, info.aug,
                     float(np.mean(finite)) if finite else math.nan, tuple(scores), tuple(val_ids))


def _heldout_maps(member: MemberRun, k: int, cases: Sequence[str], cache: CaseCache, out: Path,
                  dev: torch.device) -> dict[str, Path]:
    """Fold k's model of `member` applied to `cases` (its validation cases, on fold k's cache): the nested
    meta-model's inputs, kept under `out` (`<member>/<case>.npy`, float16) and reused when present."""
    paths = {cid: out / member.name / f"{cid}.npy" for cid in cases}
    missing = [cid for cid, p in paths.items() if not p.is_file()]
    if missing:
        trained = load_trained(fold_dir(member.path, k) / "model", dev)
        for cid in missing:
            probs, _, _ = predict_network(np.asarray(cache.load(cid).image, dtype=np.float32), [trained], dev)
            save_npy(paths[cid], probs.cpu().numpy().astype(np.float16))
    return paths


def _unique_members(per_fold: Sequence[Sequence[MemberRun]]) -> list[MemberRun]:
    seen: dict[str, MemberRun] = {}
    for members in per_fold:
        for m in members:
            seen.setdefault(m.name, m)
    return list(seen.values())


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_stack(cv_dirs: Sequence[str | Path], out_dir: str | Path, stack_cfg: StackConfig | None = None, *,
              seed: int = 0, distances: bool | None = None, device: str | torch.device | None = None,
              progress: bool = True) -> list[VolumeResult]:
    """`_run_stack` (the stacked ensemble, see there); a run that fails (or is interrupted) removes what it
    created and did not finish: the fold folders without `results.json` it made, `stack.json` when no fold is
    done, and `out_dir` when it made it and left it empty. Finished folds stay (a rerun continues)."""
    out = Path(out_dir)
    made_out = not out.exists()
    had_stack = (out / "stack.json").exists()
    old_folds = set(out.glob("fold_*")) if not made_out else set()
    try:
        return _run_stack(cv_dirs, out, stack_cfg, seed=seed, distances=distances, device=device, progress=progress)
    except BaseException:
        _remove_unfinished_stack(out, made_out, had_stack, old_folds)
        raise


def _remove_unfinished_stack(out: Path, made_out: bool, had_stack: bool, old_folds: set[Path]) -> None:
    import shutil

    folds = [p for p in out.glob("fold_*") if p.is_dir()]
    for fdir in folds:
        if fdir not in old_folds and not (fdir / "results.json").is_file():
            shutil.rmtree(fdir, ignore_errors=True)
    if not had_stack and not any((f / "results.json").is_file() for f in folds):
        (out / "stack.json").unlink(missing_ok=True)
    if made_out and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _run_stack(cv_dirs: Sequence[str | Path], out_dir: str | Path, stack_cfg: StackConfig | None = None, *,
               seed: int = 0, distances: bool | None = None, device: str | torch.device | None = None,
               progress: bool = True) -> list[VolumeResult]:
    """Stacked CNN and plain average of the top-k members per set, per test fold, evaluated on the members' folds.

    For each fold k the members are the top_k of each set by the validation Dice of their fold-k models (the
    fold's validation split, inside its training side). The meta-model scored on fold k learns, with
    `stack.meta_training: nested` (default), from those members' maps of their validation cases, or with `oof`
    from the other folds' out-of-fold maps (not nested: those maps come from models trained on fold k).
    `stack.json` records each fold's selection and the cases it was made on, `fold_<k>/meta_training.json`
    exactly which maps and cases the meta-model learnt from (`ctseg.evaluate.provenance` checks them).
    Writes `stack.json`, per-fold `results.json`, `meta.pt` and overlays into `out_dir`; skips done folds.
    """
    from ctseg.datasets import open_dataset
    from ctseg.models.stacking import (MemberPrediction, average_members, meta_training_cases, nested_meta_cases,
                                       predict_meta, save_meta_model, select_members, stack_inputs,
                                       train_meta_model, vote_matrix)
    from ctseg.preprocess.cache import CaseCache

    if not cv_dirs:
        raise CtsegError("no cross-validation folders given")
    manifests = [CVRun.read(d) for d in cv_dirs]
    first_cfg = parse_config(yaml.safe_load((Path(cv_dirs[0]) / "config.yaml").read_text()), cv_dirs[0])
    stack_cfg = stack_cfg or first_cfg.stack
    distances = first_cfg.cv.distances if distances is None else distances
    for key in ("data", "cache", "folds_file", "n_folds"):
        values = {str(getattr(m, key)) for m in manifests}
        if len(values) != 1:
            raise CtsegError(f"the runs to stack differ in {key}: {sorted(values)}; stack runs of one experiment")
    sets = {(s.arch, s.dim, s.target) for s in stack_cfg.members}
    candidates = [c for c in (member_run(d) for d in cv_dirs) if (c.arch, c.dim, c.target) in sets]
    base = manifests[0]
    dataset = open_dataset(base.data, base.layout)
    fold_set = load_folds(base.folds_file)
    fold_of = {cid: k for k, ids in enumerate(fold_set.folds) for cid in ids}
    per_fold = [select_members(candidates, stack_cfg.members, stack_cfg.top_k, fold=k)
                for k in range(fold_set.n_folds)]
    all_members = _unique_members(per_fold)
    augs = sorted({m.aug for m in all_members})
    aug = augs[0] if len(augs) == 1 else "+".join(augs)
    # a case's label and maps come from its own test fold's cache (the plan its members' predictions used)
    caches = [CaseCache(fold_cache_dir(first_cfg, base.cache, fold_set, k)) for k in range(fold_set.n_folds)]
    n_classes = len(caches[0].classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stacked = ModelIdentity(f"stacked-{aug}", "stacked", "", aug)
    averaged = ModelIdentity(f"average-{aug}", "average", "", aug)
    mode = stack_cfg.meta_training
    folds_info = []
    for k, members in enumerate(per_fold):
        folds_info.append({"fold": k, "test_cases": fold_set.test_ids(k), "members": [m.name for m in members],
                           "candidates": [{"name": c.name, "set": f"{c.arch}-{c.dim}-{c.target}",
                                           "val_score": _finite(c.score(k)), "selected": c in members,
                                           "selected_on": list(c.fold_val_ids[k])} for c in candidates]})
    StackRun(
        aug=aug, n_folds=fold_set.n_folds, top_k=stack_cfg.top_k, selection="per fold", meta_training=mode,
        folds_file=str(Path(base.folds_file).resolve()), provenance={"version": PROVENANCE_VERSION},
        members=tuple(StackMember(m.name, m.path, m.arch, m.dim, m.target, _finite(m.val_score),
                                  tuple(k for k, ms in enumerate(per_fold) if m in ms)) for m in all_members),
        candidates=tuple({"name": c.name, "path": str(c.path), "set": f"{c.arch}-{c.dim}-{c.target}",
                          "selected": any(c in ms for ms in per_fold),
                          "selected_folds": [k for k, ms in enumerate(per_fold) if c in ms],
                          "val_score": _finite(c.val_score)} for c in candidates),
        folds=tuple(folds_info), stack=stack_cfg.model_dump(mode="json"), path=out).write()
    dev = resolve_device(device if device is not None else "auto")
    from ctseg.train.losses import TanimotoCELoss

    loss = TanimotoCELoss()
    records: list[VolumeResult] = []
    steps = stack_cfg.meta_epochs * stack_cfg.steps_per_epoch
    with progress_bar(progress) as bar:
        overall = bar.add_task(f"[bold]stacked ensemble ({aug})[/] folds", total=fold_set.n_folds)
        for k in range(fold_set.n_folds):
            fdir = fold_dir(out, k)
            done = fdir / "results.json"
            if done.is_file():
                records += read_fold_results(done)
                bar.advance(overall)
                continue
            members = per_fold[k]
            names = [m.name for m in members]
            test_cases = fold_set.test_ids(k)
            lineage = {(m.name, j): TrainingRun.read(fold_dir(m.path, j) / "model").lineage() for m in members
                       for j in range(fold_set.n_folds)}
            test_maps = {cid: [MemberPrediction(cid, m.name, k, fold_dir(m.path, k) / "oof" / f"{cid}.npy",
                                                frozenset(lineage[m.name, k]["weights_fitted_on"]))
                               for m in members] for cid in test_cases}
            if mode == "nested":
                train_cases = nested_meta_cases(fold_set.train_ids(k), [lineage[m.name, k]["weights_fitted_on"]
                                                                        for m in members], k)
                held = {m.name: _heldout_maps(m, k, train_cases, caches[k], fdir / "heldout", dev) for m in members}
                train_maps = {cid: [MemberPrediction(cid, m.name, k, held[m.name][cid],
                                                     frozenset(lineage[m.name, k]["weights_fitted_on"]))
                                    for m in members] for cid in train_cases}
                label_cache = {cid: caches[k] for cid in train_cases}
            else:
                train_cases = meta_training_cases(fold_of, k)
                train_maps = {cid: [MemberPrediction(cid, m.name, fold_of[cid],
                                                     fold_dir(m.path, fold_of[cid]) / "oof" / f"{cid}.npy",
                                                     frozenset(lineage[m.name, fold_of[cid]]["weights_fitted_on"]))
                                    for m in members] for cid in train_cases}
                label_cache = {cid: caches[fold_of[cid]] for cid in train_cases}
            leaked = sorted(set(train_cases) & set(test_cases))
            if leaked:
                raise CtsegError(f"fold {k}: meta-model training cases include test cases {leaked}")
            inputs, labels, maps_used = [], [], {}
            for cid in train_cases:
                x, used = stack_inputs(cid, train_maps, names)
                inputs.append(x)
                labels.append(np.asarray(label_cache[cid].load(cid).label))
                maps_used[cid] = [{"member": p.member, "fold": p.fold, "map": os.path.relpath(p.path, out),
                                   "member_trained_on": lineage[p.member, p.fold]["weights_fitted_on"],
                                   "member_selected_on": lineage[p.member, p.fold]["checkpoint_selected_on"],
                                   "member_plan_fitted_on": lineage[p.member, p.fold]["intensity_plan_fitted_on"]}
                                  for p in used]
            atomic_write_text(fdir / "meta_training.json", json.dumps(
                {"eval_fold": k, "mode": mode, "test_cases": test_cases, "training_cases": train_cases,
                 "members": names, "maps": maps_used,
                 "provenance": {"version": PROVENANCE_VERSION, "meta_model_fitted_on": train_cases}}, indent=1))
            task = bar.add_task(f"fold {k}: meta-model", total=steps)
            gen = torch.Generator().manual_seed(int(seed) * 1000 + k)
            meta = train_meta_model(inputs, labels, n_classes, loss=loss, steps=steps, batch_size=stack_cfg.batch_size,
                                    lr=stack_cfg.lr, hidden=stack_cfg.hidden,
                                    foreground_fraction=stack_cfg.foreground_fraction, generator=gen,
                                    init_weight=vote_matrix([m.target for m in members], n_classes), device=dev,
                                    on_step=(lambda s, v: bar.update(task, advance=1)) if progress else None)
            del inputs, labels
            save_meta_model(meta, fdir / "meta.pt")
            bar.remove_task(task)
            task = bar.add_task(f"fold {k}: predict + score", total=len(test_cases))
            fold_records = []
            for cid in test_cases:
                x, used = stack_inputs(cid, test_maps, names)
                case, cached = dataset.load(cid), caches[k].load(cid)
                p_meta = predict_meta(meta, x, dev)
                maps = [np.asarray(p.load(), dtype=np.float32) for p in used]
                agreement = member_agreement(maps) if len(maps) > 1 else None
                p_avg = average_members(maps, [m.target for m in members], n_classes)
                del maps
                for ident, p in ((stacked, p_meta), (averaged, p_avg)):
                    overlay = fdir / "overlays" / ident.name / f"{cid}.npz"
                    rec = score_volume(ident, case, cached, p, k, caches[k].classes, "multiclass", overlay, distances)
                    rec.overlay = os.path.relpath(overlay, out)
                    rec.agreement = agreement
                    fold_records.append(rec)
                bar.advance(task)
            write_fold_provenance(fdir, k, test_cases, {
                "members": {m.name: str(fold_dir(m.path, k) / "model" / "run.json") for m in members},
                "meta_model": "meta.pt", "meta_training": "meta_training.json"})
            records += close_fold(done, fold_records, bar, task, overall)
    return records
