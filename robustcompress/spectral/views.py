"""Operator views of layers: a weight (or a layer at its input size) as a linear map with its adjoint.

Each view is a :class:`LinearOperator` ``R^n → R^m`` given by block products
``W V`` and ``Wᵀ U``, differentiable with respect to the layer's parameters:

* :class:`MatrixView` — a weight as ``out × (in·k…)``, block diagonal for
  grouped convolutions, optionally row-scaled by a folded BatchNorm;
* :class:`LowRankView` — the product ``B·A`` of a factorised layer;
* :class:`FunctionOperator` — a convolution as the exact map at its input size.

Example:
    >>> from torch import nn
    >>> matrix_view(nn.Linear(4, 3)).shape
    (3, 4)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..layers import LowRankConv2d, LowRankLinear

__all__ = [
    "LinearOperator",
    "MatrixView",
    "LowRankView",
    "FunctionOperator",
    "matrix_view",
    "conv_operator",
    "operator_for",
    "SUPPORTED_LAYERS",
]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, LowRankLinear, LowRankConv2d)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision weights are iterated in float32: the Gram matrices of
    # subspace iteration lose everything in 8 or 11 mantissa bits.
    return torch.float64 if dtype == torch.float64 else torch.float32


class LinearOperator:
    """A linear map ``R^n → R^m`` given by products, with its adjoint.

    Subclasses implement :meth:`matvec` and :meth:`rmatvec`; both take and
    return column blocks (``n × k`` / ``m × k``) in the operator's compute dtype
    and are differentiable with respect to the layer's parameters.
    """

    shape: tuple[int, int]
    #: operators with equal, non-None keys can be stacked into one batched matrix product
    batch_key: tuple | None = None

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``W v`` for a block ``v`` of shape ``n × k``."""
        raise NotImplementedError

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``Wᵀ u`` for a block ``u`` of shape ``m × k``."""
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """The dense ``m × n`` matrix, built column by column from :meth:`matvec`."""
        n = self.shape[1]
        eye = torch.eye(n, device=self.device, dtype=self.dtype)
        cols = [self.matvec(eye[:, i:i + 1024]) for i in range(0, n, 1024)]
        return torch.cat(cols, dim=1)

    def frobenius(self) -> torch.Tensor:
        """``‖W‖_F`` (differentiable)."""
        return torch.linalg.matrix_norm(self.matrix())

    def blocks(self) -> list[torch.Tensor]:
        """Matrices whose singular values, together, are the operator's."""
        return [self.matrix()]


class MatrixView(LinearOperator):
    """A weight seen as a matrix ``out × (in·k…)``, optionally row-scaled.

    Grouped convolutions are block diagonal: ``g`` blocks of
    ``(out/g) × (in/g·k…)``, whose singular values together are the operator's
    (so ``σ₁`` is the largest over the groups). A row scale ``s`` gives
    ``diag(s)·W`` (a layer folded with the eval-mode BatchNorm after it).
    """

    def __init__(self, weight: torch.Tensor, groups: int = 1, row_scale: Callable[[], torch.Tensor] | None = None):
        if weight.dim() < 2:
            raise ValueError(f"Expected a weight with at least 2 dimensions, but got shape {tuple(weight.shape)}")
        if weight.shape[0] % groups:
            raise ValueError(f"out features {weight.shape[0]} not divisible by groups={groups}")
        self.weight = weight
        self.groups = groups
        self.row_scale = row_scale
        m = weight.shape[0]
        n = groups * weight[0].numel()
        self.shape = (m, n)
        self.batch_key = ("matrix", m, n, str(weight.device), _compute_dtype(weight.dtype)) if groups == 1 else None

    @property
    def device(self):
        return self.weight.device

    @property
    def dtype(self):
        return _compute_dtype(self.weight.dtype)

    def _scale(self) -> torch.Tensor | None:
        return None if self.row_scale is None else self.row_scale().to(self.dtype)

    def _blocks_raw(self) -> torch.Tensor:
        """``g × (out/g) × (in/g·k…)`` unscaled blocks."""
        return rearrange(self.weight.to(self.dtype), "(g o) i ... -> g o (i ...)", g=self.groups)

    def matrix2d(self) -> torch.Tensor:
        """The row-scaled weight as ``out × (in/g·k…)`` (for ungrouped layers, the matrix)."""
        w = rearrange(self.weight.to(self.dtype), "o i ... -> o (i ...)")
        s = self._scale()
        return w if s is None else s[:, None] * w

    def matvec(self, v):
        # The row scale is applied to the product, never to W: diag(s)·W would
        # write a scaled copy of the weight on every call.
        if self.groups == 1:
            out = rearrange(self.weight.to(self.dtype), "o i ... -> o (i ...)") @ v
        else:
            vg = rearrange(v, "(g c) k -> g c k", g=self.groups)
            out = rearrange(torch.bmm(self._blocks_raw(), vg), "g o k -> (g o) k")
        s = self._scale()
        return out if s is None else s[:, None] * out

    def rmatvec(self, u):
        s = self._scale()
        if s is not None:
            u = s[:, None] * u
        if self.groups == 1:
            w = rearrange(self.weight.to(self.dtype), "o i ... -> o (i ...)")
            return w.T @ u
        ug = rearrange(u, "(g o) k -> g o k", g=self.groups)
        return rearrange(torch.bmm(self._blocks_raw().transpose(1, 2), ug), "g c k -> (g c) k")

    def blocks(self):
        b = self._blocks_raw()
        s = self._scale()
        if s is not None:
            b = rearrange(s, "(g o) -> g o 1", g=self.groups) * b
        return list(b.unbind(0))

    def matrix(self):
        return torch.block_diag(*self.blocks())

    def frobenius(self):
        return torch.linalg.vector_norm(self.matrix2d())


