"""Lipschitz rules of graph nodes, as tables keyed the way torch.fx names what a node calls.

A rule is a function ``rule(walk, node)`` that reads the values of the node's
inputs from the :class:`~robustcompress.bound.walk.Walk` and records the node's
own (:meth:`Walk.record` or :meth:`Walk.elementwise`). Four tables, one per node
kind, as torch.fx's ``Interpreter`` has one method per kind:

* ``OP_RULES`` — ``placeholder``, ``get_attr``, ``output``;
* ``MODULE_RULES`` — keyed by module type (looked up along the type's MRO, so a
  subclass of ``nn.Linear`` gets the Linear rule);
* ``FUNCTION_RULES`` — keyed by the function (``F.relu``, ``operator.add``, …);
* ``METHOD_RULES`` — keyed by the tensor method's name (``"view"``, ``"relu"``, …).

A node whose inputs are all constant is constant and needs no rule; any
other node without an entry raises :class:`~robustcompress.bound.walk.NoLipschitzRuleError`
— never skipped.

Adding a rule is one table entry. For an activation with a known constant,
an entry in :mod:`robustcompress.bound.activations` is enough; otherwise::

    from robustcompress.bound import rules

    rules.MODULE_RULES[MyScale] = lambda walk, node: walk.elementwise(
        node, walk.module(node).max_gain, "scale", "other")

``walk.elementwise(node, factor, kind, split_key)`` covers every map of one
input with a global factor; see :func:`add_rule` and :func:`linear_rule` for
rules that combine inputs or bound a layer.

Example:
    >>> rule_kind(nn.ReLU), rule_kind(torch.flatten), rule_kind("view")
    ('activation', 'shape', 'shape')
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .activations import (
    ACTIVATION_LIPSCHITZ,
    FUNCTIONAL_ACTIVATIONS,
    FUNCTIONAL_ARGNAMES,
    METHOD_ACTIVATIONS,
    activation_lipschitz,
)
from ..layers import BATCHNORM_TYPES
from .layer_facts import bound_kind, bn_folds_into, bn_scale, is_batchnorm, layer_view
from .matrix import round_up
from .norms import inf_to_2_bound, layer_bound, operator_frobenius
from .pooling import POOL_FUNCTIONS, POOL_MODULES, pool_factor
from .walk import CONST, NodeFactor, Val, Walk, nodes_in

__all__ = ["Rule", "DROPOUT_TYPES", "OP_RULES", "KIND_RULES", "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES", "TABLES",
           "rule_for", "rule_kind", "linear_rule", "add_rule"]

#: ``rule(walk, node)``: records the node's value in the walk.
Rule = Callable[[Walk, fx.Node], None]

#: Dropout modules: the identity in eval mode (a model in training mode is refused up front).
DROPOUT_TYPES: tuple[type, ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


# ---------------------------------------------------------------------------- node kinds


def input_rule(walk: Walk, node: fx.Node) -> None:
    """The network input: ``K_2 = 1``, ``K_∞ = √n`` (``‖δ‖_2 ≤ √n‖δ‖_∞``), ``A_∞ = 1``."""
    walk.inputs_seen += 1
    if walk.inputs_seen > 1:
        raise ValueError(f"The bound supports models with one input, but the model also takes {node.target!r}")
    walk.record(node, Val(1.0, walk.n_in ** 0.5, 1.0), NodeFactor(node.name, str(node.target), "input", 1.0))


def const_rule(walk: Walk, node: fx.Node) -> None:
    """A value that does not depend on the input (parameters, buffers, sizes)."""
    walk.vals[node] = CONST


def output_rule(walk: Walk, node: fx.Node) -> None:
    """The graph output: one tensor."""
    outs = nodes_in(node.args)
    if len(outs) != 1:
        raise ValueError("The bound supports models with one tensor output")
    walk.out_node = outs[0]


# ---------------------------------------------------------------------------- modules


def linear_rule(walk: Walk, node: fx.Node) -> None:
    """A linear layer: ``K ← σ̄_1·K`` at the layer's input size, a sole following eval BatchNorm folded in.

    The first linear layer on a path from the input also gets its ∞→2 bound
    (``K_∞ ≤ ‖W‖_{∞→2}·A_∞``).
    """
    mod = walk.module(node)
    walk.any_linear = True
    a, v = walk.only_var(node)
    shape = walk.shape(a)
    bn, bn_name = None, ""
    users = list(node.users)
    if (bn_folds_into(mod, walk.shape(node)) and len(users) == 1 and users[0].op == "call_module"
            and is_batchnorm(walk.module(users[0]))):
        bn, bn_name = walk.module(users[0]), users[0].target
        bn_scale(bn, bn_name)  # a clear error naming the BatchNorm for a bad scale
        walk.folded[users[0]] = node
    layer_view(mod, None, node.target)  # a clear error naming the layer for NaN / Inf weights
    sig = layer_bound(mod, shape, walk.method, bn, walk.exact_threshold)
    fro = operator_frobenius(mod, shape, bn)
    i2 = None
    kinf = sig * v.kinf
    if v.ainf is not None:
        i2 = inf_to_2_bound(mod, shape, bn, sigma_bound=sig)
        kinf = min(kinf, i2 * v.ainf)
    note = f"folded {bn_name}" if bn is not None else ""
    walk.record(node, Val(sig * v.k2, kinf, None),
                NodeFactor(node.name, node.target, "linear", sig, i2, fro, shape, note))
    walk.split["scale"] += walk.log(fro)
    walk.split["concentration"] += 0.5 * (2 * walk.log(sig) - 2 * walk.log(fro)) if fro > 0 else -float("inf")


def batchnorm_rule(walk: Walk, node: fx.Node) -> None:
    """An eval BatchNorm: folded into the layer before it (factor 1 here), else ``max |γ|/√(var+ε)``."""
    if node in walk.folded:
        lin = walk.folded[node]
        walk.record(node, walk.vals[lin],
                    NodeFactor(node.name, node.target, "bn", 1.0, note=f"folded into {lin.target}"))
        return
    s = float(bn_scale(walk.module(node), node.target).abs().max())
    walk.elementwise(node, round_up(s), "bn", "other", "not folded: max |γ|/√(var+ε)")


def identity_rule(walk: Walk, node: fx.Node) -> None:
    """Shape ops, identity, eval-mode dropout: factor 1."""
    walk.elementwise(node, 1.0, "shape", None)


def activation_module_rule(walk: Walk, node: fx.Node) -> None:
    """An activation module: its global constant ``sup |φ'|`` (exact type, or a known parametrised one)."""
    try:
        lip = activation_lipschitz(walk.module(node))
    except ValueError:
        raise walk.no_rule(node) from None
    walk.elementwise(node, lip, "activation", "activation")


