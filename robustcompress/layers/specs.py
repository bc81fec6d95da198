"""Operator descriptors: a layer's linear map described as data over its stored tensors.

The registry sits below ``spectral``: a layer kind does not build operator
objects, it *describes* each operator with one of three small descriptors,
and :mod:`robustcompress.spectral.views` turns descriptors into operators.

* :class:`MatrixSpec` — one stored tensor ``W`` seen as a matrix:
  ``op = diag(s) · (W or Wᵀ)[rows, cols]`` (``Wᵀ`` for weights stored
  in × out, e.g. transformers' ``Conv1D``; a row/column slice for packed
  Q/K/V or RNN gates), block diagonal over ``groups`` for grouped
  convolutions, with the convolution geometry for the exact operator view.
* :class:`LowRankSpec` — ``op = diag(s) · B · A`` (apply ``A``, then ``B``):
  factorised layers and the per-head attention circuits.
* :class:`LoRASpec` — ``op = op(W₀) + s · B · A``: a LoRA-adapted layer.

Every matrix a descriptor yields is a *strided view* of the one stored
parameter (transposes, slices and einops rearranges of contiguous weights
copy nothing), so gradients reach the stored weight in its own layout.

Example:
    >>> import torch
    >>> w = torch.randn(6, 4)                       # a weight stored in × out (Conv1D)
    >>> spec = MatrixSpec(lambda: w, transpose=True, rows=slice(0, 2))
    >>> spec.shape, spec.matrix().data_ptr() == w.data_ptr()
    ((2, 6), True)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "ConvGeometry",
    "MatrixSpec",
    "LowRankSpec",
    "LoRASpec",
    "Spec",
    "BATCHNORM_TYPES",
    "batchnorm_scale",
    "is_batchnorm",
    "with_row_scale",
    "check_spec",
    "slice_rows",
    "slice_cols",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class ConvGeometry:
    """How a convolution applies its kernel: enough to rebuild the exact operator at an input size.

    ``apply(x, w)`` is the convolution without bias, identical to the module's
    own (every padding mode, string padding, groups).

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
        >>> x = torch.randn(1, 2, 5, 5)
        >>> g = ConvGeometry.from_module(conv)
        >>> torch.allclose(g.apply(x, conv.weight), conv._conv_forward(x, conv.weight, None))
        True
    """

    dims: int
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    reversed_padding: tuple[int, ...] = ()

    @classmethod
    def from_module(cls, conv: nn.Module) -> "ConvGeometry":
        """The geometry of an ``nn.Conv1d/2d/3d`` (or anything with the same attributes)."""
        dims = len(conv.kernel_size)
        return cls(dims, tuple(conv.stride), conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                   tuple(conv.dilation), conv.groups, conv.padding_mode,
                   tuple(getattr(conv, "_reversed_padding_repeated_twice", ())))

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``conv(x, weight)`` without bias."""
        conv = _CONV[self.dims]
        if self.padding_mode != "zeros":
            zero = (0,) * self.dims
            return conv(F.pad(x, self.reversed_padding, mode=self.padding_mode), weight, None,
                        self.stride, zero, self.dilation, self.groups)
        return conv(x, weight, None, self.stride, self.padding, self.dilation, self.groups)


def _orient(w: torch.Tensor, transpose: bool) -> torch.Tensor:
    if w.dim() < 2:
        raise ValueError(f"Expected a weight with at least 2 dimensions, but got shape {tuple(w.shape)}")
    if transpose:
        if w.dim() != 2:
            raise ValueError(f"transpose=True needs a 2-D weight, but got shape {tuple(w.shape)}")
        return w.T
    # "o i ... -> o (i ...)": flatten(1) is the same view, without einops' per-call parsing
    # (this runs for every convolution on every step).
    return w if w.dim() == 2 else w.flatten(1)


