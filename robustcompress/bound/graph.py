"""The network bound: trace the model, run the graph once, apply each node's rule (DESIGN §1.2–1.3).

``‖f(x+δ) − f(x)‖_2 ≤ K_p · ‖δ‖_p``: :func:`lipschitz_bound` traces the model with
:mod:`torch.fx`, runs it once on a zero input with an ``fx.Interpreter`` that
records each node's shape and, right after the node has run, applies the node's
rule from :mod:`robustcompress.bound.rules`. The composition takes products
along chains and sums at adds, and gives every path from the input its own ∞→2
first factor for ``K_∞``.

Example:
    >>> from torch import nn
    >>> round(lipschitz_bound(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), (2,)).K2, 1) > 0
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from .._checks import norm_arg
from .layer_facts import can_be_head, is_batchnorm, is_leaf
from .matrix import EXACT_THRESHOLD
from .rules import DROPOUT_TYPES, MODULE_RULES, rule_for
from .walk import CONST, SHAPE_KEY, NodeFactor, Walk, nodes_in

__all__ = ["LipschitzBound", "TraceError", "lipschitz_bound", "trace"]

@dataclass
class LipschitzBound:
    """A certified Lipschitz upper bound of a network at a stated input shape.

    ``‖f(x+δ) − f(x)‖_2 ≤ K · ‖δ‖_norm`` for every ``x`` of shape ``input_shape``
    (in the units the model takes as input).

    Attributes:
        K: the bound for ``norm``; ``K2`` and ``Kinf`` both bounds.
        norm: 2.0 or inf.
        input_shape: the input shape (no batch) it holds for.
        factors: the rule per node, in graph order.
        log_split: for plain chains, ``log K2`` split as ``{"scale": Σ log ‖W_l‖_F,
            "concentration": ½ Σ log c̄_l, "activation": Σ log L_φ, "other": …}``
            where ``c̄_l = σ̄_l²/‖W_l‖_F²``; ``None`` for graphs with adds / concatenations.
        head: name of the module producing the output when it is a Linear (used by
            :func:`~robustcompress.bound.certified_radius`).
        penultimate_K2, penultimate_Kinf, penultimate_Ainf: the constants of the head's input.
        units: a sentence on the units and the looseness of the bound.
    """

    K: float
    norm: float
    K2: float
    Kinf: float
    input_shape: tuple[int, ...]
    factors: list[NodeFactor] = field(default_factory=list)
    log_split: dict[str, float] | None = None
    head: str | None = None
    penultimate_K2: float | None = None
    penultimate_Kinf: float | None = None
    penultimate_Ainf: float | None = None
    units: str = ""


class TraceError(ValueError):
    """The model cannot be traced by :mod:`torch.fx` (data-dependent control flow, unsupported calls)."""


class _Tracer(fx.Tracer):
    # A module type with a rule of its own (exact type: a subclass may change forward) is one node.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_leaf(m) or type(m) in MODULE_RULES or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """The model traced by :mod:`torch.fx`; library layers and module types with a rule are kept as one node.

    Args:
        model: a network without data-dependent control flow.

    Returns:
        The graph module.

    Raises:
        TraceError: (a ``ValueError``) naming the tracing error when the model cannot be traced.

    Example:
        >>> [n.op for n in trace(nn.Sequential(nn.Linear(2, 2))).graph.nodes]
        ['placeholder', 'call_module', 'output']
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many types; the message is what the user needs
        raise TraceError(
            f"Could not trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); the bound needs a "
            "model without data-dependent control flow"
        ) from err
    return fx.GraphModule(model, graph)


class _ModelRunError(Exception):
    """The model itself failed on the sample input (not a rule)."""


class _BoundPass(fx.Interpreter):
    """Runs each node, records its shape without batch, then applies the node's rule: one pass."""

    def __init__(self, gm: fx.GraphModule, walk: Walk) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # keep the rules' messages as written
        self.walk = walk

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as err:
            raise _ModelRunError(f"{type(err).__name__}: {err}") from err
        if isinstance(out, torch.Tensor):
            n.meta[SHAPE_KEY] = tuple(int(s) for s in out.shape[1:])
        walk = self.walk
        if n.op in ("call_module", "call_function", "call_method") and walk.is_constant(n):
            walk.vals[n] = CONST
        else:
            rule_for(walk, n)(walk, n)
        return out


