"""Command line: ``python -m robustcompress SUBCOMMAND [--help]``.

Each subcommand has a module (``cli.report``, ``cli.compress``; the demo keeps
its own in :mod:`robustcompress.demo`) providing ``add_arguments(parser)`` and
``run_cli(args) -> int``, imported only when its subcommand runs, so ``--help``
stays fast. What ``report`` and ``compress`` share (checkpoint layouts, model
and data arguments, one-line errors) is in :mod:`robustcompress.cli.common`.

Example:
    >>> sorted(SUBCOMMANDS)
    ['compress', 'demo', 'report']
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("robustcompress.demo", "train digits MLPs several ways and compare compressibility and robustness"),
    "report": ("robustcompress.cli.report", "per-layer compressibility and the certified Lipschitz bound of a checkpoint"),
    "compress": ("robustcompress.cli.compress", "prune or rank-truncate a checkpoint, fine-tune, re-measure, export"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the subcommand named in ``argv`` gets its arguments (and its module imported)."""
    parser = argparse.ArgumentParser(
        prog="python -m robustcompress",
        description="robustcompress: keep PyTorch models compressible yet adversarially robust.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (others may need extras).
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_run=importlib.import_module(module).run_cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    return int(args._run(args) or 0)