class LowRankView(LinearOperator):
    """The product ``diag(s)·B·A`` of a factorised layer, as one operator (matrix view)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, row_scale: Callable[[], torch.Tensor] | None = None):
        self.a = a  # r × n (or r × in × kh × kw)
        self.b = b  # m × r (or m × r × 1 × 1)
        self.row_scale = row_scale
        self.shape = (b.shape[0], a[0].numel())

    @property
    def device(self):
        return self.a.device

    @property
    def dtype(self):
        return _compute_dtype(self.a.dtype)

    def _factors(self):
        a = rearrange(self.a.to(self.dtype), "r ... -> r (...)")
        b = rearrange(self.b.to(self.dtype), "o r ... -> o (r ...)")
        return a, b

    def _scale(self):
        return None if self.row_scale is None else self.row_scale().to(self.dtype)

    def matvec(self, v):
        a, b = self._factors()
        out = b @ (a @ v)
        s = self._scale()
        return out if s is None else s[:, None] * out

    def rmatvec(self, u):
        a, b = self._factors()
        s = self._scale()
        if s is not None:
            u = s[:, None] * u
        return a.T @ (b.T @ u)

    def matrix(self):
        a, b = self._factors()
        s = self._scale()
        w = b @ a
        return w if s is None else s[:, None] * w

    def frobenius(self):
        # ‖BA‖_F² = tr((BᵀB)(AAᵀ)) without forming BA: r × r work.
        a, b = self._factors()
        s = self._scale()
        if s is not None:
            b = s[:, None] * b
        return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt()


class FunctionOperator(LinearOperator):
    """A linear layer applied at a fixed input size: the exact operator of a convolution.

    ``fn`` maps a batch ``N × input_shape`` to ``N × output_shape`` linearly
    (the layer without its bias, any padding mode); the adjoint is the
    vector–Jacobian product of ``fn`` (autograd), exact for every padding mode.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int],
                 reference: torch.Tensor, channel_scale: Callable[[], torch.Tensor] | None = None,
                 frobenius_fn: Callable[[], torch.Tensor] | None = None):
        self.fn = fn
        self.input_shape = tuple(int(s) for s in input_shape)
        self.reference = reference
        self.channel_scale = channel_scale
        self._frobenius_fn = frobenius_fn
        with torch.no_grad():
            out = fn(torch.zeros((1, *self.input_shape), device=reference.device, dtype=self.dtype))
        self.output_shape = tuple(out.shape[1:])
        self.shape = (math.prod(self.output_shape), math.prod(self.input_shape))

    @property
    def device(self):
        return self.reference.device

    @property
    def dtype(self):
        return _compute_dtype(self.reference.dtype)

    def _apply(self, x):
        y = self.fn(x)
        if self.channel_scale is not None:
            s = self.channel_scale().to(self.dtype)
            y = y * s.reshape(1, -1, *([1] * (y.dim() - 2)))
        return y

    def matvec(self, v):
        x = rearrange(v, "n k -> k n").reshape(v.shape[1], *self.input_shape)
        return rearrange(self._apply(x).reshape(v.shape[1], -1), "k m -> m k")

    def rmatvec(self, u):
        k = u.shape[1]
        differentiable = torch.is_grad_enabled()
        # The vector–Jacobian product of a linear map (at any point) is its
        # adjoint, exact for every padding mode. Plain autograd rather than
        # torch.func.vjp: the latter imports torch._dynamo (seconds) on first use.
        with torch.enable_grad():
            x0 = torch.zeros((k, *self.input_shape), device=u.device, dtype=u.dtype, requires_grad=True)
            y = self._apply(x0)
            (g,) = torch.autograd.grad(y, x0, rearrange(u, "m k -> k m").reshape(k, *self.output_shape),
                                       create_graph=differentiable)
        return rearrange(g.reshape(k, -1), "k n -> n k")

    def frobenius(self):
        if self._frobenius_fn is not None:
            f2 = self._frobenius_fn()
            if self.channel_scale is not None:
                f2 = (f2 * self.channel_scale().to(self.dtype) ** 2)
            return f2.sum().clamp_min(0).sqrt()
        return super().frobenius()


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[], torch.Tensor]:
    def scale() -> torch.Tensor:
        s = torch.rsqrt(bn.running_var + bn.eps)
        return s if bn.weight is None else bn.weight * s
    return scale


