"""Per-layer compressibility and the certified Lipschitz bound of a model, as a table.

``report(model, input_shape)`` returns one row per linear layer (matrix-view
metrics from :mod:`robustcompress.metrics`, the operator's certified ``σ̄_1`` from
:mod:`robustcompress.bound` next to a power-iteration estimate, which is a lower
bound) and a last ``"network"`` row with ``K_2``, ``K_∞``, the input shape and
units they hold for. ``format_report(rows)`` prints it;
``python -m robustcompress report CHECKPOINT.pt --model module:factory`` runs it
on a saved checkpoint (:mod:`robustcompress.cli.report`).

Example:
    >>> from robustcompress.models import MLP
    >>> rows = report(MLP(8, (6,), 3), input_shape=(8,), k=2)
    >>> [r["name"] for r in rows]
    ['1', '3', 'network']
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ._checks import positive_int
from .bound import EXACT_THRESHOLD, LipschitzBound, lipschitz_bound, power_sigma
from .layers import LowRankConv2d, LowRankLinear
from .metrics import layer_metrics
from .spectral import SpectralState

__all__ = ["report", "format_report"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, LowRankConv2d)

#: Columns of the printed table: (row key, header).
_COLUMNS = (
    ("name", "layer"),
    ("shape", "shape"),
    ("frobenius", "‖W‖_F"),
    ("sigma_bound", "σ̄1 bound"),
    ("sigma_estimate", "σ1 est"),
    ("stable_rank", "srank"),
    ("effective_rank", "erank"),
    ("c_spec", "c_spec"),
    ("c_neu", "c_neu"),
    ("max_row_l1", "max‖w_i‖1"),
    ("rows_99", "rows99"),
    ("rank_99", "rank99"),
    ("source", "src"),
)

_LOOSENESS = (
    "K is a product of per-layer certified norms (sums at residual adds): an upper bound, typically loose by "
    "orders of magnitude for deep networks; σ1 est is a power-iteration lower bound of each layer's norm."
)


def _shape_of(module: nn.Module) -> list[int]:
    if isinstance(module, (LowRankLinear, LowRankConv2d)):
        return [int(module.weight_b.shape[0]), *map(int, module.weight_a.shape[1:])] + [f"r{module.rank}"]
    return list(map(int, module.weight.shape))


def _default_input_shape(model: nn.Module) -> tuple[int, ...]:
    for name, m in model.named_modules():
        if isinstance(m, _CONV_TYPES):
            raise ValueError(
                f"input_shape is required: the model has a convolution ({name!r}), whose norm depends on the input "
                "size; pass e.g. input_shape=(3, 32, 32)"
            )
    for m in model.modules():
        if isinstance(m, (nn.Linear, LowRankLinear)):
            return (int(m.in_features),)
    raise ValueError("The model has no eligible layer (Linear, Conv1d/2d, LowRankLinear, LowRankConv2d) to report on")


def report(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    k: int = 8,
    exact_threshold: int = 1 << 20,
    method: str = "auto",
) -> list[dict[str, Any]]:
    """One row per linear layer, then a ``"network"`` row with the certified bounds.

    Layer rows: ``name, type, shape, frobenius`` (matrix view, BN folded),
    ``sigma_bound`` (certified upper bound of the operator at the layer's input
    size, :func:`~robustcompress.bound.layer_bound`), ``sigma_estimate`` (a
    lower bound: exact for Linear layers below ``exact_threshold``, power
    iteration on the convolution at its input size), ``stable_rank,
    effective_rank, c_spec, top_k_energy, head_spread, c_neu, max_row_l1,
    rows_99, rank_99`` (:func:`~robustcompress.metrics.layer_metrics`) and
    ``source`` (``"exact"`` / ``"estimate"`` for the spectral metrics). A rank
    for 99 % energy beyond the ``k`` tracked directions reads ``"> k"``.
    The network row: ``K2, Kinf, input_shape, units, note, log_split``.

    Args:
        model: an fx-traceable network in eval mode.
        input_shape: one input without batch; optional only for models without convolutions.
        k: directions tracked for large layers.
        exact_threshold: matrix entries up to which metrics use exact svdvals.
        method: per-layer bound method (see :func:`~robustcompress.bound.layer_bound`).

    Returns:
        A list of JSON-serialisable dicts.

    Example:
        >>> from robustcompress.models import MLP
        >>> rows = report(MLP(8, (6,), 3), k=2)
        >>> rows[-1]["input_shape"]
        [8]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    k = positive_int(k, "k")
    if isinstance(exact_threshold, bool) or not isinstance(exact_threshold, int) or exact_threshold < 0:
        raise ValueError(f"Expected exact_threshold to be a non-negative integer, but got {exact_threshold!r}")
    shape = _default_input_shape(model) if input_shape is None else tuple(input_shape)
    bound: LipschitzBound = lipschitz_bound(model, shape, 2, method, min(exact_threshold, EXACT_THRESHOLD))
    linear = [f for f in bound.factors if f.kind == "linear"]
    names = list(dict.fromkeys(f.target for f in linear))
    state = SpectralState(model, k=k, layers=names, init_iter=0)
    big = [n for n in state.names if math.prod(state.operator(n).shape) > exact_threshold]
    # Only layers above the threshold need iterations: a state of their own.
    big_state = SpectralState(model, k=k, layers=big, init_iter=0) if big else None
    if big_state is not None:
        big_state.step(30)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for f in linear:
        if f.target in seen:
            continue
        seen.add(f.target)
        module = model.get_submodule(f.target)
        src_state = big_state if f.target in big else state
        met = layer_metrics(src_state, f.target, exact_threshold=exact_threshold, k=k)
        if isinstance(module, _CONV_TYPES):
            est = power_sigma(module, f.input_shape, state.folded_bn(f.target), n_iter=15)
        else:
            est = met["sigma_1"].value
        row: dict[str, Any] = {
            "name": f.target,
            "type": type(module).__name__,
            "shape": _shape_of(module),
            "input_shape": list(f.input_shape) if f.input_shape else None,
            "folded_bn": f.note.removeprefix("folded ") if f.note else None,
            "sigma_bound": f.factor,
            "sigma_estimate": est,
            "inf_to_2_bound": f.inf_to_2,
        }
        for key in ("frobenius", "stable_rank", "effective_rank", "c_spec", "top_k_energy", "head_spread",
                    "rank_99", "c_neu", "max_row_l1", "rows_99", "dead_rows"):
            row[key] = met[key].to_json()
        row["source"] = met["stable_rank"].source
        rows.append(row)
    rows.append({
        "name": "network",
        "K2": bound.K2,
        "Kinf": bound.Kinf,
        "input_shape": list(bound.input_shape),
        "units": bound.units,
        "note": _LOOSENESS,
        "log_split": bound.log_split,
    })
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return "×".join(str(x) for x in v)
    return str(v)