@dataclass(frozen=True)
class MatrixSpec:
    """``op = diag(s) · M``, ``M = (W or Wᵀ)[rows, cols]``, block diagonal over ``groups``.

    ``W`` is ``weight()`` (called each time, so a parametrized or replaced
    weight is always the current one); a weight with more than two axes is
    seen as ``rearrange(W, "o i ... -> o (i ...)")``. Slices are in the
    operator's orientation (after the transpose). With ``groups = g`` the
    operator is ``blockdiag(M_1, …, M_g)``, ``M_j`` the ``j``-th ``(m/g) ×
    n`` row block of ``M`` (a grouped convolution's kernel; its singular
    values are the union over the groups).

    Args:
        weight: returns the stored tensor (a parameter, or a parametrized weight).
        transpose: the operator is ``Wᵀ`` (a weight stored in × out).
        rows: a slice of the operator's rows (packed Q/K/V, RNN gates).
        cols: a slice of the operator's columns.
        groups: convolution groups (block-diagonal operator); 1 otherwise.
        conv: the convolution geometry, for the exact operator view.
        row_scale: returns per-row scales ``s`` (a folded eval-mode BatchNorm).
    """

    weight: Callable[[], torch.Tensor]
    transpose: bool = False
    rows: slice | None = None
    cols: slice | None = None
    groups: int = 1
    conv: ConvGeometry | None = None
    row_scale: Callable[[], torch.Tensor] | None = None

    def matrix(self) -> torch.Tensor:
        """``M`` without the row scale: a strided view of the stored weight (a copy only for ``groups > 1``)."""
        if self.groups == 1:
            return self.sliced()
        return torch.block_diag(*self.blocks().unbind(0))

    def sliced(self) -> torch.Tensor:
        """``M`` before the block-diagonal layout of groups: ``(W or Wᵀ)[rows, cols]``, a strided view."""
        m = _orient(self.weight(), self.transpose)
        if self.rows is not None:
            m = m[self.rows]
        if self.cols is not None:
            m = m[:, self.cols]
        return m

    def blocks(self) -> torch.Tensor:
        """The ``g × (m/g) × n_g`` diagonal blocks (a view; ``g = 1``: ``1 × m × n``)."""
        return rearrange(self.sliced(), "(g o) n -> g o n", g=self.groups)

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the operator (``n = groups · n_g``), from the weight's shape alone.

        Read several times per layer and step: shape arithmetic, not the
        strided view (whose reshape costs more than the rest of a small layer's
        bookkeeping).
        """
        w = self.weight()
        if w.dim() < 2 or (self.transpose and w.dim() != 2):
            _orient(w, self.transpose)  # raises with the reason
        m, n = (w.shape[1], w.shape[0]) if self.transpose else (w.shape[0], math.prod(w.shape[1:]))
        if self.rows is not None:
            m = len(range(m)[self.rows])
        if self.cols is not None:
            n = len(range(n)[self.cols])
        return m, n * self.groups

    @property
    def T(self) -> "MatrixSpec":  # noqa: N802 - the usual spelling of a transpose
        """The transposed operator ``Mᵀ`` (no row scale, no convolution geometry)."""
        if self.groups != 1 or self.row_scale is not None or self.conv is not None:
            raise ValueError("Only ungrouped, unscaled matrix views (no convolution geometry) can be transposed")
        w = self.weight()
        if w.dim() != 2:
            raise ValueError(f"Only 2-D weights can be transposed, but got shape {tuple(w.shape)}")
        return dataclasses.replace(self, transpose=not self.transpose, rows=self.cols, cols=self.rows)

    def stored_key(self) -> tuple:
        """Which part of the weight this view reads, in the stored orientation (equal for ``M`` and ``Mᵀ``)."""
        rows, cols = (self.cols, self.rows) if self.transpose else (self.rows, self.cols)

        def norm(s):
            return None if s is None else (s.start, s.stop, s.step)
        return (norm(rows), norm(cols), self.groups)


@dataclass(frozen=True)
class LowRankSpec:
    """``op = diag(s) · B · A``: apply ``A`` (r × n), then ``B`` (m × r), as one operator.

    Penalising the factors separately is a different regulariser, since
    ``σ₁(B)·σ₁(A) ≥ σ₁(B·A)``. With ``conv``, ``A`` is a convolution of that
    geometry and ``B`` a 1×1 convolution (``LowRankConv2d``).
    """

    a: MatrixSpec
    b: MatrixSpec
    row_scale: Callable[[], torch.Tensor] | None = None
    conv: ConvGeometry | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    def matrix(self) -> torch.Tensor:
        """``B·A`` without the row scale (a new tensor, differentiable)."""
        return self.b.matrix() @ self.a.matrix()


@dataclass(frozen=True)
class LoRASpec:
    """``op = op(W₀) + s · B · A``: a LoRA-adapted layer's effective weight.

    ``base`` is ``W₀`` in the operator's orientation (``W₀ᵀ`` for ``Conv1D`` /
    ``fan_in_fan_out``), ``a`` is ``r × n``, ``b`` is ``m × r`` and ``scale``
    is ``α/r`` (``α/√r`` with rsLoRA).
    """

    base: MatrixSpec
    a: MatrixSpec
    b: MatrixSpec
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    def matrix(self) -> torch.Tensor:
        """The merged weight ``op(W₀) + s·B·A`` (a new tensor, differentiable)."""
        return self.base.matrix() + self.scale * (self.b.matrix() @ self.a.matrix())


Spec = Union[MatrixSpec, LowRankSpec, LoRASpec]


#: The normalisations that fold into the layer before them as ``diag(s)`` (eval mode).
BATCHNORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy variants).

    Example:
        >>> is_batchnorm(nn.BatchNorm2d(3)), is_batchnorm(nn.LayerNorm(3))
        (True, False)
    """
    return isinstance(module, BATCHNORM_TYPES)


