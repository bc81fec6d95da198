"""Per-layer compressibility and the certified Lipschitz bound of a model, as a table.

``report(model, input_shape)`` returns one row per linear layer (matrix-view
metrics from :mod:`robustcompress.metrics`, the operator's certified ``σ̄_1`` from
:mod:`robustcompress.bound` next to a power-iteration estimate, which is a lower
bound) and a last ``"network"`` row with ``K_2``, ``K_∞``, the input shape and
units they hold for. It works on any model: where the graph has a node without a
global Lipschitz rule (attention, LayerNorm, an embedding of integer tokens, …)
or cannot be captured, the layer rows still come (one per layer the shared
:class:`~robustcompress.spectral.SpectralState` tracks) and the network row
carries ``K2 = Kinf = None`` and one line naming where certification stopped.
``format_report(rows)`` prints it; ``python -m robustcompress report
CHECKPOINT.pt --model module:factory`` runs it on a saved
checkpoint (:mod:`robustcompress.cli.report`).

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
from .bound import (
    EXACT_THRESHOLD,
    LipschitzBound,
    NoLipschitzRuleError,
    TraceError,
    layer_bound,
    lipschitz_bound,
    power_sigma,
)
from .bound.capture import Stop, call_model, find_stop
from .bound.layer_facts import can_be_head, is_conv, is_linear, operator_shape, weight_shape
from .metrics import layer_metrics
from .spectral import SpectralState

__all__ = ["report", "format_report", "json_safe"]

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

_METRIC_KEYS = ("frobenius", "stable_rank", "effective_rank", "c_spec", "top_k_energy", "head_spread", "rank_99",
                "c_neu", "max_row_l1", "rows_99", "dead_rows")


def _default_input_shape(model: nn.Module) -> tuple[int, ...]:
    for name, m in model.named_modules():
        if is_conv(m):
            raise ValueError(
                f"input_shape is required: the model has a convolution ({name!r}), whose norm depends on the input "
                "size; pass e.g. input_shape=(3, 32, 32)"
            )
    for m in model.modules():
        if can_be_head(m):
            return (operator_shape(m)[1],)
    raise ValueError("The model has no eligible layer (Linear, Conv1d/2d, LowRankLinear, LowRankConv2d) to report on")


def _inputs(model: nn.Module, input_shape: Sequence[int] | None,
            example_input: Any) -> tuple[tuple[int, ...] | None, Any]:
    """``(input shape for the bound or None, one example batch)``."""
    if example_input is None:
        shape = _default_input_shape(model) if input_shape is None else tuple(input_shape)
        p = next(iter(model.parameters()), None)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            return shape, None  # lipschitz_bound names the bad input_shape
        return shape, torch.zeros((2, *shape), dtype=p.dtype if p is not None else torch.float32,
                                  device=p.device if p is not None else "cpu")
    if isinstance(example_input, torch.Tensor) and example_input.is_floating_point():
        if example_input.dim() < 2:
            raise ValueError("Expected example_input to be a batch (N, ...), but got shape "
                             f"{tuple(example_input.shape)}")
        shape = tuple(int(s) for s in example_input.shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise ValueError(f"input_shape={tuple(input_shape)} does not match example_input.shape[1:]={shape}")
        return shape, example_input
    if not isinstance(example_input, (torch.Tensor, dict, tuple, list)):
        raise TypeError(f"Expected example_input to be a tensor, a dict of keyword inputs or a tuple, but got "
                        f"{type(example_input).__name__}")
    return None, example_input  # integer tokens / several inputs: no certified bound


def _certify(model: nn.Module, shape: tuple[int, ...] | None, example: Any, method: str,
             exact_threshold: int) -> tuple[LipschitzBound | None, Stop | None]:
    """The certified bound, or where certification stops (one line)."""
    if shape is not None:
        try:
            return lipschitz_bound(model, shape, 2, method, min(exact_threshold, EXACT_THRESHOLD)), None
        except NoLipschitzRuleError as err:
            return None, Stop(f"Not certified: {err}", err.target if err.module_type else None, err.module_type,
                              None if err.module_type else err.target)
        except TraceError:
            pass
    stop = find_stop(model, example)
    if stop is None:
        why = ("it takes integer tokens or several inputs" if shape is None else "torch.fx cannot trace it")
        stop = Stop(f"Not certified: every captured operation has a Lipschitz rule, but the certified bound needs a "
                    f"torch.fx-traceable model taking one floating-point tensor, and {why}", None, None, None)
    return None, stop


def _layer_row(name: str, module: nn.Module, met: dict, input_shape: Sequence[int] | None, folded: str | None,
               sigma_bound: float | None, estimate: Any, inf_to_2: float | None) -> dict[str, Any]:
    if is_linear(module):
        shape = weight_shape(module)
    else:
        w = getattr(module, "weight", None)
        shape = list(map(int, w.shape)) if isinstance(w, torch.Tensor) else None
    row: dict[str, Any] = {
        "name": name,
        "type": type(module).__name__,
        "shape": shape,
        "input_shape": list(input_shape) if input_shape else None,
        "folded_bn": folded,
        "sigma_bound": sigma_bound,
        "sigma_estimate": estimate,
        "inf_to_2_bound": inf_to_2,
    }
    for key in _METRIC_KEYS:
        row[key] = met[key].to_json()
    row["source"] = met["stable_rank"].source
    return row


def _states(model: nn.Module, k: int, names: Sequence[str] | None, exact_threshold: int):
    """The shared state (no iterations), and one iterated 30 times for layers above the threshold."""
    state = SpectralState(model, k=k, layers=names, init_iter=0)
    if not state.names:
        raise ValueError("The model has no eligible layer (Linear, Conv1d/2d, LowRankLinear, LowRankConv2d) to "
                         "report on")
    big = [n for n in state.names if math.prod(state.operator(n).shape) > exact_threshold]
    # Only layers above the threshold need iterations: a state of their own.
    big_state = SpectralState(model, k=k, layers=big, init_iter=0) if big else None
    if big_state is not None:
        big_state.step(30)
    return state, big_state, set(big)


def _certified_rows(model: nn.Module, bound: LipschitzBound, k: int, exact_threshold: int) -> list[dict[str, Any]]:
    linear = [f for f in bound.factors if f.kind == "linear"]
    state, big_state, big = _states(model, k, list(dict.fromkeys(f.target for f in linear)), exact_threshold)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for f in linear:
        if f.target in seen:
            continue
        seen.add(f.target)
        module = model.get_submodule(f.target)
        met = layer_metrics(big_state if f.target in big else state, f.target, exact_threshold=exact_threshold, k=k)
        if is_conv(module):
            est = power_sigma(module, f.input_shape, state.folded_bn(f.target), n_iter=15)
        else:
            est = met["sigma_1"].value
        rows.append(_layer_row(f.target, module, met, f.input_shape, f.note.removeprefix("folded ") if f.note else None,
                               f.factor, est, f.inf_to_2))
    return rows


def _input_shapes(model: nn.Module, example: Any, modules: dict[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    """Each named layer's input shape without batch, from one no-grad forward pass (the mode is left alone)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    try:
        for name, module in modules.items():
            def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    shapes.setdefault(name, tuple(int(s) for s in args[0].shape[1:]))
            handles.append(module.register_forward_hook(hook))
        with torch.no_grad():
            call_model(model, example)
    except Exception as err:  # the user's model: any error, reported with what to pass instead
        raise ValueError(f"The model does not run on the example input ({type(err).__name__}: {err}); pass "
                         "example_input= as the model takes it (a tensor, or a dict such as {'input_ids': ids})"
                         ) from err
    finally:
        for h in handles:
            h.remove()
    return shapes


