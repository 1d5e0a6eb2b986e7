"""Phantom generation speed: one full-size 512 x 512 x 200 kidney case against a plain scipy anchor.

Figure: generate_case(seed, size="full", num_slices=200, thickness=2.5) (3 sub-slices per slice for the
partial volume, 2 worker threads). Anchor, same run, same volume size: scipy.ndimage.gaussian_filter
(sigma 1 voxel) of a 200 x 512 x 512 float32 volume, single-threaded. Both report wall and process CPU
seconds (CPU time is robust to other processes on a shared machine; wall time is not). Median of repeats.

    python benchmarks/bench_phantom.py [--repeats 3] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
from scipy import ndimage

from ctseg.datasets.phantom import generate_case


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    volume = np.random.default_rng(0).standard_normal((200, 512, 512), dtype=np.float32)
    generate_case(0, size="small", num_slices=4)                         # warm-up (imports, allocator)
    figs, anchors = [], []
    for r in range(args.repeats):
        figs.append(_timed(lambda: generate_case(r, size="full", num_slices=200, thickness=2.5,
                                                 workers=args.workers)))
        anchors.append(_timed(lambda: ndimage.gaussian_filter(volume, 1.0)))
    fw, fc = (statistics.median(v) for v in zip(*figs))
    aw, ac = (statistics.median(v) for v in zip(*anchors))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"phantom 512x512x200 (2.5 mm, K=3), {args.workers} workers: wall {fw:6.2f} s  cpu {fc:6.2f} s")
    print(f"anchor gaussian_filter 512x512x200 sigma 1:        wall {aw:6.2f} s  cpu {ac:6.2f} s")
    print(f"ratio phantom / anchor: wall {fw / aw:5.2f}  cpu {fc / ac:5.2f}")


if __name__ == "__main__":
    main()
