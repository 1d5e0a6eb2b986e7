"""Where the CLI's results go: stdout, whole, whether it is a terminal or a pipe.

Rich sizes its output to the terminal; piped it falls back to 80 columns and cuts table cells ("512×…").
`stdout_console` keeps the terminal's width on a terminal and gives a pipe or file room for any table,
so `ctseg inspect DIR | less` and `> table.txt` hold every value. `write_rows` prints records as JSON or
CSV for scripts.
"""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence

from rich.console import Console

#: Columns a pipe or file gets: wide enough for any table we print (rich tables are as wide as their content).
PIPE_WIDTH = 10_000


def stdout_console() -> Console:
    """A rich Console on stdout: the terminal's width on a terminal, `PIPE_WIDTH` (no colour) when piped."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPE_WIDTH)


def write_rows(rows: Sequence[dict], fmt: str, extra: dict | None = None) -> None:
    """Print `rows` (flat dicts with the same keys) to stdout as "json" (an object with "rows" and `extra`)
    or "csv" (header and one line per row; `extra` is not part of CSV)."""
    if fmt == "json":
        json.dump({**(extra or {}), "rows": list(rows)}, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    elif fmt == "csv":
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    sys.stdout.flush()
