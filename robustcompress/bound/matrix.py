"""Certified spectral norms of matrices, and the rounding margin every certified number carries.

Every certified number of the bound is computed in float64 (complex128 for
Fourier symbols) and multiplied by ``1 + ROUNDING_MARGIN``: the margin
(``1e-6``) is far above the backward error of the float64 SVD / FFT / Gram
products used (``≲ 1e-12`` relative).

Example:
    >>> round(matrix_norm_bound(torch.tensor([[3.0, 0.0], [0.0, 4.0]])), 5)
    4.0
"""

from __future__ import annotations

import torch

from .._checks import float_tensor, positive_int
from ..spectral.iteration import gram_upper_bound

__all__ = ["ROUNDING_MARGIN", "EXACT_THRESHOLD", "round_up", "gram_iteration_bound", "matrix_norm_bound"]

#: Relative margin multiplied onto every certified float64 number.
ROUNDING_MARGIN = 1e-6

#: Default size (entries of the dense matrix) up to which exact float64 ``svdvals`` are used.
EXACT_THRESHOLD = 1 << 18


def round_up(x: float) -> float:
    """``x · (1 + ROUNDING_MARGIN)``: a float64 result made safe against its own rounding.

    Args:
        x: a non-negative number computed in float64.

    Returns:
        The number times ``1 + ROUNDING_MARGIN`` (a float).

    Example:
        >>> round_up(2.0) > 2.0
        True
    """
    return float(x) * (1.0 + ROUNDING_MARGIN)


def gram_iteration_bound(w: torch.Tensor, n_iter: int = 6) -> float:
    """Certified upper bound of ``σ_1(W)`` by Gram iteration, rescaled every step.

    ``G_0 = W``, ``G_{t+1} = G_tᴴ G_t``; ``σ_1(G_t) = σ_1(W)^{2^t} ≤ ‖G_t‖_F`` gives
    ``σ_1(W) ≤ ‖G_t‖_F^{1/2^t}``, which decreases to ``σ_1`` as t grows (the
    ratio is at most ``rank^{1/2^{t+1}}``). Each ``G_t`` is divided by its
    Frobenius norm and the log-scale carried along, so nothing overflows.
    Computed in float64 (complex128 for complex input) by the package's one Gram
    iteration, :func:`robustcompress.spectral.iteration.gram_upper_bound`, with the
    rounding margin on top; a leading batch dimension gives one bound per matrix,
    and the maximum is returned.

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
    if not bool(torch.isfinite(torch.view_as_real(g) if g.is_complex() else g).all()):
        raise ValueError("Expected w to be finite, but it holds NaN or Inf entries")
    return round_up(float(gram_upper_bound(g, n_iter).max()))


def matrix_norm_bound(w: torch.Tensor, method: str = "auto", exact_threshold: int = EXACT_THRESHOLD) -> float:
    """Certified upper bound of the spectral norm of a matrix (or the max over a batch).

    ``"exact"``: float64 ``svdvals``; ``"gram"``: :func:`gram_iteration_bound`;
    ``"auto"``: exact when the matrix has at most ``exact_threshold`` entries,
    else Gram iteration. Both times ``1 + ROUNDING_MARGIN``.

    Args:
        w: ``m × n`` or ``b × m × n``, real or complex, finite.
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
    if not bool(torch.isfinite(torch.view_as_real(w) if w.is_complex() else w).all()):
        raise ValueError("Expected w to be finite, but it holds NaN or Inf entries")
    per = w.shape[-1] * w.shape[-2]
    if method == "gram" or (method == "auto" and per > exact_threshold):
        return gram_iteration_bound(w, n_iter=8)
    if w.numel() == 0:
        return 0.0
    return round_up(float(torch.linalg.svdvals(w).max()))
