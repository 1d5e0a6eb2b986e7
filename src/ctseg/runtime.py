"""Process-wide runtime settings: glibc malloc tuning for CPU throughput, resident memory of memory-mapped arrays
(`mapped_pages_dropped`), and the compute device."""
from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

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


def _mappings(arrays: tuple[Any, ...]) -> list[mmap.mmap]:
    """The read-only file mappings behind these arrays (`np.load(..., mmap_mode="r")` and views of it)."""
    found: dict[int, mmap.mmap] = {}
    for a in arrays:
        while a is not None:
            m = getattr(a, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here (views share it)
            if isinstance(m, mmap.mmap):
                found[id(m)] = m
                break
            a = getattr(a, "base", None)
    return list(found.values())


def drop_mapped_pages(*arrays: Any) -> None:
    """Drop the pages of these memory-mapped arrays from this process's resident memory (madvise
    MADV_DONTNEED on their read-only file mappings: the data stay in the page cache and are mapped again on the
    next read, unchanged). Arrays that are not memory-mapped, and platforms without madvise, are left alone."""
    _drop(_mappings(arrays))


def _drop(maps: list[mmap.mmap]) -> None:
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return
    for m in maps:
        try:
            m.madvise(int(advice))
        except (ValueError, OSError):  # closed meanwhile, or refused: nothing to drop
            pass


@contextmanager
def mapped_pages_dropped(*arrays: Any, interval_s: float = 0.01) -> Iterator[None]:
    """While the block runs, drop the pages of these read-only memory-mapped arrays from this process's resident
    memory every `interval_s` seconds, and once more at the end (`drop_mapped_pages`; a helper thread, which runs
    while the block's numpy / scipy / torch work releases the GIL). A whole-volume pass over a memory-mapped
    volume then keeps only the pages read in the last interval resident, instead of the whole file: the same
    values are read, from the page cache."""
    maps = _mappings(arrays)
    if not maps or getattr(mmap, "MADV_DONTNEED", None) is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            _drop(maps)

    helper = threading.Thread(target=loop, name="ctseg-drop-pages", daemon=True)
    helper.start()
    try:
        yield
    finally:
        stop.set()
        helper.join()
        _drop(maps)


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


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """Torch CPU threads when none are asked for: OMP_NUM_THREADS when set, else half the CPUs this process may
    use, at least 1. On a shared 2-core machine 2 spinning OpenMP threads made inference up to 5x slower than 1
    while another job ran, and only 1.5x faster when quiet (BENCHMARKS.md, "torch threads")."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cpus() // 2)


def worker_threads(jobs: int) -> int:
    """Torch threads of each of `jobs` parallel CPU worker processes: OMP_NUM_THREADS when set, else the usable
    CPUs shared out, at least 1 (2 cores, 2 jobs: 1 thread each; 16 cores, 2 jobs: 8 each)."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cpus() // max(1, jobs))


def auto_jobs(parallel_tasks: int, device: str | torch.device | None) -> int:
    """Worker processes for `parallel_tasks` independent CPU trainings: one per usable CPU, at most one per task;
    1 when they would run on a GPU (one device: the processes would only queue on it). Small networks train
    ~1.4x faster on 2 cores as two one-thread processes than as one two-thread process (BENCHMARKS.md)."""
    if parallel_tasks <= 1 or resolve_device(device).type != "cpu":
        return 1
    return max(1, min(usable_cpus(), parallel_tasks))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads (`threads`, else `default_threads()`); returns the number set."""
    import torch

    n = threads if threads is not None else default_threads()
    if n < 1:
        raise CtsegError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n
