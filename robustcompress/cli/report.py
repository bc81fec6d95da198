"""``python -m robustcompress report CHECKPOINT --model MODULE:FACTORY``: the per-layer table and the bound.

The computation is :func:`robustcompress.reporting.report`; this module reads
the checkpoint (every layout :mod:`robustcompress.cli.common` reads, including
files that ``compress`` exports) and prints the table or JSON.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_arguments(p)
    >>> p.parse_args(["m.pt", "--model", "robustcompress.models:MLP"]).k
    8
"""

from __future__ import annotations

import argparse
import json

from ..reporting import format_report, report
from .common import (add_data_arguments, add_model_arguments, example_input, json_safe, load_data, load_model,
                     parse_shape, run_guarded)

__all__ = ["add_arguments", "run_cli"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` subcommand's arguments to ``parser``."""
    add_model_arguments(parser)
    add_data_arguments(parser, "digits, digits-image or MODULE:FACTORY (a Dataset or DataLoader factory): the "
                               "input shape is read from its first example")
    parser.add_argument("--k", type=int, default=8, help="directions tracked for large layers (default 8)")
    parser.add_argument("--exact-threshold", type=int, default=1 << 20,
                        help="matrix entries up to which metrics use exact svdvals")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def _run(args: argparse.Namespace) -> int:
    shape = parse_shape(args.input_shape) if args.input_shape else None
    model = load_model(args.checkpoint, args.model, args.model_kwargs, args.trust_checkpoint)
    if shape is None and args.data is not None:
        data = load_data(args.data)
        shape = tuple(example_input(data[1], None, model).shape[1:])
    rows = report(model, input_shape=shape, k=args.k, exact_threshold=args.exact_threshold)
    if args.json:
        print(json.dumps(json_safe(rows), indent=2, allow_nan=False, default=str))
    else:
        print(format_report(rows))
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """Run ``report`` from parsed arguments; print the table (or JSON). Returns the exit code.

    Every error (a bad checkpoint, model spec or input shape, an unsupported
    module) is one line on stderr and exit code 2.
    """
    return run_guarded(_run, args)
