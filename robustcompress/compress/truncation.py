"""Rank truncation: replace layers by their best rank-``r`` factorisation ``W ≈ B·A``.

Linear / Conv2d layers (and transformers' ``Conv1D``, whose operator is ``Wᵀ``)
become :class:`~robustcompress.layers.LowRankLinear` /
:class:`~robustcompress.layers.LowRankConv2d` (Eckart–Young: the error
``‖W − B·A‖_F² = Σ_{j>r} σ_j²`` is the smallest any rank-``r`` matrix
reaches), ``r`` per layer from an energy threshold, a fixed rank, or a global
parameter budget. A layer is factorised only when ``r·(m + n) < m·n``: truncation
never makes a layer larger; the layers left dense are reported in a warning.

Example:
    >>> small = truncate(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)), rank=4)
    >>> type(small[0]).__name__
    'LowRankLinear'
"""

from __future__ import annotations

import copy
import heapq
import warnings
from typing import Mapping, Sequence

import torch
from torch import nn

from .._checks import bool_arg, fraction, module_arg, positive_int
from ..layers import LowRankLinear, head_name, to_low_rank
from ..metrics import rank_for_energy
from ._common import mask_hooks, set_submodule
from ._kinds import is_conv1d_transposed, is_truncatable_kind, operator_matrix, truncation_refusal

__all__ = ["truncate", "ranks_for_budget"]