def _uncertified_rows(model: nn.Module, example: Any, k: int, exact_threshold: int,
                      method: str) -> list[dict[str, Any]]:
    state, big_state, big = _states(model, k, None, exact_threshold)
    shapes = _input_shapes(model, example, {name: state.module(name) for name in state.names})
    rows = []
    for name in state.names:
        module = state.module(name)
        met = layer_metrics(big_state if name in big else state, name, exact_threshold=exact_threshold, k=k)
        shape, bn = shapes.get(name), state.folded_bn(name)
        sig = None
        if is_linear(module) and (shape is not None or not is_conv(module)):
            sig = layer_bound(module, shape, method, bn, min(exact_threshold, EXACT_THRESHOLD))
        folded = next((n for n, m in model.named_modules() if bn is not None and m is bn), None)
        rows.append(_layer_row(name, module, met, shape, folded, sig, met["sigma_1"].value, None))
    return rows


def json_safe(v: Any) -> Any:
    """Rows as valid JSON: non-finite floats become ``None`` (``null``), recursively through dicts and lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {key: json_safe(x) for key, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def report(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    k: int = 8,
    exact_threshold: int = 1 << 20,
    method: str = "auto",
    example_input: Any = None,
) -> list[dict[str, Any]]:
    """One row per linear layer, then a ``"network"`` row with the certified bounds (or where they stop).

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

    Certified where the graph is: on a model with a node without a global
    Lipschitz rule (attention, LayerNorm, …), or one that neither torch.fx nor
    ``torch.export`` captures, or that takes integer tokens / several inputs,
    the layer rows cover every layer the shared state tracks and the network
    row has ``K2 = Kinf = log_split = None``, ``certified = False`` and a
    ``note`` of one line naming where certification stopped (``stopped_at``:
    the module's name, or ``None`` when unknown). Everything is valid JSON:
    ``null`` marks a value that is undefined or was not computed — a metric
    undefined for the layer (e.g. ranks of an all-zero weight), a term of
    ``log_split`` that is ``log 0`` (an all-zero layer, where ``K2 = 0``), or a
    bound not computed because certification stopped.

    Args:
        model: a network in eval mode.
        input_shape: one input without batch; optional only for models without convolutions,
            or when ``example_input`` is given.
        k: directions tracked for large layers.
        exact_threshold: matrix entries up to which metrics use exact svdvals.
        method: per-layer bound method (see :func:`~robustcompress.bound.layer_bound`).
        example_input: one batch as the model takes it: a float tensor, integer tokens, a dict of
            keyword inputs (``{"input_ids": ids}``) or a tuple; outputs are read through their logits.

    Returns:
        A list of JSON-serialisable dicts.

    Example:
        >>> from robustcompress.models import MLP
        >>> rows = report(MLP(8, (6,), 3), k=2)
        >>> rows[-1]["input_shape"]
        [8]
        >>> rows = report(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), input_shape=(4,), k=2)
        >>> rows[-1]["K2"] is None, rows[-1]["stopped_at"]
        (True, '1')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    k = positive_int(k, "k")
    if isinstance(exact_threshold, bool) or not isinstance(exact_threshold, int) or exact_threshold < 0:
        raise ValueError(f"Expected exact_threshold to be a non-negative integer, but got {exact_threshold!r}")
    shape, example = _inputs(model, input_shape, example_input)
    bound, stop = _certify(model, shape, example, method, exact_threshold)
    if bound is not None:
        rows = _certified_rows(model, bound, k, exact_threshold)
        rows.append({"name": "network", "certified": True, "K2": bound.K2, "Kinf": bound.Kinf,
                     "input_shape": list(bound.input_shape), "units": bound.units, "note": _LOOSENESS,
                     "log_split": bound.log_split})
    else:
        rows = _uncertified_rows(model, example, k, exact_threshold, method)
        rows.append({"name": "network", "certified": False, "K2": None, "Kinf": None,
                     "input_shape": list(shape) if shape is not None else None, "units": "", "note": stop.line,
                     "log_split": None, "stopped_at": stop.module})
    return json_safe(rows)


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
    if net is not None and net.get("K2") is None:
        lines += ["", net["note"]]
    elif net is not None:
        shape = "×".join(map(str, net["input_shape"]))
        lines += [
            "",
            f"K_2 = {net['K2']:.6g}   (‖f(x+δ) − f(x)‖_2 ≤ K_2·‖δ‖_2)",
            f"K_∞ = {net['Kinf']:.6g}   (‖f(x+δ) − f(x)‖_2 ≤ K_∞·‖δ‖_∞)",
            f"input shape {shape}; {net['units']}.",
            net["note"],
        ]
        split = net.get("log_split")
        if split and all(v is not None for v in split.values()):
            parts = ", ".join(f"{k} {v:+.3f}" for k, v in split.items())
            lines.append(f"log K_2 = {sum(split.values()):.4f} = {parts}")
    return "\n".join(lines)
