"""Global Lipschitz constants ``sup_x |φ'(x)|`` of activations (DESIGN §1).

Three tables, one per way an activation appears in a traced graph: a module
(``ACTIVATION_LIPSCHITZ``, keyed by exact type), a function
(``FUNCTIONAL_ACTIVATIONS``, with the names of its positional arguments in
``FUNCTIONAL_ARGNAMES``) and a tensor method (``METHOD_ACTIVATIONS``). Smooth
constants (GELU, SiLU, Mish) are maximised numerically in float64 and
rounded up, so every constant is ≥ the true supremum.

Example:
    >>> activation_lipschitz(nn.ReLU())
    1.0
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .matrix import ROUNDING_MARGIN

__all__ = ["ACTIVATION_LIPSCHITZ", "FUNCTIONAL_ACTIVATIONS", "FUNCTIONAL_ARGNAMES", "METHOD_ACTIVATIONS",
           "activation_lipschitz"]


def _sup_abs(deriv: Callable[[torch.Tensor], torch.Tensor], lo: float = -30.0, hi: float = 30.0) -> float:
    """``sup_x |deriv(x)|`` on [lo, hi]: a fine grid, golden-section refinement, rounded up.

    The derivatives maximised here are smooth with one interior maximum, where
    the refinement is accurate to ~1e-12; rounding up at the 6th decimal (after
    adding 1e-9) makes the returned constant ≥ the true sup.
    """
    xs = torch.linspace(lo, hi, 600_001, dtype=torch.float64)
    d = deriv(xs).abs()
    i = int(torch.argmax(d))
    a, b = float(xs[max(i - 1, 0)]), float(xs[min(i + 1, xs.numel() - 1)])
    g = (math.sqrt(5) - 1) / 2

    def f(x: float) -> float:
        return float(deriv(torch.tensor([x], dtype=torch.float64)).abs()[0])

    for _ in range(120):
        c, e = b - g * (b - a), a + g * (b - a)
        if f(c) > f(e):
            b = e
        else:
            a = c
    best = max(float(d[i]), f((a + b) / 2))
    return math.ceil((best + 1e-9) * 1e6) / 1e6


def _gelu_deriv(x: torch.Tensor) -> torch.Tensor:
    # d/dx x·Φ(x) = Φ(x) + x·φ(x); maximal at x = √2 (where φ(x)(2 − x²) = 0).
    return torch.special.ndtr(x) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _gelu_tanh_deriv(x: torch.Tensor) -> torch.Tensor:
    c = math.sqrt(2 / math.pi)
    u = c * (x + 0.044715 * x**3)
    t = torch.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _silu_deriv(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _mish_deriv(x: torch.Tensor) -> torch.Tensor:
    sp = F.softplus(x)
    t = torch.tanh(sp)
    return t + x * (1 - t * t) * torch.sigmoid(x)


@functools.lru_cache(maxsize=None)
def _smooth_constant(name: str) -> float:
    return _sup_abs({"gelu": _gelu_deriv, "gelu_tanh": _gelu_tanh_deriv, "silu": _silu_deriv,
                     "mish": _mish_deriv}[name])


_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717

#: Global Lipschitz constants of activation modules without parameters
#: (``sup |φ'|``; smooth ones computed numerically and rounded up).
ACTIVATION_LIPSCHITZ: dict[type, Callable[[], float]] = {
    nn.ReLU: lambda: 1.0,
    nn.ReLU6: lambda: 1.0,
    nn.Tanh: lambda: 1.0,
    nn.Hardtanh: lambda: 1.0,
    nn.Softsign: lambda: 1.0,
    nn.Softplus: lambda: 1.0,
    nn.Sigmoid: lambda: 0.25,
    nn.Hardsigmoid: lambda: 1 / 6 * (1 + ROUNDING_MARGIN),
    nn.Hardswish: lambda: 1.5,
    nn.SiLU: lambda: _smooth_constant("silu"),
    nn.Mish: lambda: _smooth_constant("mish"),
    nn.CELU: lambda: 1.0,
    nn.SELU: lambda: math.ceil(_SELU_SCALE * _SELU_ALPHA * 1e9) / 1e9,
    nn.Identity: lambda: 1.0,
}


def _kw(kwargs: dict, key: str, default: Any) -> Any:
    return kwargs.get(key, default)


#: Lipschitz constants of activation functions, from their keyword arguments.
FUNCTIONAL_ACTIVATIONS: dict[Any, Callable[[dict], float]] = {
    F.relu: lambda kw: 1.0,
    torch.relu: lambda kw: 1.0,
    F.relu6: lambda kw: 1.0,
    F.hardtanh: lambda kw: 1.0,
    F.softplus: lambda kw: 1.0,
    F.softsign: lambda kw: 1.0,
    torch.tanh: lambda kw: 1.0,
    F.tanh: lambda kw: 1.0,
    torch.sigmoid: lambda kw: 0.25,
    F.sigmoid: lambda kw: 0.25,
    F.hardsigmoid: lambda kw: 1 / 6 * (1 + ROUNDING_MARGIN),
    F.hardswish: lambda kw: 1.5,
    F.silu: lambda kw: _smooth_constant("silu"),
    F.mish: lambda kw: _smooth_constant("mish"),
    F.leaky_relu: lambda kw: max(1.0, abs(float(_kw(kw, "negative_slope", 0.01)))),
    F.elu: lambda kw: max(1.0, abs(float(_kw(kw, "alpha", 1.0)))),
    F.gelu: lambda kw: _smooth_constant("gelu_tanh" if _kw(kw, "approximate", "none") == "tanh" else "gelu"),
}

#: Positional names of the extra arguments of functional activations (after the input).
FUNCTIONAL_ARGNAMES: dict[Any, tuple[str, ...]] = {
    F.leaky_relu: ("negative_slope", "inplace"),
    F.elu: ("alpha", "inplace"),
    F.gelu: ("approximate",),
}

#: Lipschitz constants of activation tensor methods (``x.relu()``).
METHOD_ACTIVATIONS = {"relu": 1.0, "relu_": 1.0, "tanh": 1.0, "sigmoid": 0.25}


def activation_lipschitz(act: nn.Module | Callable, **kwargs: Any) -> float:
    """Global Lipschitz constant ``sup_x |φ'(x)|`` of an activation (module or function).

    ReLU 1; LeakyReLU ``max(1, |slope|)``; ELU ``max(1, |α|)``; GELU
    ``Φ(√2) + √2·φ(√2) ≈ 1.128904`` (tanh form: computed likewise); SiLU
    ≈ 1.0998; Mish ≈ 1.0886; Hardswish 1.5; Tanh 1; Sigmoid 0.25. Smooth
    constants are maximised numerically in float64 and rounded up.

    Args:
        act: an activation module (``nn.GELU()``) or function (``F.gelu``).
        kwargs: the function's keyword arguments (``negative_slope``,
            ``approximate``, ``alpha``) when ``act`` is a function.

    Returns:
        The constant (a float).

    Example:
        >>> activation_lipschitz(nn.LeakyReLU(0.1))
        1.0
        >>> activation_lipschitz(F.gelu)
        1.128905
    """
    if isinstance(act, nn.Module):
        if isinstance(act, nn.LeakyReLU):
            return max(1.0, abs(float(act.negative_slope)))
        if isinstance(act, nn.ELU):
            return max(1.0, abs(float(act.alpha)))
        if isinstance(act, nn.GELU):
            return _smooth_constant("gelu_tanh" if act.approximate == "tanh" else "gelu")
        for t, fn in ACTIVATION_LIPSCHITZ.items():
            if type(act) is t:
                return fn()
        raise ValueError(f"No Lipschitz constant known for activation module {type(act).__name__}")
    fn = FUNCTIONAL_ACTIVATIONS.get(act)
    if fn is None:
        raise ValueError(f"No Lipschitz constant known for activation function {getattr(act, '__name__', act)!r}")
    return fn(kwargs)
