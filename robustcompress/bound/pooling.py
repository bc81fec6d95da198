"""Lipschitz factors of pooling layers and functions (DESIGN §1.3).

Max pooling: ``√c`` with ``c`` the most windows holding one element (1 without
overlap, 2 for 3×3 stride 2); ℓ∞ factor 1. Average pooling of any kind: the
Schur-test bound of its non-negative matrix, computed by running it and its
adjoint at the real input size. ``POOL_MODULES`` and ``POOL_FUNCTIONS`` list
what :func:`pool_factor` takes.

Example:
    >>> pool_factor(nn.MaxPool2d(2), (1, 8, 8))
    (1.0, 1.0)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layer_facts import per_dim
from .matrix import round_up
from .norms import window_multiplicity

__all__ = ["POOL_MODULES", "POOL_FUNCTIONS", "pool_factor"]

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_ADAPTIVE_MAX = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)

_POOL_FUNCS_MAX = {F.max_pool1d: 1, F.max_pool2d: 2}
_POOL_FUNCS_AVG = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2}
_POOL_FUNCS_ADAPTIVE_MAX = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2}
_MAX_POOL_ARGNAMES = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _adaptive_multiplicity(n: int, out: int) -> int:
    counts = [0] * n
    for i in range(out):
        lo, hi = (i * n) // out, -((-(i + 1) * n) // out)
        for j in range(lo, hi):
            counts[j] += 1
    return max(counts)


def pool_factor(pool: nn.Module | Callable, input_shape: Sequence[int], *args: Any, **kwargs: Any) -> tuple[float, float]:
    """``(ℓ2 factor, ℓ∞ factor)`` of a pooling layer at ``input_shape`` (channels first).

    Max pooling: ``√c`` with ``c`` the most windows holding one element
    (``‖Δy‖² ≤ Σ_w max_{i∈w} Δx_i² ≤ c‖Δx‖²``; 1 without overlap, 2 for 3×3
    stride 2); ℓ∞ factor 1. Average pooling (any padding, ``ceil_mode``,
    ``count_include_pad``, ``divisor_override``, adaptive): the pooling is a
    non-negative matrix A, and ``‖A‖² ≤ max_i (AᵀA·1)_i`` (Schur test, exact
    for non-overlapping windows), computed by running A and its adjoint; ℓ∞
    factor ``max_w (A·1)_w``.

    Args:
        pool: a pooling module, or a functional pooling (``F.max_pool2d``) with its
            arguments after the input in ``args`` / ``kwargs``.
        input_shape: the pooling's input without batch.

    Returns:
        ``(factor_2, factor_inf)``.

    Example:
        >>> pool_factor(nn.MaxPool2d(3, stride=2), (1, 9, 9))
        (2.0, 1.0)
    """
    spatial = tuple(int(s) for s in input_shape[1:])
    if isinstance(pool, nn.Module):
        if isinstance(pool, _MAX_POOLS):
            if pool.return_indices:
                raise ValueError("max pooling with return_indices=True is not supported in the bound")
            d = 1 if isinstance(pool, nn.MaxPool1d) else 2
            k, s, dil = per_dim(pool.kernel_size, d), per_dim(pool.stride or pool.kernel_size, d), per_dim(pool.dilation, d)
            c = math.prod(window_multiplicity(a, b, e) for a, b, e in zip(k, s, dil))
            return math.sqrt(c), 1.0
        if isinstance(pool, _ADAPTIVE_MAX):
            d = len(spatial)
            outs = per_dim(pool.output_size, d)
            outs = tuple(n if o is None else o for o, n in zip(outs, spatial))
            c = math.prod(_adaptive_multiplicity(n, o) for n, o in zip(spatial, outs))
            return math.sqrt(c), 1.0
        if isinstance(pool, _AVG_POOLS):
            return _linear_pool_factor(pool, spatial)
        raise ValueError(f"No pooling rule for {type(pool).__name__}")
    if pool in _POOL_FUNCS_MAX:
        d = _POOL_FUNCS_MAX[pool]
        bound = dict(zip(_MAX_POOL_ARGNAMES, args))
        bound.update(kwargs)
        if bound.get("return_indices"):
            raise ValueError("max pooling with return_indices=True is not supported in the bound")
        k = per_dim(bound["kernel_size"], d)
        stride = bound.get("stride") or bound["kernel_size"]
        s = per_dim(stride, d)
        dil = per_dim(bound.get("dilation", 1), d)
        c = math.prod(window_multiplicity(a, b, e) for a, b, e in zip(k, s, dil))
        return math.sqrt(c), 1.0
    if pool in _POOL_FUNCS_ADAPTIVE_MAX:
        out = args[0] if args else kwargs["output_size"]
        outs = per_dim(out, len(spatial))
        c = math.prod(_adaptive_multiplicity(n, o) for n, o in zip(spatial, outs))
        return math.sqrt(c), 1.0
    if pool in _POOL_FUNCS_AVG:
        return _linear_pool_factor(lambda x: pool(x, *args, **kwargs), spatial)
    raise ValueError(f"No pooling rule for {getattr(pool, '__name__', pool)!r}")


def _linear_pool_factor(fn: Callable[[torch.Tensor], torch.Tensor], spatial: tuple[int, ...]) -> tuple[float, float]:
    ones = torch.ones(1, 1, *spatial, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = fn(ones)
        if bool((y < 0).any()):
            raise ValueError("average pooling with a negative divisor is not supported")
        # A is linear, so the gradient of ⟨A·x, A·1⟩ at any x is Aᵀ(A·1).
        (ata1,) = torch.autograd.grad(y, ones, y.detach())
    return round_up(math.sqrt(float(ata1.max()))), round_up(float(y.detach().max()))


#: Pooling modules with a rule.
POOL_MODULES: tuple[type, ...] = _MAX_POOLS + _AVG_POOLS + _ADAPTIVE_MAX
#: Pooling functions with a rule.
POOL_FUNCTIONS: tuple[Callable, ...] = (*_POOL_FUNCS_MAX, *_POOL_FUNCS_AVG, *_POOL_FUNCS_ADAPTIVE_MAX)
