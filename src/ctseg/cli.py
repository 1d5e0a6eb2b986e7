"""`ctseg <verb>`: the command-line front end.

Each verb lives in its own module under `ctseg.commands` and defines

    HELP: str                                   one-line help
    def add_arguments(parser) -> None           its options
    def run(args) -> int                        the work; returns the exit status

The CLI prints; library code only logs. A `CtsegError` becomes a one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from rich.console import Console
from rich.logging import RichHandler

from ctseg import __version__
from ctseg.errors import CtsegError
from ctseg.runtime import tune_malloc

console = Console(stderr=True)


def _verbs() -> dict[str, object]:
    import ctseg.commands as commands

    verbs = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        verbs[info.name.replace("_", "-")] = importlib.import_module(f"ctseg.commands.{info.name}")
    return verbs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctseg", description="Robust deep-learning segmentation of CT volumes.")
    parser.add_argument("--version", action="version", version=f"ctseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, module in _verbs().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    logging.captureWarnings(True)
    tune_malloc()
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CtsegError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
