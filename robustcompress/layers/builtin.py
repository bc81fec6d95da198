"""Built-in layer kinds: Linear, Conv1d/2d/3d, transformers' Conv1D, low-rank layers, Embedding.

Each kind describes its operator as data (:mod:`~robustcompress.layers.specs`);
parametrized weights (``torch.nn.utils.parametrize``, e.g. ``weight_norm`` /
``spectral_norm`` parametrizations, and the older hook-based ``weight_norm``)
are read through :func:`weight_of`, so the operator is the parametrized
weight and gradients flow through the parametrization to the stored tensors.

Example:
    >>> from torch import nn
    >>> from .registry import layer_views
    >>> v, = layer_views(nn.utils.parametrizations.weight_norm(nn.Linear(4, 3)))
    >>> v.params
    ('parametrizations.weight.original0', 'parametrizations.weight.original1')
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from .lowrank import LowRankConv2d, LowRankLinear
from .registry import LayerKind, LayerView, ViewOptions, register_layer_kind
from .specs import ConvGeometry, LowRankSpec, MatrixSpec

__all__ = ["weight_of", "CONV1D_TRANSFORMERS"]

#: transformers' Conv1D (weight stored in × out), recognised by name without importing transformers.
CONV1D_TRANSFORMERS = "transformers.pytorch_utils.Conv1D"

EMBEDDING_REASON = ("a lookup table, not a map of the model's input: each step reads a few rows, so its norm is "
                    "not a gain the model applies; tracked for metrics only (a tied output head follows it)")


def weight_of(module: nn.Module, name: str = "weight") -> tuple[Callable[[], torch.Tensor], tuple[str, ...]]:
    """A getter for ``module``'s (possibly parametrized) weight and the names of the parameters it reads.

    Args:
        module: the module.
        name: the weight's attribute name.

    Returns:
        ``(getter, params)``: ``getter()`` returns the current weight
        (recomputed through a parametrization, differentiable); ``params``
        are the stored tensors' names relative to ``module``.

    Example:
        >>> get, params = weight_of(nn.Linear(3, 2))
        >>> get().shape, params
        (torch.Size([2, 3]), ('weight',))
    """
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        params = tuple(f"parametrizations.{name}.{p}" for p, _ in plist.named_parameters())
        return (lambda: getattr(module, name)), params
    for hook in module._forward_pre_hooks.values():
        # The hook-based torch.nn.utils.weight_norm keeps `weight` as a stale
        # attribute refreshed only in forward: recompute it from g and v.
        if isinstance(hook, WeightNorm) and hook.name == name:
            return (lambda: hook.compute_weight(module)), (f"{name}_g", f"{name}_v")
    if not isinstance(module._parameters.get(name), nn.Parameter):
        raise ValueError(f"{type(module).__name__}.{name} is not a parameter or a parametrized weight")
    return (lambda: getattr(module, name)), (name,)


def _prefixed(prefix: str, params: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{p}" for p in params)


def _linear_views(m: nn.Module, options: ViewOptions) -> list[LayerView]:
    get, params = weight_of(m)
    return [LayerView("", MatrixSpec(get), params)]


def _conv_views(m: nn.Module, options: ViewOptions) -> list[LayerView]:
    get, params = weight_of(m)
    return [LayerView("", MatrixSpec(get, groups=m.groups, conv=ConvGeometry.from_module(m)), params)]


def _conv1d_views(m: nn.Module, options: ViewOptions) -> list[LayerView]:
    get, params = weight_of(m)
    return [LayerView("", MatrixSpec(get, transpose=True), params)]


def _lowrank_views(m: nn.Module, options: ViewOptions) -> list[LayerView]:
    get_a, pa = weight_of(m, "weight_a")
    get_b, pb = weight_of(m, "weight_b")
    conv = None
    if isinstance(m, LowRankConv2d):
        pair = nn.modules.utils._pair
        pad = m.conv_args["padding"]
        conv = ConvGeometry(2, pair(m.conv_args["stride"]), pad if isinstance(pad, str) else pair(pad),
                            pair(m.conv_args["dilation"]))
    return [LayerView("", LowRankSpec(MatrixSpec(get_a), MatrixSpec(get_b), conv=conv), pa + pb)]


def _embedding_views(m: nn.Module, options: ViewOptions) -> list[LayerView]:
    # The operator maps a one-hot token to its vector: Wᵀ (dim × vocab).
    get, params = weight_of(m)
    return [LayerView("", MatrixSpec(get, transpose=True), params)]


LINEAR = register_layer_kind(LayerKind(
    "linear", (nn.Linear,), _linear_views, feature_axis=-1, fold_norm="features", prune="rows", truncate="factorize"))
CONV = register_layer_kind(LayerKind(
    "conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv_views, feature_axis=1, fold_norm="channels", prune="rows",
    truncate="factorize"))
CONV1D = register_layer_kind(LayerKind(
    "conv1d_transformers", (CONV1D_TRANSFORMERS,), _conv1d_views, feature_axis=-1, fold_norm="features",
    prune="rows", truncate="factorize"))
LOWRANK_LINEAR = register_layer_kind(LayerKind(
    "lowrank_linear", (LowRankLinear,), _lowrank_views, feature_axis=-1, fold_norm="features", truncate="rank"))
LOWRANK_CONV = register_layer_kind(LayerKind(
    "lowrank_conv", (LowRankConv2d,), _lowrank_views, feature_axis=1, fold_norm="channels", truncate="rank"))
EMBEDDING = register_layer_kind(LayerKind(
    "embedding", (nn.Embedding, nn.EmbeddingBag), _embedding_views, feature_axis=-1, can_be_head=False,
    penalize=False, exclusion_reason=EMBEDDING_REASON))
