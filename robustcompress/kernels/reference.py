"""Pure-torch reference for one model-wide power step (the fused kernel's fallback).

Kept free of Triton so that it imports everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MAX_K", "check_power_step_args", "power_step_reference"]

#: Largest number of columns ``k`` per layer the fused kernel is built for.
MAX_K = 32

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_power_step_args(
    weights: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    row_scales: Sequence[torch.Tensor | None] | None,
    u_addends: Sequence[torch.Tensor | None] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Validate the arguments of a power step and return them as lists.

    Raises with the argument, the layer index, what came and what is allowed.
    Weights may be any strided 2-D view (transposed, sliced): they are read in
    place. Row scales that are not float32 and contiguous are converted (they
    are small); weights, vectors and addends are never copied.
    """
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError(
            f"Expected weights to be a sequence of 2-D tensors, but got {type(weights).__name__}"
        )
    if isinstance(vs, torch.Tensor) or not isinstance(vs, Sequence):
        raise TypeError(f"Expected vs to be a sequence of 2-D tensors, but got {type(vs).__name__}")
    weights, vs = list(weights), list(vs)
    if len(weights) == 0:
        raise ValueError("Expected weights to hold at least one tensor, but got an empty sequence")
    if len(vs) != len(weights):
        raise ValueError(
            f"Expected one vector block per weight, but got len(weights)={len(weights)} and len(vs)={len(vs)}"
        )
    if row_scales is None:
        scales: list[torch.Tensor | None] = [None] * len(weights)
    else:
        if isinstance(row_scales, torch.Tensor) or not isinstance(row_scales, Sequence):
            raise TypeError(
                "Expected row_scales to be None or a sequence of 1-D tensors / None, "
                f"but got {type(row_scales).__name__}"
            )
        scales = list(row_scales)
        if len(scales) != len(weights):
            raise ValueError(
                "Expected one row scale (or None) per weight, but got "
                f"len(weights)={len(weights)} and len(row_scales)={len(scales)}"
            )
    addends = _optional_list(u_addends, "u_addends", len(weights), "2-D tensors")
    device = None
    for i, (w, v) in enumerate(zip(weights, vs)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"Expected weights[{i}] to be a torch.Tensor, but got {type(w).__name__}")
        if w.dim() != 2 or w.numel() == 0:
            raise ValueError(f"Expected weights[{i}] to be a non-empty 2-D matrix, but got shape {tuple(w.shape)}")
        if w.dtype not in _WEIGHT_DTYPES:
            raise TypeError(
                f"Expected weights[{i}] to have dtype float32, bfloat16 or float16, but got dtype={w.dtype}"
            )
        device = w.device if device is None else device
        if w.device != device:
            raise ValueError(f"Expected every tensor on {device}, but weights[{i}] is on {w.device}")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"Expected vs[{i}] to be a torch.Tensor, but got {type(v).__name__}")
        m, n = w.shape
        if v.dim() != 2 or v.shape[0] != n or not 1 <= v.shape[1] <= MAX_K:
            raise ValueError(
                f"Expected vs[{i}] of shape ({n}, k) with 1 <= k <= {MAX_K} (weights[{i}] is {m}x{n}), "
                f"but got shape {tuple(v.shape)}"
            )
        if v.dtype != torch.float32:
            raise TypeError(f"Expected vs[{i}] to have dtype float32, but got dtype={v.dtype}")
        if not v.is_contiguous():
            raise ValueError(f"Expected vs[{i}] to be contiguous, but got strides {v.stride()}")
        if v.device != device:
            raise ValueError(f"Expected every tensor on {device}, but vs[{i}] is on {v.device}")
        x = addends[i]
        if x is not None:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"Expected u_addends[{i}] to be None or a torch.Tensor, but got {type(x).__name__}")
            if x.shape != (m, v.shape[1]) or x.dtype != torch.float32 or not x.is_contiguous() or x.device != device:
                raise ValueError(
                    f"Expected u_addends[{i}] to be a contiguous float32 ({m}, {v.shape[1]}) tensor on {device} "
                    f"(weights[{i}] is {m}x{n}, vs[{i}] has {v.shape[1]} columns), but got shape {tuple(x.shape)}, "
                    f"dtype={x.dtype}, strides {x.stride()} on {x.device}")
        s = scales[i]
        if s is None:
            continue
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            raise TypeError(f"Expected row_scales[{i}] to be None or a floating-point tensor, but got {s!r:.80}")
        if s.shape != (m,):
            raise ValueError(
                f"Expected row_scales[{i}] of shape ({m},) to match weights[{i}] ({m}x{n}), "
                f"but got shape {tuple(s.shape)}"
            )
        if s.device != device:
            raise ValueError(f"Expected every tensor on {device}, but row_scales[{i}] is on {s.device}")
        if s.dtype != torch.float32 or not s.is_contiguous():
            scales[i] = s.detach().to(torch.float32).contiguous()
    return weights, vs, scales, addends


