"""Building blocks of the subspace iteration shared by the spectral state.

Example:
    >>> import torch
    >>> q = cholesky_qr2(torch.randn(6, 2))
    >>> torch.allclose(q.T @ q, torch.eye(2), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

__all__ = ["cholesky_qr2", "power_step", "ritz_step", "RitzResult", "subspace_iteration", "gram_upper_bound"]


def cholesky_qr2(y: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the columns of ``y`` (``… × n × k``) by CholeskyQR, twice.

    Columns are normalised first, which removes their scale from the Gram
    matrix's condition number; CholeskyQR2 then orthonormalises to working
    precision while the Gram is numerically positive definite. Where Cholesky
    fails (rank-deficient or badly conditioned blocks) Householder QR is used.
    The direction of the first column is kept.

    Args:
        y: a batch of ``n × k`` blocks with ``k ≤ n``.

    Returns:
        ``Q`` of the same shape with ``QᵀQ = I``.

    Example:
        >>> q = cholesky_qr2(torch.randn(10, 3))
        >>> torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)
        True
    """
    q = y / torch.linalg.vector_norm(y, dim=-2, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    for _ in range(2):
        gram = q.transpose(-1, -2) @ q
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()) or not bool(torch.isfinite(chol).all()):
            qr, r = torch.linalg.qr(y)
            # Householder QR fixes signs arbitrarily; keep column directions.
            sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
            return qr * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)
        q = torch.linalg.solve_triangular(chol, q.transpose(-1, -2), upper=False).transpose(-1, -2)
    return q




class RitzResult(NamedTuple):
    """One Rayleigh–Ritz update of a batch of operators (see :func:`ritz_step`)."""

    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor
    radius: torch.Tensor
    ok: torch.Tensor


def power_step(u0s: list[torch.Tensor], ys: list[torch.Tensor], vs: list[torch.Tensor]):
    """k = 1 update of many operators of any shapes, list-wide (foreach) so the per-layer cost is tiny.

    From ``U₀ = W v`` and ``Y = WᵀU₀`` (``v`` unit): ``s = ‖W v‖``, ``u = U₀/s``,
    ``v' = Y/‖Y‖`` and ``σ = ‖Y‖/s = uᵀ W v'``, which lies between the Ritz value
    ``s`` and σ₁. The residual of the pair ``(u, v)`` with value ``s``,
    ``r = [W v − s u; Wᵀu − s v] = [0; Y/s − s v]``, costs no weight read; some
    singular value (or 0, when W is not square) lies within ``‖r‖/√2`` of ``s``
    (the residual bound for the symmetric dilation ``[[0, W], [Wᵀ, 0]]``, whose
    eigenvalues are ``±σ_i`` and ``|m − n|`` zeros) — not necessarily σ₁.

    Args:
        u0s, ys, vs: per operator ``W v`` (``m × 1``), ``Wᵀ W v`` (``n × 1``), ``v`` (``n × 1``).

    Returns:
        ``(s, yn, radius, ok)``: tensors of one entry per operator — ``‖W v‖``,
        ``‖Y‖``, ``‖r‖/√2`` and whether the products were finite.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0]))
        >>> v = torch.tensor([[0.6], [0.8]])
        >>> s, yn, radius, ok = power_step([w @ v], [w.T @ (w @ v)], [v])
        >>> bool(s - radius <= 3.0 <= s + radius or s - radius <= 1.0 <= s + radius)
        True
    """
    s = torch.stack(torch._foreach_norm(u0s))
    yn = torch.stack(torch._foreach_norm(ys))
    ok = torch.isfinite(s) & torch.isfinite(yn)
    safe = torch.where(ok & (s > 0), s, torch.ones_like(s))
    per = list(safe.unbind(0))
    r = torch._foreach_sub(torch._foreach_div(ys, per), torch._foreach_mul(vs, per))
    radius = torch.stack(torch._foreach_norm(r)) / math.sqrt(2.0)
    radius = torch.where(ok & (s > 0), radius, torch.full_like(radius, math.inf))
    return s, yn, radius, ok


