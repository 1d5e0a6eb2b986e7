"""The paper's experiment: {U-Net, MS-D Net} x {2D, 3D} x augmentations (MIA, nnU-Net DA, CTIA, none)
cross-validated, plus stacking, one report.

`run_experiment(cfg, data_dir, out_dir)` expands `cfg.experiment` into one configuration per combination
(and per seed), cross-validates each on the shared cache and folds (`ctseg.cv.run_cv`), adds the runs the
stack needs that the matrix lacks (e.g. the paper's 3D MS-D Nets on foreground), stacks per augmentation
(`ctseg.cv.stack.run_stack`) and writes the results and the report. Finished parts are skipped, so a killed
experiment continues where it stopped. Output folder::

    config.yaml  cache/  folds.json  runs/<run>/  stack/<aug>/  stress/
    results.csv  results.json  results.md  plots/  report/index.html

With `stress.enabled`, the acquisition-shift stress test (`ctseg.stress`) runs after the cross-validations,
out-of-fold, on the table runs (one line per run configuration) and the report gets its section.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from ctseg.config import ExperimentConfig, config_to_dict, parse_config, save_config
from ctseg.errors import CtsegError
from ctseg.registry import NETWORKS
from ctseg.runtime import auto_jobs, worker_threads

log = logging.getLogger(__name__)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_profile(cfg: ExperimentConfig, profile: str | None) -> ExperimentConfig:
    """The config with `cfg.experiment.profiles[profile]` merged over it (nested dicts merge, values replace).

    The result no longer lists the profiles: it is the exact configuration that runs.
    """
    if not profile:
        return cfg
    profiles = cfg.experiment.profiles
    if profile not in profiles:
        raise CtsegError(f"unknown profile {profile!r}; this config defines: {', '.join(profiles) or 'none'}",
                         cfg.source)
    merged = _merge(config_to_dict(cfg), profiles[profile])
    merged["experiment"]["profiles"] = {}
    return parse_config(merged, f"{cfg.source or 'config'}, profile {profile!r}")


def run_configs(cfg: ExperimentConfig) -> tuple[list[ExperimentConfig], list[ExperimentConfig]]:
    """(table runs, extra runs only the stack needs): one config per arch x dim x aug x seed, with the
    matrix's per-'arch-dim' overrides merged in, and each of them once more per `experiment.variants` arm. The stack's member sets are trained for every seed in
    `seeds` and `stack_seeds`: the candidates `stack.top_k` chooses from."""
    e = cfg.experiment
    table, keys = [], set()

    unknown = sorted(set(e.overrides) - {f"{a}-{d}" for a in NETWORKS for d in ("2d", "3d")})
    if unknown:
        raise CtsegError(f"experiment.overrides keys must be 'arch-dim' (e.g. 'msd-3d'), got {unknown}")

    def variant(arch: str, dim: str, aug: str, seed: int, target: str) -> ExperimentConfig:
        d = _merge(config_to_dict(cfg), e.overrides.get(f"{arch}-{dim}", {}))
        d["model"].update(arch=arch, dim=dim, target=target)
        d["augment"]["name"] = aug
        d["seed"] = seed
        return parse_config(d)

    for arch in e.archs:
        for dim in e.dims:
            if f"{arch}-{dim}" in e.exclude:
                continue
            for aug in e.augs:
                for seed in e.seeds:
                    table.append(variant(arch, dim, aug, seed, cfg.model.target))
                    keys.add((arch, dim, cfg.model.target, aug, seed))
    for name, over in e.variants.items():  # extra arms (e.g. no windowing): every table run once more
        for rc in list(table):
            d = _merge(config_to_dict(rc), over)
            d["experiment"]["variant"] = name
            table.append(parse_config(d, f"experiment.variants.{name}"))
    extra = []
    if e.stack:
        for s in cfg.stack.members:
            for aug in e.augs:
                for seed in dict.fromkeys([*e.seeds, *e.stack_seeds]):
                    if (s.arch, s.dim, s.target, aug, seed) not in keys:
                        extra.append(variant(s.arch, s.dim, aug, seed, s.target))
                        keys.add((s.arch, s.dim, s.target, aug, seed))
    return table, extra


def candidates_per_set(cfg: ExperimentConfig, runs: list[ExperimentConfig], aug: str) -> dict[str, int]:
    """Number of runs of augmentation `aug` in each stack member set ('arch-dim-target'): top_k's candidates."""
    return {f"{s.arch}-{s.dim}-{s.target}": sum((rc.model.arch, rc.model.dim, rc.model.target, rc.augment.name)
                                                == (s.arch, s.dim, s.target, aug) and not rc.experiment.variant
                                                for rc in runs)
            for s in cfg.stack.members}


def _warn_few_candidates(cfg: ExperimentConfig, runs: list[ExperimentConfig], aug: str) -> None:
    for name, n in candidates_per_set(cfg, runs, aug).items():
        if n <= cfg.stack.top_k:
            log.warning("stack %s: set %s has %d candidate(s) for top_k %d, so all are kept (add "
                        "experiment.stack_seeds for a real selection)", aug, name, n, cfg.stack.top_k)