def _optional_list(items, name: str, count: int, what: str) -> list:
    if items is None:
        return [None] * count
    if isinstance(items, torch.Tensor) or not isinstance(items, Sequence):
        raise TypeError(f"Expected {name} to be None or a sequence of {what} / None, but got {type(items).__name__}")
    items = list(items)
    if len(items) != count:
        raise ValueError(f"Expected one entry of {name} (or None) per weight, but got "
                         f"len(weights)={count} and len({name})={len(items)}")
    return items


@torch.no_grad()
def power_step_reference(
    weights: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    row_scales: Sequence[torch.Tensor | None] | None = None,
    u_addends: Sequence[torch.Tensor | None] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    r"""One power step for every layer with plain matmuls, in float32.

    For each layer ``l`` with operator ``A_l = diag(s_l) W_l`` (``A_l = W_l``
    without a row scale) and addend ``X_l`` (0 without one)::

        U_l = diag(s_l) (W_l V_l + X_l)          (m_l × k)
        Y_l = W_lᵀ diag(s_l) U_l                 (n_l × k)

    so ``Y_l = A_lᵀ A_l V_l`` without an addend, the product a subspace
    iteration orthonormalises next. The addend carries a low-rank term
    computed outside: a LoRA layer ``W₀ + s·B·A`` passes ``X = s·B(A V)``,
    making ``U`` the whole operator's product, and adds ``s·Aᵀ(Bᵀ U)`` to ``Y``
    itself. bf16 / fp16 weights are upcast to float32 before the products.
    No autograd: the outputs are detached.

    Args:
        weights: 2-D matrices ``W_l`` (float32, bfloat16 or float16; any strides,
            e.g. a transposed or sliced view of a stored weight), one device.
        vs: float32 contiguous blocks ``V_l`` of shape ``(n_l, k_l)``, ``1 <= k_l <= 32``.
        row_scales: ``None``, or per layer ``None`` / a length-``m_l`` vector ``s_l``.
        u_addends: ``None``, or per layer ``None`` / a contiguous float32 ``m_l × k_l`` block ``X_l``.

    Returns:
        ``(us, ys)``: lists of float32 tensors ``U_l`` (``m_l × k_l``) and ``Y_l`` (``n_l × k_l``).

    Example:
        >>> w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> us, ys = power_step_reference([w], [torch.tensor([[1.0], [1.0]])])
        >>> ys[0].flatten().tolist()
        [9.0, 1.0]
    """
    weights, vs, scales, addends = check_power_step_args(weights, vs, row_scales, u_addends)
    us, ys = [], []
    for w, v, s, x in zip(weights, vs, scales, addends):
        a = w.detach().to(torch.float32)
        u = a @ v
        if x is not None:
            u = u + x
        if s is not None:
            u = u * s[:, None]
            y = a.T @ (u * s[:, None])
        else:
            y = a.T @ u
        us.append(u)
        ys.append(y)
    return us, ys