def _check_args(model: Any, input_shape: Any) -> tuple[int, ...]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    if isinstance(input_shape, int) or not isinstance(input_shape, (tuple, list, torch.Size)) or not input_shape or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape
    ):
        raise ValueError(f"Expected input_shape to be a non-empty sequence of positive ints (no batch dimension), "
                         f"but got input_shape={input_shape!r}")
    for name, m in model.named_modules():
        if is_batchnorm(m) and m.training:
            raise ValueError(
                f"BatchNorm {name!r} is in training mode: its output depends on the batch, so the network has no "
                "per-input Lipschitz bound; call model.eval() first"
            )
        if isinstance(m, DROPOUT_TYPES) and m.training and m.p > 0:
            raise ValueError(f"Dropout {name!r} is in training mode (random output); call model.eval() first")
    return tuple(int(s) for s in input_shape)


_UNITS = ("‖f(x+δ) − f(x)‖_2 ≤ K·‖δ‖ for inputs of shape {shape} in the units the model takes "
          "(a preprocessing outside the model changes K); a product of per-layer norms, so usually loose by "
          "orders of magnitude for deep networks — a certificate, not an estimate")


def lipschitz_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    norm: Any = 2,
    method: str = "auto",
    exact_threshold: int = EXACT_THRESHOLD,
) -> LipschitzBound:
    """Certified upper bound ``K`` of the Lipschitz constant of ``model`` at ``input_shape``.

    ``‖f(x+δ) − f(x)‖_2 ≤ K · ‖δ‖_norm``. Rules per node as in
    :mod:`robustcompress.bound.rules`; the composition takes products along
    chains and sums at adds, and gives every path from the input its own ∞→2
    first factor for ``K_∞``. BatchNorm must be in eval mode (folded into the
    preceding layer when that layer feeds only it), as must dropout.

    Args:
        model: an fx-traceable network taking one input tensor.
        input_shape: one input without the batch dimension, e.g. ``(3, 32, 32)``.
        norm: 2 or ``float("inf")`` (``"l2"``, ``"linf"`` accepted): the input norm of ``K``.
        method: per-layer method passed to :func:`~robustcompress.bound.layer_bound`.
        exact_threshold: entries up to which dense float64 svdvals are used.

    Returns:
        A :class:`LipschitzBound` (with both ``K2`` and ``Kinf``).

    Raises:
        NoLipschitzRuleError: (a ``ValueError``) naming the first node without a global rule.
        ValueError: for bad arguments, a model that cannot be traced or run, NaN / Inf weights (naming the layer).

    Example:
        >>> from robustcompress.models import MLP
        >>> b = lipschitz_bound(MLP(8, (6,), 3), (8,))
        >>> b.Kinf <= 8 ** 0.5 * b.K2 * (1 + 1e-5)
        True
    """
    norm = norm_arg(norm)
    input_shape = _check_args(model, input_shape)
    gm = trace(model)
    walk = Walk(gm, math.prod(input_shape), method, exact_threshold)
    p = next(iter(model.parameters()), None)
    sample = torch.zeros((1, *input_shape), dtype=p.dtype if p is not None else torch.float32,
                         device=p.device if p is not None else "cpu")
    try:
        with torch.no_grad():
            _BoundPass(gm, walk).run(sample)
    except _ModelRunError as err:
        raise ValueError(f"The model does not run on an input of shape (N, {', '.join(map(str, input_shape))}): "
                         f"{err}") from err.__cause__
    return _result(walk, input_shape, norm)


def _result(walk: Walk, input_shape: tuple[int, ...], norm: float) -> LipschitzBound:
    out = walk.out_node
    if out is None or walk.vals[out].const:
        raise ValueError("The model's output does not depend on its input")
    if not walk.any_linear:
        raise ValueError("The model has no eligible layer (Linear, Conv1d/2d, LowRankLinear, LowRankConv2d) to bound")
    v = walk.vals[out]
    kinf = min(v.kinf, math.sqrt(walk.n_in) * v.k2)
    if v.ainf is not None:
        kinf = min(kinf, math.sqrt(math.prod(walk.shape(out) or (1,))) * v.ainf)
    head, pen = None, (None, None, None)
    if out.op == "call_module" and can_be_head(walk.module(out)) and out not in walk.folded.values():
        a = [x for x in nodes_in((out.args, out.kwargs)) if not walk.vals[x].const][0]
        shape = walk.shape(a)
        if shape is not None and len(shape) == 1:
            head = out.target
            pen = (walk.vals[a].k2, walk.vals[a].kinf, walk.vals[a].ainf)
    return LipschitzBound(
        K=v.k2 if norm == 2 else kinf, norm=norm, K2=v.k2, Kinf=kinf, input_shape=input_shape, factors=walk.factors,
        log_split=dict(walk.split) if walk.chain else None, head=head, penultimate_K2=pen[0],
        penultimate_Kinf=pen[1], penultimate_Ainf=pen[2], units=_UNITS.format(shape=input_shape),
    )
