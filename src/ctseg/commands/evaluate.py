"""`ctseg evaluate --pred P --ref R`: Dice / HD95 / surface Dice per volume in original geometry, summaries.

P and R are two label files, or two folders whose label files pair up by file name
(e.g. `pred/case_00001.nii.gz` with `ref/case_00001.nii.gz`). With `--folds folds.json` the
records carry their fold and the summary adds mean ± std over folds (how the paper's tables read);
every summary is also given per slice-thickness group.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from rich.table import Table

from ctseg.commands._output import stdout_console
from ctseg.commands._types import positive_float
from ctseg.errors import CtsegError

HELP = "compare predicted label maps with references: Dice, HD95, surface Dice; per fold and slice thickness"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", type=Path, required=True, help="predicted label file or folder")
    parser.add_argument("--ref", type=Path, required=True, help="reference label file or folder")
    parser.add_argument("--classes", default="kits",
                        help="kits (kidney, tumour; total = union), chaos (liver), or e.g. '1=liver,2=lesion'")
    parser.add_argument("--folds", type=Path, help="folds.json (from cross-validation) to group by fold")
    parser.add_argument("--out", type=Path, help="write records and summaries as JSON")
    parser.add_argument("--no-distances", action="store_true", help="Dice only (skip HD95 and surface Dice)")
    parser.add_argument("--tolerance", type=positive_float, default=2.0, help="surface Dice tolerance in mm")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def parse_classes(text: str) -> dict[int, str]:
    """--classes: a dataset's classes (kits, chaos) or 'VALUE=NAME,...' (background 0 added)."""
    from ctseg.datasets import ChaosDataset, KiTS19Dataset

    presets = {"kits": KiTS19Dataset.classes, "chaos": ChaosDataset.classes}
    if text.lower() in presets:
        return dict(presets[text.lower()])
    classes = {0: "background"}
    names: dict[str, int] = {}
    try:
        for part in text.split(","):
            value_text, sep, name = part.partition("=")
            if not sep:
                raise ValueError(part)
            value, name = int(value_text), name.strip()
            if value in names.values():
                raise CtsegError(f"--classes: value {value} given twice, in {text!r}")
            if not name or name in names:
                raise CtsegError(f"--classes: class name {name!r} empty or given twice, in {text!r}; "
                                 "every class needs its own name")
            names[name] = value
            classes[value] = name
    except ValueError:
        raise CtsegError(f"--classes: expected kits, chaos or 'VALUE=NAME,...', got {text!r}") from None
    if len(classes) < 2 or any(v < 0 or v > 255 for v in classes):
        raise CtsegError(f"--classes: give at least one foreground class with a value in 1..255, got {text!r}")
    return classes


def _case_id(path: Path) -> str:
    from ctseg.io import WRITE_SUFFIXES

    name = path.name
    for suffix in WRITE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _pairs(pred: Path, ref: Path) -> list[tuple[str, Path, Path]]:
    from ctseg.io import WRITE_SUFFIXES

    if pred.is_file() and ref.is_file():
        return [(_case_id(ref), pred, ref)]
    if not (pred.is_dir() and ref.is_dir()):
        raise CtsegError("--pred and --ref must both be files or both be folders", pred if not pred.exists() else ref)
    labels = lambda d: {_case_id(p): p for p in sorted(d.iterdir()) if p.name.lower().endswith(WRITE_SUFFIXES)}  # noqa: E731
    preds, refs = labels(pred), labels(ref)
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise CtsegError(f"{len(missing)} reference case(s) have no prediction: {', '.join(missing[:10])}", pred)
    if not refs:
        raise CtsegError(f"no label files ({', '.join(WRITE_SUFFIXES)})", ref)
    return [(cid, preds[cid], refs[cid]) for cid in sorted(refs)]


def _fmt(stats: dict | None) -> str:
    if not stats or math.isnan(stats["mean"]):
        return "-"
    extra = f" ({stats['n_inf']} inf)" if stats.get("n_inf") else ""
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}{extra}"


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ctseg.datasets.base import check_label_values
    from ctseg.evaluate.folds import load_folds
    from ctseg.evaluate.metrics import evaluate_volume, fold_mean_std, summarize
    from ctseg.fileutil import atomic_write_text
    from ctseg.io import read_volume, resample_to

    if args.out is not None and args.out.exists() and not args.overwrite:
        raise CtsegError("output exists; pass --overwrite to replace it", args.out)
    classes = parse_classes(args.classes)
    folds = load_folds(args.folds) if args.folds else None
    records = []
    for case_id, pred_path, ref_path in _pairs(args.pred, args.ref):
        ref, pred = read_volume(ref_path), read_volume(pred_path)
        check_label_values(ref.array, classes, ref_path, "reference", " (see --classes)")
        check_label_values(pred.array, classes, pred_path, "prediction", " (see --classes)")
        if not pred.same_geometry(ref):
            log.warning("%s: prediction is not on the reference grid; resampled by nearest neighbour", pred_path)
            pred = resample_to(pred, ref, order=0)
        fold = None
        if folds is not None:
            try:
                fold = folds.fold_of(case_id)
            except KeyError:
                raise CtsegError(f"case {case_id!r} is in no fold of {args.folds}", ref_path) from None
        records += evaluate_volume(np.asarray(pred.array), np.asarray(ref.array), classes, ref.spacing,
                                   case_id=case_id, fold=fold, slice_thickness=ref.slice_thickness_mm(),
                                   distances=not args.no_distances, tolerance_mm=args.tolerance)

    metrics = ["dice"] + ([] if args.no_distances else ["hd95", "surface_dice"])
    summary = {m: {"overall": summarize(records, m), "by_thickness_group": summarize(records, m, "thickness_group")}
               for m in metrics}
    if folds is not None:
        for m in metrics:
            summary[m]["by_fold"] = {str(k): v for k, v in summarize(records, m, "fold").items()}
            summary[m]["over_folds"] = fold_mean_std(records, m)
    if args.out is not None:
        clean = [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in records]
        atomic_write_text(args.out, json.dumps({"classes": {str(k): v for k, v in classes.items()},
                                                "records": clean, "summary": summary}, indent=1, default=str))

    console = stdout_console()
    n_cases = len({r["case_id"] for r in records})
    table = Table(title=f"{n_cases} volume(s), mean ± std over volumes")
    table.add_column("structure")
    for m in metrics:
        table.add_column(m, justify="right")
    if folds is not None:
        table.add_column("dice over folds", justify="right")
    for struct in summary["dice"]["overall"]:
        row = [struct] + [_fmt(summary[m]["overall"].get(struct)) for m in metrics]
        if folds is not None:
            row.append(_fmt(summary["dice"]["over_folds"].get(struct)))
        table.add_row(*row)
    console.print(table)
    groups = summary["dice"]["by_thickness_group"]
    if len(groups) > 1:
        t2 = Table(title="Dice by slice thickness")
        t2.add_column("thickness")
        structs = list(summary["dice"]["overall"])
        for s in structs:
            t2.add_column(s, justify="right")
        for g, per in groups.items():
            t2.add_row(f"{g} (n={next(iter(per.values()))['n']})", *[_fmt(per.get(s)) for s in structs])
        console.print(t2)
    return 0
