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
* anything else (attention, LayerNorm, …): a ``ValueError`` naming the node.

Per node three numbers are carried: ``K2`` (ℓ2→ℓ2), ``Kinf`` (ℓ∞ input → ℓ2
node output) and, while the node is still an entrywise / coordinate map of the
input, ``Ainf`` (ℓ∞→ℓ∞). The first linear layer on each path from the input
uses its ∞→2 bound ``min(√(Σ_i ‖w_i‖_1²), √n·σ̄_1)`` times ``Ainf`` of its
argument; a path that reaches the output with no linear layer costs
``√n · Ainf`` (``Kinf`` of the input node is ``√n``). So
``K_∞ = ‖W_1‖_{∞→2} · L_φ · Π σ̄(W_l)`` for a plain chain.

Rounding: every certified number is computed in float64 and multiplied by
``1 + ROUNDING_MARGIN`` (``1e-6``), far above the backward error of the
float64 SVD / FFT / Gram products used (``≲ 1e-12`` relative).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU())
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(2 * torch.eye(4))
    >>> round(lipschitz_bound(model, (4,)).K, 5)
    2.0
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._checks import float_tensor, norm_arg, positive_int
from .layers import LowRankConv2d, LowRankLinear

__all__ = [
    "ROUNDING_MARGIN",
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
    "LipschitzBound",
    "lipschitz_bound",
    "certified_radius",
]

#: Relative margin multiplied onto every certified float64 number.
ROUNDING_MARGIN = 1e-6

#: Default size (entries of the dense matrix) up to which exact float64 ``svdvals`` are used.
EXACT_THRESHOLD = 1 << 18

#: Most ``frequencies · m · n · min(m, n)`` for which ``method="auto"`` runs the
#: Fourier bound of a convolution (above it the √c matrix bound alone).
_FOURIER_BUDGET = 2e8

#: Most entries of a convolution operator materialised for ``method="exact"``.
_MATERIALISE_LIMIT = 1 << 25

_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, LowRankLinear, LowRankConv2d)


def _up(x: float) -> float:
    return float(x) * (1.0 + ROUNDING_MARGIN)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


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
    fn = _FUNCTIONAL_ACTIVATIONS.get(act)
    if fn is None:
        raise ValueError(f"No Lipschitz constant known for activation function {getattr(act, '__name__', act)!r}")
    return fn(kwargs)


def _kw(kwargs: dict, key: str, default: Any) -> Any:
    return kwargs.get(key, default)


