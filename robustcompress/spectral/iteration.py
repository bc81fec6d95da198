"""Building blocks of the subspace iteration shared by the spectral state.

Example:
    >>> import torch
    >>> q = cholesky_qr2(torch.randn(6, 2))
    >>> torch.allclose(q.T @ q, torch.eye(2), atol=1e-5)
    True
"""

from __future__ import annotations

import torch

__all__ = ["cholesky_qr2"]


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


