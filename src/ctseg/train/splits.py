"""Which cases a training run fits its weights on and selects its checkpoint on, and their fingerprint."""
from __future__ import annotations

import hashlib
import json
import zlib
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from ctseg.preprocess.cache import TrainingCache


def split_validation(train_ids: list[str], val_fraction: float, seed: int | Sequence[int]
                     ) -> tuple[list[str], list[str]]:
    """Hold out round(val_fraction * n) of `train_ids` (at least one if val_fraction > 0), chosen with `seed`
    (an int or a sequence of ints for `numpy.random.default_rng`)."""
    ids = sorted(train_ids)
    n_val = int(round(val_fraction * len(ids)))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(ids) - 1)
    if n_val <= 0:
        return ids, []
    entropy = [int(seed), 0x5EED] if isinstance(seed, (int, np.integer)) else [*(int(s) for s in seed), 0x5EED]
    perm = np.random.default_rng(entropy).permutation(len(ids))
    val = sorted(ids[i] for i in perm[:n_val])
    return [c for c in ids if c not in set(val)], val


def fold_validation_split(train_ids: Sequence[str], val_fraction: float, fold: int) -> tuple[list[str], list[str]]:
    """The validation split of cross-validation fold `fold`: seeded by the fold index and the fold's training
    cases, never by the model seed, so every run of an experiment (any architecture, augmentation or seed)
    selects its checkpoint on the same cases of a fold and stack candidates are compared on the same cases."""
    ids = sorted(train_ids)
    digest = zlib.crc32("\n".join(ids).encode())
    return split_validation(ids, val_fraction, [0xF01D, int(fold), digest])


def dataset_fingerprint(cache: TrainingCache, case_ids: list[str]) -> str:
    """sha256 over the cache's settings fingerprint and each case's id and cached-file checksums."""
    h = hashlib.sha256(cache.fingerprint.encode())
    for cid in sorted(case_ids):
        files = cache.meta(cid)["files"]
        h.update(json.dumps([cid, {k: files[k]["crc32"] for k in sorted(files)}]).encode())
    return h.hexdigest()