_FUNCTIONAL_ACTIVATIONS: dict[Any, Callable[[dict], float]] = {
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

# Positional names of the extra arguments of functional activations (after the input).
_FUNCTIONAL_ARGNAMES: dict[Any, tuple[str, ...]] = {
    F.leaky_relu: ("negative_slope", "inplace"),
    F.elu: ("alpha", "inplace"),
    F.gelu: ("approximate",),
}

_METHOD_ACTIVATIONS = {"relu": 1.0, "relu_": 1.0, "tanh": 1.0, "sigmoid": 0.25}


# ---------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------


def gram_iteration_bound(w: torch.Tensor, n_iter: int = 6) -> float:
    """Certified upper bound of ``σ_1(W)`` by Gram iteration, rescaled every step.

    ``G_0 = W``, ``G_{t+1} = G_tᴴ G_t``; ``σ_1(G_t) = σ_1(W)^{2^t} ≤ ‖G_t‖_F`` gives
    ``σ_1(W) ≤ ‖G_t‖_F^{1/2^t}``, which decreases to ``σ_1`` as t grows (the
    ratio is at most ``rank^{1/2^{t+1}}``). Each ``G_t`` is divided by its
    Frobenius norm and the log-scale carried along, so nothing overflows.
    Computed in float64 (complex128 for complex input); a leading batch
    dimension gives one bound per matrix, and the maximum is returned.

    Args:
        w: a matrix ``m × n`` (or a batch ``b × m × n``), real or complex.
        n_iter: Gram steps t, ≥ 1.

    Returns:
        The bound, times ``1 + ROUNDING_MARGIN`` (a float).

    Example:
        >>> abs(gram_iteration_bound(torch.diag(torch.tensor([3.0, 1.0]))) - 3.0) < 1e-4
        True
    """
    w = float_tensor(w, "w") if not w.is_complex() else w
    n_iter = positive_int(n_iter, "n_iter")
    if w.dim() not in (2, 3):
        raise ValueError(f"Expected w to be a matrix or a batch of matrices, but got shape {tuple(w.shape)}")
    g = w.detach().to(torch.complex128 if w.is_complex() else torch.float64)
    if g.dim() == 2:
        g = g.unsqueeze(0)
    if not bool(torch.isfinite(torch.view_as_real(g) if g.is_complex() else g).all()):
        raise ValueError("Expected w to be finite")
    # T_t = (WᴴW)^{2^(t-1)} = exp(L_t)·G_t with σ_1(T_t) = σ_1(W)^{2^t} ≤ exp(L_t)·‖G_t‖_F.
    # Carry ℓ_t = L_t / 2^t; each step divides G_t by f_t = ‖G_t‖_F, so
    # ℓ_{t+1} = ℓ_t + log f_t / 2^t and log σ_1 ≤ ℓ_T + log ‖G_T‖_F / 2^T.
    f0 = torch.linalg.matrix_norm(g)
    zero = f0 == 0
    f0 = torch.where(zero, torch.ones_like(f0), f0)
    g = g / f0[:, None, None].to(g.dtype)
    ell = torch.log(f0)
    # The first product on the smaller side: same non-zero spectrum, less work.
    g = g @ g.mH if g.shape[1] < g.shape[2] else g.mH @ g
    for t in range(1, n_iter):
        f = torch.linalg.matrix_norm(g)
        f = torch.where(f == 0, torch.ones_like(f), f)
        g = g / f[:, None, None].to(g.dtype)
        ell = ell + torch.log(f) / 2**t
        g = g @ g
    f = torch.linalg.matrix_norm(g)
    f = torch.where(f == 0, torch.ones_like(f), f)
    bound = torch.exp(ell + torch.log(f) / 2**n_iter)
    bound = torch.where(zero, torch.zeros_like(bound), bound)
    return _up(float(bound.max()))


def _sigma1_exact(m: torch.Tensor) -> float:
    """Largest singular value of a (batch of) float64 / complex128 matrices via LAPACK."""
    if m.numel() == 0:
        return 0.0
    return float(torch.linalg.svdvals(m).max())


def matrix_norm_bound(w: torch.Tensor, method: str = "auto", exact_threshold: int = EXACT_THRESHOLD) -> float:
    """Certified upper bound of the spectral norm of a matrix (or the max over a batch).

    ``"exact"``: float64 ``svdvals``; ``"gram"``: :func:`gram_iteration_bound`;
    ``"auto"``: exact when the matrix has at most ``exact_threshold`` entries,
    else Gram iteration. Both times ``1 + ROUNDING_MARGIN``.

    Args:
        w: ``m × n`` or ``b × m × n``, real or complex.
        method: ``"auto"``, ``"exact"`` or ``"gram"``.
        exact_threshold: entries per matrix up to which ``"auto"`` is exact.

    Returns:
        A float ≥ σ_1.

    Example:
        >>> round(matrix_norm_bound(torch.tensor([[3.0, 0.0], [0.0, 4.0]])), 5)
        4.0
    """
    if method not in ("auto", "exact", "gram"):
        raise ValueError(f"Expected method to be 'auto', 'exact' or 'gram', but got method={method!r}")
    dt = torch.complex128 if w.is_complex() else torch.float64
    w = w.detach().to(dt)
    per = w.shape[-1] * w.shape[-2]
    if method == "gram" or (method == "auto" and per > exact_threshold):
        return gram_iteration_bound(w, n_iter=8)
    return _up(_sigma1_exact(w))


# ---------------------------------------------------------------------------
# A layer as (kernel, mixing matrix, geometry)
# ---------------------------------------------------------------------------


@dataclass
class _Layer:
    """A linear layer in float64: ``y = diag(s)·B·conv_K(x)`` (B = I unless low-rank)."""

    kind: str  # "linear" or "conv"
    kernel: torch.Tensor  # linear: (out, in); conv: (r, in/g, *k)
    mix: torch.Tensor | None  # (out, r) or None
    groups: int = 1
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    padding_mode: str = "zeros"
    padding_arg: Any = 0
    in_channels: int = 0


def _tuple(v: Any, d: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * d


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    if bn.training:
        raise ValueError(
            f"BatchNorm {type(bn).__name__} is in training mode: its output depends on the batch, so it has no "
            "Lipschitz bound as a function of one input; call model.eval() first"
        )
    if bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} without running statistics (track_running_stats=False) is not supported")
    s = torch.rsqrt(bn.running_var.detach().to("cpu", torch.float64) + bn.eps)
    if bn.weight is not None:
        s = bn.weight.detach().to("cpu", torch.float64) * s
    return s


def _as_layer(module: nn.Module, bn: nn.Module | None = None) -> _Layer:
    if isinstance(module, LowRankLinear):
        w = module.weight_b.detach().to("cpu", torch.float64) @ module.weight_a.detach().to("cpu", torch.float64)
        layer = _Layer("linear", w, None)
    elif isinstance(module, nn.Linear):
        layer = _Layer("linear", module.weight.detach().to("cpu", torch.float64), None)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        d = module.weight.dim() - 2
        layer = _Layer("conv", module.weight.detach().to("cpu", torch.float64), None, module.groups, _tuple(module.stride, d),
                       _tuple(module.dilation, d), (), module.padding_mode, module.padding, module.in_channels)
    elif isinstance(module, LowRankConv2d):
        a = module.conv_args
        layer = _Layer("conv", module.weight_a.detach().to("cpu", torch.float64),
                       rearrange(module.weight_b.detach().to("cpu", torch.float64), "o r 1 1 -> o r"), 1,
                       _tuple(a["stride"], 2), _tuple(a["dilation"], 2), (), "zeros", a["padding"],
                       module.in_channels)
    else:
        raise TypeError(
            f"No layer bound for {type(module).__name__}; supported: "
            + ", ".join(t.__name__ for t in _LINEAR_TYPES)
        )
    if bn is not None:
        s = _bn_scale(bn)
        out = layer.mix.shape[0] if layer.mix is not None else layer.kernel.shape[0]
        if s.numel() != out:
            raise ValueError(f"BatchNorm has {s.numel()} features but the layer has {out} outputs")
        if layer.mix is not None:
            layer.mix = s[:, None] * layer.mix
        else:
            layer.kernel = s.reshape(-1, *([1] * (layer.kernel.dim() - 1))) * layer.kernel
    return layer


def _with_padding(layer: _Layer, spatial: Sequence[int]) -> _Layer:
    """Resolve the padding (ints, 'valid', 'same') into (left, right) pairs for this input size."""
    k = layer.kernel.shape[2:]
    d = len(k)
    p = layer.padding_arg
    if isinstance(p, str):
        if p == "valid":
            pads = tuple((0, 0) for _ in range(d))
        elif p == "same":
            pads = []
            for kk, dd in zip(k, layer.dilation):
                total = dd * (kk - 1)
                pads.append((total // 2, total - total // 2))
            pads = tuple(pads)
        else:
            raise ValueError(f"Unknown padding {p!r}")
    else:
        pads = tuple((q, q) for q in _tuple(p, d))
    layer.padding = pads
    return layer


def _matrix_of(layer: _Layer) -> torch.Tensor:
    """The dense matrix view ``out × (in·k…)`` (grouped kernels block-diagonal in the channels)."""
    if layer.kind == "linear":
        return layer.kernel
    k = layer.kernel
    g = layer.groups
    if g == 1:
        mat = rearrange(k, "o i ... -> o (i ...)")
    else:
        r, cin_g = k.shape[0], k.shape[1]
        taps = k[0, 0].numel()
        mat = torch.zeros(r, g * cin_g * taps, dtype=k.dtype, device=k.device)
        rg = r // g
        for gi in range(g):
            mat[gi * rg:(gi + 1) * rg, gi * cin_g * taps:(gi + 1) * cin_g * taps] = rearrange(
                k[gi * rg:(gi + 1) * rg], "o i ... -> o (i ...)")
    return mat if layer.mix is None else layer.mix @ mat


def _window_multiplicity(k: int, s: int, d: int) -> int:
    """Most windows (kernel k, stride s, dilation d) that read one input element, per dimension.

    A tap j reads element i from the window starting at i − j·d, which exists
    only when that start is a multiple of s: the count is the largest number of
    j ∈ [0, k) sharing one residue of j·d mod s (``⌈k/s⌉`` without dilation).
    """
    counts: dict[int, int] = {}
    for j in range(k):
        r = (j * d) % s
        counts[r] = counts.get(r, 0) + 1
    return max(counts.values())


def _conv_c(layer: _Layer) -> int:
    k = layer.kernel.shape[2:]
    return math.prod(_window_multiplicity(kk, ss, dd) for kk, ss, dd in zip(k, layer.stride, layer.dilation))


def _padding_copies(layer: _Layer, spatial: Sequence[int]) -> int:
    """Most copies of one input element in the padded input (1 for zero padding)."""
    if layer.padding_mode == "zeros":
        return 1
    shape = tuple(int(n) for n in spatial)
    idx = torch.arange(math.prod(shape), dtype=torch.float64).reshape(1, 1, *shape)
    pad = []
    for lo, hi in reversed(layer.padding):
        pad += [lo, hi]
    padded = F.pad(idx, pad, mode=layer.padding_mode)
    counts = torch.bincount(padded.reshape(-1).long(), minlength=math.prod(shape))
    return int(counts.max())


def _check_input_shape(layer: _Layer, input_shape: Sequence[int] | None, module: nn.Module) -> tuple[int, ...]:
    d = layer.kernel.dim() - 2
    if input_shape is None:
        raise ValueError(
            f"{type(module).__name__} needs input_shape (C, {'L' if d == 1 else 'H, W'}) for its bound: a "
            "convolution's norm depends on the input size"
        )
    shape = tuple(input_shape)
    if len(shape) != d + 1 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"Expected input_shape to be {d + 1} positive ints (channels first, no batch), "
                         f"but got input_shape={input_shape!r}")
    if shape[0] != layer.in_channels:
        raise ValueError(f"input_shape has {shape[0]} channels but {type(module).__name__} expects {layer.in_channels}")
    return shape


def _out_size(n: int, k: int, s: int, d: int, pad: tuple[int, int]) -> int:
    return (n + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1


def _apply_conv(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
    """The layer (no bias) on a float64 batch, honouring the padding mode."""
    d = layer.kernel.dim() - 2
    conv = F.conv1d if d == 1 else F.conv2d
    if layer.padding_mode != "zeros" or any(lo != hi for lo, hi in layer.padding):
        pad = []
        for lo, hi in reversed(layer.padding):
            pad += [lo, hi]
        x = F.pad(x, pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
        y = conv(x, layer.kernel, None, layer.stride, 0, layer.dilation, layer.groups)
    else:
        y = conv(x, layer.kernel, None, layer.stride, tuple(lo for lo, _ in layer.padding), layer.dilation,
                 layer.groups)
    if layer.mix is not None:
        y = torch.einsum("or,br...->bo...", layer.mix, y)
    return y


def _operator_matrix(layer: _Layer, input_shape: tuple[int, ...]) -> torch.Tensor:
    m, n = _operator_size(layer, input_shape)
    if m * n > _MATERIALISE_LIMIT:
        raise ValueError(
            f"The convolution's operator at input shape {input_shape} is {m}×{n}, too large to materialise for "
            "method='exact'; use 'fourier', 'gram' or 'matrix'"
        )
    eye = torch.eye(n, dtype=torch.float64, device=layer.kernel.device).reshape(n, *input_shape)
    return _apply_conv(layer, eye).reshape(n, -1).T


def _operator_size(layer: _Layer, input_shape: tuple[int, ...]) -> tuple[int, int]:
    out_sp = [
        _out_size(n, k, s, d, p)
        for n, k, s, d, p in zip(input_shape[1:], layer.kernel.shape[2:], layer.stride, layer.dilation, layer.padding)
    ]
    out_ch = layer.mix.shape[0] if layer.mix is not None else layer.kernel.shape[0]
    return out_ch * math.prod(out_sp), math.prod(input_shape)


def _fourier_symbols(layer: _Layer, spatial: Sequence[int]) -> torch.Tensor:
    """Per-frequency matrices of the circular convolution on N ≥ n + p_l + p_r per dimension.

    The zero-padded convolution (stride 1) is a restriction of that circular
    one (the input embedded in zeros, outputs selected), and striding selects
    outputs again, so its norm is at most ``max_ω σ_1(K̂(ω))``. Returns a batch
    ``(frequencies·groups) × out × in``.
    """
    k = layer.kernel
    d = k.dim() - 2
    sizes = [n + lo + hi for n, (lo, hi) in zip(spatial, layer.padding)]
    emb = torch.zeros(*k.shape[:2], *sizes, dtype=torch.float64, device=k.device)
    index = (slice(None), slice(None)) + tuple(
        slice(0, dd * (kk - 1) + 1, dd) for kk, dd in zip(k.shape[2:], layer.dilation))
    emb[index] = k
    # Real kernel: K̂(−ω) = conj K̂(ω), so the half spectrum of rfftn has every σ.
    sym = torch.fft.rfftn(emb, dim=tuple(range(2, 2 + d)))
    sym = rearrange(sym, "o i ... -> (...) o i")
    g = layer.groups
    if layer.mix is not None:
        if g != 1:
            raise ValueError("grouped low-rank convolutions are not supported")
        return layer.mix.to(sym.dtype) @ sym
    if g == 1:
        return sym
    return rearrange(sym, "f (g o) i -> (f g) o i", g=g)


def conv_fourier_bound(conv: nn.Module, input_shape: Sequence[int], bn: nn.Module | None = None,
                       method: str = "exact") -> float:
    """Fourier-symbol upper bound of a zero-padded convolution at ``input_shape``.

    ``‖conv‖ ≤ max_ω σ_1(K̂(ω))`` with the kernel's DFT of size
    ``N_d = n_d + p_left + p_right`` per dimension (≥ n + 2p; at size n it would
    be the *circular* norm, which can be far below). Any stride, dilation and
    group count; a low-rank conv uses ``B·Â(ω)``.

    Args:
        conv: ``nn.Conv1d``, ``nn.Conv2d`` or ``LowRankConv2d`` with zero padding.
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        bn: an eval-mode BatchNorm after the conv, folded in.
        method: per-frequency norms by ``"exact"`` (svdvals) or ``"gram"`` iteration.

    Returns:
        A float ≥ the operator norm (times ``1 + ROUNDING_MARGIN``).

    Example:
        >>> conv = nn.Conv2d(1, 1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.fill_(3.0)
        >>> round(conv_fourier_bound(conv, (1, 5, 5)), 5)
        3.0
    """
    layer = _as_layer(conv, bn)
    if layer.kind != "conv":
        raise TypeError(f"conv_fourier_bound needs a convolution, but got {type(conv).__name__}")
    shape = _check_input_shape(layer, input_shape, conv)
    _with_padding(layer, shape[1:])
    if layer.padding_mode != "zeros":
        raise ValueError(
            f"The Fourier bound holds for zero padding only, but the layer has padding_mode={layer.padding_mode!r}; "
            "use conv_matrix_bound (counts padded copies) or method='exact'"
        )
    sym = _fourier_symbols(layer, shape[1:])
    return matrix_norm_bound(sym, "gram" if method == "gram" else "exact")


def conv_matrix_bound(conv: nn.Module, input_shape: Sequence[int] | None = None, bn: nn.Module | None = None,
                      method: str = "auto", exact_threshold: int = EXACT_THRESHOLD) -> float:
    """``√(c·copies) · σ̄_1(W_mat)``: the matrix-view bound of a convolution.

    ``‖conv x‖² = Σ_o ‖W_mat · patch_o(x)‖² ≤ σ_1(W_mat)² · c · copies · ‖x‖²``,
    ``c`` = the most windows reading one input element (``⌈kh/sh⌉·⌈kw/sw⌉``
    without dilation, at most ``kh·kw``), ``copies`` = the most copies of one
    element in the padded input (1 for zero padding; reflect / replicate /
    circular counted at ``input_shape``).

    Args:
        conv: a convolution (see :func:`conv_fourier_bound`).
        input_shape: needed only for non-zero padding modes.
        bn: an eval-mode BatchNorm after the conv, folded in.
        method: σ̄_1(W_mat) by ``"auto"``, ``"exact"`` or ``"gram"``.
        exact_threshold: see :func:`matrix_norm_bound`.

    Returns:
        A float ≥ the operator norm at any input size (zero padding).

    Example:
        >>> conv = nn.Conv2d(1, 1, 2, stride=2, bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.fill_(0.5)
        >>> round(conv_matrix_bound(conv), 5)   # non-overlapping windows: c = 1
        1.0
    """
    layer = _as_layer(conv, bn)
    if layer.kind != "conv":
        raise TypeError(f"conv_matrix_bound needs a convolution, but got {type(conv).__name__}")
    copies = 1
    if layer.padding_mode != "zeros":
        shape = _check_input_shape(layer, input_shape, conv)
        _with_padding(layer, shape[1:])
        copies = _padding_copies(layer, shape[1:])
    return math.sqrt(_conv_c(layer) * copies) * matrix_norm_bound(_matrix_of(layer), method, exact_threshold)


def layer_bound(
    module: nn.Module,
    input_shape: Sequence[int] | None = None,
    method: str = "auto",
    bn: nn.Module | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
) -> float:
    """Certified upper bound of one linear layer's spectral norm (bias excluded).

    Linear / LowRankLinear (``B·A``): ``"exact"`` float64 svdvals, or ``"gram"``
    iteration; ``"auto"`` picks exact up to ``exact_threshold`` entries.
    Convolutions, at ``input_shape``: ``"exact"`` (the materialised operator's
    svdvals), ``"fourier"`` (:func:`conv_fourier_bound`, zero padding),
    ``"matrix"`` (:func:`conv_matrix_bound`); ``"auto"``: exact when the operator
    has at most ``exact_threshold`` entries, else the smaller of the matrix bound
    and (zero padding, within a work budget) the Fourier bound.
    With ``bn``, the folded ``diag(γ/√(var+ε))·W``.

    Args:
        module: the layer.
        input_shape: the layer's input without batch (required for convolutions).
        method: see above.
        bn: an eval-mode BatchNorm that follows the layer.
        exact_threshold: entries up to which dense svdvals are used.

    Returns:
        A float ≥ σ_1 of the operator, margin included.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> layer_bound(lin) >= float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2))
        True
    """
    layer = _as_layer(module, bn)
    if layer.kind == "linear":
        if method not in ("auto", "exact", "gram"):
            raise ValueError(f"Expected method for {type(module).__name__} to be 'auto', 'exact' or 'gram', "
                             f"but got method={method!r}")
        return matrix_norm_bound(layer.kernel, method, exact_threshold)
    if method not in ("auto", "exact", "fourier", "matrix", "gram"):
        raise ValueError(f"Expected method to be 'auto', 'exact', 'fourier', 'gram' or 'matrix', but got method={method!r}")
    shape = _check_input_shape(layer, input_shape, module)
    _with_padding(layer, shape[1:])
    if method == "matrix":
        return conv_matrix_bound(module, shape, bn, "auto", exact_threshold)
    if method in ("fourier", "gram"):
        return conv_fourier_bound(module, shape, bn, "gram" if method == "gram" else "exact")
    m, n = _operator_size(layer, shape)
    if method == "exact" or m * n <= exact_threshold:
        return _up(_sigma1_exact(_operator_matrix(layer, shape)))
    bound = conv_matrix_bound(module, shape, bn, "auto", exact_threshold)
    if layer.padding_mode == "zeros":
        k = layer.kernel
        sizes = [s + lo + hi for s, (lo, hi) in zip(shape[1:], layer.padding)]
        freqs = math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)
        rows = layer.mix.shape[0] if layer.mix is not None else k.shape[0] // layer.groups
        cols = k.shape[1] * (layer.groups if layer.mix is not None else 1)
        work = freqs * layer.groups * rows * cols * min(rows, cols)
        if work <= _FOURIER_BUDGET:
            bound = min(bound, conv_fourier_bound(module, shape, bn))
    return bound


def operator_frobenius(module: nn.Module, input_shape: Sequence[int] | None = None,
                       bn: nn.Module | None = None) -> float:
    """``‖W‖_F`` of the layer's operator (a convolution at ``input_shape``: taps × valid positions).

    Convolutions: ``Σ_tap count(tap) · ‖B·K_tap‖_F²`` with count(tap) the output
    positions where that tap reads a real input element (non-zero padding modes:
    the materialised operator). Linear layers applied per position count each position.
    """
    layer = _as_layer(module, bn)
    if layer.kind == "linear":
        reps = 1 if input_shape is None else math.prod(input_shape) // layer.kernel.shape[1]
        return math.sqrt(reps) * float(torch.linalg.matrix_norm(layer.kernel))
    shape = _check_input_shape(layer, input_shape, module)
    _with_padding(layer, shape[1:])
    if layer.padding_mode != "zeros":
        return float(torch.linalg.matrix_norm(_operator_matrix(layer, shape)))
    sq = _tap_weights(layer, lambda m: m.square().sum(1))
    ones = torch.ones(1, 1, *shape[1:], dtype=torch.float64)
    conv = F.conv1d if len(shape) == 2 else F.conv2d
    x = F.pad(ones, [p for lo, hi in reversed(layer.padding) for p in (lo, hi)])
    cnt = conv(x, sq, None, layer.stride, 0, layer.dilation)
    return math.sqrt(float(cnt.sum()))


def _tap_weights(layer: _Layer, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per output channel and tap, ``reduce`` of the row ``(B·K_tap)[o, :]`` → kernel ``out × 1 × k…``."""
    k = layer.kernel
    taps = k.shape[2:]
    kt = rearrange(k, "o i ... -> (...) o i")  # taps × r × in/g
    if layer.mix is not None:
        rows = layer.mix @ kt  # taps × out × in (ungrouped)
    else:
        rows = kt
    vals = torch.stack([reduce(r) for r in rows], 0)  # taps × out
    return rearrange(vals, "t o -> o t").reshape(vals.shape[1], 1, *taps)


def power_sigma(module: nn.Module, input_shape: Sequence[int] | None = None, bn: nn.Module | None = None,
                n_iter: int = 20, seed: int = 0) -> float:
    """Power-iteration estimate of the layer's operator norm: a *lower* bound, never a certificate.

    ``v ← WᵀW v / ‖WᵀW v‖`` from a seeded random start, then ``‖W v‖``
    (convolutions at ``input_shape``, in the weight's precision, float32 at least).

    Args:
        module: a linear layer; input_shape: its input without batch (convolutions).
        bn: an eval-mode BatchNorm folded in.
        n_iter: iterations, ≥ 1; seed: seed of the start vector.

    Returns:
        A float ≤ σ_1 (up to rounding).

    Example:
        >>> lin = nn.Linear(5, 3)
        >>> power_sigma(lin, n_iter=200) <= layer_bound(lin)
        True
    """
    n_iter = positive_int(n_iter, "n_iter")
    layer = _as_layer(module, bn)
    dt = module.weight_a.dtype if isinstance(module, (LowRankLinear, LowRankConv2d)) else module.weight.dtype
    dt = torch.float64 if dt == torch.float64 else torch.float32
    layer.kernel = layer.kernel.to(dt)
    layer.mix = None if layer.mix is None else layer.mix.to(dt)
    gen = torch.Generator().manual_seed(seed)
    if layer.kind == "linear":
        w = layer.kernel
        v = torch.randn(w.shape[1], generator=gen, dtype=dt)
        for _ in range(n_iter):
            v = w.T @ (w @ v)
            v = v / v.norm().clamp_min(torch.finfo(dt).tiny)
        return float((w @ v).norm())
    shape = _check_input_shape(layer, input_shape, module)
    _with_padding(layer, shape[1:])
    v = torch.randn(1, *shape, generator=gen, dtype=dt)
    with torch.enable_grad():
        for _ in range(n_iter):
            x = (v / v.norm().clamp_min(torch.finfo(dt).tiny)).requires_grad_(True)
            y = _apply_conv(layer, x)
            (v,) = torch.autograd.grad(y, x, y.detach())
    with torch.no_grad():
        v = v / v.norm().clamp_min(torch.finfo(dt).tiny)
        return float(_apply_conv(layer, v).norm())


def inf_to_2_bound(module: nn.Module, input_shape: Sequence[int] | None = None, bn: nn.Module | None = None,
                   sigma_bound: float | None = None) -> float:
    """Certified upper bound of ``‖W‖_{∞→2}``: ``min(√(Σ_rows ‖row‖_1²), √n · σ̄_1)``.

    Rows of the operator: a convolution's row at one output position is its
    filter restricted to the taps inside the input (counted exactly for zero
    padding; the whole filter otherwise). A Linear applied to ``t`` positions
    has ``t`` copies of each row. (The exact ∞→2 norm is NP-hard; this is an
    upper bound, and ``max_i ‖w_i‖_1`` a lower one.)

    Args:
        module: a linear layer.
        input_shape: its input without batch (required for convolutions).
        bn: an eval-mode BatchNorm folded in.
        sigma_bound: a precomputed :func:`layer_bound` (else computed).

    Returns:
        A float.

    Example:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
        >>> round(inf_to_2_bound(lin), 5)
        3.0
    """
    layer = _as_layer(module, bn)
    if sigma_bound is None:
        sigma_bound = layer_bound(module, input_shape, "auto", bn)
    if layer.kind == "linear":
        n_in = layer.kernel.shape[1]
        reps = 1 if input_shape is None else max(1, math.prod(input_shape) // n_in)
        rows = float(layer.kernel.abs().sum(1).square().sum()) * reps
        n = n_in * reps
    else:
        shape = _check_input_shape(layer, input_shape, module)
        _with_padding(layer, shape[1:])
        n = math.prod(shape)
        l1 = _tap_weights(layer, lambda m: m.abs().sum(1))
        ones = torch.ones(1, 1, *shape[1:], dtype=torch.float64)
        conv = F.conv1d if len(shape) == 2 else F.conv2d
        if layer.padding_mode == "zeros":
            x = F.pad(ones, [p for lo, hi in reversed(layer.padding) for p in (lo, hi)])
        else:  # padded copies are real inputs: bound each row by its whole filter
            x = F.pad(ones, [p for lo, hi in reversed(layer.padding) for p in (lo, hi)], value=1.0)
        row_l1 = conv(x, l1, None, layer.stride, 0, layer.dilation)
        rows = float(row_l1.square().sum())
    return min(_up(math.sqrt(rows)), _up(math.sqrt(n) * sigma_bound))


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------


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
            k, s, dil = _tuple(pool.kernel_size, d), _tuple(pool.stride or pool.kernel_size, d), _tuple(pool.dilation, d)
            c = math.prod(_window_multiplicity(a, b, e) for a, b, e in zip(k, s, dil))
            return math.sqrt(c), 1.0
        if isinstance(pool, _ADAPTIVE_MAX):
            d = len(spatial)
            outs = _tuple(pool.output_size, d)
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
        k = _tuple(bound["kernel_size"], d)
        stride = bound.get("stride") or bound["kernel_size"]
        s = _tuple(stride, d)
        dil = _tuple(bound.get("dilation", 1), d)
        c = math.prod(_window_multiplicity(a, b, e) for a, b, e in zip(k, s, dil))
        return math.sqrt(c), 1.0
    if pool in _POOL_FUNCS_ADAPTIVE_MAX:
        out = args[0] if args else kwargs["output_size"]
        outs = _tuple(out, len(spatial))
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
    return _up(math.sqrt(float(ata1.max()))), _up(float(y.detach().max()))


# ---------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------


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
            :func:`certified_radius`).
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


@dataclass
class _Val:
    k2: float
    kinf: float
    ainf: float | None
    const: bool = False


_CONST = _Val(0.0, 0.0, 0.0, True)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (LowRankLinear, LowRankConv2d)):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many types; the message is what the user needs
        raise ValueError(
            f"Could not trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); the bound needs a "
            "model without data-dependent control flow"
        ) from err
    return fx.GraphModule(model, graph)


_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze",
                  "clone", "detach", "t", "view_as", "unflatten"}
_SHAPE_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                torch.clone, torch.t, torch.unflatten}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_SUB_FUNCS = {operator.sub, operator.isub, torch.sub}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_DIV_FUNCS = {operator.truediv, operator.itruediv, torch.div}
_CONST_FUNCS = {getattr, len}
_CONST_METHODS = {"size", "dim", "numel"}
_IDENTITY_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


def _nodes_in(a: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(a, lambda n: out.append(n))
    return out


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and records each tensor node's shape without the batch dimension."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(int(s) for s in out.shape[1:])
        return out


_SHAPES_KEY = "robustcompress_shape"


def _tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get(_SHAPES_KEY)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)!r} (node {node.name!r})"
    return f"{node.op} {node.target!r} (node {node.name!r})"


def lipschitz_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    norm: Any = 2,
    method: str = "auto",
    exact_threshold: int = EXACT_THRESHOLD,
) -> LipschitzBound:
    """Certified upper bound ``K`` of the Lipschitz constant of ``model`` at ``input_shape``.

    ``‖f(x+δ) − f(x)‖_2 ≤ K · ‖δ‖_norm``. Rules per node as in the module
    docstring; the composition takes products along chains and sums at adds,
    and gives every path from the input its own ∞→2 first factor for ``K_∞``.
    BatchNorm must be in eval mode (folded into the preceding layer when that
    layer feeds only it), as must dropout.

    Args:
        model: an fx-traceable network taking one input tensor.
        input_shape: one input without the batch dimension, e.g. ``(3, 32, 32)``.
        norm: 2 or ``float("inf")`` (``"l2"``, ``"linf"`` accepted): the input norm of ``K``.
        method: per-layer method passed to :func:`layer_bound`.
        exact_threshold: entries up to which dense float64 svdvals are used.

    Returns:
        A :class:`LipschitzBound` (with both ``K2`` and ``Kinf``).

    Example:
        >>> from robustcompress.models import MLP
        >>> b = lipschitz_bound(MLP(8, (6,), 3), (8,))
        >>> b.Kinf <= 8 ** 0.5 * b.K2 * (1 + 1e-5)
        True
    """
    norm = norm_arg(norm)
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    if isinstance(input_shape, int) or not isinstance(input_shape, (tuple, list, torch.Size)) or not input_shape or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape
    ):
        raise ValueError(f"Expected input_shape to be a non-empty sequence of positive ints (no batch dimension), "
                         f"but got input_shape={input_shape!r}")
    input_shape = tuple(int(s) for s in input_shape)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"BatchNorm {name!r} is in training mode: its output depends on the batch, so the network has no "
                "per-input Lipschitz bound; call model.eval() first"
            )
        if isinstance(m, _DROPOUTS) and m.training and m.p > 0:
            raise ValueError(f"Dropout {name!r} is in training mode (random output); call model.eval() first")

    gm = _trace(model)
    modules = dict(gm.named_modules())
    p = next(iter(model.parameters()), None)
    sample = torch.zeros((1, *input_shape), dtype=p.dtype if p is not None else torch.float32,
                         device=p.device if p is not None else "cpu")
    try:
        with torch.no_grad():
            rec = _ShapeRecorder(gm)
            rec.run(sample)
        for nd, shp in rec.shapes.items():
            nd.meta[_SHAPES_KEY] = shp
    except Exception as err:
        raise ValueError(f"The model does not run on an input of shape (N, {', '.join(map(str, input_shape))}): "
                         f"{type(err).__name__}: {err}") from err

    n_in = math.prod(input_shape)
    vals: dict[fx.Node, _Val] = {}
    factors: list[NodeFactor] = []
    folded: dict[fx.Node, fx.Node] = {}  # bn node -> linear node
    chain = True
    split = {"scale": 0.0, "concentration": 0.0, "activation": 0.0, "other": 0.0}
    out_node: fx.Node | None = None
    placeholders = 0
    any_linear = False

    def log(x: float) -> float:
        return math.log(x) if x > 0 else -math.inf

    def only_var(node: fx.Node) -> tuple[fx.Node, _Val]:
        var = [a for a in _nodes_in((node.args, node.kwargs)) if not vals[a].const]
        if len(var) != 1:
            raise ValueError(f"{_describe(node, modules)} takes {len(var)} inputs that depend on the network input; "
                             "only one is supported here")
        return var[0], vals[var[0]]

    def elementwise(node: fx.Node, factor: float, kind: str, split_key: str | None, note: str = "") -> None:
        a, v = only_var(node)
        vals[node] = _Val(v.k2 * factor, v.kinf * factor, None if v.ainf is None else v.ainf * factor)
        factors.append(NodeFactor(node.name, str(node.target), kind, factor, note=note))
        if split_key:
            split[split_key] += log(factor)

    def const_value(a: Any, node: fx.Node) -> torch.Tensor:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return torch.tensor(float(a), dtype=torch.float64)
        if isinstance(a, fx.Node) and a.op == "get_attr":
            t = _get_attr(gm, a.target)
            if isinstance(t, torch.Tensor):
                return t.detach().to("cpu", torch.float64)
        raise ValueError(f"{_describe(node, modules)}: a product or quotient needs a constant operand (a number or "
                         "a buffer / parameter), since a product of two inputs has no global Lipschitz bound")

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                raise ValueError(f"The bound supports models with one input, but the model also takes {node.target!r}")
            vals[node] = _Val(1.0, math.sqrt(n_in), 1.0)
            factors.append(NodeFactor(node.name, str(node.target), "input", 1.0))
            continue
        if node.op == "get_attr":
            vals[node] = _CONST
            continue
        if node.op == "output":
            outs = _nodes_in(node.args)
            if len(outs) != 1:
                raise ValueError("The bound supports models with one tensor output")
            out_node = outs[0]
            continue
        inputs = _nodes_in((node.args, node.kwargs))
        if inputs and all(vals[a].const for a in inputs) or (not inputs):
            vals[node] = _CONST
            continue
        target = node.target
        if node.op == "call_module":
            mod = modules[target]
            if node in folded:
                lin = folded[node]
                vals[node] = vals[lin]
                factors.append(NodeFactor(node.name, target, "bn", 1.0, note=f"folded into {lin.target}"))
                continue
            if isinstance(mod, _LINEAR_TYPES):
                any_linear = True
                a, v = only_var(node)
                shape = _tensor_shape(a)
                bn = None
                users = list(node.users)
                # BatchNorm scales dim 1. That is the layer's output axis for a
                # convolution, and for a Linear only when its output is (N, F):
                # on (N, L, F) a Linear acts on the last axis while BN scales L,
                # and diag(s)·W would under-estimate max(s)·σ₁(W).
                out_shape = _tensor_shape(node)
                foldable = (not isinstance(mod, (nn.Linear, LowRankLinear))
                            or (out_shape is not None and len(out_shape) == 1))
                if foldable and len(users) == 1 and users[0].op == "call_module" and isinstance(
                        modules[users[0].target], nn.modules.batchnorm._BatchNorm):
                    bn = modules[users[0].target]
                    folded[users[0]] = node
                sig = layer_bound(mod, shape, method, bn, exact_threshold)
                fro = operator_frobenius(mod, shape, bn)
                i2 = None
                kinf = sig * v.kinf
                if v.ainf is not None:
                    i2 = inf_to_2_bound(mod, shape, bn, sigma_bound=sig)
                    kinf = min(kinf, i2 * v.ainf)
                vals[node] = _Val(sig * v.k2, kinf, None)
                note = f"folded {users[0].target}" if bn is not None else ""
                factors.append(NodeFactor(node.name, target, "linear", sig, i2, fro, shape, note))
                split["scale"] += log(fro)
                split["concentration"] += 0.5 * (2 * log(sig) - 2 * log(fro)) if fro > 0 else -math.inf
                continue
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                s = float(_bn_scale(mod).abs().max())
                elementwise(node, _up(s), "bn", "other", "not folded: max |γ|/√(var+ε)")
                continue
            if isinstance(mod, _IDENTITY_MODULES) or isinstance(mod, _DROPOUTS):
                elementwise(node, 1.0, "shape", None)
                continue
            if isinstance(mod, _MAX_POOLS + _AVG_POOLS + _ADAPTIVE_MAX):
                a, v = only_var(node)
                f2, finf = pool_factor(mod, _tensor_shape(a))
                vals[node] = _Val(v.k2 * f2, v.kinf * f2, None if v.ainf is None else v.ainf * finf)
                factors.append(NodeFactor(node.name, target, "pool", f2, input_shape=_tensor_shape(a)))
                split["other"] += log(f2)
                continue
            try:
                lip = activation_lipschitz(mod)
            except ValueError:
                raise ValueError(
                    f"No Lipschitz rule for {_describe(node, modules)}: it is not a supported layer, activation, "
                    "pooling, normalisation or shape op (attention, LayerNorm and the like have no global bound)"
                ) from None
            elementwise(node, lip, "activation", "activation")
            continue
        if node.op == "call_function":
            if target in _FUNCTIONAL_ACTIVATIONS:
                kw = dict(zip(_FUNCTIONAL_ARGNAMES.get(target, ()), node.args[1:]))
                kw.update(node.kwargs)
                elementwise(node, activation_lipschitz(target, **kw), "activation", "activation")
                continue
            if target in (F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout):
                kw = dict(zip(("p", "training", "inplace"), node.args[1:]))
                kw.update(node.kwargs)
                if kw.get("training", True) and kw.get("p", 0.5) > 0:
                    raise ValueError(f"{_describe(node, modules)} runs in training mode (random output); "
                                     "call model.eval() / pass training=self.training")
                elementwise(node, 1.0, "shape", None)
                continue
            if target in _SHAPE_FUNCS:
                elementwise(node, 1.0, "shape", None)
                continue
            if target is operator.getitem:
                idx = node.args[1]
                flat = idx if isinstance(idx, tuple) else (idx,)
                if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in flat):
                    raise ValueError(f"{_describe(node, modules)}: only basic indexing (ints, slices) is supported")
                elementwise(node, 1.0, "shape", None)
                continue
            if target in _POOL_FUNCS_MAX or target in _POOL_FUNCS_AVG or target in _POOL_FUNCS_ADAPTIVE_MAX:
                a, v = only_var(node)
                f2, finf = pool_factor(target, _tensor_shape(a), *node.args[1:], **node.kwargs)
                vals[node] = _Val(v.k2 * f2, v.kinf * f2, None if v.ainf is None else v.ainf * finf)
                factors.append(NodeFactor(node.name, getattr(target, "__name__", str(target)), "pool", f2))
                split["other"] += log(f2)
                continue
            if target in _ADD_FUNCS or target in _SUB_FUNCS:
                _add(node, vals, factors, modules)
                if sum(not vals[a].const for a in _nodes_in(node.args[:2])) > 1:
                    chain = False
                continue
            if target is operator.neg:
                elementwise(node, 1.0, "scale", None)
                continue
            if target in _MUL_FUNCS or target in _DIV_FUNCS:
                lhs, rhs = node.args[0], node.args[1]
                lhs_var = isinstance(lhs, fx.Node) and not vals[lhs].const
                rhs_var = isinstance(rhs, fx.Node) and not vals[rhs].const
                if lhs_var and rhs_var:
                    raise ValueError(f"{_describe(node, modules)} multiplies two input-dependent tensors: no global "
                                     "Lipschitz bound")
                if target in _DIV_FUNCS:
                    if not lhs_var or node.kwargs.get("rounding_mode") is not None:
                        raise ValueError(f"{_describe(node, modules)}: only division of the input by a constant is supported")
                    c = const_value(rhs, node).abs().min()
                    if float(c) == 0:
                        raise ValueError(f"{_describe(node, modules)} divides by zero")
                    factor = _up(1.0 / float(c))
                else:
                    factor = _up(float(const_value(rhs if lhs_var else lhs, node).abs().max()))
                elementwise(node, factor, "scale", "other", "constant scale (input normalisation)")
                continue
            if target is torch.cat or target is torch.concat:
                _cat(node, vals, factors)
                chain = False
                continue
            if target is torch.mean:
                elementwise(node, 1.0, "pool", None, "mean ≤ 1")
                continue
        if node.op == "call_method":
            if target in _CONST_METHODS:
                vals[node] = _CONST
                continue
            if target in _SHAPE_METHODS:
                elementwise(node, 1.0, "shape", None)
                continue
            if target in _METHOD_ACTIVATIONS:
                elementwise(node, _METHOD_ACTIVATIONS[target], "activation", "activation")
                continue
            if target in ("add", "add_", "sub", "sub_"):
                _add(node, vals, factors, modules)
                if sum(not vals[a].const for a in _nodes_in(node.args[:2])) > 1:
                    chain = False
                continue
            if target == "mean":
                elementwise(node, 1.0, "pool", None, "mean ≤ 1")
                continue
        if node.op == "call_function" and target in _CONST_FUNCS:
            vals[node] = _CONST
            continue
        raise ValueError(
            f"No Lipschitz rule for {_describe(node, modules)}: it is not a supported layer, activation, pooling, "
            "normalisation, residual add or shape op (attention, LayerNorm and the like have no global bound)"
        )

    if out_node is None or vals[out_node].const:
        raise ValueError("The model's output does not depend on its input")
    if not any_linear:
        raise ValueError("The model has no eligible layer (Linear, Conv1d/2d, LowRankLinear, LowRankConv2d) to bound")
    v = vals[out_node]
    kinf = min(v.kinf, math.sqrt(n_in) * v.k2)
    if v.ainf is not None:
        kinf = min(kinf, math.sqrt(math.prod(_tensor_shape(out_node) or (1,))) * v.ainf)
    head = None
    pen = (None, None, None)
    if out_node.op == "call_module" and isinstance(modules[out_node.target], (nn.Linear, LowRankLinear)):
        if out_node not in folded.values():
            a = [x for x in _nodes_in((out_node.args, out_node.kwargs)) if not vals[x].const][0]
            shape = _tensor_shape(a)
            if shape is not None and len(shape) == 1:
                head = out_node.target
                pen = (vals[a].k2, vals[a].kinf, vals[a].ainf)
    units = (
        f"‖f(x+δ) − f(x)‖_2 ≤ K·‖δ‖ for inputs of shape {input_shape} in the units the model takes "
        "(a preprocessing outside the model changes K); a product of per-layer norms, so usually loose by "
        "orders of magnitude for deep networks — a certificate, not an estimate"
    )
    return LipschitzBound(
        K=v.k2 if norm == 2 else kinf,
        norm=norm,
        K2=v.k2,
        Kinf=kinf,
        input_shape=input_shape,
        factors=factors,
        log_split=dict(split) if chain else None,
        head=head,
        penultimate_K2=pen[0],
        penultimate_Kinf=pen[1],
        penultimate_Ainf=pen[2],
        units=units,
    )


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _add(node: fx.Node, vals: dict, factors: list, modules: dict) -> None:
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, fx.Node):
        raise ValueError(f"{node.name}: a tensor-valued alpha is not supported")
    k2 = kinf = 0.0
    ainf: float | None = 0.0
    for i, a in enumerate(node.args[:2]):
        if not isinstance(a, fx.Node) or vals[a].const:
            continue
        v = vals[a]
        w = abs(float(alpha)) if i == 1 else 1.0
        k2 += w * v.k2
        kinf += w * v.kinf
        ainf = None if (ainf is None or v.ainf is None) else ainf + w * v.ainf
    vals[node] = _Val(_up(k2), _up(kinf), None if ainf is None else _up(ainf))
    factors.append(NodeFactor(node.name, getattr(node.target, "__name__", str(node.target)), "add"))


def _cat(node: fx.Node, vals: dict, factors: list) -> None:
    parts = [vals[a] for a in _nodes_in(node.args[0] if node.args else node.kwargs["tensors"])]
    k2 = math.sqrt(sum(v.k2**2 for v in parts))
    kinf = math.sqrt(sum(v.kinf**2 for v in parts))
    ainf = None if any(v.ainf is None for v in parts) else max(v.ainf for v in parts)
    vals[node] = _Val(_up(k2), _up(kinf), ainf)
    factors.append(NodeFactor(node.name, "cat", "cat"))


# ---------------------------------------------------------------------------
# Certified radius
# ---------------------------------------------------------------------------


def certified_radius(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Any = 2,
    input_shape: Sequence[int] | None = None,
    bound: LipschitzBound | None = None,
) -> torch.Tensor:
    """Per-example radius within which the prediction provably cannot change.

    With logit margins ``m_j(x) = f_y(x) − f_j(x)``: when the output comes
    from a final Linear ``W_L`` on features ``h`` (Lipschitz ``K_h``), each
    margin is ``(‖w_y − w_j‖_2 · K_h)``-Lipschitz, so the radius is
    ``min_{j≠y} m_j(x) / (‖w_y − w_j‖_2 K_h)`` (at least
    ``M(x) / (max_{j≠y} ‖w_y − w_j‖_2 · K_h)``; for ℓ∞ also
    ``‖w_y − w_j‖_1 · Ainf_h`` when ``h`` is an entrywise map of the input);
    otherwise ``M(x) / (√2·K)``. Misclassified examples get 0. It holds only at
    the input shape and in the input units of ``x``.

    Args:
        model: the network (eval-mode BatchNorm / dropout).
        x: inputs ``N × input_shape``.
        y: labels ``N``.
        norm: 2 or ``float("inf")``.
        input_shape: defaults to ``x.shape[1:]``.
        bound: a precomputed :class:`LipschitzBound` for this model and shape.

    Returns:
        Tensor ``N`` (float64, on ``x.device``).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.eye(2))
        >>> certified_radius(model, torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        tensor([0.7071], dtype=torch.float64)
    """
    norm = norm_arg(norm)
    x = float_tensor(x, "x")
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError("Expected y to be an integer tensor of labels")
    if x.dim() < 2 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"Expected x of shape (N, ...) and y of shape (N,), but got {tuple(x.shape)} and {tuple(y.shape)}")
    shape = tuple(x.shape[1:]) if input_shape is None else tuple(input_shape)
    if shape != tuple(x.shape[1:]):
        raise ValueError(f"input_shape={shape} does not match x.shape[1:]={tuple(x.shape[1:])}")
    if bound is None:
        bound = lipschitz_bound(model, shape, norm)
    elif tuple(bound.input_shape) != shape:
        raise ValueError(f"The given bound holds for input shape {bound.input_shape}, not {shape}")
    with torch.no_grad():
        logits = model(x).double()
    if logits.dim() != 2:
        raise ValueError(f"Expected the model to return logits (N, classes), but got shape {tuple(logits.shape)}")
    c = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= c:
        raise ValueError(f"Expected labels in [0, {c}), but got range [{int(y.min())}, {int(y.max())}]")
    y = y.to(logits.device).long()
    fy = logits.gather(1, y[:, None])
    margins = fy - logits  # N × C, m_j = f_y − f_j
    own = torch.nn.functional.one_hot(y, c).bool()
    lip = torch.full_like(margins, math.sqrt(2.0) * (bound.K2 if norm == 2 else bound.Kinf))
    if bound.head is not None:
        w = _head_matrix(model.get_submodule(bound.head)).to(logits.device)
        diff = w[y][:, None, :] - w[None, :, :]  # N × C × features
        kh = bound.penultimate_K2 if norm == 2 else bound.penultimate_Kinf
        per = torch.linalg.vector_norm(diff, dim=2) * kh
        if norm != 2 and bound.penultimate_Ainf is not None:
            per = torch.minimum(per, diff.abs().sum(2) * bound.penultimate_Ainf)
        lip = torch.minimum(lip, per.mul(1 + ROUNDING_MARGIN))
    ratio = torch.where(lip > 0, margins / lip, torch.full_like(margins, math.inf))
    ratio = ratio.masked_fill(own, math.inf)
    radius = ratio.min(1).values.clamp_min(0)
    correct = logits.argmax(1) == y
    radius = torch.where(correct, radius, torch.zeros_like(radius))
    # Margins are exact in float64 up to the model's own float32 rounding: shave a hair.
    return (radius * (1 - 1e-6)).to(x.device)


def _head_matrix(module: nn.Module) -> torch.Tensor:
    if isinstance(module, LowRankLinear):
        return module.weight_b.detach().to("cpu", torch.float64) @ module.weight_a.detach().to("cpu", torch.float64)
    return module.weight.detach().to("cpu", torch.float64)