def _cv_job(job: tuple[dict, str, str, str, str, str | None, int]) -> str:
    """One cross-validation in a worker process of `run_experiment(jobs=N)`: its share of the CPUs as torch
    threads, no progress bars."""
    from ctseg.cv import run_cv

    cfg_dict, data_dir, run_dir, cache_dir, folds_file, device, threads = job
    torch.set_num_threads(threads)
    run_cv(parse_config(cfg_dict), data_dir, run_dir, cache_dir=cache_dir, folds_file=folds_file, device=device,
           progress=False)
    return run_dir


def experiment_jobs(cfg: ExperimentConfig, jobs: int | str, device: str | None) -> int:
    """`--jobs`: a number as given, or "auto": one worker process per usable CPU for the cross-validations that
    run in parallel (all but the first), 1 on a GPU (`runtime.auto_jobs`)."""
    if jobs != "auto":
        return int(jobs)
    return auto_jobs(sum(map(len, run_configs(cfg))) - 1, device or cfg.train.device)


def run_experiment(cfg: ExperimentConfig, data_dir: str | Path, out_dir: str | Path, *, title: str | None = None,
                   intro: str = "", device: str | torch.device | None = None, progress: bool = True,
                   jobs: int = 1) -> Path:
    """Run (or continue) the whole experiment; returns the path of `report/index.html`.

    jobs > 1: after the first cross-validation (which builds the shared caches and folds), the others run in
    `jobs` worker processes that share the CPUs (`runtime.worker_threads`: one torch thread each on a 2-core
    machine), and the stress test in `jobs` parts by volume. Small CPU networks train ~1.4x faster as N one-thread
    processes than as one N-thread process. Torch's CPU kernels sum in an order that depends on the thread count,
    so trained weights, and the Dice figures, differ in the last digits between `jobs` settings; each run's
    run.json records its thread count."""
    from ctseg.cv import RunIdentity, run_cv, run_stack
    from ctseg.cv.run import cv_log_csvs, load_cv_records
    from ctseg.progress import progress_bar
    from ctseg.evaluate.records import aug_display, display_name
    from ctseg.evaluate.report import stack_selection_section, write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    table, extra = run_configs(cfg)
    runs = table + extra
    stack_augs = cfg.experiment.augs if cfg.experiment.stack else []
    cache_dir, folds_file = out / "cache", out / "folds.json"
    log.info("experiment %s: %d cross-validations (%d for the table, %d for the stack), %d stacks",
             cfg.name, len(runs), len(table), len(extra), len(stack_augs))
    run_dirs: dict[str, Path] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("[bold magenta]experiment[/]", total=len(runs) + len(stack_augs))
        for rc in runs:
            run_dirs[RunIdentity.of(rc).name] = out / "runs" / RunIdentity.of(rc).name
        parallel = runs[1:] if jobs > 1 else []
        for rc in runs[: len(runs) - len(parallel)]:
            ident = RunIdentity.of(rc)
            bar.update(task, description=f"[bold magenta]experiment[/] · {display_name(ident.arch, ident.dim, ident.aug, ident.variant)}")
            run_cv(rc, data_dir, run_dirs[ident.name], cache_dir=cache_dir, folds_file=folds_file, device=device,
                   progress=progress)
            bar.advance(task)
        if parallel:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            bar.update(task, description=f"[bold magenta]experiment[/] · {len(parallel)} runs in {jobs} processes")
            dev = None if device is None else str(device)
            jobs_args = [(config_to_dict(rc), str(data_dir), str(run_dirs[RunIdentity.of(rc).name]), str(cache_dir),
                          str(folds_file), dev, worker_threads(jobs)) for rc in parallel]
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                for done in as_completed([pool.submit(_cv_job, j) for j in jobs_args]):
                    done.result()
                    bar.advance(task)
        for aug in stack_augs:
            members = [run_dirs[RunIdentity.of(rc).name] for rc in runs
                       if rc.augment.name == aug and not rc.experiment.variant]  # variant arms are not stacked
            _warn_few_candidates(cfg, [rc for rc in runs if rc.augment.name == aug], aug)
            bar.update(task, description=f"[bold magenta]experiment[/] · stacked ensemble + {aug_display(aug)}")
            run_stack(members, out / "stack" / aug, cfg.stack, seed=cfg.seed, distances=cfg.cv.distances,
                      device=device, progress=progress)
            bar.advance(task)
    records, curves = [], {}
    for d in run_dirs.values():  # stack-only members are reported too: the stack is made of them
        recs = load_cv_records(d, require_all=True)
        records += recs
        if recs:
            curves[recs[0].display] = cv_log_csvs(d)
    for aug in stack_augs:
        records += load_cv_records(out / "stack" / aug, require_all=True)
    if not records:
        raise CtsegError("the experiment produced no results", out)
    selection = stack_selection_section([out / "stack" / aug for aug in stack_augs])
    stress_dir = ablation_dir = None
    if cfg.stress.enabled:
        stress_dir = run_experiment_stress(cfg, [run_dirs[RunIdentity.of(rc).name] for rc in table], data_dir,
                                           out / "stress", device=device, progress=progress, jobs=jobs)
    if cfg.experiment.selection.enabled and stress_dir is not None:
        ablation_dir = run_experiment_ablation(cfg, table, stress_dir, folds_file, out / "ablation")
    names = [cfg.augment.display(a) for a in cfg.experiment.augs]
    augs = " vs ".join(names) if len(names) <= 4 else f"{len(names)} augmentation arms"
    html = write_report(records, out, config=config_to_dict(cfg), log_csvs=curves,
                        title=title or f"{cfg.name}: {augs}, slice-sorted {cfg.cv.n_folds}-fold cross-validation",
                        thickness_edges_mm=cfg.experiment.thickness_groups_mm, intro=intro,
                        extra_sections=[selection] if selection is not None else [], stress_dir=stress_dir,
                        ablation_dir=ablation_dir)
    from ctseg.evaluate.provenance import enforce_no_leak

    enforce_no_leak(out)  # leak_check.json; a leak fails the experiment, naming the file and the cases
    return html


