import json

import numpy as np
import pytest

from ctseg.errors import CtsegError
from ctseg.evaluate.folds import load_folds, load_or_create_folds, make_folds, thickness_group


def _meta(rng, n=23):
    return {f"case_{i:03d}": {"num_slices": int(rng.integers(29, 1060)),
                              "slice_thickness": float(rng.choice([0.5, 1.0, 2.5, 3.0, 5.0]))}
            for i in range(n)}


def test_sorted_folds_are_contiguous_in_slice_count_and_cover_every_case_once(rng):
    meta = _meta(rng)
    folds = make_folds(meta, n_folds=5, mode="sorted")
    flat = [c for f in folds for c in f]
    assert sorted(flat) == sorted(meta) and len(flat) == len(set(flat))
    assert [len(f) for f in folds] == [5, 5, 5, 4, 4]
    keys = [[(meta[c]["num_slices"], meta[c]["slice_thickness"]) for c in f] for f in folds]
    for a, b in zip(keys, keys[1:]):
        assert max(a) <= min(b)  # every fold lies entirely before the next in the sort order
    for f in keys:
        assert f == sorted(f)


def test_sorted_ties_broken_by_thickness():
    meta = {"a": {"num_slices": 100, "slice_thickness": 5.0}, "b": {"num_slices": 100, "slice_thickness": 1.0},
            "c": {"num_slices": 50, "slice_thickness": 3.0}, "d": {"num_slices": 100, "slice_thickness": 2.0}}
    assert make_folds(meta, 2, "sorted") == [["c", "b"], ["d", "a"]]


def test_random_and_stratified(rng):
    meta = _meta(rng, 30)
    r1 = make_folds(meta, 5, "random", np.random.default_rng(1))
    r2 = make_folds(meta, 5, "random", np.random.default_rng(1))
    assert r1 == r2 and sorted(c for f in r1 for c in f) == sorted(meta)
    strat = make_folds(meta, 5, "stratified", np.random.default_rng(2))
    assert sorted(c for f in strat for c in f) == sorted(meta)
    assert max(map(len, strat)) - min(map(len, strat)) <= 1
    groups = {thickness_group(m["slice_thickness"]) for m in meta.values()}
    for g in groups:
        n_g = sum(thickness_group(m["slice_thickness"]) == g for m in meta.values())
        per_fold = [sum(thickness_group(meta[c]["slice_thickness"]) == g for c in f) for f in strat]
        assert max(per_fold) - min(per_fold) <= 1, (g, per_fold, n_g)
    with pytest.raises(CtsegError, match="random generator"):
        make_folds(meta, 5, "random")


def test_thickness_groups():
    assert [thickness_group(t) for t in (0.5, 1.5, 2.0, 3.0, 5.0, None)] == \
        ["<=1.5mm", "<=1.5mm", "1.5-3mm", "1.5-3mm", ">3mm", "unknown"]


def test_folds_file_written_once_reused_and_guarded(tmp_path, rng):
    meta = _meta(rng, 12)
    path = tmp_path / "cv" / "folds.json"
    f1 = load_or_create_folds(path, meta, 3, "random", np.random.default_rng(5))
    data = json.loads(path.read_text())
    assert set(data) == {"mode", "n_folds", "folds", "case_meta"} and data["mode"] == "random"
    # a different generator would give other folds: the file wins
    f2 = load_or_create_folds(path, meta, 3, "random", np.random.default_rng(99))
    assert f2.folds == f1.folds == load_folds(path).folds
    assert sorted(f1.train_ids(0) + f1.test_ids(0)) == sorted(meta)
    assert f1.fold_of(f1.folds[2][0]) == 2
    meta2 = dict(meta)
    meta2.pop("case_000")
    meta2["case_new"] = {"num_slices": 40, "slice_thickness": 1.0}
    with pytest.raises(CtsegError, match="case_new") as exc:
        load_or_create_folds(path, meta2, 3, "random", np.random.default_rng(5))
    assert "case_000" in str(exc.value)
    with pytest.raises(CtsegError, match="requested 4"):
        load_or_create_folds(path, meta, 4, "random", np.random.default_rng(5))
    assert not [p for p in path.parent.iterdir() if p.name != "folds.json"]  # no temp files left


def test_too_few_cases():
    with pytest.raises(CtsegError, match="cannot fill"):
        make_folds({"a": {"num_slices": 3, "slice_thickness": 1.0}}, 2)
