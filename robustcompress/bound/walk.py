"""What the bound carries from node to node of a traced graph, and the error for a node without a rule.

Per node three numbers are carried (:class:`Val`): ``k2`` (ℓ2 input → ℓ2 node
output), ``kinf`` (ℓ∞ input → ℓ2 node output) and, while the node is still an
entrywise / coordinate map of the input, ``ainf`` (ℓ∞ → ℓ∞). A node that does
not depend on the input is a constant (:data:`CONST`). :class:`Walk` holds these
per node, the :class:`NodeFactor` records, the ``log K_2`` split, and the
helpers rules share (:meth:`Walk.only_var`, :meth:`Walk.elementwise`, …). A rule
(see :mod:`robustcompress.bound.rules`) reads its node's inputs from the walk and
writes its node's :class:`Val`.

Example:
    >>> Val(2.0, 3.0, None).k2, CONST.const
    (2.0, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .matrix import EXACT_THRESHOLD

__all__ = ["Val", "CONST", "NodeFactor", "NoLipschitzRuleError", "Walk", "nodes_in", "SHAPE_KEY"]

#: ``node.meta`` key of a tensor node's shape without the batch dimension.
SHAPE_KEY = "robustcompress_shape"


@dataclass
class Val:
    """Lipschitz constants of one node's output as a function of the network input.

    Attributes:
        k2: ℓ2 → ℓ2; kinf: ℓ∞ → ℓ2; ainf: ℓ∞ → ℓ∞ while the node is an entrywise map of the
            input (else ``None``); const: the node does not depend on the input.
    """

    k2: float
    kinf: float
    ainf: float | None
    const: bool = False


#: The value of a node that does not depend on the input.
CONST = Val(0.0, 0.0, 0.0, True)


@dataclass(frozen=True)
class NodeFactor:
    """The rule applied at one graph node.

    Attributes:
        node: the fx node name; ``target`` the module name or function.
        kind: ``"linear"``, ``"activation"``, ``"pool"``, ``"bn"``, ``"scale"``,
            ``"add"``, ``"cat"``, ``"shape"``, ``"input"``, ``"const"``.
        factor: the ℓ2 Lipschitz factor applied (``None`` for adds / cat / shape ops).
        inf_to_2: for a linear node reached from the input through entrywise maps only,
            its ∞→2 bound.
        frobenius: ``‖W‖_F`` of the (folded) operator, linear nodes only.
        input_shape: the node's input shape (no batch), linear and pooling nodes.
        note: e.g. ``"folded bn1"``.
    """

    node: str
    target: str
    kind: str
    factor: float | None = None
    inf_to_2: float | None = None
    frobenius: float | None = None
    input_shape: tuple[int, ...] | None = None
    note: str = ""


class NoLipschitzRuleError(ValueError):
    """A graph node that has no global Lipschitz rule (attention, LayerNorm, a product of two inputs, …).

    Attributes:
        node: the graph node's name; target: its module name, function or method name;
        module_type: the module's type name for a module node, else ``None``.
    """

    def __init__(self, message: str, node: str, target: str, module_type: str | None = None) -> None:
        super().__init__(message)
        self.node, self.target, self.module_type = node, target, module_type


def nodes_in(a: Any) -> list[fx.Node]:
    """The graph nodes inside an argument structure (args, kwargs, nested tuples).

    Example:
        >>> g = fx.Graph(); x = g.placeholder("x")
        >>> [n.name for n in nodes_in(((x, 1), {"k": x}))]
        ['x', 'x']
    """
    out: list[fx.Node] = []
    fx.node.map_arg(a, lambda n: out.append(n))
    return out


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


class Walk:
    """The bound's state over one traced graph: per-node values, factors, folds and the ``log K_2`` split.

    Args:
        gm: the traced graph module.
        n_in: number of input entries (an identity path from the input costs ``√n_in`` in ``K_∞``).
        method, exact_threshold: per-layer bound options (see :func:`~robustcompress.bound.layer_bound`).

    Example:
        >>> walk = Walk(fx.symbolic_trace(nn.ReLU()), n_in=4)
        >>> walk.chain, walk.split["scale"]
        (True, 0.0)
    """

    def __init__(self, gm: fx.GraphModule, n_in: int, method: str = "auto",
                 exact_threshold: int = EXACT_THRESHOLD) -> None:
        self.gm = gm
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.n_in = n_in
        self.method = method
        self.exact_threshold = exact_threshold
        self.vals: dict[fx.Node, Val] = {}
        self.factors: list[NodeFactor] = []
        self.folded: dict[fx.Node, fx.Node] = {}  # BatchNorm node -> the linear node it folds into
        self.split = {"scale": 0.0, "concentration": 0.0, "activation": 0.0, "other": 0.0}
        self.chain = True  # no adds / concatenations of two input-dependent tensors
        self.any_linear = False
        self.inputs_seen = 0
        self.out_node: fx.Node | None = None

    def module(self, node: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self.modules[node.target]

    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...] | None:
        """The node's tensor shape without batch, as recorded while the graph ran (``None`` if not a tensor)."""
        return node.meta.get(SHAPE_KEY)

    def describe(self, node: fx.Node) -> str:
        """A phrase naming the node for error messages: module name and type, or function and node name."""
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.modules[node.target]).__name__})"
        if node.op == "call_function":
            return f"function {getattr(node.target, '__name__', node.target)!r} (node {node.name!r})"
        return f"{node.op} {node.target!r} (node {node.name!r})"

    def no_rule(self, node: fx.Node, why: str = "") -> NoLipschitzRuleError:
        """The error for a node without a global Lipschitz rule (``why`` replaces the generic reason)."""
        why = why or ("it is not a supported layer, activation, pooling, normalisation, residual add or shape op "
                      "(attention, LayerNorm and the like have no global bound)")
        mtype = type(self.modules[node.target]).__name__ if node.op == "call_module" else None
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return NoLipschitzRuleError(f"No Lipschitz rule for {self.describe(node)}: {why}", node.name, target, mtype)

    def is_constant(self, node: fx.Node) -> bool:
        """Whether no input of the node depends on the network input."""
        return all(self.vals[a].const for a in nodes_in((node.args, node.kwargs)))

    def only_var(self, node: fx.Node) -> tuple[fx.Node, Val]:
        """The one input of ``node`` that depends on the network input, and its value."""
        var = [a for a in nodes_in((node.args, node.kwargs)) if not self.vals[a].const]
        if len(var) != 1:
            raise self.no_rule(node, f"it takes {len(var)} inputs that depend on the network input; only one is "
                                     "supported here")
        return var[0], self.vals[var[0]]

    def record(self, node: fx.Node, val: Val, factor: NodeFactor, split_key: str | None = None,
               log_factor: float = 0.0) -> None:
        """Store the node's value and factor, adding ``log_factor`` to ``split[split_key]``."""
        if not (math.isfinite(val.k2) and math.isfinite(val.kinf)):
            raise ValueError(f"The Lipschitz bound overflows float64 at {self.describe(node)} (K2 = {val.k2}, "
                             f"Kinf = {val.kinf}): the per-layer norms multiply to more than 1.8e308")
        self.vals[node] = val
        self.factors.append(factor)
        if split_key:
            self.split[split_key] += log_factor

    def elementwise(self, node: fx.Node, factor: float, kind: str, split_key: str | None, note: str = "",
                    factor_inf: float | None = None) -> None:
        """A map of the node's one input with ℓ2 factor ``factor`` (ℓ∞→ℓ∞ ``factor_inf``, default the same)."""
        _, v = self.only_var(node)
        finf = factor if factor_inf is None else factor_inf
        val = Val(v.k2 * factor, v.kinf * factor, None if v.ainf is None else v.ainf * finf)
        self.record(node, val, NodeFactor(node.name, str(node.target), kind, factor, note=note), split_key,
                    _log(factor))

    def const_value(self, a: Any, node: fx.Node) -> torch.Tensor:
        """A constant operand (a number, or a buffer / parameter read by ``get_attr``) in float64."""
        t: Any = None
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            t = torch.tensor(float(a), dtype=torch.float64)
        elif isinstance(a, fx.Node) and a.op == "get_attr":
            obj: Any = self.gm
            for part in a.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor):
                t = obj.detach().to("cpu", torch.float64)
        if t is None:
            raise self.no_rule(node, "a product or quotient needs a constant operand (a number or a buffer / "
                                     "parameter), since a product of two inputs has no global Lipschitz bound")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{self.describe(node)} uses a constant operand with NaN or Inf entries: no bound")
        return t

    @staticmethod
    def log(x: float) -> float:
        """``log x``, ``-inf`` at 0 (a zero layer)."""
        return _log(x)