def ritz_step(u0: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> RitzResult:
    """Rayleigh–Ritz on ``span(V)`` for a batch of operators given ``U₀ = W V`` and ``Y = WᵀU₀``.

    With ``G = U₀ᵀU₀ = Q diag(s²) Qᵀ``, the Ritz pairs are ``v_j = V q_j``,
    ``u_j = U₀ q_j / s_j`` with values ``s_j ≤ σ_j`` (interlacing). Their residuals
    ``r_j = [W v_j − s_j u_j; Wᵀu_j − s_j v_j] = [0; Y q_j / s_j − s_j V q_j]``
    need no weight read, and some singular value (or 0, when W is not square)
    lies within ``‖r_j‖/√2`` of ``s_j``. The next right block is ``orth(Y Q)`` (CholeskyQR2).

    Directions with ``s_j ≈ 0`` carry no singular vectors; non-finite blocks
    are flagged. The caller decides what to keep (``ok``).

    Args:
        u0: ``… × m × k``; y: ``… × n × k``; v: ``… × n × k`` with orthonormal columns.

    Returns:
        :class:`RitzResult` ``(u, v, sigma, radius, ok)``: ``u = U₀Q/s``
        (``… × m × k``), the next ``V`` (``… × n × k``), ``s`` and ``‖r‖/√2``
        (``… × k``, descending ``s``), and ``ok`` (``…``) — finite products.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        >>> v = torch.eye(3)[:, :2]
        >>> res = ritz_step(w @ v, w.T @ (w @ v), v)
        >>> res.sigma.tolist(), res.radius.tolist()
        ([3.0, 2.0], [0.0, 0.0])
    """
    gram = u0.mT @ u0
    ok = torch.isfinite(gram).flatten(-2).all(-1) & torch.isfinite(y).flatten(-2).all(-1)
    gram = torch.where(ok[..., None, None], gram, torch.zeros_like(gram))
    lam, q = torch.linalg.eigh(gram)
    lam, q = lam.flip(-1), q.flip(-1)
    s = lam.clamp_min(0).sqrt()
    tiny = torch.finfo(s.dtype).tiny
    live = s > torch.finfo(s.dtype).eps * s[..., :1].clamp_min(tiny) * 16
    s_safe = torch.where(live, s, torch.ones_like(s))
    y_rot = torch.where(ok[..., None, None], y, torch.zeros_like(y)) @ q
    v_rot = v @ q
    radius = torch.linalg.vector_norm(y_rot / s_safe[..., None, :] - s_safe[..., None, :] * v_rot, dim=-2)
    radius = torch.where(live & ok[..., None], radius / math.sqrt(2.0), torch.full_like(radius, math.inf))
    u = torch.where(ok[..., None, None], u0, torch.zeros_like(u0)) @ q / s_safe[..., None, :]
    v_next = cholesky_qr2(torch.where(live[..., None, :] & ok[..., None, None], y_rot, v_rot))
    return RitzResult(u, v_next, s, radius, ok)


def subspace_iteration(products: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], v: torch.Tensor,
                       n_iter: int) -> RitzResult:
    """Warm block power iteration with Rayleigh–Ritz for a batch of operators given only their products.

    Each iteration calls ``products(V) → (W V, WᵀW V)`` once and applies
    :func:`ritz_step`. This one loop serves the spectral state's layers (one
    operator per layer), the bound's power estimates and the attacks'
    per-example Jacobians (one operator per example).

    Args:
        products: maps ``V`` (``… × n × k``) to ``(W V, Wᵀ(W V))``.
        v: starting block ``… × n × k`` (orthonormalised here).
        n_iter: iterations, ≥ 1.

    Returns:
        The :class:`RitzResult` of the last iteration: ``sigma`` are Ritz values
        (lower bounds of ``σ_1 … σ_k``), ``radius`` their residual half-widths.

    Example:
        >>> w = torch.randn(2, 7, 5, dtype=torch.float64)
        >>> res = subspace_iteration(lambda v: (w @ v, w.mT @ (w @ v)), torch.randn(2, 5, 2, dtype=torch.float64), 200)
        >>> torch.allclose(res.sigma, torch.linalg.svdvals(w)[:, :2])
        True
    """
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
        raise ValueError(f"Expected n_iter to be a positive int, but got n_iter={n_iter!r}")
    v = cholesky_qr2(v)
    result = None
    for _ in range(n_iter):
        u0, y = products(v)
        result = ritz_step(u0, y, v)
        v = torch.where(result.ok[..., None, None], result.v, v)
    return result


def gram_upper_bound(matrix: torch.Tensor, n_iter: int = 6) -> torch.Tensor:
    """Upper bound of ``σ_1`` by Gram iteration: ``σ_1(W) ≤ ‖(WᴴW)^{2^{t-1}}‖_F^{1/2^t}``.

    ``G_1 = WᴴW`` (on the smaller side), ``G_{t+1} = G_t²``; ``σ_1(W)^{2^t} =
    σ_1(G_t) ≤ ‖G_t‖_F``. Each ``G_t`` is divided by its Frobenius norm and the
    log-scale is carried along, so nothing overflows; computed in float64
    (complex128 for complex input). The bound decreases to ``σ_1`` with ``t``
    (ratio at most ``rank^{1/2^t}``). This is the package's one Gram iteration:
    the certified :func:`robustcompress.bound.gram_iteration_bound` adds its
    rounding margin on top.

    Args:
        matrix: ``… × m × n``, real or complex.
        n_iter: Gram steps ``t ≥ 1``.

    Returns:
        float64 tensor ``…`` of upper bounds (0 for a zero matrix; no rounding
        margin: see :mod:`robustcompress.bound` for certificates).

    Example:
        >>> abs(float(gram_upper_bound(torch.diag(torch.tensor([3.0, 1.0])))) - 3.0) < 1e-6
        True
    """
    g = matrix.detach()
    g = g.to(torch.complex128 if g.is_complex() else torch.float64)
    # σ_1(W) = c · σ_1(W/c): scale by the largest entry first so neither the
    # norm nor the first Gram product can overflow.
    f0 = g.abs().amax(dim=(-2, -1))
    zero = f0 == 0
    f0 = torch.where(zero, torch.ones_like(f0), f0)
    g = g / f0[..., None, None].to(g.dtype)
    ell = torch.log(f0)
    g = g @ g.mH if g.shape[-2] < g.shape[-1] else g.mH @ g
    for t in range(1, n_iter + 1):
        f = torch.linalg.matrix_norm(g)
        f = torch.where(f == 0, torch.ones_like(f), f)
        g = g / f[..., None, None].to(g.dtype)
        ell = ell + torch.log(f) / 2**t
        if t < n_iter:
            g = g @ g
    return torch.where(zero, torch.zeros_like(ell), torch.exp(ell))