def _truncation_layers(model: nn.Module, layers: Sequence[str] | None, exclude_head: bool
                       ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The chosen layers, and the default-chosen ones that cannot be factorised with the reason."""
    named = dict(model.named_modules())
    head = head_name(model) if exclude_head else None

    def in_head(n: str) -> bool:
        # The head and anything inside it (e.g. the base layer of a LoRA-wrapped head).
        return head is not None and (n == head or n.startswith(head + "."))

    if layers is None:
        kinds = {n: m for n, m in named.items() if is_truncatable_kind(m) and not in_head(n)}
        refused = {n: r for n, m in kinds.items() if (r := truncation_refusal(n, m)) is not None}
        return {n: m for n, m in kinds.items() if n not in refused}, refused
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise TypeError(f"Expected layers to be a sequence of layer names, but got layers={layers!r}")
    out = {}
    for n in layers:
        if n not in named:
            raise ValueError(f"Unknown layer {n!r}; Linear/Conv2d/Conv1D layers: "
                             f"{[k for k, m in named.items() if is_truncatable_kind(m)]}")
        reason = truncation_refusal(n, named[n])
        if reason is not None:
            raise ValueError(reason)
        if in_head(n):
            raise ValueError(f"Layer {n!r} is (inside) the classifier head {head!r}; pass exclude_head=False to "
                             "truncate it too")
        out[n] = named[n]
    return out, {}


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    m, n = operator_matrix(module).shape
    return int(m), int(n)


def _saves(shape: tuple[int, int], r: int) -> bool:
    """Whether rank-``r`` factors ``r·(m + n)`` hold fewer weights than the dense ``m·n``."""
    m, n = shape
    return r * (m + n) < m * n


def _svdvals(module: nn.Module) -> torch.Tensor:
    return torch.linalg.svdvals(operator_matrix(module).detach().double())


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def ranks_for_budget(model: nn.Module, budget: float, layers: Sequence[str] | None = None,
                     exclude_head: bool = True) -> dict[str, int]:
    """Per-layer ranks that keep at most ``budget`` of the model's parameters, by greedy energy per parameter.

    A layer ``m × n`` at rank ``r`` costs ``r·(m + n)`` weights while that is
    below ``m·n``, else it stays dense (``m·n``, full rank). Every layer starts
    at rank 1; then singular values are added in decreasing order of
    ``(σ_{l,j}² / ‖W_l‖_F²) / (m_l + n_l)`` — relative energy per parameter, so
    the rescaling of a layer changes nothing — as long as the total stays
    within ``budget · (all parameters of the model)``.

    Args:
        model: the network.
        budget: fraction of the model's parameters to keep, in (0, 1].
        layers: the layers to factorise (default: every Linear/Conv2d but the head).
        exclude_head: leave the classifier head dense.

    Returns:
        ``{layer name: rank}``; a rank equal to ``min(m, n)`` means "stays dense".

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> ranks_for_budget(model, 0.5)['0'] < 64
        True
    """
    model = module_arg(model)
    budget = fraction(budget, "budget", closed_right=True)
    if budget == 0:
        raise ValueError("Expected budget to lie in (0, 1], but got budget=0")
    chosen, _ = _truncation_layers(model, layers, exclude_head)
    total = _unique_params(model)
    limit = budget * total
    shapes = {n: _matrix_shape(m) for n, m in chosen.items()}
    sig2 = {n: _svdvals(m).square() for n, m in chosen.items()}

    def cost(name: str, r: int) -> int:
        m, n = shapes[name]
        return r * (m + n) if r < min(m, n) and r * (m + n) < m * n else m * n

    ranks = {n: 1 for n in chosen}
    used = total - sum(shapes[n][0] * shapes[n][1] for n in chosen) + sum(cost(n, 1) for n in chosen)
    if used > limit:
        raise ValueError(f"budget={budget} is below the smallest reachable share {used / total:.4g} "
                         "(every chosen layer at rank 1 and the other parameters kept)")
    heap = []
    for n in chosen:
        if cost(n, 1) == shapes[n][0] * shapes[n][1]:  # already dense at rank 1
            ranks[n] = min(shapes[n])
            continue
        if len(sig2[n]) > 1:
            tot = float(sig2[n].sum()) or 1.0
            heapq.heappush(heap, (-float(sig2[n][1]) / tot / sum(shapes[n]), n))
    while heap:
        _, n = heapq.heappop(heap)
        r = ranks[n] + 1
        extra = cost(n, r) - cost(n, ranks[n])
        if used + extra > limit:
            continue  # this layer cannot grow any more; the others may
        used += extra
        m_, n_ = shapes[n]
        if cost(n, r) == m_ * n_:
            ranks[n] = min(m_, n_)
            continue
        ranks[n] = r
        if r < len(sig2[n]):
            tot = float(sig2[n].sum()) or 1.0
            heapq.heappush(heap, (-float(sig2[n][r]) / tot / (m_ + n_), n))
    return ranks


def truncate(
    model: nn.Module,
    *,
    energy: float | None = None,
    rank: int | Mapping[str, int] | None = None,
    budget: float | None = None,
    layers: Sequence[str] | None = None,
    exclude_head: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Replace Linear / Conv2d / Conv1D layers by their best rank-``r`` factorisation ``W ≈ B·A``.

    Exactly one of:

    * ``energy``: per layer the smallest ``r`` with ``Σ_{j≤r} σ_j² ≥ energy · Σ_j σ_j²``
      (float64 singular values of the matrix view ``out × (in·kh·kw)``);
    * ``rank``: one rank for every chosen layer, or ``{name: rank}``;
    * ``budget``: a global parameter budget (fraction of the model's parameters
      kept), ranks from :func:`ranks_for_budget`.

    A layer is factorised only when ``r·(m + n) < m·n`` (fewer weights than
    dense); the others stay dense, and those whose rank is below ``min(m, n)``
    — or, by default, that are of a factorisable kind but cannot be (grouped
    convolutions) — are listed in a ``UserWarning``. The factorised ones
    become :class:`~robustcompress.layers.LowRankLinear` /
    :class:`~robustcompress.layers.LowRankConv2d` holding the truncated SVD of
    the operator (``Wᵀ`` for transformers' ``Conv1D``, stored ``in × out``)
    (Eckart–Young: ``‖W − B·A‖_F² = Σ_{j>r} σ_j²``, the least any rank-``r`` matrix reaches).

    Args:
        model: the network.
        energy: share of ``‖W‖_F²`` kept per layer, in (0, 1].
        rank: ``1 ≤ rank ≤ min(m, n)`` for every chosen layer, or a mapping.
        budget: fraction of parameters kept, in (0, 1].
        layers: the layers to factorise (default: every Linear / Conv1D / ungrouped Conv2d but the head).
        exclude_head: leave the classifier head dense.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The truncated model.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> truncate(model, rank=2)[0].rank
        2
    """
    model = module_arg(model)
    inplace = bool_arg(inplace, "inplace")
    exclude_head = bool_arg(exclude_head, "exclude_head")
    given = [k for k, v in (("energy", energy), ("rank", rank), ("budget", budget)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"Expected exactly one of energy, rank or budget, but got {given or 'none'}")
    if isinstance(rank, Mapping):
        if layers is not None:
            raise ValueError("Pass layers or a {name: rank} mapping, not both")
        layers = list(rank)
    chosen, refused = _truncation_layers(model, layers, exclude_head)
    for module in chosen.values():
        for _, hook in mask_hooks(module):
            hook.zero_(module)  # factorise what the masked layer computes (a no-op for its function)
    plan = _plan_ranks(model, chosen, energy, rank, budget, exclude_head)
    factorised = {n: r for n, r in plan.items() if _saves(_matrix_shape(chosen[n]), r)}
    dense = {n: f"rank {r} of {'×'.join(map(str, _matrix_shape(chosen[n])))} would not shrink it"
             for n, r in plan.items() if n not in factorised and r < min(_matrix_shape(chosen[n]))}
    _warn_dense({**refused, **dense})
    target = model if inplace else copy.deepcopy(model)
    linear = {n: r for n, r in factorised.items() if not is_conv1d_transposed(chosen[n])}
    if linear:
        to_low_rank(target, linear, exclude_head=False, inplace=True)
    for n, r in factorised.items():
        if n not in linear:
            set_submodule(target, n, _conv1d_low_rank(target.get_submodule(n), r))
    return target


def _plan_ranks(model: nn.Module, chosen: Mapping[str, nn.Module], energy: float | None,
                rank: int | Mapping[str, int] | None, budget: float | None, exclude_head: bool) -> dict[str, int]:
    """Rank per chosen layer from exactly one of energy, rank, budget (arguments checked here)."""
    plan: dict[str, int] = {}
    if energy is not None:
        energy = fraction(energy, "energy", closed_right=True)
        if energy == 0:
            raise ValueError("Expected energy to lie in (0, 1], but got energy=0")
        for n, m in chosen.items():
            sig = _svdvals(m)
            plan[n] = max(1, rank_for_energy(sig, energy) or len(sig))
    elif rank is not None:
        for n, m in chosen.items():
            r = positive_int(rank[n] if isinstance(rank, Mapping) else rank, f"rank for layer {n!r}")
            full = min(_matrix_shape(m))
            if r > full:
                raise ValueError(f"Expected rank <= min(shape) = {full} for layer {n!r} "
                                 f"(matrix view {_matrix_shape(m)}), but got rank={r}")
            plan[n] = r
    else:
        plan = ranks_for_budget(model, budget, list(chosen), exclude_head=exclude_head)
    return plan


def _warn_dense(reasons: Mapping[str, str]) -> None:
    if reasons:
        listed = "; ".join(f"{n!r}: {why}" for n, why in reasons.items())
        warnings.warn(f"truncate left {len(reasons)} layer(s) dense: {listed}", UserWarning, stacklevel=3)


def _conv1d_low_rank(layer: nn.Module, rank: int) -> LowRankLinear:
    """A transformers ``Conv1D`` (``y = x W + b``, ``W`` stored ``in × out``) as a LowRankLinear of ``Wᵀ``."""
    return LowRankLinear.from_weight(layer.weight.T, layer.bias, rank)
