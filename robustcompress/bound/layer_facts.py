"""Every layer fact the bound needs, in one place (to be read from the layer registry later).

Nothing else in :mod:`robustcompress.bound` asks which module type a layer is:

* ``LINEAR_TYPES`` — the modules bounded as linear layers; ``CONV_TYPES`` — those
  whose norm depends on the input size; ``HEAD_TYPES`` — those that can be the
  classifier head read by :func:`~robustcompress.bound.certified_radius`;
  ``LEAF_TYPES`` — library layers traced as one node; ``BATCHNORM_TYPES``.
* :func:`layer_view` — a layer as ``y = diag(s)·B·conv_K(x)`` in float64 (its
  operator facts), with a following eval-mode BatchNorm folded in as ``s``;
* :func:`bn_scale` — how a BatchNorm folds: ``s = γ/√(var+ε)``;
  :func:`bn_folds_into` — whether it can fold into the layer before it;
* :func:`head_matrix`, :func:`weight_dtype`, :func:`weight_shape`.

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

from ..layers import LowRankConv2d, LowRankLinear

__all__ = ["LINEAR_TYPES", "CONV_TYPES", "HEAD_TYPES", "LEAF_TYPES", "BATCHNORM_TYPES", "LayerView", "per_dim",
           "layer_view", "bn_scale", "bn_folds_into", "head_matrix", "weight_dtype", "weight_shape"]

#: Modules bounded as linear layers (bias excluded: it does not change a Lipschitz constant).
LINEAR_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, LowRankLinear, LowRankConv2d)
#: Linear layers whose operator norm depends on the input size.
CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, LowRankConv2d)
#: Layers that can be the classifier head (rows = classes) read by the certified radius.
HEAD_TYPES: tuple[type, ...] = (nn.Linear, LowRankLinear)
#: Library layers that the tracer keeps as one node (torch.nn modules are leaves already).
LEAF_TYPES: tuple[type, ...] = (LowRankLinear, LowRankConv2d)
#: Normalisations folded as ``diag(s)`` into the layer before them (eval mode only).
BATCHNORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)


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
    """The per-feature scale ``s = γ / √(running_var + ε)`` of an eval-mode BatchNorm, float64.

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
    s = torch.rsqrt(_f64(bn.running_var) + bn.eps)
    if bn.weight is not None:
        s = _f64(bn.weight) * s
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{what} has a non-finite scale γ/√(var+ε) (NaN or Inf in its weight or running_var): "
                         "no bound")
    return s


def _raw_view(module: nn.Module) -> LayerView:
    if isinstance(module, LowRankLinear):
        return LayerView("linear", _f64(module.weight_b) @ _f64(module.weight_a), None)
    if isinstance(module, nn.Linear):
        return LayerView("linear", _f64(module.weight), None)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        d = module.weight.dim() - 2
        return LayerView("conv", _f64(module.weight), None, module.groups, per_dim(module.stride, d),
                         per_dim(module.dilation, d), (), module.padding_mode, module.padding, module.in_channels)
    if isinstance(module, LowRankConv2d):
        a = module.conv_args
        return LayerView("conv", _f64(module.weight_a), rearrange(_f64(module.weight_b), "o r 1 1 -> o r"), 1,
                         per_dim(a["stride"], 2), per_dim(a["dilation"], 2), (), "zeros", a["padding"],
                         module.in_channels)
    raise TypeError(f"No layer bound for {type(module).__name__}; supported: "
                    + ", ".join(t.__name__ for t in LINEAR_TYPES))


def layer_view(module: nn.Module, bn: nn.Module | None = None, name: str | None = None) -> LayerView:
    """The layer as a float64 :class:`LayerView`, a following eval-mode BatchNorm folded as ``diag(s)``.

    Args:
        module: one of ``LINEAR_TYPES``.
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
    return not isinstance(module, HEAD_TYPES) or (out_shape is not None and len(out_shape) == 1)


def head_matrix(module: nn.Module) -> torch.Tensor:
    """The head's weight as a float64 matrix ``classes × features`` (``B·A`` for a low-rank layer).

    Example:
        >>> tuple(head_matrix(nn.Linear(4, 3)).shape)
        (3, 4)
    """
    if isinstance(module, LowRankLinear):
        return _f64(module.weight_b) @ _f64(module.weight_a)
    return _f64(module.weight)


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's weights are stored in.

    Example:
        >>> weight_dtype(nn.Linear(2, 2).double())
        torch.float64
    """
    return module.weight_a.dtype if isinstance(module, LEAF_TYPES) else module.weight.dtype


def weight_shape(module: nn.Module) -> list[int | str]:
    """The weight's shape as reported (a low-rank layer: ``[out, in…, "r<rank>"]``).

    Example:
        >>> weight_shape(nn.Conv2d(3, 8, 3))
        [8, 3, 3, 3]
    """
    if isinstance(module, LEAF_TYPES):
        return [int(module.weight_b.shape[0]), *map(int, module.weight_a.shape[1:])] + [f"r{module.rank}"]
    return list(map(int, module.weight.shape))
