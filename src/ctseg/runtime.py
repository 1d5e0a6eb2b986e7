"""Process-wide runtime settings for CPU throughput."""
from __future__ import annotations

import ctypes
import logging
import sys

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
