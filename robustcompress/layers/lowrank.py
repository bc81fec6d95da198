"""Explicit low-rank layers: architecture-level compression.

A rank-``r`` layer stores two factors, ``W ≈ B·A`` with ``A ∈ R^{r×n}`` and
``B ∈ R^{m×r}``, so it holds ``r·(m + n)`` weights instead of ``m·n``. The
spectral core iterates the product ``B·A`` as one operator: penalising the
factors separately is a different regulariser, since
``σ₁(B)·σ₁(A) ≥ σ₁(B·A)``.

Example:
    >>> import torch
    >>> layer = LowRankLinear(64, 32, rank=4)
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 32])
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._checks import positive_int

__all__ = ["LowRankLinear", "LowRankConv2d", "to_low_rank", "to_dense", "best_rank_factors"]


def best_rank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors of a matrix (Eckart–Young), balanced between the two.

    ``M ≈ B·A`` with ``B = U_r·diag(√s_r)`` and ``A = diag(√s_r)·V_rᵀ``, so
    ``‖M − B·A‖_F² = Σ_{j>r} s_j²``, the smallest error any rank-``r`` matrix
    can reach. Computed in float64, returned in the matrix's dtype.

    Args:
        matrix: a 2-D floating-point tensor ``m × n``.
        rank: ``1 ≤ rank ≤ min(m, n)``.

    Returns:
        ``(A, B)`` with shapes ``r × n`` and ``m × r``.

    Example:
        >>> a, b = best_rank_factors(torch.eye(3), 3)
        >>> torch.allclose(b @ a, torch.eye(3))
        True
    """
    if matrix.dim() != 2 or not matrix.is_floating_point():
        raise ValueError(f"Expected matrix to be a 2-D float tensor, but got shape {tuple(matrix.shape)}, dtype={matrix.dtype}")
    positive_int(rank, "rank")
    if rank > min(matrix.shape):
        raise ValueError(f"Expected rank <= min(shape) = {min(matrix.shape)}, but got rank={rank}")
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a.to(matrix.dtype), b.to(matrix.dtype)


