"""Weight files of networks: atomic `torch.save`, and loads that never unpickle arbitrary objects.

Everything saved here is tensors and primitive containers (dict/list/tuple/int/float/str/bool/None), so it
loads with `torch.load(path, weights_only=True)`. A training run's `model_best.pt` / `model_last.pt` are plain
`state_dict`s; the resume checkpoint (`ctseg.train.checkpoint`) and the stacking meta-model use the same writer.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_path


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """`torch.save` to a temporary file in the same folder, then rename over `path`."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
        raise CtsegError(f"cannot write ({getattr(exc, 'strerror', None) or str(exc).splitlines()[0]})",
                         path) from exc


def safe_load(path: str | Path, what: str = "checkpoint") -> object:
    """`torch.load(weights_only=True)` on CPU; any failure becomes a CtsegError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CtsegError(f"{what} not found", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CtsegError(f"{what} holds objects other than tensors and plain containers; refusing to load it "
                         f"({first})", path) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError) as err:
        raise CtsegError(f"{what} is corrupt or not a PyTorch file ({type(err).__name__}: {err})", path) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain `state_dict` file (`model_best.pt` / `model_last.pt`), checked to be name -> tensor."""
    obj = safe_load(path, "model weights")
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CtsegError("expected a state_dict (parameter name -> tensor)", path)
    return obj