def pool_module_rule(walk: Walk, node: fx.Node) -> None:
    """A pooling module at its input size (:func:`~robustcompress.bound.pool_factor`)."""
    a, _ = walk.only_var(node)
    f2, finf = pool_factor(walk.module(node), walk.shape(a))
    walk.elementwise(node, f2, "pool", "other", factor_inf=finf)
    walk.factors[-1] = NodeFactor(node.name, node.target, "pool", f2, input_shape=walk.shape(a))


# ---------------------------------------------------------------------------- functions and methods


def activation_function_rule(walk: Walk, node: fx.Node) -> None:
    """An activation function with its arguments (``F.leaky_relu(x, 0.2)``)."""
    kw = dict(zip(FUNCTIONAL_ARGNAMES.get(node.target, ()), node.args[1:]))
    kw.update(node.kwargs)
    walk.elementwise(node, activation_lipschitz(node.target, **kw), "activation", "activation")


def activation_method_rule(walk: Walk, node: fx.Node) -> None:
    """``x.relu()`` and the like."""
    walk.elementwise(node, METHOD_ACTIVATIONS[node.target], "activation", "activation")


def dropout_function_rule(walk: Walk, node: fx.Node) -> None:
    """``F.dropout(x, p, training)``: factor 1 when not training."""
    kw = dict(zip(("p", "training", "inplace"), node.args[1:]))
    kw.update(node.kwargs)
    if kw.get("training", True) and kw.get("p", 0.5) > 0:
        raise ValueError(f"{walk.describe(node)} runs in training mode (random output); "
                         "call model.eval() / pass training=self.training")
    identity_rule(walk, node)


def getitem_rule(walk: Walk, node: fx.Node) -> None:
    """Basic indexing (ints, slices) selects coordinates: factor 1."""
    idx = node.args[1]
    flat = idx if isinstance(idx, tuple) else (idx,)
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in flat):
        raise walk.no_rule(node, "only basic indexing (ints, slices) is supported")
    identity_rule(walk, node)


