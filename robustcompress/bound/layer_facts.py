"""The layer facts the bound uses, read from the layer registry (:mod:`robustcompress.layers`).

Nothing else in :mod:`robustcompress.bound` asks which module type a layer is,
and this module asks only the registry:

* :data:`BOUND_KINDS` — the registry kinds bounded as linear layers, and whether
  their norm depends on the input size (``"conv"``); :func:`bound_kind` reads a
  module's kind (Conv3d has no bound yet: ``None``);
* :func:`layer_view` — a layer as ``y = diag(s)·B·conv_K(x)`` in float64, from the
  registry's operator descriptor, with a following eval-mode BatchNorm folded in as ``s``;
* :func:`bn_scale` — the registry's :func:`~robustcompress.layers.batchnorm_scale`
  in float64 with the bound's checks (eval mode, finite);
  :func:`bn_folds_into` — the kind's ``fold_norm`` rule; :func:`is_batchnorm`;
* :func:`can_be_head`, :func:`head_matrix`, :func:`weight_dtype`, :func:`weight_shape`.

Example:
    >>> view = layer_view(nn.Linear(3, 2))
    >>> view.kind, tuple(view.kernel.shape), view.kernel.dtype
    ('linear', (2, 3), torch.float64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from einops import rearrange
from torch import nn

from ..layers import LowRankSpec, MatrixSpec, batchnorm_scale, is_batchnorm, layer_kind, layer_views

__all__ = ["BOUND_KINDS", "LayerView", "per_dim", "bound_kind", "is_linear", "is_conv", "is_leaf", "can_be_head", "operator_shape", "is_batchnorm",
           "layer_view", "bn_scale", "bn_folds_into", "head_matrix", "weight_dtype", "weight_shape"]

#: Registry kinds bounded as linear layers (bias excluded: it does not change a Lipschitz constant), with
#: ``"conv"`` for those whose operator norm depends on the input size.
BOUND_KINDS: dict[str, str] = {"linear": "linear", "lowrank_linear": "linear", "conv": "conv", "lowrank_conv": "conv"}
#: Convolution dimensions the bound covers (1-D and 2-D).
_CONV_DIMS = (1, 2)


def bound_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"`` or ``None``: how the bound treats ``module``, from its registry kind.

    Example:
        >>> bound_kind(nn.Conv2d(1, 2, 3)), bound_kind(nn.Conv3d(1, 2, 3)), bound_kind(nn.ReLU())
        ('conv', None, None)
    """
    kind = layer_kind(module)
    what = BOUND_KINDS.get(kind.name) if kind is not None else None
    if what == "conv" and _spec(module).conv.dims not in _CONV_DIMS:
        return None
    return what


def is_linear(module: nn.Module) -> bool:
    """Whether the bound treats ``module`` as a linear layer (Linear, Conv1d/2d, low-rank layers)."""
    return bound_kind(module) is not None


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer whose operator norm depends on the input size."""
    return bound_kind(module) == "conv"


def is_leaf(module: nn.Module) -> bool:
    """Whether the tracer keeps ``module`` as one node: a bound layer whose exact type is registered.

    A subclass may change ``forward``, so it is traced through (as torch.fx does for user modules).

    Example:
        >>> from robustcompress.layers import LowRankLinear
        >>> is_leaf(LowRankLinear(4, 3, rank=2)), is_leaf(nn.ReLU())
        (True, False)
    """
    kind = layer_kind(module)  # not its views: the tracer hands out proxies for parameters while tracing
    return kind is not None and kind.name in BOUND_KINDS and type(module) in kind.types


def can_be_head(module: nn.Module) -> bool:
    """Whether ``module`` can be the classifier head (rows = classes) read by the certified radius.

    Example:
        >>> can_be_head(nn.Linear(4, 3)), can_be_head(nn.Conv2d(4, 3, 1))
        (True, False)
    """
    kind = layer_kind(module)
    return bound_kind(module) == "linear" and kind.can_be_head


def operator_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a bound layer's matrix (a convolution's kernel matrix: ``out × in/groups·k…``).

    Example:
        >>> operator_shape(nn.Linear(4, 3))
        (3, 4)
    """
    return tuple(int(d) for d in _spec(module).shape)


