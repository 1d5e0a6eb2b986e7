"""Process-wide runtime settings: glibc malloc tuning for CPU throughput, and the compute device."""
from __future__ import annotations

import ctypes
import logging
import sys
from typing import TYPE_CHECKING

from ctseg.errors import CtsegError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed MB-sized buffers in glibc's heap instead of unmapping them after every call.

    Batched augmentation and inference allocate 2-4 MB tensors per step; by default glibc maps and
    unmaps each one, and every first touch page-faults (about 2 ms per tensor on a loaded VM). PyTorch
    recommends jemalloc/tcmalloc for CPU work for the same reason. Returns False where not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError):
        return False
    log.debug("glibc malloc tuned: %s", ok)
    return ok


def release_free_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`), e.g. after a whole-volume step.

    With `tune_malloc`, freed buffers below 64 MiB stay in the heap; holes between live blocks stay
    resident. Whole-volume steps (inference of a long CT) free hundreds of MB of such buffers at once.
    Returns False where not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim(0) == 1
    except (OSError, AttributeError):
        return False


def resolve_device(name: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """"auto"/None -> CUDA if available else CPU; "cuda" under torchrun -> cuda:LOCAL_RANK.

    Used by training, prediction and cross-validation alike (torch is imported on first use, so that
    `ctseg --help` and the CLI's start-up stay light).
    """
    import torch

    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CtsegError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CtsegError(f"device {name!r} requested but CUDA is not available in this PyTorch build")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def default_threads() -> int:
    """Torch CPU threads when none are asked for: OMP_NUM_THREADS when set, else half the CPUs this process may
    use, at least 1. On a shared 2-core machine 2 spinning OpenMP threads made inference up to 5x slower than 1
    while another job ran, and only 1.5x faster when quiet (BENCHMARKS.md, "torch threads")."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads (`threads`, else `default_threads()`); returns the number set."""
    import torch

    n = threads if threads is not None else default_threads()
    if n < 1:
        raise CtsegError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n
