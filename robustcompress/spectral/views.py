"""Operator views of layers: a weight (or a layer at its input size) as a linear map with its adjoint.

Each view is a :class:`LinearOperator` ``R^n → R^m`` given by block products
``W V`` and ``Wᵀ U``, differentiable with respect to the layer's parameters:

* :class:`MatrixView` — a weight as ``out × (in·k…)`` (transposed for
  weights stored in × out, row/column slices for packed Q/K/V and RNN gates),
  block diagonal for grouped convolutions, optionally row-scaled by a folded BatchNorm;
* :class:`LowRankView` — the product ``B·A`` of a factorised layer (or an attention circuit);
* :class:`LoRAView` — ``op(W₀) + s·B·A`` of a LoRA-adapted layer;
* :class:`FunctionOperator` — a convolution as the exact map at its input size.

Layer kinds describe their operators as data (``robustcompress.layers``
descriptors); :func:`operator_from_spec` turns a descriptor into one of these
operators. Matrices are strided views of the one stored parameter (no copy),
so gradients reach the weight in its own layout.

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

from ..layers import (
    LoRASpec,
    LowRankSpec,
    MatrixSpec,
    batchnorm_scale,
    layer_views,
    with_row_scale,
)

__all__ = [
    "thin_product",
    "LinearOperator",
    "MatrixView",
    "LowRankView",
    "FunctionOperator",
    "LoRAView",
    "operator_from_spec",
    "matrix_view",
    "conv_operator",
    "operator_for",
]

#: thin_product: on CPU, blocks this narrow (2 ≤ k < 16) are multiplied as the transposed product.
_THIN_MIN_K, _THIN_MAX_K, _THIN_MIN_ROWS = 2, 16, 32


def thin_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a matrix ``a`` (``m × n``) and a thin block ``b`` (``n × k``), fast on CPU.

    On CPU, for ``2 ≤ k < 16`` columns and ``m ≥ 32``, this computes
    ``(bᵀ aᵀ)ᵀ``: the same product with the thin block on the left. The BLAS
    kernels behind torch's CPU matmul handle a thin *left* operand well but
    a thin right one poorly on some CPUs: ``benchmarks/bench_spectral.py``
    measured ``Wᵀ U`` for a 2000 × 2000 fp32 ``W`` and ``k = 8`` at about
    20× the time of ``(Uᵀ W)ᵀ``, one thread (RESULTS.md). Elsewhere (``k = 1``
    — a matrix–vector product either way — wide blocks, CUDA) it is ``a @ b``.
    The result may be a transposed (non-contiguous) view.

    Example:
        >>> a, b = torch.randn(64, 40, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)
        >>> torch.allclose(thin_product(a, b), a @ b)
        True
    """
    k = b.shape[-1]
    if a.device.type == "cpu" and _THIN_MIN_K <= k < _THIN_MAX_K and a.shape[0] >= _THIN_MIN_ROWS:
        return (b.mT @ a.mT).mT
    return a @ b


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

    def products(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U₀ = W v`` and ``Y = Wᵀ U₀``: the two products of one power/subspace iteration."""
        u0 = self.matvec(v)
        return u0, self.rmatvec(u0)

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
    """A weight seen as a matrix ``M`` (``out × (in·k…)``, or a transposed / sliced view), optionally row-scaled.

    Built from a weight tensor (as before) or from a
    :class:`~robustcompress.layers.MatrixSpec`. Grouped convolutions are
    block diagonal: ``g`` blocks of ``(out/g) × (in/g·k…)``, whose singular
    values together are the operator's (so ``σ₁`` is the largest over the
    groups). A row scale ``s`` gives ``diag(s)·M`` (a layer folded with the
    eval-mode BatchNorm after it).

    Example:
        >>> w = torch.randn(5, 3)                          # stored in × out
        >>> op = MatrixView(MatrixSpec(lambda: w, transpose=True))
        >>> op.shape, torch.equal(op.matvec(torch.eye(5)), w.T)
        ((3, 5), True)
    """

    def __init__(self, weight: torch.Tensor | MatrixSpec, groups: int = 1,
                 row_scale: Callable[[], torch.Tensor] | None = None):
        if isinstance(weight, MatrixSpec):
            spec = weight
            if groups != 1 or row_scale is not None:
                raise ValueError("Pass groups and row_scale inside the MatrixSpec, not beside it")
        elif isinstance(weight, torch.Tensor):
            if weight.dim() < 2:
                raise ValueError(f"Expected a weight with at least 2 dimensions, but got shape {tuple(weight.shape)}")
            if weight.shape[0] % groups:
                raise ValueError(f"out features {weight.shape[0]} not divisible by groups={groups}")
            spec = MatrixSpec(lambda: weight, groups=groups, row_scale=row_scale)
        else:
            raise TypeError(f"Expected a weight tensor or a MatrixSpec, but got {type(weight).__name__}")
        self.spec = spec
        self.groups = spec.groups
        self.row_scale = spec.row_scale

    @property
    def plain(self) -> bool:
        """True when the view is the stored weight itself (no transpose, no slice)."""
        return not self.spec.transpose and self.spec.rows is None and self.spec.cols is None

    @property
    def weight(self) -> torch.Tensor:
        """The tensor this view multiplies: the stored weight for a plain view, else its 2-D strided view ``M``.

        A row-sliced view of a contiguous weight (packed Q/K/V, RNN gates) is
        contiguous with an offset; a transposed or column-sliced one is not.
        """
        return self.spec.weight() if self.plain else self.spec.matrix() if self.groups == 1 else self.spec.sliced()

    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.shape

    @property
    def batch_key(self) -> tuple | None:
        if self.groups != 1:
            return None
        m, n = self.shape
        return ("matrix", m, n, str(self.device), self.dtype)

    @property
    def device(self):
        return self.spec.weight().device

    @property
    def dtype(self):
        return _compute_dtype(self.spec.weight().dtype)

    def scale(self) -> torch.Tensor | None:
        """The row scale ``s`` (a folded BatchNorm) in the compute dtype, or None."""
        return None if self.row_scale is None else self.row_scale().to(self.dtype)

    def _m(self) -> torch.Tensor:
        return self.spec.matrix().to(self.dtype) if self.groups == 1 else self.spec.matrix()

    def _blocks_raw(self) -> torch.Tensor:
        """``g × (out/g) × (in/g·k…)`` unscaled blocks."""
        return self.spec.blocks().to(self.dtype)

    def matrix2d(self) -> torch.Tensor:
        """The row-scaled ``M`` as ``out × (in/g·k…)`` (for ungrouped layers, the matrix)."""
        w = self.spec.sliced().to(self.dtype)
        s = self.scale()
        return w if s is None else s[:, None] * w

    def matvec(self, v):
        return self._matvec(v, self.scale())

    def rmatvec(self, u):
        return self._rmatvec(u, self.scale())

    def products(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The scale is recomputed from the BatchNorm statistics on each call: once for both products.
        s = self.scale()
        u0 = self._matvec(v, s)
        return u0, self._rmatvec(u0, s)

    def _matvec(self, v: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        # The row scale is applied to the product, never to W: diag(s)·W would
        # write a scaled copy of the weight on every call.
        if self.groups == 1:
            out = thin_product(self.spec.matrix().to(self.dtype), v)
        else:
            vg = rearrange(v, "(g c) k -> g c k", g=self.groups)
            out = rearrange(torch.bmm(self._blocks_raw(), vg), "g o k -> (g o) k")
        return out if s is None else s[:, None] * out

    def _rmatvec(self, u: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        if s is not None:
            u = s[:, None] * u
        if self.groups == 1:
            return thin_product(self.spec.matrix().to(self.dtype).T, u)
        ug = rearrange(u, "(g o) k -> g o k", g=self.groups)
        return rearrange(torch.bmm(self._blocks_raw().transpose(1, 2), ug), "g c k -> (g c) k")

    def blocks(self):
        b = self._blocks_raw()
        s = self.scale()
        if s is not None:
            b = rearrange(s, "(g o) -> g o 1", g=self.groups) * b
        return list(b.unbind(0))

    def matrix(self):
        return torch.block_diag(*self.blocks())

    def frobenius(self):
        return torch.linalg.vector_norm(self.matrix2d())


class LowRankView(LinearOperator):
    """The product ``diag(s)·B·A`` of a factorised layer (or an attention circuit), as one operator.

    Built from the factor tensors ``a`` (``r × n`` or ``r × in × kh × kw``)
    and ``b`` (``m × r`` or ``m × r × 1 × 1``), or from a
    :class:`~robustcompress.layers.LowRankSpec` (factors may be transposed or sliced views).

    Example:
        >>> a, b = torch.randn(2, 6), torch.randn(4, 2)
        >>> torch.allclose(LowRankView(a, b).matrix(), b @ a)
        True
    """

    def __init__(self, a: torch.Tensor | LowRankSpec, b: torch.Tensor | None = None,
                 row_scale: Callable[[], torch.Tensor] | None = None):
        if isinstance(a, LowRankSpec):
            if b is not None or row_scale is not None:
                raise ValueError("Pass the factors and row_scale inside the LowRankSpec, not beside it")
            spec = a
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            spec = LowRankSpec(MatrixSpec(lambda: a), MatrixSpec(lambda: b), row_scale)
        else:
            raise TypeError("Expected factor tensors a and b, or a LowRankSpec")
        self.spec = spec
        self.row_scale = spec.row_scale

    @property
    def a(self) -> torch.Tensor:
        """The stored tensor of factor A."""
        return self.spec.a.weight()

    @property
    def b(self) -> torch.Tensor:
        """The stored tensor of factor B."""
        return self.spec.b.weight()

    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.shape

    @property
    def device(self):
        return self.a.device

    @property
    def dtype(self):
        return _compute_dtype(self.a.dtype)

    def _factors(self):
        return self.spec.a.matrix().to(self.dtype), self.spec.b.matrix().to(self.dtype)

    def scale(self) -> torch.Tensor | None:
        """The row scale ``s`` (a folded BatchNorm) in the compute dtype, or None."""
        return None if self.row_scale is None else self.row_scale().to(self.dtype)

    def matvec(self, v):
        a, b = self._factors()
        out = b @ (a @ v)
        s = self.scale()
        return out if s is None else s[:, None] * out

    def rmatvec(self, u):
        a, b = self._factors()
        s = self.scale()
        if s is not None:
            u = s[:, None] * u
        return a.T @ (b.T @ u)

    def matrix(self):
        a, b = self._factors()
        s = self.scale()
        w = b @ a
        return w if s is None else s[:, None] * w

    def frobenius(self):
        # ‖BA‖_F² = tr((BᵀB)(AAᵀ)) without forming BA: r × r work.
        a, b = self._factors()
        s = self.scale()
        if s is not None:
            b = s[:, None] * b
        return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt()


class LoRAView(LinearOperator):
    """``op(W₀) + s·B·A``: a LoRA-adapted layer's effective weight, never formed for products.

    ``W v = op(W₀) v + s·B (A v)`` and ``Wᵀ u = op(W₀)ᵀ u + s·Aᵀ (Bᵀ u)``;
    with ``W₀`` frozen, gradients of ``uᵀ W v`` reach only ``A`` and ``B``.

    Example:
        >>> w0, a, b = torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2)
        >>> op = LoRAView(LoRASpec(MatrixSpec(lambda: w0), MatrixSpec(lambda: a), MatrixSpec(lambda: b), 0.5))
        >>> torch.allclose(op.matrix(), w0 + 0.5 * b @ a)
        True
    """

    def __init__(self, spec: LoRASpec):
        if not isinstance(spec, LoRASpec):
            raise TypeError(f"Expected a LoRASpec, but got {type(spec).__name__}")
        self.spec = spec
        self.row_scale = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.shape

    @property
    def device(self):
        return self.spec.base.weight().device

    @property
    def dtype(self):
        return _compute_dtype(self.spec.base.weight().dtype)

    def _parts(self):
        sp = self.spec
        return sp.base.matrix().to(self.dtype), sp.a.matrix().to(self.dtype), sp.b.matrix().to(self.dtype)

    def matvec(self, v):
        w0, a, b = self._parts()
        return w0 @ v + self.spec.scale * (b @ (a @ v))

    def rmatvec(self, u):
        w0, a, b = self._parts()
        return w0.T @ u + self.spec.scale * (a.T @ (b.T @ u))

    def matrix(self):
        w0, a, b = self._parts()
        return w0 + self.spec.scale * (b @ a)


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


def _scale_of(bn: nn.Module | None) -> Callable[[], torch.Tensor] | None:
    return None if bn is None else (lambda: batchnorm_scale(bn))


def operator_from_spec(spec: MatrixSpec | LowRankSpec | LoRASpec, view: str = "matrix",
                       input_shape: Sequence[int] | None = None) -> LinearOperator:
    """The operator a layer kind's descriptor describes.

    Args:
        spec: a :class:`~robustcompress.layers.MatrixSpec`,
            :class:`~robustcompress.layers.LowRankSpec` or
            :class:`~robustcompress.layers.LoRASpec`.
        view: ``"matrix"`` or ``"operator"`` (the exact convolution at
            ``input_shape``; descriptors without convolution geometry are
            matrices in both views).
        input_shape: one example's input shape, channels first (operator view of a convolution).

    Returns:
        A :class:`MatrixView`, :class:`LowRankView`, :class:`LoRAView` or :class:`FunctionOperator`.

    Example:
        >>> from robustcompress.layers import layer_views
        >>> (v,) = layer_views(nn.Conv2d(2, 3, 3, padding=1))
        >>> operator_from_spec(v.spec).shape, operator_from_spec(v.spec, "operator", (2, 4, 4)).shape
        ((3, 18), (48, 32))
    """
    if view not in ("matrix", "operator"):
        raise ValueError(f"Expected view to be 'matrix' or 'operator', but got view={view!r}")
    conv = getattr(spec, "conv", None)
    if view == "operator" and conv is not None:
        if input_shape is None:
            raise ValueError("The operator view of a convolution needs its input size: pass input_shape=(C, H, W) "
                             "for the model input (or example_input) to SpectralState, or input_shapes={name: shape}")
        return _conv_function(spec, tuple(input_shape))
    if isinstance(spec, MatrixSpec):
        return MatrixView(spec)
    if isinstance(spec, LowRankSpec):
        return LowRankView(spec)
    if isinstance(spec, LoRASpec):
        return LoRAView(spec)
    raise TypeError(f"Expected a MatrixSpec, LowRankSpec or LoRASpec, but got {type(spec).__name__}")


def _conv_function(spec: MatrixSpec | LowRankSpec, input_shape: tuple[int, ...]) -> FunctionOperator:
    conv = spec.conv
    if len(input_shape) != conv.dims + 1 or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"Expected input_shape to be {conv.dims + 1} positive ints (channels first, no batch), "
                         f"but got input_shape={input_shape!r}")
    if isinstance(spec, LowRankSpec):
        ref = spec.a.weight()
        dtype = _compute_dtype(ref.dtype)
        in_ch = ref.shape[1]

        def fn(x):
            return F.conv2d(conv.apply(x, spec.a.weight().to(dtype)), spec.b.weight().to(dtype))
        frob = None
    else:
        ref = spec.weight()
        dtype = _compute_dtype(ref.dtype)
        in_ch = ref.shape[1] * conv.groups

        def fn(x):
            return conv.apply(x, spec.weight().to(dtype))
        if conv.padding_mode != "zeros":
            frob = None
        else:
            # ‖A‖_F² = Σ over output positions of the squared taps that land
            # inside the input = the convolution of an all-ones input with W².
            def frob():
                ones = torch.ones((1, *input_shape), device=ref.device, dtype=dtype)
                out = conv.apply(ones, spec.weight().to(dtype) ** 2)
                return out.sum(dim=tuple(d for d in range(out.dim()) if d != 1))
    if input_shape[0] != in_ch:
        raise ValueError(f"input_shape has {input_shape[0]} channels but the layer expects {in_ch}")
    return FunctionOperator(fn, input_shape, ref, spec.row_scale, frob)


def _single_spec(layer: nn.Module, what: str):
    views = layer_views(layer)
    if not views:
        raise TypeError(f"No {what} for {type(layer).__name__}: it has no registered layer kind "
                        "(see robustcompress.layers.register_layer_kind)")
    if len(views) != 1:
        raise TypeError(f"{type(layer).__name__} has {len(views)} operators ({[v.name for v in views]}); "
                        "use robustcompress.layers.find_layers and operator_from_spec for each")
    return views[0].spec


def matrix_view(layer: nn.Module | torch.Tensor, bn: nn.Module | None = None) -> LinearOperator:
    """The matrix view of a layer, from its registered kind: ``rearrange(w, "o i ... -> o (i ...)")``.

    For ``LowRankLinear`` / ``LowRankConv2d`` the product ``B·A``; for a
    grouped convolution the block-diagonal matrix of its groups; for
    transformers' ``Conv1D`` ``Wᵀ``; with ``bn`` (a BatchNorm with running
    statistics) the folded ``diag(|γ|/√(var+ε))·W``.

    Args:
        layer: a module whose kind has one operator, or a weight tensor (≥ 2-D) given directly.
        bn: the BatchNorm that follows the layer, to fold in.

    Returns:
        A :class:`LinearOperator`.

    Example:
        >>> matrix_view(nn.Conv2d(3, 8, 3)).shape
        (8, 27)
    """
    scale = _scale_of(bn)
    if isinstance(layer, torch.Tensor):
        return MatrixView(layer, 1, scale)
    spec = _single_spec(layer, "matrix view")
    return operator_from_spec(spec if scale is None else with_row_scale(spec, scale))


def conv_operator(layer: nn.Module, input_shape: Sequence[int], bn: nn.Module | None = None) -> FunctionOperator:
    """The convolution as the linear map it is at ``input_shape`` (bias excluded).

    Stride, dilation, groups and every padding mode are honoured; the adjoint
    is exact through autograd's vector–Jacobian product.

    Args:
        layer: ``nn.Conv1d/2d/3d`` or ``LowRankConv2d`` (any kind whose descriptor has convolution geometry).
        input_shape: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``, one example without the batch dimension.
        bn: an eval-mode BatchNorm to fold in per output channel.

    Returns:
        A :class:`FunctionOperator` of shape ``(C_out·H'·W', C·H·W)``.

    Example:
        >>> conv_operator(nn.Conv2d(1, 2, 3, padding=1), (1, 4, 4)).shape
        (32, 16)
    """
    spec = _single_spec(layer, "convolution operator") if isinstance(layer, nn.Module) else None
    if getattr(spec, "conv", None) is None:
        raise TypeError(f"conv_operator needs a convolution (Conv1d/2d/3d, LowRankConv2d), "
                        f"but got {type(layer).__name__}")
    scale = _scale_of(bn)
    return _conv_function(spec if scale is None else with_row_scale(spec, scale), tuple(input_shape))


def operator_for(layer: nn.Module, view: str = "matrix", input_shape: Sequence[int] | None = None,
                 bn: nn.Module | None = None) -> LinearOperator:
    """The operator of one layer in the chosen view (``"matrix"`` or ``"operator"``).

    Linear layers are matrices in both views; convolutions in the operator
    view need ``input_shape``.

    Example:
        >>> operator_for(nn.Linear(3, 2), "operator").shape
        (2, 3)
    """
    if view not in ("matrix", "operator"):
        raise ValueError(f"Expected view to be 'matrix' or 'operator', but got view={view!r}")
    if not isinstance(layer, nn.Module):
        raise TypeError(f"Expected layer to be an nn.Module, but got {type(layer).__name__}")
    spec = _single_spec(layer, "operator")
    scale = _scale_of(bn)
    if scale is not None:
        spec = with_row_scale(spec, scale)
    if view == "operator" and getattr(spec, "conv", None) is not None and input_shape is None:
        raise ValueError(
            f"The operator view of {type(layer).__name__} needs its input size: pass input_shape=(C, H, W) "
            "for the model input (or example_input) to SpectralState, or input_shapes={name: shape}")
    return operator_from_spec(spec, view, input_shape)