def _spec(module: nn.Module) -> MatrixSpec | LowRankSpec:
    (view,) = layer_views(module)
    return view.spec


@dataclass
class LayerView:
    """A linear layer in float64: ``y = diag(s)·B·conv_K(x)`` (``B = I`` unless low-rank, ``s`` folded in).

    Attributes:
        kind: ``"linear"`` or ``"conv"``.
        kernel: linear ``out × in``; conv ``r × in/groups × k…``.
        mix: ``B`` (``out × r``) for a low-rank convolution, else ``None``.
        groups, stride, dilation, padding_mode, padding_arg, in_channels: the convolution's geometry
            (``padding`` holds the resolved ``(left, right)`` pairs once an input size is known).
    """

    kind: str
    kernel: torch.Tensor
    mix: torch.Tensor | None
    groups: int = 1
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    padding_mode: str = "zeros"
    padding_arg: Any = 0
    in_channels: int = 0


def per_dim(v: Any, d: int) -> tuple[int, ...]:
    """A size argument (an int or a sequence, as torch layers take them) as a ``d``-tuple of ints.

    Example:
        >>> per_dim(3, 2), per_dim((1, 2), 2)
        ((3, 3), (1, 2))
    """
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * d


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def bn_scale(bn: nn.Module, name: str | None = None) -> torch.Tensor:
    """The per-feature scale ``s = |γ| / √(running_var + ε)`` of an eval-mode BatchNorm, float64 on the host.

    The registry's :func:`~robustcompress.layers.batchnorm_scale` computed in
    float64 (``diag(sign γ)`` is orthogonal: it changes no singular value).

    Args:
        bn: a BatchNorm module in eval mode with running statistics.
        name: the module's name in its model, for error messages.

    Returns:
        ``s`` (one entry per feature).

    Raises:
        ValueError: in training mode, without running statistics, or with a non-finite scale.

    Example:
        >>> bn_scale(nn.BatchNorm1d(2, eps=0.0).eval())
        tensor([1., 1.], dtype=torch.float64)
    """
    what = f"BatchNorm {name!r} ({type(bn).__name__})" if name else f"BatchNorm {type(bn).__name__}"
    if bn.training:
        raise ValueError(
            f"{what} is in training mode: its output depends on the batch, so it has no "
            "Lipschitz bound as a function of one input; call model.eval() first"
        )
    if bn.running_var is None:
        raise ValueError(f"{what} without running statistics (track_running_stats=False) is not supported")
    s = batchnorm_scale(bn, torch.float64).detach().cpu()
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{what} has a non-finite scale γ/√(var+ε) (NaN or Inf in its weight or running_var): "
                         "no bound")
    return s


def _raw_view(module: nn.Module) -> LayerView:
    what = bound_kind(module)
    if what is None:
        raise TypeError(f"No layer bound for {type(module).__name__}; supported: the layer kinds "
                        + ", ".join(sorted(BOUND_KINDS)) + " (convolutions in 1-D and 2-D)")
    spec = _spec(module)
    if isinstance(spec, LowRankSpec):
        a, b = _f64(spec.a.weight()), _f64(spec.b.weight())
        if spec.conv is None:
            return LayerView("linear", b @ a, None)
        g = spec.conv
        return LayerView("conv", a, rearrange(b, "o r 1 1 -> o r"), 1, g.stride, g.dilation, (), g.padding_mode,
                         g.padding, a.shape[1])
    w = _f64(spec.weight())
    if spec.conv is None:
        return LayerView("linear", w, None)
    g = spec.conv
    return LayerView("conv", w, None, spec.groups, g.stride, g.dilation, (), g.padding_mode, g.padding,
                     w.shape[1] * spec.groups)


