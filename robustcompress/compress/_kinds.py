"""The layer facts compression needs, read from the layer registry (:mod:`robustcompress.layers`).

* which modules :func:`~robustcompress.compress.prune` removes output units of
  (:data:`PRUNABLE_LAYERS`; grouped convolutions only when depthwise,
  :func:`is_depthwise`, pruned with their producer) and which per-channel
  modules follow them (:data:`CHANNEL_MODULES`);
* which modules prune refuses (:func:`prune_refusal`, from the layer
  registry's prune rule: the kinds Torch-Pruning cannot cut) and which
  attention blocks lose whole heads (:func:`~robustcompress.layers.attention.head_layout`);
* which modules :func:`~robustcompress.compress.truncate` factorises and why
  one cannot be (:func:`truncation_refusal`);
* the operator of a weight (:func:`operator_matrix`: transformers' ``Conv1D``
  stores its weight ``in × out``, so its operator is ``Wᵀ``);
* the BatchNorm scale that folds into the rows before it (:func:`bn_scale`:
  :func:`~robustcompress.layers.batchnorm_scale` in float64, or None where
  there is nothing to fold).

The classifier head is :func:`robustcompress.layers.head_name`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import LowRankConv2d, LowRankLinear, batchnorm_scale, layer_kind
from ..layers.attention import head_layout
from ..layers.builtin import CONV1D

#: layers whose output units (rows / filters) prune removes
PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: per-channel modules that follow the channels they read (pruned along, never roots)
CHANNEL_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
#: low-rank layers (the result of truncate)
LOW_RANK = (LowRankLinear, LowRankConv2d)


def is_conv1d_transposed(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` stored ``in × out`` (the registry's kind)."""
    return layer_kind(module) is CONV1D


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution (``groups == in_channels == out_channels > 1``): its channels follow its producer's."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


#: Attention classes on which Torch-Pruning 1.6's grouping never finished (measured on a tiny config).
_GRAPH_DOES_NOT_FINISH = frozenset({"LlamaAttention"})


def prune_refusal(name: str, module: nn.Module) -> str | None:
    """Why :func:`~robustcompress.compress.prune` cannot handle ``module`` (None when it can).

    Read from the layer registry's prune rule: ``"rows"`` kinds are pruned
    when Torch-Pruning has a rule for them (Linear, Conv1d, Conv2d ungrouped or
    depthwise); ``"heads"`` kinds when their Q/K/V/O are Linear layers or packed
    ``nn.MultiheadAttention`` weights; ``"none"`` kinds left out of penalties
    (Embedding) stay whole; every other kind (recurrent layers, LoRA adapters,
    low-rank layers, transformers' ``Conv1D``, Conv3d, grouped convolutions) is refused.
    """
    kind = layer_kind(module)
    if kind is None:
        return None
    label = f"layer {name!r} is a {type(module).__name__}"
    if kind.prune == "rows":
        if not isinstance(module, PRUNABLE_LAYERS):
            return (f"{label}; Torch-Pruning has no rule for it (prune supports Linear, Conv1d and Conv2d "
                    "among row-pruned layers)")
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1 and not is_depthwise(module):
            return (f"prune supports ungrouped and depthwise convolutions only, but layer {name!r} has "
                    f"groups={module.groups} with {module.in_channels} input and {module.out_channels} output channels")
        return None
    if kind.prune == "heads":
        if type(module).__name__ in _GRAPH_DOES_NOT_FINISH:
            return (f"{label}; Torch-Pruning's dependency graph did not finish on this attention (rotary "
                    "position embeddings) within 300 s, so prune refuses it rather than hang")
        if head_layout(module) is None:
            inner = sorted({type(c).__name__ for c in module.children() if list(c.parameters(recurse=False))})
            return (f"{label} whose projections are {', '.join(inner) or 'packed weights'}, not nn.Linear layers; "
                    "Torch-Pruning cannot split them into heads")
        return None
    if kind.prune == "none" and not kind.penalize:
        return None  # a lookup table (Embedding): stays whole, with the features it is coupled to
    hint = " (prune before truncating)" if isinstance(module, LOW_RANK) else ""
    return (f"{label} (layer kind {kind.name!r}, prune rule {kind.prune!r}); Torch-Pruning cannot prune it{hint}")


def is_truncatable_kind(module: nn.Module) -> bool:
    """Linear, Conv2d or transformers' Conv1D: the kinds truncate may factorise."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d_transposed(module)


def operator_matrix(module: nn.Module) -> torch.Tensor:
    """The weight's matrix view ``out × (in·k…)`` as the layer applies it (``Wᵀ`` for Conv1D)."""
    w = module.weight
    if is_conv1d_transposed(module):
        return w.T
    return w.reshape(w.shape[0], -1)


def truncation_refusal(name: str, module: nn.Module) -> str | None:
    """Why ``module`` cannot be factorised (None when it can)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return (f"layer {name!r}: only ungrouped Conv2d with numeric zero padding can be factorised "
                    f"(groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r})")
        return None
    if is_truncatable_kind(module):
        return None
    return (f"layer {name!r} is a {type(module).__name__}; only nn.Linear, nn.Conv2d and transformers' Conv1D "
            "layers can be truncated to low rank")


def bn_scale(bn: nn.Module) -> torch.Tensor | None:
    """``|γ|/√(var + eps)`` of an eval-mode BatchNorm in float64, detached (None where nothing folds).

    None for modules other than BatchNorm1d/2d and for a BatchNorm without
    running statistics; otherwise :func:`~robustcompress.layers.batchnorm_scale`.
    """
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.running_var is None:
        return None
    return batchnorm_scale(bn, torch.float64).detach()
