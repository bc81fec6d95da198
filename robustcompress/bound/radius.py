"""Certified radius: the distance within which a prediction provably cannot change (DESIGN §1.2).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.eye(2))
    >>> float(certified_radius(model, torch.tensor([[3.0, 1.0]]), torch.tensor([0]))[0]) > 1.41
    True
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from .._checks import float_tensor, norm_arg
from .graph import LipschitzBound, lipschitz_bound
from .layer_facts import head_matrix
from .matrix import ROUNDING_MARGIN

__all__ = ["certified_radius"]


def _nonfinite_rows(t: torch.Tensor, show: int = 8) -> list[int]:
    rows = (~torch.isfinite(t.flatten(1))).any(1).nonzero().flatten().tolist()
    return rows[:show] + (["…"] if len(rows) > show else [])


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

    Non-finite inputs are an error, never a ``nan`` radius: a row of ``x`` with
    NaN / Inf has no prediction to certify, so a ``ValueError`` names the rows
    (filter them out first); likewise for rows whose logits are not finite.

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
    bad = _nonfinite_rows(x)
    if bad:
        raise ValueError(f"x has NaN or Inf entries in rows {bad}: such an input has no prediction to certify; "
                         "remove those rows")
    with torch.no_grad():
        logits = model(x).double()
    if logits.dim() != 2:
        raise ValueError(f"Expected the model to return logits (N, classes), but got shape {tuple(logits.shape)}")
    bad = _nonfinite_rows(logits)
    if bad:
        raise ValueError(f"The model's logits are NaN or Inf for rows {bad} of x: no radius can be certified")
    c = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= c:
        raise ValueError(f"Expected labels in [0, {c}), but got range [{int(y.min())}, {int(y.max())}]")
    y = y.to(logits.device).long()
    fy = logits.gather(1, y[:, None])
    margins = fy - logits  # N × C, m_j = f_y − f_j
    own = torch.nn.functional.one_hot(y, c).bool()
    lip = torch.full_like(margins, math.sqrt(2.0) * (bound.K2 if norm == 2 else bound.Kinf))
    if bound.head is not None:
        w = head_matrix(model.get_submodule(bound.head)).to(logits.device)
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
