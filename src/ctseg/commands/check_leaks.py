"""`ctseg check-leaks FOLDER`: prove that no test case of fold k influenced anything scored on fold k."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from ctseg.commands._output import stdout_console

HELP = "prove from the provenance records of an experiment, CV or stack folder that no test fold leaked " \
       "(exit 0 clean, 1 leak, 3 cannot prove)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="experiment folder (runs/, stack/), `ctseg cv` or `ctseg stack` folder")
    parser.add_argument("--quiet", action="store_true", help="print only the verdict and the findings")


def run(args: argparse.Namespace) -> int:
    from ctseg.evaluate.provenance import check_leaks

    result = check_leaks(args.folder)
    console = stdout_console()
    if not args.quiet:
        for line in result.checked:
            console.print(f"checked  {escape(line)}", highlight=False)
    for finding in result.findings:
        console.print(escape(str(finding)), highlight=False, soft_wrap=True)
    colour = {"clean": "green", "leak": "bold red", "unproven": "yellow"}[result.status]
    console.print(f"[{colour}]{escape(result.summary())}[/]", highlight=False, soft_wrap=True)
    return result.exit_code