def batchnorm_scale(bn: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-channel scale ``|γ| / √(running_var + ε)`` of an eval-mode BatchNorm (``|γ| = 1`` without affine).

    The eval-mode BatchNorm after a linear layer ``W`` applies
    ``diag(γ/√(var+ε))·W`` plus a shift; ``diag(sign γ)`` is orthogonal, so
    the folded operator has the singular values of ``diag(|γ|/√(var+ε))·W``.
    This is the one place the package computes that scale.

    Args:
        bn: a ``BatchNorm1d/2d/3d`` that tracks running statistics.
        dtype: compute in this dtype (the statistics are converted first; the
            certified bound asks for ``torch.float64``); default: theirs.

    Returns:
        A 1-D tensor of length ``num_features`` (differentiable in ``γ``).

    Example:
        >>> bn = nn.BatchNorm1d(3).eval()
        >>> batchnorm_scale(bn)
        tensor([1.0000, 1.0000, 1.0000], grad_fn=<MulBackward0>)
        >>> batchnorm_scale(bn, torch.float64).dtype
        torch.float64
    """
    if not is_batchnorm(bn):
        raise TypeError(f"Expected a BatchNorm module, but got {type(bn).__name__}")
    if bn.running_var is None:
        raise ValueError("Expected a BatchNorm that tracks running statistics (track_running_stats=True), "
                         "but its running_var is None")
    var = bn.running_var if dtype is None else bn.running_var.to(dtype)
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is None:
        return s
    return (bn.weight if dtype is None else bn.weight.to(dtype)).abs() * s


def with_row_scale(spec: Spec, row_scale: Callable[[], torch.Tensor]) -> Spec:
    """The same descriptor with ``diag(s)`` applied on the left (a following BatchNorm folded in).

    Example:
        >>> bn = nn.BatchNorm1d(4).eval()
        >>> spec = with_row_scale(MatrixSpec(lambda: torch.ones(4, 2)), lambda: batchnorm_scale(bn))
        >>> spec.row_scale().shape
        torch.Size([4])
    """
    if isinstance(spec, LoRASpec):
        raise ValueError("A row scale cannot be folded into a LoRA descriptor")
    return dataclasses.replace(spec, row_scale=row_scale)


def check_spec(spec: Spec, where: str) -> tuple[int, int]:
    """Check a descriptor against its stored tensors; return its shape ``(m, n)``.

    Raises:
        ValueError: naming ``where``: a slice outside the weight, a row count
            not divisible by ``groups``, factors whose inner sizes differ, a
            LoRA product whose shape differs from the base, or a row scale of
            the wrong length.
    """
    if isinstance(spec, MatrixSpec):
        w = spec.weight()
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise ValueError(f"{where}: expected a floating-point weight tensor, but got "
                             f"{type(w).__name__} of dtype {getattr(w, 'dtype', None)}")
        full = _orient(w, spec.transpose).shape
        for axis, sl in (("rows", spec.rows), ("cols", spec.cols)):
            size = full[0 if axis == "rows" else 1]
            if sl is not None:
                start, stop, step = sl.indices(size)
                if (sl.start is not None and not -size <= sl.start <= size) or (
                        sl.stop is not None and sl.stop > size) or stop <= start:
                    raise ValueError(f"{where}: {axis} slice {sl} does not fit the weight's operator "
                                     f"shape {tuple(full)} (stored shape {tuple(w.shape)})")
        if spec.groups < 1 or (spec.groups > 1 and (spec.rows is not None or spec.cols is not None)):
            raise ValueError(f"{where}: groups must be ≥ 1 and cannot be combined with slices, but got groups={spec.groups}")
        m = spec.sliced().shape[0]
        if m % spec.groups:
            raise ValueError(f"{where}: {m} rows are not divisible by groups={spec.groups}")
        shape = spec.shape
    elif isinstance(spec, LowRankSpec):
        a = check_spec(spec.a, f"{where} (factor A)")
        b = check_spec(spec.b, f"{where} (factor B)")
        if b[1] != a[0]:
            raise ValueError(f"{where}: factor B is {b[0]}×{b[1]} but factor A is {a[0]}×{a[1]}; "
                             "B's columns must equal A's rows")
        shape = (b[0], a[1])
    elif isinstance(spec, LoRASpec):
        base = check_spec(spec.base, f"{where} (base weight)")
        a = check_spec(spec.a, f"{where} (lora_A)")
        b = check_spec(spec.b, f"{where} (lora_B)")
        if b[1] != a[0] or (b[0], a[1]) != base:
            raise ValueError(f"{where}: the adapter product B·A is {b[0]}×{b[1]} · {a[0]}×{a[1]} but the base "
                             f"operator is {base[0]}×{base[1]}")
        return base
    else:
        raise TypeError(f"{where}: expected a MatrixSpec, LowRankSpec or LoRASpec, but got {type(spec).__name__}")
    if spec.row_scale is not None:
        s = spec.row_scale()
        if s.dim() != 1 or s.numel() != shape[0]:
            raise ValueError(f"{where}: the row scale has shape {tuple(s.shape)} but the operator has {shape[0]} rows")
    return shape


def _compose(outer: slice | None, inner: slice, size: int) -> slice:
    r = range(size)
    if outer is not None:
        r = r[outer]
    r = r[inner]
    if r.step < 0 or len(r) == 0:
        raise ValueError(f"Slice {inner} of {outer} (size {size}) is empty or reversed")
    return slice(r.start, r.start + len(r) * r.step, r.step)


def slice_rows(spec: Spec, rows: slice) -> Spec:
    """The operator's rows ``rows`` (a part of a packed projection), still a view of the stored tensors.

    ``LoRA``: ``(W₀ + sBA)[rows] = W₀[rows] + s·B[rows]·A``; low-rank: ``(BA)[rows] = B[rows]·A``.

    Example:
        >>> spec = slice_rows(MatrixSpec(lambda: torch.arange(12.).reshape(6, 2)), slice(2, 4))
        >>> spec.matrix().tolist()
        [[4.0, 5.0], [6.0, 7.0]]
    """
    if isinstance(spec, MatrixSpec):
        if spec.groups != 1 or spec.row_scale is not None:
            raise ValueError("Only ungrouped, unscaled matrix views can be sliced")
        full = _orient(spec.weight(), spec.transpose).shape[0]
        return dataclasses.replace(spec, rows=_compose(spec.rows, rows, full), conv=None)
    if isinstance(spec, LowRankSpec):
        if spec.row_scale is not None:
            raise ValueError("A row-scaled low-rank view cannot be sliced")
        return dataclasses.replace(spec, b=slice_rows(spec.b, rows), conv=None)
    if isinstance(spec, LoRASpec):
        return dataclasses.replace(spec, base=slice_rows(spec.base, rows), b=slice_rows(spec.b, rows))
    raise TypeError(f"Expected an operator descriptor, but got {type(spec).__name__}")


def slice_cols(spec: Spec, cols: slice) -> Spec:
    """The operator's columns ``cols``, still a view of the stored tensors (see :func:`slice_rows`).

    Example:
        >>> slice_cols(MatrixSpec(lambda: torch.zeros(3, 8)), slice(0, 4)).shape
        (3, 4)
    """
    if isinstance(spec, MatrixSpec):
        if spec.groups != 1:
            raise ValueError("Only ungrouped matrix views can be sliced")
        full = _orient(spec.weight(), spec.transpose).shape[1]
        return dataclasses.replace(spec, cols=_compose(spec.cols, cols, full), conv=None)
    if isinstance(spec, LowRankSpec):
        return dataclasses.replace(spec, a=slice_cols(spec.a, cols), conv=None)
    if isinstance(spec, LoRASpec):
        return dataclasses.replace(spec, base=slice_cols(spec.base, cols), a=slice_cols(spec.a, cols))
    raise TypeError(f"Expected an operator descriptor, but got {type(spec).__name__}")