class LowRankLinear(nn.Module):
    """``y = B (A x) + b``: a Linear layer of rank at most ``rank``.

    Parameters ``weight_a`` (``rank × in_features``) and ``weight_b``
    (``out_features × rank``); the represented weight is ``weight_b @ weight_a``.

    Args:
        in_features: input size n.
        out_features: output size m.
        rank: the inner dimension r (``1 ≤ r``; larger than ``min(m, n)`` is allowed but wasteful).
        bias: whether to learn an additive bias.

    Example:
        >>> LowRankLinear(10, 5, rank=2).weight.shape
        torch.Size([5, 10])
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.rank = positive_int(rank, "rank")
        kw = {"device": device, "dtype": dtype}
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-uniform on each factor, like nn.Linear, so the product has the
        # scale a Linear of the same fan-in would have.
        nn.init.kaiming_uniform_(self.weight_a, a=5 ** 0.5)
        nn.init.kaiming_uniform_(self.weight_b, a=5 ** 0.5)
        if self.bias is not None:
            bound = 1 / self.in_features ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``B·A`` (differentiable)."""
        return self.weight_b @ self.weight_a

    def linear_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer without its bias: ``x ↦ B A x``."""
        return F.linear(F.linear(x, self.weight_a), self.weight_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """The best rank-``rank`` approximation of ``linear`` (Eckart–Young), bias copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Expected an nn.Linear, but got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, rank)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> "LowRankLinear":
        """The best rank-``rank`` approximation ``B·A`` of the map ``x ↦ W x + b`` (Eckart–Young).

        Args:
            weight: ``W``, ``out × in`` as the layer applies it (e.g. ``Wᵀ`` of a
                weight stored in × out, like transformers' ``Conv1D``).
            bias: ``b`` (copied) or None.
            rank: ``1 ≤ rank ≤ min(out, in)``.

        Example:
            >>> w = torch.randn(5, 3)
            >>> layer = LowRankLinear.from_weight(w, None, rank=3)
            >>> torch.allclose(layer.weight, w, atol=1e-5)
            True
        """
        if rank > min(weight.shape):
            raise ValueError(f"Expected rank <= min(weight shape) = {min(weight.shape)}, but got rank={rank}")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        a, b = best_rank_factors(weight.detach(), rank)
        with torch.no_grad():
            layer.weight_a.copy_(a)
            layer.weight_b.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class LowRankConv2d(nn.Module):
    """A Conv2d of rank at most ``rank`` in its matrix view: a ``rank``-channel conv, then a 1×1 conv.

    ``weight_a`` (``rank × in × kh × kw``) is applied with the layer's stride,
    padding and dilation; ``weight_b`` (``out × rank × 1 × 1``) mixes the
    ``rank`` channels. The matrix view of the represented kernel is
    ``rearrange(weight_b, "o r 1 1 -> o r") @ rearrange(weight_a, "r i kh kw -> r (i kh kw)")``.

    Example:
        >>> LowRankConv2d(3, 8, 3, rank=2, padding=1)(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.rank = positive_int(rank, "rank")
        self.conv_args = {"stride": stride, "padding": padding, "dilation": dilation}
        kh, kw = nn.modules.utils._pair(kernel_size)
        self.kernel_size = (kh, kw)
        kwargs = {"device": device, "dtype": dtype}
        self.weight_a = nn.Parameter(torch.empty(rank, in_channels, kh, kw, **kwargs))
        self.weight_b = nn.Parameter(torch.empty(out_channels, rank, 1, 1, **kwargs))
        self.bias = nn.Parameter(torch.empty(out_channels, **kwargs)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_a, a=5 ** 0.5)
        nn.init.kaiming_uniform_(self.weight_b, a=5 ** 0.5)
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            nn.init.uniform_(self.bias, -1 / fan_in ** 0.5, 1 / fan_in ** 0.5)

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel ``out × in × kh × kw`` the two factors represent."""
        a = rearrange(self.weight_a, "r i kh kw -> r (i kh kw)")
        b = rearrange(self.weight_b, "o r 1 1 -> o r")
        kh, kw = self.kernel_size
        return rearrange(b @ a, "o (i kh kw) -> o i kh kw", kh=kh, kw=kw)

    def linear_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer without its bias."""
        return F.conv2d(F.conv2d(x, self.weight_a, None, **self.conv_args), self.weight_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, self.weight_a, None, **self.conv_args), self.weight_b, self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> "LowRankConv2d":
        """The best rank-``rank`` approximation of ``conv``'s matrix view, bias copied.

        Only ungrouped, zero-padded convolutions are supported.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"Expected an nn.Conv2d, but got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                "LowRankConv2d supports ungrouped convolutions with numeric zero padding, but got "
                f"groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        w = conv.weight
        mat = rearrange(w, "o i kh kw -> o (i kh kw)")
        if rank > min(mat.shape):
            raise ValueError(f"Expected rank <= min(matrix-view shape) = {min(mat.shape)}, but got rank={rank}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    device=w.device, dtype=w.dtype)
        a, b = best_rank_factors(mat, rank)
        kh, kw = conv.kernel_size
        with torch.no_grad():
            layer.weight_a.copy_(rearrange(a, "r (i kh kw) -> r i kh kw", kh=kh, kw=kw))
            layer.weight_b.copy_(rearrange(b, "o r -> o r 1 1"))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.conv_args['stride']}, padding={self.conv_args['padding']}, "
                f"dilation={self.conv_args['dilation']}, bias={self.bias is not None}")


def _last_layer_name(model: nn.Module) -> str | None:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, LowRankLinear, LowRankConv2d)):
            last = name
    return last