def format_report(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`report` as an aligned text table plus the network summary.

    Args:
        rows: the output of :func:`report`.

    Returns:
        A multi-line string.

    Example:
        >>> from robustcompress.models import MLP
        >>> "K_2" in format_report(report(MLP(8, (6,), 3), k=2))
        True
    """
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError("Expected rows to be the non-empty list of dicts returned by report()")
    layers = [r for r in rows if r.get("name") != "network"]
    table = [[h for _, h in _COLUMNS]] + [[_fmt(r.get(key)) for key, _ in _COLUMNS] for r in layers]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    net = next((r for r in rows if r.get("name") == "network"), None)
    if net is not None:
        shape = "×".join(map(str, net["input_shape"]))
        lines += [
            "",
            f"K_2 = {net['K2']:.6g}   (‖f(x+δ) − f(x)‖_2 ≤ K_2·‖δ‖_2)",
            f"K_∞ = {net['Kinf']:.6g}   (‖f(x+δ) − f(x)‖_2 ≤ K_∞·‖δ‖_∞)",
            f"input shape {shape}; {net['units']}.",
            net["note"],
        ]
        if net.get("log_split"):
            parts = ", ".join(f"{k} {v:+.3f}" for k, v in net["log_split"].items())
            lines.append(f"log K_2 = {sum(net['log_split'].values()):.4f} = {parts}")
    return "\n".join(lines)
