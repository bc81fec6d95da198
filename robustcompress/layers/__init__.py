"""The layer registry and low-rank layers: the one home of layer facts.

* :mod:`.registry` — :class:`LayerKind`, :func:`register_layer_kind`,
  :func:`layer_kind`, :func:`find_layers`, :func:`head_name`.
* :mod:`.specs` — operator descriptors (:class:`MatrixSpec`,
  :class:`LowRankSpec`, :class:`LoRASpec`) and :func:`batchnorm_scale`.
* :mod:`.builtin`, :mod:`.attention`, :mod:`.recurrent`, :mod:`.adapters` — the built-in kinds.
* :mod:`.lowrank` — ``LowRankLinear``, ``LowRankConv2d``, ``to_low_rank``, ``to_dense``.

Example:
    >>> from torch import nn
    >>> find_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))).skipped
    {}
"""

from .lowrank import LowRankConv2d, LowRankLinear, best_rank_factors, to_dense, to_low_rank
from .registry import (
    Layer,
    LayerCatalog,
    LayerKind,
    LayerView,
    ViewOptions,
    find_layers,
    head_name,
    layer_kind,
    layer_kinds,
    layer_views,
    register_layer_kind,
    unregister_layer_kind,
)
from .specs import (
    BATCHNORM_TYPES,
    ConvGeometry,
    LoRASpec,
    LowRankSpec,
    MatrixSpec,
    batchnorm_scale,
    check_spec,
    is_batchnorm,
    slice_cols,
    slice_rows,
    with_row_scale,
)
from . import adapters, attention, builtin, recurrent  # noqa: F401,E402 - register the built-in kinds
from .builtin import weight_of

__all__ = [
    "BATCHNORM_TYPES",
    "ConvGeometry",
    "Layer",
    "LayerCatalog",
    "LayerKind",
    "LayerView",
    "LoRASpec",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankSpec",
    "MatrixSpec",
    "ViewOptions",
    "batchnorm_scale",
    "best_rank_factors",
    "check_spec",
    "find_layers",
    "head_name",
    "is_batchnorm",
    "layer_kind",
    "layer_kinds",
    "layer_views",
    "register_layer_kind",
    "slice_cols",
    "slice_rows",
    "to_dense",
    "to_low_rank",
    "unregister_layer_kind",
    "weight_of",
    "with_row_scale",
]