def pool_function_rule(walk: Walk, node: fx.Node) -> None:
    """A pooling function with its arguments at its input size."""
    a, _ = walk.only_var(node)
    f2, finf = pool_factor(node.target, walk.shape(a), *node.args[1:], **node.kwargs)
    walk.elementwise(node, f2, "pool", "other", factor_inf=finf)
    walk.factors[-1] = NodeFactor(node.name, getattr(node.target, "__name__", str(node.target)), "pool", f2)


def add_rule(walk: Walk, node: fx.Node) -> None:
    """``a + α·b`` (or ``−``): the constants add, ``K = K_a + |α|·K_b`` (a constant operand adds 0)."""
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, fx.Node):
        raise walk.no_rule(node, "a tensor-valued alpha is not supported")
    k2 = kinf = 0.0
    ainf: float | None = 0.0
    variable = 0
    for i, a in enumerate(node.args[:2]):
        if not isinstance(a, fx.Node) or walk.vals[a].const:
            continue
        variable += 1
        v = walk.vals[a]
        w = abs(float(alpha)) if i == 1 else 1.0
        k2 += w * v.k2
        kinf += w * v.kinf
        ainf = None if (ainf is None or v.ainf is None) else ainf + w * v.ainf
    if variable > 1:
        walk.chain = False
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    walk.record(node, Val(round_up(k2), round_up(kinf), None if ainf is None else round_up(ainf)),
                NodeFactor(node.name, target, "add"))


def neg_rule(walk: Walk, node: fx.Node) -> None:
    """``−x``: factor 1."""
    walk.elementwise(node, 1.0, "scale", None)


def _scale(walk: Walk, node: fx.Node, divide: bool) -> None:
    lhs, rhs = node.args[0], node.args[1]
    lhs_var = isinstance(lhs, fx.Node) and not walk.vals[lhs].const
    rhs_var = isinstance(rhs, fx.Node) and not walk.vals[rhs].const
    if lhs_var and rhs_var:
        raise walk.no_rule(node, "it multiplies two input-dependent tensors: no global Lipschitz bound")
    if divide:
        if not lhs_var or node.kwargs.get("rounding_mode") is not None:
            raise walk.no_rule(node, "only division of the input by a constant is supported")
        c = float(walk.const_value(rhs, node).abs().min())
        if c == 0:
            raise ValueError(f"{walk.describe(node)} divides by zero")
        factor = round_up(1.0 / c)
    else:
        factor = round_up(float(walk.const_value(rhs if lhs_var else lhs, node).abs().max()))
    walk.elementwise(node, factor, "scale", "other", "constant scale (input normalisation)")


def mul_rule(walk: Walk, node: fx.Node) -> None:
    """``x · c`` with a constant ``c``: factor ``max |c|``."""
    _scale(walk, node, divide=False)


def div_rule(walk: Walk, node: fx.Node) -> None:
    """``x / c`` with a constant ``c``: factor ``1 / min |c|`` (input normalisation)."""
    _scale(walk, node, divide=True)


def cat_rule(walk: Walk, node: fx.Node) -> None:
    """``torch.cat``: ``K = √(Σ K_i²)``."""
    parts = [walk.vals[a] for a in nodes_in(node.args[0] if node.args else node.kwargs["tensors"])]
    k2 = sum(v.k2**2 for v in parts) ** 0.5
    kinf = sum(v.kinf**2 for v in parts) ** 0.5
    ainf = None if any(v.ainf is None for v in parts) else max(v.ainf for v in parts)
    walk.chain = False
    walk.record(node, Val(round_up(k2), round_up(kinf), ainf), NodeFactor(node.name, "cat", "cat"))


def mean_rule(walk: Walk, node: fx.Node) -> None:
    """A mean over axes: an average, factor ≤ 1."""
    walk.elementwise(node, 1.0, "pool", None, "mean ≤ 1")


# ---------------------------------------------------------------------------- tables

#: Rules per node kind that calls nothing.
OP_RULES: dict[str, Rule] = {"placeholder": input_rule, "get_attr": const_rule, "output": output_rule}

#: Rules per layer kind of the registry, as :func:`~robustcompress.bound.layer_facts.bound_kind` names it
#: (looked up before :data:`MODULE_RULES`).
KIND_RULES: dict[str, Rule] = {"linear": linear_rule, "conv": linear_rule}

