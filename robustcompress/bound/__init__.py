"""Certified Lipschitz upper bounds of a network, and certified radii (DESIGN §1.2–1.3).

``‖f(x+δ) − f(x)‖_2 ≤ K_p · ‖δ‖_p`` for every input ``x`` of the stated shape and
every ``δ``. The model is traced with :mod:`torch.fx`; every node gets a rule:

* linear layers (Linear, Conv1d/2d, LowRankLinear/LowRankConv2d as the product
  ``B·A``), folded with a following eval-mode BatchNorm as ``diag(s)·W``: a
  certified upper bound ``σ̄_1`` of the operator at the node's real input size;
* activations: their global Lipschitz constant ``L_φ`` (sup of ``|φ'|``);
* residual adds: the bounds add; ``torch.cat``: ``√(Σ K_i²)``;
* shape ops, dropout (eval), identity: 1; pooling: see :func:`pool_factor`;
* ``(x − μ)/σ`` with constant ``μ, σ``: ``1 / min |σ|``; an unfolded BatchNorm:
  ``max |γ|/√(var+ε)``;
* anything else (attention, LayerNorm, …): a :class:`NoLipschitzRuleError`
  (a ``ValueError``) naming the node.

Per node three numbers are carried: ``K2`` (ℓ2→ℓ2), ``Kinf`` (ℓ∞ input → ℓ2
node output) and, while the node is still an entrywise / coordinate map of the
input, ``Ainf`` (ℓ∞→ℓ∞). The first linear layer on each path from the input
uses its ∞→2 bound ``min(√(Σ_i ‖w_i‖_1²), √n·σ̄_1)`` times ``Ainf`` of its
argument; a path that reaches the output with no linear layer costs
``√n · Ainf`` (``Kinf`` of the input node is ``√n``). So
``K_∞ = ‖W_1‖_{∞→2} · L_φ · Π σ̄(W_l)`` for a plain chain.

Rounding: every certified number is computed in float64 and multiplied by
``1 + ROUNDING_MARGIN`` (``1e-6``), far above the backward error of the
float64 SVD / FFT / Gram products used (``≲ 1e-12`` relative). NaN / Inf
weights are an error naming the layer, never a ``nan`` bound.

The package, one concept per module:

* :mod:`~robustcompress.bound.matrix` — certified matrix norms (exact float64
  ``svdvals``, Gram iteration) and the rounding margin;
* :mod:`~robustcompress.bound.layer_facts` — every fact about layer kinds the
  bound uses (which modules are linear layers, their float64 operator view,
  BatchNorm folding, which layer can be the head);
* :mod:`~robustcompress.bound.norms` — certified norms of one layer (exact,
  Gram, Fourier symbol, ``√c·σ_1``), its ∞→2 bound, a power-iteration estimate;
* :mod:`~robustcompress.bound.activations` and :mod:`~robustcompress.bound.pooling`
  — constants of activations and pooling;
* :mod:`~robustcompress.bound.walk` — what is carried from node to node;
* :mod:`~robustcompress.bound.rules` — the rule tables;
* :mod:`~robustcompress.bound.graph` — :func:`lipschitz_bound`, one pass over the graph;
* :mod:`~robustcompress.bound.radius` — :func:`certified_radius`;
* :mod:`~robustcompress.bound.capture` — where certification stops on models
  torch.fx cannot trace (captured with ``torch.export``).

Adding a rule is one table entry in :mod:`robustcompress.bound.rules`:
``MODULE_RULES[ModuleType]``, ``FUNCTION_RULES[function]`` or
``METHOD_RULES["method_name"]`` maps to ``rule(walk, node)``; an activation
with a global constant needs only an entry in
``activations.ACTIVATION_LIPSCHITZ`` (module, exact type) plus
``rules.MODULE_RULES[T] = rules.activation_module_rule``, or
``activations.FUNCTIONAL_ACTIVATIONS`` plus
``rules.FUNCTION_RULES[f] = rules.activation_function_rule``. For example, a
module computing ``g·sin(x)`` (Lipschitz constant ``|g|``; ``torch.sin`` alone has no rule):

    >>> import torch
    >>> from torch import nn
    >>> from robustcompress.bound import rules
    >>> class Gain(nn.Module):
    ...     def __init__(self, gain):
    ...         super().__init__()
    ...         self.gain = gain
    ...     def forward(self, x):
    ...         return self.gain * torch.sin(x)
    >>> rules.MODULE_RULES[Gain] = lambda walk, node: walk.elementwise(
    ...     node, abs(walk.module(node).gain), "activation", "activation")
    >>> model = nn.Sequential(nn.Linear(4, 4, bias=False), Gain(3.0))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.eye(4))
    >>> round(lipschitz_bound(model, (4,)).K2, 4)
    3.0
    >>> del rules.MODULE_RULES[Gain]

A module type with an entry is traced as one node (its ``forward`` is not
looked into), so the rule must hold for its whole ``forward``.

Example:
    >>> model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU())
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(2 * torch.eye(4))
    >>> round(lipschitz_bound(model, (4,)).K, 5)
    2.0
"""

from __future__ import annotations

from .activations import ACTIVATION_LIPSCHITZ, activation_lipschitz
from .graph import LipschitzBound, TraceError, lipschitz_bound
from .matrix import EXACT_THRESHOLD, ROUNDING_MARGIN, gram_iteration_bound, matrix_norm_bound
from .norms import conv_fourier_bound, conv_matrix_bound, inf_to_2_bound, layer_bound, operator_frobenius, power_sigma
from .pooling import pool_factor
from .radius import certified_radius
from .walk import NodeFactor, NoLipschitzRuleError

__all__ = [
    "ROUNDING_MARGIN",
    "EXACT_THRESHOLD",
    "ACTIVATION_LIPSCHITZ",
    "activation_lipschitz",
    "gram_iteration_bound",
    "matrix_norm_bound",
    "conv_fourier_bound",
    "conv_matrix_bound",
    "layer_bound",
    "inf_to_2_bound",
    "power_sigma",
    "operator_frobenius",
    "pool_factor",
    "NodeFactor",
    "NoLipschitzRuleError",
    "LipschitzBound",
    "TraceError",
    "lipschitz_bound",
    "certified_radius",
]