def matrix_view(layer: nn.Module | torch.Tensor, bn: nn.Module | None = None) -> LinearOperator:
    """The matrix view of a layer: ``rearrange(w, "o i ... -> o (i ...)")``.

    For ``LowRankLinear`` / ``LowRankConv2d`` the product ``B·A``; for a
    grouped convolution the block-diagonal matrix of its groups; with ``bn``
    (a BatchNorm with running statistics) the folded ``diag(γ/√(var+ε))·W``.

    Args:
        layer: a supported module, or a weight tensor (≥ 2-D) given directly.
        bn: the BatchNorm that follows the layer, to fold in.

    Returns:
        A :class:`LinearOperator`.

    Example:
        >>> matrix_view(nn.Conv2d(3, 8, 3)).shape
        (8, 27)
    """
    scale = _bn_scale(bn) if bn is not None else None
    if isinstance(layer, torch.Tensor):
        return MatrixView(layer, 1, scale)
    if isinstance(layer, (LowRankLinear, LowRankConv2d)):
        return LowRankView(layer.weight_a, layer.weight_b, scale)
    if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return MatrixView(layer.weight, getattr(layer, "groups", 1), scale)
    raise TypeError(f"No matrix view for {type(layer).__name__}; supported: "
                    f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} or a weight tensor")


def conv_operator(layer: nn.Module, input_shape: Sequence[int], bn: nn.Module | None = None) -> FunctionOperator:
    """The convolution as the linear map it is at ``input_shape`` (bias excluded).

    Stride, dilation, groups and every padding mode are honoured (the layer's
    own convolution is applied); the adjoint is exact through autograd's vector–Jacobian product.

    Args:
        layer: ``nn.Conv1d``, ``nn.Conv2d`` or ``LowRankConv2d``.
        input_shape: ``(C, L)`` or ``(C, H, W)``, one example without the batch dimension.
        bn: an eval-mode BatchNorm to fold in per output channel.

    Returns:
        A :class:`FunctionOperator` of shape ``(C_out·H'·W', C·H·W)``.

    Example:
        >>> conv_operator(nn.Conv2d(1, 2, 3, padding=1), (1, 4, 4)).shape
        (32, 16)
    """
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, LowRankConv2d)):
        raise TypeError(f"conv_operator needs Conv1d, Conv2d or LowRankConv2d, but got {type(layer).__name__}")
    input_shape = tuple(input_shape)
    expected = 2 if isinstance(layer, nn.Conv1d) else 3
    if len(input_shape) != expected or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"Expected input_shape to be {expected} positive ints (channels first, no batch), "
                         f"but got input_shape={input_shape!r}")
    in_ch = layer.in_channels
    if input_shape[0] != in_ch:
        raise ValueError(f"input_shape has {input_shape[0]} channels but the layer expects {in_ch}")
    ref = layer.weight_a if isinstance(layer, LowRankConv2d) else layer.weight
    dtype = _compute_dtype(ref.dtype)
    if isinstance(layer, LowRankConv2d):
        def fn(x):
            return F.conv2d(F.conv2d(x, layer.weight_a.to(dtype), None, **layer.conv_args), layer.weight_b.to(dtype))
        frob = None
    else:
        def fn(x):
            return layer._conv_forward(x, layer.weight.to(dtype), None)
        frob = None
        if layer.padding_mode == "zeros":
            # ‖A‖_F² = Σ over output positions of the squared taps that land
            # inside the input = the convolution of an all-ones input with W².
            def frob():
                ones = torch.ones((1, *input_shape), device=ref.device, dtype=dtype)
                out = layer._conv_forward(ones, layer.weight.to(dtype) ** 2, None)
                return out.sum(dim=tuple(d for d in range(out.dim()) if d != 1))
    scale = _bn_scale(bn) if bn is not None else None
    return FunctionOperator(fn, input_shape, ref, scale, frob)


def operator_for(layer: nn.Module, view: str = "matrix", input_shape: Sequence[int] | None = None,
                 bn: nn.Module | None = None) -> LinearOperator:
    """The operator of one layer in the chosen view (``"matrix"`` or ``"operator"``).

    Linear layers are matrices in both views; convolutions in the operator
    view need ``input_shape``.
    """
    if view not in ("matrix", "operator"):
        raise ValueError(f"Expected view to be 'matrix' or 'operator', but got view={view!r}")
    if view == "operator" and isinstance(layer, (nn.Conv1d, nn.Conv2d, LowRankConv2d)):
        if input_shape is None:
            raise ValueError(
                f"The operator view of {type(layer).__name__} needs its input size: pass input_shape=(C, H, W) "
                "for the model input (or example_input) to SpectralState, or input_shapes={name: shape}")
        return conv_operator(layer, input_shape, bn)
    return matrix_view(layer, bn)


