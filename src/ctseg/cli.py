"""`ctseg <verb>`: the command-line front end.

Each verb lives in its own module under `ctseg.commands` and defines

    HELP: str                                   one-line help
    def add_arguments(parser) -> None           its options
    def run(args) -> int                        the work; returns the exit status

The CLI prints; library code only logs. A `CtsegError` (bad input), an invalid option value
(pydantic) or an operating-system error (disk full, permission denied: it names the file) becomes
a one-line message and exit status 2. Ctrl-C exits with 130 and SIGTERM with 143, after the
`finally` blocks of the work have removed their temporary files. Messages are printed with rich
markup escaped, so bracketed text in paths ("CT [arterial].nii.gz") survives.
"""
from __future__ import annotations

import argparse
import importlib
import io
import logging
import pkgutil
import signal
import sys
from contextlib import contextmanager
from types import FrameType
from typing import Iterator, Protocol, cast

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from ctseg import __version__
from ctseg.errors import CtsegError
from ctseg.registry import load_plugins
from ctseg.runtime import tune_malloc

console = Console(stderr=True)


class Verb(Protocol):
    """What a `ctseg.commands` module defines (see the module docstring)."""

    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _verbs() -> dict[str, Verb]:
    import ctseg.commands as commands

    verbs = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        # imported by name: a module is a `Verb` by convention, which the type checker cannot see
        verbs[info.name.replace("_", "-")] = cast(Verb, importlib.import_module(f"ctseg.commands.{info.name}"))
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """While the verb runs, SIGTERM raises `Terminated` (only possible from the main thread)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _os_error_message(exc: OSError) -> str:
    """'FILE: what went wrong' for an OSError (disk full, permission denied, ...)."""
    where = exc.filename if exc.filename is not None else None
    what = exc.strerror or str(exc)
    return f"{where}: {what}" if where is not None else what


def print_error(message: object) -> None:
    """One line on stderr: 'error: MESSAGE', with rich markup in the message escaped."""
    console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def _unencodable_as_escapes() -> None:
    """Characters that stdout/stderr's encoding cannot hold (a non-ASCII path under PYTHONIOENCODING=ascii or
    a C locale) are printed as backslash escapes instead of raising UnicodeEncodeError mid-output."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def _log_once_through_root(level: int) -> None:
    """One handler, rich on stderr, at the root logger; a library logger that prints to stderr itself and also
    passes its records on to the root (nibabel's `nibabel.global`) would print each line twice: its own stream
    handlers are removed. Python warnings go through logging too."""
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    for logger in [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]:
        if isinstance(logger, logging.Logger) and logger.propagate:
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    _unencodable_as_escapes()
    try:
        load_plugins()  # CTSEG_PLUGINS: their components are CLI choices too (ctseg.registry)
    except CtsegError as exc:
        print_error(exc)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    _log_once_through_root(level)
    tune_malloc()
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from pydantic import ValidationError

    try:
        with _sigterm_as_exception():
            return int(args._run(args) or 0)
    except CtsegError as exc:
        print_error(exc)
        return 2
    except ValidationError as exc:
        print_error("invalid option: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                  for e in exc.errors()))
        return 2
    except OSError as exc:
        print_error(_os_error_message(exc))
        return 2
    except Terminated:
        console.print("[yellow]terminated[/]")
        return 143
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