#: Rules per module type (looked up along the MRO).
MODULE_RULES: dict[type, Rule] = {
    **{t: batchnorm_rule for t in BATCHNORM_TYPES},
    **{t: activation_module_rule for t in (*ACTIVATION_LIPSCHITZ, nn.LeakyReLU, nn.ELU, nn.GELU)},
    **{t: pool_module_rule for t in POOL_MODULES},
    **{t: identity_rule for t in (nn.Flatten, nn.Unflatten, nn.Identity, *DROPOUT_TYPES)},
}

#: Rules per function.
FUNCTION_RULES: dict[Callable, Rule] = {
    **{f: activation_function_rule for f in FUNCTIONAL_ACTIVATIONS},
    **{f: dropout_function_rule for f in (F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout)},
    **{f: identity_rule for f in (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                                  torch.unsqueeze, torch.clone, torch.t, torch.unflatten)},
    operator.getitem: getitem_rule,
    **{f: pool_function_rule for f in POOL_FUNCTIONS},
    **{f: add_rule for f in (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub)},
    operator.neg: neg_rule,
    **{f: mul_rule for f in (operator.mul, operator.imul, torch.mul)},
    **{f: div_rule for f in (operator.truediv, operator.itruediv, torch.div)},
    torch.cat: cat_rule,
    torch.concat: cat_rule,
    torch.mean: mean_rule,
    getattr: const_rule,
    len: const_rule,
}

#: Rules per tensor method name.
METHOD_RULES: dict[str, Rule] = {
    **{m: const_rule for m in ("size", "dim", "numel")},
    **{m: identity_rule for m in ("view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze",
                                  "unsqueeze", "clone", "detach", "t", "view_as", "unflatten")},
    **{m: activation_method_rule for m in METHOD_ACTIVATIONS},
    **{m: add_rule for m in ("add", "add_", "sub", "sub_")},
    "mean": mean_rule,
}

#: The tables by ``node.op``.
TABLES: dict[str, dict] = {"call_module": MODULE_RULES, "call_function": FUNCTION_RULES, "call_method": METHOD_RULES}

_KINDS = {linear_rule: "linear", batchnorm_rule: "bn", activation_module_rule: "activation",
          pool_module_rule: "pool", identity_rule: "shape", activation_function_rule: "activation",
          activation_method_rule: "activation", dropout_function_rule: "shape", getitem_rule: "shape",
          pool_function_rule: "pool", add_rule: "add", neg_rule: "scale", mul_rule: "scale", div_rule: "scale",
          cat_rule: "cat", mean_rule: "pool", const_rule: "const"}


def _lookup(key: object) -> Rule | None:
    if isinstance(key, nn.Module):
        kind = bound_kind(key)
        return KIND_RULES[kind] if kind is not None else _lookup(type(key))
    if isinstance(key, type):
        return next((MODULE_RULES[t] for t in key.__mro__ if t in MODULE_RULES), None)
    if isinstance(key, str):
        return METHOD_RULES.get(key)
    try:
        return FUNCTION_RULES.get(key)
    except TypeError:  # an unhashable target
        return None


def rule_for(walk: Walk, node: fx.Node) -> Rule:
    """The rule of a graph node, or :class:`~robustcompress.bound.walk.NoLipschitzRuleError` naming it.

    Args:
        walk: the walk over the node's graph; node: a graph node.

    Returns:
        The rule.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.LayerNorm(3)))
        >>> node = list(gm.graph.nodes)[1]
        >>> rule_for(Walk(gm, 3), node)
        Traceback (most recent call last):
        ...
        robustcompress.bound.walk.NoLipschitzRuleError: No Lipschitz rule for module '0' (LayerNorm): ...
    """
    if node.op in OP_RULES:
        return OP_RULES[node.op]
    key = walk.module(node) if node.op == "call_module" else node.target
    rule = _lookup(key) if node.op in TABLES else None
    if rule is None:
        raise walk.no_rule(node)
    return rule


def rule_kind(key: object) -> str | None:
    """The kind of factor (``"linear"``, ``"activation"``, …) a module, module type, function or method name gets.

    Args:
        key: a module (layers are looked up by their registry kind), a module type, a function, or a tensor
            method's name.

    Returns:
        The kind, or ``None`` when there is no rule.

    Example:
        >>> rule_kind(nn.Linear(2, 2)), rule_kind(nn.LayerNorm)
        ('linear', None)
    """
    rule = _lookup(key)
    return None if rule is None else _KINDS.get(rule, "custom")
