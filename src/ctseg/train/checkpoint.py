"""Resume checkpoints of a training run (`checkpoint.pt`) and RNG state capture/restore.

Everything saved here is tensors and primitive containers (dict/list/tuple/int/float/str/bool/None), so it
loads with `torch.load(path, weights_only=True)`: a checkpoint never unpickles arbitrary objects.

`checkpoint.pt` is the resume state, a dict with `format == CHECKPOINT_FORMAT` (see `save_resume_state`); the
weight files `model_best.pt` / `model_last.pt` are written and read by `ctseg.models.weights`.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctseg.errors import CtsegError
from ctseg.models.weights import atomic_torch_save, safe_load

CHECKPOINT_FORMAT = "ctseg.train.checkpoint"
CHECKPOINT_VERSION = 1


def load_resume_state(path: str | Path) -> dict:
    """`checkpoint.pt` written by `save_resume_state`; CtsegError if it is not ours or not this version."""
    obj = safe_load(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CtsegError("not a ctseg training checkpoint (no ctseg format marker)", path)
    if obj.get("version") != CHECKPOINT_VERSION:
        raise CtsegError(f"checkpoint version {obj.get('version')!r}, this ctseg reads version "
                         f"{CHECKPOINT_VERSION}", path)
    missing = [k for k in ("model", "optimizer", "epoch", "global_step", "config", "rng") if k not in obj]
    if missing:
        raise CtsegError(f"checkpoint lacks {', '.join(missing)}", path)
    return obj


def save_resume_state(path: str | Path, state: dict) -> None:
    """Write `state` (see `Trainer._resume_state`) with the format marker, atomically."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, path)


# --- RNG states ---------------------------------------------------------------------------------------------

def _numpy_state_to_primitive(state: dict) -> dict:
    """numpy bit-generator state dict with ndarrays turned into lists (weights_only-loadable)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _numpy_state_to_primitive(v)
        elif isinstance(v, np.ndarray):
            out[k] = {"__ndarray__": v.tolist(), "dtype": str(v.dtype)}
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def _numpy_state_from_primitive(state: dict) -> dict:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict) and "__ndarray__" in v:
            out[k] = np.asarray(v["__ndarray__"], dtype=v["dtype"])
        elif isinstance(v, dict):
            out[k] = _numpy_state_from_primitive(v)
        else:
            out[k] = v
    return out


def capture_rng_state() -> dict:
    """States of Python's, NumPy's legacy global, torch CPU and all CUDA RNGs.

    The trainer's own generators are not stored: they are re-created for every step from
    (seed, rank, epoch, step) (see `ctseg.train.data.step_seed`), so the position in the run fixes them.
    """
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_to_primitive(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict, path: str | Path | None = None) -> None:
    """Inverse of `capture_rng_state`."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(_numpy_state_from_primitive(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CtsegError(f"checkpoint RNG state unreadable ({type(err).__name__}: {err})", path) from None
