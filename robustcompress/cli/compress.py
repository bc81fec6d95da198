"""``python -m robustcompress compress CHECKPOINT --model MODULE:FACTORY (--prune A | --rank-energy E | …) --out PATH``.

Loads the model (every layout :mod:`robustcompress.cli.common` reads), measures
it on ``--data`` (parameters and MACs only without it), prunes or truncates it
(:mod:`robustcompress.compress`), optionally fine-tunes, measures again and
exports a file that ``report`` and :func:`~robustcompress.compress.load_exported` read.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_arguments(p)
    >>> p.parse_args(["m.pt", "--model", "x:y", "--prune", "0.5", "--out", "s.pt"]).prune
    0.5
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from torch import nn

from ..compress import amounts_for_energy, count_macs, count_parameters, export, finetune, measure, prune, truncate
from ..compress.pruning import IMPORTANCES
from .common import (add_data_arguments, add_model_arguments, example_input, load_data, load_model, parse_shape,
                     run_guarded)

__all__ = ["add_arguments", "run_cli"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m robustcompress compress``."""
    add_model_arguments(parser)
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--prune", type=float, metavar="AMOUNT", help="fraction of neurons/filters removed per layer")
    how.add_argument("--prune-energy", type=float, metavar="E",
                     help="keep the fewest rows holding this share of each layer's row energy")
    how.add_argument("--rank-energy", type=float, metavar="E", help="per-layer rank keeping this share of ‖W‖_F²")
    how.add_argument("--rank", type=int, metavar="R", help="one rank for every hidden layer")
    how.add_argument("--rank-budget", type=float, metavar="B", help="fraction of the parameters kept")
    parser.add_argument("--importance", default="l2", choices=sorted(IMPORTANCES), help="pruning importance")
    parser.add_argument("--mask-only", action="store_true", help="zero pruned units instead of removing them")
    parser.add_argument("--finetune-epochs", type=int, default=0, metavar="N")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    add_data_arguments(parser, "data to measure (and fine-tune) on: digits (N×64), digits-image (N×1×8×8) or "
                               "MODULE:FACTORY returning a Dataset / DataLoader of (x, y) or a pair (train, test); "
                               "without it only parameters and MACs are measured")
    parser.add_argument("--eps", type=float, default=0.1, help="PGD L∞ budget of the robust accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, metavar="PATH", help="where to export the compressed model")


def _compress(model: nn.Module, args: argparse.Namespace, example: Any) -> tuple[nn.Module, dict[str, Any]]:
    if args.prune is not None or args.prune_energy is not None:
        amount = args.prune if args.prune is not None else amounts_for_energy(model, args.prune_energy)
        setting = {"method": "prune", "amount": args.prune, "energy": args.prune_energy,
                   "importance": args.importance, "mask_only": args.mask_only}
        # Energy-based amounts are computed on the raw rows: score the same rows.
        small = prune(model, amount, example_inputs=example, importance=args.importance,
                      mask_only=args.mask_only, fold_bn=args.prune_energy is None)
    else:
        setting = {"method": "truncate", "energy": args.rank_energy, "rank": args.rank, "budget": args.rank_budget}
        small = truncate(model, energy=args.rank_energy, rank=args.rank, budget=args.rank_budget)
    return small, setting


def _measure(model: nn.Module, test: Any, args: argparse.Namespace, example: Any) -> dict[str, Any]:
    if test is not None:
        return measure(model, test, eps_linf=args.eps, example_input=example, seed=args.seed)
    out: dict[str, Any] = {"params": count_parameters(model)}
    if example is not None:
        out["macs"] = count_macs(model, example)
    return out


def _print_table(before: dict[str, Any], after: dict[str, Any]) -> None:
    cols = [("params", "params", "d"), ("macs", "MACs", "d"), ("clean_acc", "clean", ".3f"),
            ("robust_acc_linf", "PGD-Linf", ".3f")]
    cols = [c for c in cols if c[0] in before]
    print(f"{'':10s} " + " ".join(f"{h:>10s}" for _, h, _ in cols))
    for label, m in (("original", before), ("compressed", after)):
        print(f"{label:10s} " + " ".join(f"{m[k]:10{f}}" for k, _, f in cols))


def _run(args: argparse.Namespace) -> int:
    shape = parse_shape(args.input_shape) if args.input_shape else None
    model = load_model(args.checkpoint, args.model, args.model_kwargs, args.trust_checkpoint)
    data = load_data(args.data)
    if args.finetune_epochs and data is None:
        raise ValueError("--finetune-epochs needs --data (the data to fine-tune on)")
    train, test = data if data is not None else (None, None)
    example = example_input(test, shape, model)
    before = _measure(model, test, args, example)
    small, setting = _compress(model, args, example)
    if args.finetune_epochs:
        finetune(small, train, epochs=args.finetune_epochs, lr=args.lr, seed=args.seed)
    after = _measure(small, test, args, example)
    _print_table(before, after)
    if test is None:
        print("(no --data: accuracy not measured)")
    export(small, args.out, info={**setting, "model": args.model, "model_kwargs": json.loads(args.model_kwargs),
                                  "data": args.data, "finetune_epochs": args.finetune_epochs,
                                  "before": before, "after": after})
    print(f"exported to {args.out}")
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """Run ``compress``: load, measure, compress, fine-tune, re-measure, export. Returns the exit status.

    Every error is one line on stderr naming the file and the cause, exit code 2.
    """
    return run_guarded(_run, args)
