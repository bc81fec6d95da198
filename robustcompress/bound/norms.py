"""Certified norms of one linear layer (DESIGN §1.2): exact, Gram iteration, Fourier symbol, ``√c·σ_1``.

A layer is first turned into a float64 :class:`~robustcompress.bound.layer_facts.LayerView`
(``y = diag(s)·B·conv_K(x)``, a following eval-mode BatchNorm folded in).
Linear layers: exact float64 ``svdvals`` or Gram iteration
(:mod:`robustcompress.bound.matrix`). Convolutions, at their real input size:
the materialised operator's ``svdvals``; the Fourier-symbol bound with a DFT of
size ``≥ n + 2p`` per dimension; or ``√(c·copies)·σ̄_1(W_mat)`` with ``c`` the
most windows reading one input element. Every number carries the rounding
margin. :func:`power_sigma` is the one *lower* bound here (power iteration).

Example:
    >>> conv = nn.Conv2d(1, 1, 2, stride=2, bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.fill_(0.5)
    >>> round(layer_bound(conv, (1, 4, 4)), 5)
    1.0
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._checks import positive_int
from ..spectral.iteration import subspace_iteration
from ..spectral.views import operator_for
from .layer_facts import LayerView, layer_view, per_dim
from .matrix import EXACT_THRESHOLD, matrix_norm_bound, round_up

__all__ = ["window_multiplicity", "conv_fourier_bound", "conv_matrix_bound", "layer_bound", "operator_frobenius",
           "power_sigma", "inf_to_2_bound"]

#: Most ``frequencies · m · n · min(m, n)`` for which ``method="auto"`` runs the
#: Fourier bound of a convolution (above it the √c matrix bound alone).
_FOURIER_BUDGET = 2e8

#: Most entries of a convolution operator materialised for ``method="exact"``.
_MATERIALISE_LIMIT = 1 << 25


def _with_padding(layer: LayerView, spatial: Sequence[int]) -> LayerView:
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
        pads = tuple((q, q) for q in per_dim(p, d))
    layer.padding = pads
    return layer


def _matrix_of(layer: LayerView) -> torch.Tensor:
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


def window_multiplicity(k: int, s: int, d: int) -> int:
    """Most windows (kernel k, stride s, dilation d) that read one input element, per dimension.

    A tap j reads element i from the window starting at i − j·d, which exists
    only when that start is a multiple of s: the count is the largest number of
    j ∈ [0, k) sharing one residue of j·d mod s (``⌈k/s⌉`` without dilation).

    Example:
        >>> window_multiplicity(3, 2, 1), window_multiplicity(2, 2, 1)
        (2, 1)
    """
    counts: dict[int, int] = {}
    for j in range(k):
        r = (j * d) % s
        counts[r] = counts.get(r, 0) + 1
    return max(counts.values())


def _conv_c(layer: LayerView) -> int:
    k = layer.kernel.shape[2:]
    return math.prod(window_multiplicity(kk, ss, dd) for kk, ss, dd in zip(k, layer.stride, layer.dilation))


def _padding_copies(layer: LayerView, spatial: Sequence[int]) -> int:
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


def _check_input_shape(layer: LayerView, input_shape: Sequence[int] | None, module: nn.Module) -> tuple[int, ...]:
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


def _apply_conv(layer: LayerView, x: torch.Tensor) -> torch.Tensor:
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


def _operator_matrix(layer: LayerView, input_shape: tuple[int, ...]) -> torch.Tensor:
    m, n = _operator_size(layer, input_shape)
    if m * n > _MATERIALISE_LIMIT:
        raise ValueError(
            f"The convolution's operator at input shape {input_shape} is {m}×{n}, too large to materialise for "
            "method='exact'; use 'fourier', 'gram' or 'matrix'"
        )
    eye = torch.eye(n, dtype=torch.float64, device=layer.kernel.device).reshape(n, *input_shape)
    return _apply_conv(layer, eye).reshape(n, -1).T


def _operator_size(layer: LayerView, input_shape: tuple[int, ...]) -> tuple[int, int]:
    out_sp = [
        _out_size(n, k, s, d, p)
        for n, k, s, d, p in zip(input_shape[1:], layer.kernel.shape[2:], layer.stride, layer.dilation, layer.padding)
    ]
    out_ch = layer.mix.shape[0] if layer.mix is not None else layer.kernel.shape[0]
    return out_ch * math.prod(out_sp), math.prod(input_shape)


def _fourier_symbols(layer: LayerView, spatial: Sequence[int]) -> torch.Tensor:
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
    layer = layer_view(conv, bn)
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
    layer = layer_view(conv, bn)
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
    layer = layer_view(module, bn)
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
        return matrix_norm_bound(_operator_matrix(layer, shape), "exact")
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

    Args:
        module: a linear layer; input_shape: its input without batch (required for convolutions).
        bn: an eval-mode BatchNorm folded in.

    Returns:
        ``‖W‖_F`` of the operator (a float).

    Example:
        >>> conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.fill_(1.0)
        >>> round(operator_frobenius(conv, (1, 4)) ** 2)   # 4 positions × 3 taps − 2 taps in the padding
        10
    """
    layer = layer_view(module, bn)
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


def _tap_weights(layer: LayerView, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
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
    (convolutions at ``input_shape``, in the weight's precision, float32 at least):
    :func:`robustcompress.spectral.iteration.subspace_iteration` with one
    direction on the layer's operator (:func:`robustcompress.spectral.operator_for`).

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
    layer = layer_view(module, bn)  # a clear error for NaN / Inf weights or a bad BatchNorm
    if layer.kind == "conv":
        input_shape = _check_input_shape(layer, input_shape, module)
    op = operator_for(module, "operator", input_shape if layer.kind == "conv" else None, bn)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(op.shape[1], 1, generator=gen, dtype=op.dtype).to(op.device)
    with torch.no_grad():
        # n_iter updates of v, then ‖W v‖: the Ritz value of the (n_iter+1)-th step.
        res = subspace_iteration(lambda x: (lambda u0: (u0, op.rmatvec(u0)))(op.matvec(x)), v, n_iter + 1)
    return float(res.sigma[0])


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
    layer = layer_view(module, bn)
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
    return min(round_up(math.sqrt(rows)), round_up(math.sqrt(n) * sigma_bound))
