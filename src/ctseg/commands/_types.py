"""argparse types that validate numeric options at the CLI boundary (a bad value exits with status 2
and a one-line usage error before any work starts). The config enforces the same bounds (`ctseg.config`)."""
from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

from ctseg.config import MAX_SEED

Number = TypeVar("Number", int, float)


def _number(text: str, kind: Callable[[str], Number]) -> Number:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, top-k, epochs)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def jobs_arg(text: str) -> int | str:
    """A worker-process count: an integer >= 1, or "auto" (chosen from the CPUs and the device)."""
    return "auto" if text == "auto" else positive_int(text)


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in low..high."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value
    return parse


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (fold index, worker count)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed_int(text: str) -> int:
    """A seed in 0..2**32-1."""
    value = _number(text, int)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed must be in 0..{MAX_SEED}, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (tolerances in mm, thickness limits)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def overlap_fraction(text: str) -> float:
    """A fraction in [0, 1) (sliding-window overlap)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads N`: torch CPU threads (`ctseg.runtime.set_threads`)."""
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="torch CPU threads (default: OMP_NUM_THREADS if set, else half the CPUs: on a shared "
                        "machine extra spinning threads slow inference; see BENCHMARKS.md)")
