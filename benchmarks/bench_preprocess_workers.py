"""`ctseg preprocess --workers N` against a serial run: wall time, speed-up, and byte-identical caches.

A KiTS19-geometry dataset of `--cases` cases (each a hard link to one synthetic `--slices` x 512 x 512
int16 case written as KiTS19 stores it, see `bench_memory.py`), preprocessed with `--force` by
`ctseg preprocess` in a subprocess, serial and with `--workers N`, interleaved `--repeats` times
(the machine may be shared: the best of each is reported, with the load average).
Afterwards every file of the two caches' `cases/` folders is compared byte for byte.

    python benchmarks/bench_preprocess_workers.py [--cases 6] [--slices 256] [--workers 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import REPO, phantom_like, write_kits_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--slices", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctseg-bench-workers-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    try:
        image, label = phantom_like(args.slices)
        write_kits_case(work / "kits" / "case_00000", image, label, 0.78, 1.0)
        del image, label
        for i in range(1, args.cases):
            (work / "kits" / f"case_{i:05d}").mkdir()
            for name in ("imaging.nii.gz", "segmentation.nii.gz"):
                os.link(work / "kits" / "case_00000" / name, work / "kits" / f"case_{i:05d}" / name)
        (work / "cfg.yaml").write_text(yaml.safe_dump({"preprocess": {"subset_size": 2, "in_plane_size": 128}}))
        times: dict[int, list[float]] = {1: [], args.workers: []}
        for _ in range(args.repeats):
            for n in times:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "ctseg", "preprocess", str(work / "kits"), "--out",
                                str(work / f"cache-{n}"), "--config", str(work / "cfg.yaml"), "--force",
                                "--no-progress", "--workers", str(n)], check=True, env=env, capture_output=True)
                times[n].append(time.perf_counter() - t0)
        names = sorted(p.name for p in (work / "cache-1" / "cases").iterdir())
        identical = all((work / "cache-1" / "cases" / f).read_bytes() ==
                        (work / f"cache-{args.workers}" / "cases" / f).read_bytes() for f in names)
        serial, parallel = min(times[1]), min(times[args.workers])
        print(f"{args.cases} cases of {args.slices} x 512 x 512 int16: serial {serial:.1f} s, "
              f"--workers {args.workers} {parallel:.1f} s, speed-up {serial / parallel:.2f}x "
              f"(all runs: {times}); {len(names)} cached files byte-identical: {identical}")
        print(f"machine: {os.cpu_count()} CPUs, load average {open('/proc/loadavg').read().split()[:3]}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
