"""Argument checks shared by every public function.

Each check raises with the argument's name, what came, and what is allowed,
in the style of ``torch.nn.utils.parametrizations.spectral_norm``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

_NORM_ALIASES = {
    "l2": 2.0,
    "2": 2.0,
    "linf": math.inf,
    "l_inf": math.inf,
    "inf": math.inf,
}


def norm_arg(norm: Any, name: str = "norm") -> float:
    """Normalise a norm spelling to ``2.0`` or ``math.inf``.

    Accepted: ``2``, ``float("inf")``, and the strings ``"l2"``, ``"linf"``,
    ``"inf"`` (case-insensitive).

    >>> norm_arg("linf")
    inf
    """
    if isinstance(norm, str):
        key = norm.strip().lower()
        if key in _NORM_ALIASES:
            return _NORM_ALIASES[key]
    elif isinstance(norm, (int, float)) and not isinstance(norm, bool):
        if norm == 2:
            return 2.0
        if math.isinf(norm) and norm > 0:
            return math.inf
    raise ValueError(
        f"Expected {name} to be 2 or float('inf') (or one of the strings 'l2', 'linf', 'inf'), "
        f"but got {name}={norm!r}"
    )


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an int ≥ 1, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be a positive integer, but got {name}={value!r}")
    return value


def bool_arg(value: Any, name: str) -> bool:
    """Return ``value`` if it is a bool, else raise naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected {name} to be a bool, but got {name}={value!r}")
    return value


def module_arg(value: Any, name: str = "model") -> torch.nn.Module:
    """Return ``value`` if it is an ``nn.Module``, else raise naming ``name``."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"Expected {name} to be a torch.nn.Module, but got {type(value).__name__}")
    return value


def nonnegative_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an int ≥ 0, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected {name} to be a non-negative integer, but got {name}={value!r}")
    return value


def nonnegative_float(value: Any, name: str) -> float:
    """Return ``float(value)`` if it is a finite real ≥ 0, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected {name} to be a real number, but got {name}={value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected {name} to be finite and >= 0, but got {name}={value!r}")
    return float(value)


def positive_float(value: Any, name: str) -> float:
    """Return ``float(value)`` if it is a finite real > 0, else raise naming ``name``."""
    value = nonnegative_float(value, name)
    if value == 0:
        raise ValueError(f"Expected {name} to be > 0, but got {name}={value!r}")
    return value


def fraction(value: Any, name: str, *, closed_right: bool = False) -> float:
    """Return ``float(value)`` if it lies in [0, 1) (or [0, 1] with ``closed_right``)."""
    value = nonnegative_float(value, name)
    if value > 1 or (value == 1 and not closed_right):
        allowed = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"Expected {name} to lie in {allowed}, but got {name}={value!r}")
    return value


def float_tensor(t: Any, name: str) -> torch.Tensor:
    """Return ``t`` if it is a non-empty floating-point tensor, else raise naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"Expected {name} to be a floating-point tensor, but got dtype={t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"Expected {name} to be non-empty, but got shape {tuple(t.shape)}")
    return t


def domain_arg(domain: Any, name: str = "domain") -> tuple[float, float]:
    """Return ``(lo, hi)`` with finite ``lo < hi``."""
    try:
        lo, hi = (float(v) for v in domain)
    except (TypeError, ValueError):
        raise TypeError(f"Expected {name} to be a pair (lo, hi), but got {name}={domain!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"Expected {name}=(lo, hi) with finite lo < hi, but got {name}={domain!r}")
    return lo, hi


# ------------------------------------------------------------------ model inputs and labels (attacks, evaluation)


def attack_input(x: Any, domain: tuple[float, float], name: str = "x") -> torch.Tensor:
    """Return ``x`` if an attack can perturb it: a finite float batch ``(N, ...)`` inside ``domain``."""
    if isinstance(x, Mapping):
        raise TypeError(
            f"Expected {name} to be one floating-point tensor for a gradient attack, but got a dict of inputs "
            f"(keys {sorted(x)}); attack the float input alone (e.g. pass pixel_values as x). "
            "Token ids cannot be perturbed by a gradient attack; accuracy() accepts dict inputs"
        )
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        raise TypeError(
            f"Expected {name} to be a floating-point tensor, but got dtype={x.dtype}: a gradient attack cannot "
            "perturb integer inputs (token ids); accuracy() evaluates them"
        )
    x = float_tensor(x, name)
    if x.dim() < 2:
        raise ValueError(
            f"Expected {name} to be a batch of shape (N, ...) with at least 2 dimensions, "
            f"but got shape {tuple(x.shape)}"
        )
    lo, hi = domain
    slack = 1e-6 * (hi - lo)
    x_min, x_max = float(x.min()), float(x.max())
    if not (math.isfinite(x_min) and math.isfinite(x_max)):
        raise ValueError(f"Expected {name} to be finite, but it holds nan or inf")
    if x_min < lo - slack or x_max > hi + slack:
        raise ValueError(
            f"Expected {name} to lie in domain=({lo}, {hi}), but its values span [{x_min:.4g}, {x_max:.4g}]; "
            "pass the data's units as domain=(lo, hi) and keep normalisation inside the model"
        )
    return x


def finite_input(x: Any, name: str = "x") -> Any:
    """Return ``x`` (a tensor or a dict of tensors) if its floating-point tensors hold no nan or inf."""
    items = x.items() if isinstance(x, Mapping) else [(None, x)]
    for key, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            where = name if key is None else f"{name}[{key!r}]"
            raise ValueError(f"Expected {where} to be finite, but it holds nan or inf")
    return x


def labels_arg(y: Any, n: int, num_classes: int, name: str = "y") -> torch.Tensor:
    """Return ``y`` as int64 class indices of shape ``(n,)`` in ``[0, num_classes)``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor of class indices, but got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"Expected {name} to hold integer class indices, but got dtype={y.dtype}")
    if tuple(y.shape) != (n,):
        raise ValueError(f"Expected {name} to have shape ({n},) (one label per example), but got {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"Expected {name} to lie in [0, {num_classes - 1}] (the model has {num_classes} logits), "
            f"but got values in [{int(y.min())}, {int(y.max())}]"
        )
    return y.long()


def seed_arg(seed: Any) -> int:
    """Return a non-negative int seed; ``None`` draws one from torch's global generator."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Expected seed to be a non-negative integer or None, but got seed={seed!r}")
    return seed


def eps_arg(eps: Any, n: int, like: torch.Tensor) -> torch.Tensor:
    """A per-example budget vector of shape (N,) from a number or a tensor."""
    if isinstance(eps, torch.Tensor):
        if eps.dim() == 0:
            eps = eps.item()
        else:
            if tuple(eps.shape) != (n,):
                raise ValueError(f"Expected a tensor eps to have shape ({n},), but got {tuple(eps.shape)}")
            if not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
                raise ValueError("Expected every per-example eps to be finite and >= 0")
            return eps.detach().to(device=like.device, dtype=like.dtype)
    eps = nonnegative_float(eps, "eps")
    return torch.full((n,), eps, device=like.device, dtype=like.dtype)