def _stress_job(job: tuple[list[str], str, str, dict, str, list[str], str, int]) -> str:
    """One part (a subset of the volumes) of the experiment's stress test in a worker process."""
    from ctseg.config import StressConfig
    from ctseg.stress.runner import model_specs_from_cv, run_stress

    cv_dirs, data_dir, out_dir, stress_cfg, layout, volumes, device, threads = job
    torch.set_num_threads(threads)
    specs, _ = model_specs_from_cv(cv_dirs)
    run_stress(specs, data_dir, out_dir, StressConfig.model_validate(stress_cfg), layout=layout, case_ids=volumes,
               device=device, progress=False)
    return out_dir


def run_experiment_stress(cfg: ExperimentConfig, cv_dirs: list[Path], data_dir: str | Path, out_dir: Path, *,
                          device: str | torch.device | None = None, progress: bool = True, jobs: int = 1) -> Path:
    """The stress test of the experiment's table runs, out-of-fold (`ctseg.stress.runner`); returns its folder.
    jobs > 1: the volumes in `jobs` parts of about equal size (`split_volumes`, `out_dir/part-K`), run in parallel
    processes, then merged."""
    from ctseg.evaluate.folds import load_folds
    from ctseg.datasets import open_dataset
    from ctseg.stress.runner import choose_volumes, merge_stress_parts, model_specs_from_cv, run_stress, split_volumes

    specs, manifest = model_specs_from_cv(cv_dirs)
    case_ids = [cid for fold in load_folds(manifest.folds_file).folds for cid in fold]
    dev = device if device is not None else cfg.train.device
    if jobs <= 1:
        run_stress(specs, data_dir, out_dir, cfg.stress, layout=cfg.data.layout, case_ids=case_ids,
                   device=dev, progress=progress)
        return out_dir
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    volumes = choose_volumes(case_ids, cfg.stress.max_volumes, cfg.stress.seed)
    parts = split_volumes(open_dataset(data_dir, cfg.data.layout), volumes, jobs)
    part_cfg = cfg.stress.model_copy(update={"max_volumes": None}).model_dump()
    args = [([str(d) for d in cv_dirs], str(data_dir), str(out_dir / f"part-{i}"), part_cfg, cfg.data.layout, part,
             str(dev), worker_threads(len(parts))) for i, part in enumerate(parts)]
    with ProcessPoolExecutor(len(args), mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_stress_job, args))
    merge_stress_parts([out_dir / f"part-{i}" for i in range(len(parts))], specs, out_dir, cfg.stress)
    return out_dir


def run_experiment_ablation(cfg: ExperimentConfig, table: list[ExperimentConfig], stress_dir: Path, folds_file: Path,
                            out_dir: Path) -> Path:
    """The ablation of the table runs' stress test and the pre-registered choice (`ctseg.evaluate.ablation`);
    one architecture and dimension, so that the arms differ in their augmentation only."""
    from ctseg.evaluate.ablation import run_ablation
    from ctseg.evaluate.folds import load_folds

    kinds = sorted({f"{rc.model.arch}-{rc.model.dim}-{rc.model.target}" for rc in table})
    if len(kinds) != 1:
        raise CtsegError(f"experiment.selection compares augmentations of one model; the table has {kinds}")
    result = run_ablation(stress_dir, load_folds(folds_file).folds, cfg.augment, cfg.experiment.selection,
                          list(cfg.experiment.augs), out_dir, failure_dice=cfg.stress.failure_dice)
    log.info("ablation: the rule chose %s", result["chosen"])
    return out_dir