def layer_view(module: nn.Module, bn: nn.Module | None = None, name: str | None = None) -> LayerView:
    """The layer as a float64 :class:`LayerView`, a following eval-mode BatchNorm folded as ``diag(s)``.

    Args:
        module: a layer whose registry kind is in :data:`BOUND_KINDS`.
        bn: an eval-mode BatchNorm after it, or ``None``.
        name: the layer's name in its model, for error messages.

    Returns:
        The view (fresh float64 tensors on the CPU; the module is not changed).

    Raises:
        TypeError: for a module type that is not a linear layer.
        ValueError: for NaN / Inf weights (naming the layer) or a BatchNorm of the wrong width.

    Example:
        >>> layer_view(nn.Conv2d(1, 2, 3, stride=2)).stride
        (2, 2)
    """
    view = _raw_view(module)
    what = f"layer {name!r} ({type(module).__name__})" if name else f"layer {type(module).__name__}"
    for t in (view.kernel, view.mix):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"The {what} has non-finite weights (NaN or Inf): no Lipschitz bound exists for it")
    if bn is not None:
        s = bn_scale(bn)
        out = view.mix.shape[0] if view.mix is not None else view.kernel.shape[0]
        if s.numel() != out:
            raise ValueError(f"BatchNorm has {s.numel()} features but the {what} has {out} outputs")
        if view.mix is not None:
            view.mix = s[:, None] * view.mix
        else:
            view.kernel = s.reshape(-1, *([1] * (view.kernel.dim() - 1))) * view.kernel
    return view


def bn_folds_into(module: nn.Module, out_shape: Sequence[int] | None) -> bool:
    """Whether a BatchNorm right after ``module`` (output shape ``out_shape``, no batch) folds in as ``diag(s)·W``.

    BatchNorm scales axis 1. That is the layer's output axis for a convolution,
    and for a Linear only when its output is ``(N, F)``: on ``(N, L, F)`` a Linear
    acts on the last axis while BN scales L, and ``diag(s)·W`` would
    under-estimate ``max(s)·σ₁(W)``.

    Example:
        >>> bn_folds_into(nn.Linear(3, 4), (4,)), bn_folds_into(nn.Linear(3, 4), (5, 4))
        (True, False)
    """
    kind = layer_kind(module)
    rule = kind.fold_norm if kind is not None else None
    return rule == "channels" or (rule == "features" and out_shape is not None and len(out_shape) == 1)


def head_matrix(module: nn.Module) -> torch.Tensor:
    """The head's weight as a float64 matrix ``classes × features`` (``B·A`` for a low-rank layer).

    Example:
        >>> tuple(head_matrix(nn.Linear(4, 3)).shape)
        (3, 4)
    """
    spec = _spec(module)
    if isinstance(spec, LowRankSpec):
        return _f64(spec.b.weight()) @ _f64(spec.a.weight())
    return _f64(spec.weight())


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's weights are stored in.

    Example:
        >>> weight_dtype(nn.Linear(2, 2).double())
        torch.float64
    """
    spec = _spec(module)
    return (spec.a if isinstance(spec, LowRankSpec) else spec).weight().dtype


def weight_shape(module: nn.Module) -> list[int | str]:
    """The weight's shape as reported (a low-rank layer: ``[out, in…, "r<rank>"]``).

    Example:
        >>> weight_shape(nn.Conv2d(3, 8, 3))
        [8, 3, 3, 3]
    """
    spec = _spec(module)
    if isinstance(spec, LowRankSpec):
        a, b = spec.a.weight(), spec.b.weight()
        return [int(b.shape[0]), *map(int, a.shape[1:])] + [f"r{int(a.shape[0])}"]
    return list(map(int, spec.weight().shape))