def to_low_rank(
    model: nn.Module,
    rank: int | Mapping[str, int] | Callable[[str, nn.Module], int | None],
    *,
    exclude_head: bool = True,
    from_weights: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Replace Linear / Conv2d layers by ``LowRankLinear`` / ``LowRankConv2d``.

    With ``from_weights=True`` each layer starts as its best rank-``r``
    approximation (truncated SVD of the matrix view, Eckart–Young); with
    ``False`` it is freshly initialised (architecture compression, trained from
    scratch). A layer whose rank would be ``≥ min(m, n)`` gains nothing and is
    left dense.

    Args:
        model: the network.
        rank: one rank for every eligible layer, a ``{name: rank}`` mapping
            (names as in ``model.named_modules()``), or a callable
            ``(name, module) -> rank or None`` (None leaves the layer dense).
        exclude_head: leave the classifier head (the last Linear/Conv) dense.
        from_weights: initialise from the layer's SVD rather than at random.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The model with low-rank layers.

    Example:
        >>> from torch import nn
        >>> m = to_low_rank(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), 2)
        >>> type(m[0]).__name__, type(m[2]).__name__
        ('LowRankLinear', 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    named = dict(model.named_modules())
    if isinstance(rank, Mapping):
        unknown = [n for n in rank if n not in named]
        if unknown:
            raise ValueError(f"Unknown layer names in rank: {unknown}; known Linear/Conv2d layers: "
                             f"{[n for n, m in named.items() if isinstance(m, (nn.Linear, nn.Conv2d))]}")
        for n, r in rank.items():
            positive_int(r, f"rank[{n!r}]")
            if not isinstance(named[n], (nn.Linear, nn.Conv2d)):
                raise ValueError(f"Layer {n!r} is a {type(named[n]).__name__}; only nn.Linear and nn.Conv2d can be factorised")
        choose = lambda name, module: rank.get(name)  # noqa: E731
    elif callable(rank):
        choose = rank
    else:
        positive_int(rank, "rank")
        choose = lambda name, module: rank  # noqa: E731
    head = _last_layer_name(model) if exclude_head else None

    plan: dict[str, int] = {}
    for name, module in named.items():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or name == head:
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                              or isinstance(module.padding, str)):
            if isinstance(rank, Mapping) and name in rank:
                raise ValueError(f"Layer {name!r}: only ungrouped, numerically zero-padded Conv2d can be factorised")
            continue
        r = choose(name, module)
        if r is None:
            continue
        positive_int(r, f"rank for layer {name!r}")
        full = min(module.weight.shape[0], module.weight[0].numel())
        if isinstance(rank, Mapping) and r > full:
            raise ValueError(f"Layer {name!r}: rank {r} exceeds min(matrix-view shape) = {full}")
        if r < full:
            plan[name] = r

    target = model if inplace else copy.deepcopy(model)
    for name, r in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        old = getattr(parent, child)
        if isinstance(old, nn.Linear):
            new = LowRankLinear.from_linear(old, r) if from_weights else LowRankLinear(
                old.in_features, old.out_features, r, bias=old.bias is not None,
                device=old.weight.device, dtype=old.weight.dtype)
        else:
            new = LowRankConv2d.from_conv(old, r) if from_weights else LowRankConv2d(
                old.in_channels, old.out_channels, old.kernel_size, r, stride=old.stride, padding=old.padding,
                dilation=old.dilation, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        setattr(parent, child, new)
    return target


def to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace ``LowRankLinear`` / ``LowRankConv2d`` by the dense layer of weight ``B·A``: the inverse of :func:`to_low_rank`.

    The dense layer computes the same function (``W = B·A``, bias copied,
    stride/padding/dilation kept), on the factors' device and dtype, so
    structured pruning and export can act on it. ``to_dense(to_low_rank(m, r))``
    has ``m``'s layer types; its weights are the rank-``r`` approximations.

    Args:
        model: the network.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The model with dense layers.

    Example:
        >>> from torch import nn
        >>> m = to_low_rank(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), 2)
        >>> d = to_dense(m)
        >>> type(d[0]).__name__, torch.allclose(d[0].weight, m[0].weight)
        ('Linear', True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    if isinstance(model, (LowRankLinear, LowRankConv2d)):
        return _dense_layer(model)
    target = model if inplace else copy.deepcopy(model)
    for name, module in list(target.named_modules()):
        if isinstance(module, (LowRankLinear, LowRankConv2d)):
            parent_name, _, child = name.rpartition(".")
            setattr(target.get_submodule(parent_name) if parent_name else target, child, _dense_layer(module))
    return target


def _dense_layer(layer: nn.Module) -> nn.Module:
    kw = {"device": layer.weight_a.device, "dtype": layer.weight_a.dtype}
    if isinstance(layer, LowRankLinear):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, **kw)
    else:
        dense = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, bias=layer.bias is not None,
                          **layer.conv_args, **kw)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    dense.train(layer.training)
    return dense
