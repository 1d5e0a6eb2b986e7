"""Cross-validation folds, written once to JSON and reused.

The paper's protocol (`mode="sorted"`): sort the volumes by number of slices, then by slice
thickness, and cut the sorted list into `n_folds` contiguous blocks. Every test fold then holds
volumes unlike the ones its models were trained on (the thinnest / longest scans are tested by
models that never saw such scans): a worst case for the clinic, and the test of robustness.

Other modes, for comparison: `"random"` (a permutation cut into folds) and `"stratified"`
(volumes grouped by slice-thickness bin, each group shuffled and dealt round-robin to the folds,
so every fold holds every kind of volume).

File format (JSON): `{"mode", "n_folds", "folds": [[case ids], ...], "case_meta": {id: {...}}}`.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text

log = logging.getLogger(__name__)

FoldMode = Literal["sorted", "random", "stratified"]

#: Upper edges (mm) of the slice-thickness groups used for stratified folds and for reporting.
THICKNESS_BINS: tuple[float, ...] = (1.5, 3.0)


def thickness_group(thickness_mm: float | None, bins: tuple[float, ...] = THICKNESS_BINS) -> str:
    """Name of the slice-thickness group: with the default bins "<=1.5mm", "1.5-3mm", ">3mm" ("unknown" for None)."""
    if thickness_mm is None or not math.isfinite(thickness_mm):
        return "unknown"
    lower = None
    for edge in bins:
        if thickness_mm <= edge:
            return f"<={edge:g}mm" if lower is None else f"{lower:g}-{edge:g}mm"
        lower = edge
    return f">{bins[-1]:g}mm"


def _thickness(meta: dict) -> float:
    """Slice thickness in mm (DICOM SliceThickness, else the z spacing); NaN when neither is known."""
    t = meta.get("slice_thickness")
    if t is None and meta.get("spacing") is not None:
        t = meta["spacing"][0]
    return float(t) if t is not None else math.nan


def make_folds(case_meta: dict[str, dict], n_folds: int = 5, mode: FoldMode = "sorted",
               rng: np.random.Generator | None = None) -> list[list[str]]:
    """Assign every case to exactly one of `n_folds` test folds.

    case_meta: case id -> {"num_slices": int, "slice_thickness": float mm | None (falls back to "spacing"[0])}.
    mode: "sorted" (paper: sort by slice count, then thickness, then id; contiguous blocks), "random",
    "stratified" (by thickness group, round-robin). `rng` is required for "random" and "stratified".
    Returns a list of `n_folds` lists of case ids (sizes differ by at most one).
    """
    ids = sorted(case_meta)
    if n_folds < 2:
        raise CtsegError(f"need at least 2 folds, got {n_folds}")
    if len(ids) < n_folds:
        raise CtsegError(f"{len(ids)} cases cannot fill {n_folds} folds: use fewer folds or more cases")
    for cid in ids:
        if "num_slices" not in case_meta[cid]:
            raise CtsegError(f"case {cid!r} has no 'num_slices' in its metadata")
    if mode == "sorted":
        def key(cid: str) -> tuple[int, float, str]:
            t = _thickness(case_meta[cid])
            return (int(case_meta[cid]["num_slices"]), math.inf if math.isnan(t) else t, cid)
        order = sorted(ids, key=key)
        return [list(block) for block in np.array_split(np.array(order, dtype=object), n_folds)]
    if rng is None:
        raise CtsegError(f"fold mode {mode!r} needs a random generator (rng)")
    if mode == "random":
        order = [ids[i] for i in rng.permutation(len(ids))]
        return [list(block) for block in np.array_split(np.array(order, dtype=object), n_folds)]
    if mode == "stratified":
        groups: dict[str, list[str]] = {}
        for cid in ids:
            groups.setdefault(thickness_group(_thickness(case_meta[cid])), []).append(cid)
        folds: list[list[str]] = [[] for _ in range(n_folds)]
        k = 0
        for name in sorted(groups):
            members = groups[name]
            for i in rng.permutation(len(members)):
                folds[k % n_folds].append(members[i])
                k += 1
        return folds
    raise CtsegError(f"unknown fold mode {mode!r}: choose sorted, random or stratified")


@dataclass
class Folds:
    """Fold assignment as stored on disk. `folds[i]` is the test set of fold i."""

    mode: str
    n_folds: int
    folds: list[list[str]]
    case_meta: dict[str, dict]

    def test_ids(self, fold: int) -> list[str]:
        return list(self.folds[fold])

    def train_ids(self, fold: int) -> list[str]:
        return [cid for i, f in enumerate(self.folds) if i != fold for cid in f]

    def fold_of(self, case_id: str) -> int:
        for i, f in enumerate(self.folds):
            if case_id in f:
                return i
        raise KeyError(case_id)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "n_folds": self.n_folds, "folds": self.folds, "case_meta": self.case_meta}


def _json_meta(case_meta: dict[str, dict]) -> dict[str, dict]:
    """Case metadata reduced to JSON-safe numbers (num_slices, slice_thickness, spacing)."""
    out = {}
    for cid, m in case_meta.items():
        entry: dict[str, Any] = {"num_slices": int(m["num_slices"]),
                                 "slice_thickness": None if m.get("slice_thickness") is None
                                 else float(m["slice_thickness"])}
        if m.get("spacing") is not None:
            entry["spacing"] = [float(s) for s in m["spacing"]]
        out[cid] = entry
    return out


def save_folds(folds: Folds, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(folds.to_dict(), indent=1))


def load_folds(path: str | Path) -> Folds:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        folds = Folds(mode=data["mode"], n_folds=int(data["n_folds"]),
                      folds=[list(map(str, f)) for f in data["folds"]], case_meta=data.get("case_meta", {}))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CtsegError(f"not a valid folds file ({err})", path) from None
    if len(folds.folds) != folds.n_folds:
        raise CtsegError(f"n_folds says {folds.n_folds} but the file lists {len(folds.folds)} folds", path)
    seen = [cid for f in folds.folds for cid in f]
    if len(seen) != len(set(seen)):
        dup = sorted({c for c in seen if seen.count(c) > 1})
        raise CtsegError(f"cases listed in more than one fold: {', '.join(dup[:10])}", path)
    return folds


def load_or_create_folds(path: str | Path, case_meta: dict[str, dict], n_folds: int = 5,
                         mode: FoldMode = "sorted", rng: np.random.Generator | None = None) -> Folds:
    """Reuse the folds stored at `path`, or make them (see `make_folds`) and write them atomically.

    Refuses (CtsegError) when the stored file was made for another case set (names the cases added
    and removed), another number of folds or another mode: delete the file to start afresh.
    """
    path = Path(path)
    if path.exists():
        folds = load_folds(path)
        stored = {cid for f in folds.folds for cid in f}
        wanted = set(case_meta)
        if stored != wanted:
            added, removed = sorted(wanted - stored), sorted(stored - wanted)
            parts = []
            if added:
                parts.append(f"{len(added)} new case(s) not in any fold: {', '.join(added[:10])}"
                             + (" ..." if len(added) > 10 else ""))
            if removed:
                parts.append(f"{len(removed)} case(s) in the folds but not in the data: {', '.join(removed[:10])}"
                             + (" ..." if len(removed) > 10 else ""))
            raise CtsegError("the case set changed since these folds were made; " + "; ".join(parts)
                             + ". Delete the file to make new folds (results of old folds will not compare).", path)
        if folds.n_folds != n_folds or folds.mode != mode:
            raise CtsegError(f"stored folds are {folds.n_folds} x {folds.mode!r}, requested {n_folds} x {mode!r}; "
                             "delete the file or request the stored setting", path)
        log.info("reusing %d %s folds from %s", folds.n_folds, folds.mode, path)
        return folds
    folds = Folds(mode=mode, n_folds=n_folds, folds=make_folds(case_meta, n_folds, mode, rng),
                  case_meta=_json_meta(case_meta))
    save_folds(folds, path)
    log.info("wrote %d %s folds for %d cases to %s", n_folds, mode, len(case_meta), path)
    return folds
