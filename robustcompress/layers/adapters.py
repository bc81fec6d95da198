"""PEFT LoRA layers: the operator is the effective weight ``op(W₀) + s·B·A``.

A ``peft.tuners.lora.layer.Linear`` (recognised by its class name; peft is
never imported) wraps ``base_layer`` — an ``nn.Linear``, or transformers'
``Conv1D`` with ``fan_in_fan_out`` (weight stored in × out, so
``op(W₀) = W₀ᵀ``; on GPT-2's square ``c_proj`` the wrong orientation has the
right shape and the wrong value, so the base's own layer kind decides it) —
and adds ``s·B·A`` with ``A = lora_A[adapter].weight`` (``r × in``),
``B = lora_B[adapter].weight`` (``out × r``) and ``s = scaling[adapter]``
(``α/r``, or ``α/√r`` with rsLoRA). With the base frozen, gradients of
``uᵀ·op·v`` reach ``A`` and ``B`` only.

Refused with a clear error (never tracked as something else): DoRA
(``use_dora``: the magnitude vector rescales columns of the merged weight, a
different operator), several active adapters, and LoRA on other layer types
(``Embedding``, convolutions, ``MultiheadAttention``). A LoRA layer whose
adapters are disabled or merged into the base is its base's operator.

Example:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from .registry import find_layers
    >>> model = get_peft_model(nn.Sequential(nn.Linear(6, 4)), LoraConfig(r=2, target_modules=["0"]))
    >>> layer = find_layers(model).layers[0]
    >>> layer.name, layer.view.params
    ('base_model.model.0', ('base_layer.weight', 'lora_A.default.weight', 'lora_B.default.weight'))
"""

from __future__ import annotations

from torch import nn

from .registry import LayerKind, LayerView, ViewOptions, layer_kind, register_layer_kind
from .specs import LoRASpec, MatrixSpec

__all__ = ["PEFT_LORA_LINEAR"]

PEFT_LORA_LINEAR = "peft.tuners.lora.layer.Linear"
_PEFT_LORA_LAYER = "peft.tuners.lora.layer.LoraLayer"


def _base_view(m: nn.Module, options: ViewOptions) -> LayerView:
    base = m.base_layer
    kind = layer_kind(base)
    if kind is None:
        raise ValueError(f"The LoRA layer's base_layer is a {type(base).__name__}, which has no registered layer kind")
    views = kind.views(base, options)
    if len(views) != 1 or not isinstance(views[0].spec, MatrixSpec):
        raise ValueError(f"The LoRA layer's base_layer ({type(base).__name__}) is not a single weight matrix")
    return views[0]


def _active_adapter(m: nn.Module) -> str | None:
    """The one active adapter acting on this layer, None if the layer is its base, or raise."""
    if getattr(m, "disable_adapters", False) or getattr(m, "merged", False):
        return None
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) > 1:
        raise ValueError(f"LoRA layer with several active adapters {active}: its operator is a sum over adapters, "
                         "which is not supported; activate one adapter (model.set_adapter(name)) or merge them")
    if not active:
        return None
    adapter = active[0]
    if m.use_dora.get(adapter, False):
        raise ValueError(f"DoRA adapter {adapter!r} (use_dora=True) is not supported: its magnitude vector rescales "
                         "the merged weight's columns, a different operator than W0 + s·B·A; use plain LoRA or merge "
                         "the adapter (merge_and_unload) first")
    return adapter


def _lora_views(m: nn.Module, options: ViewOptions) -> list[LayerView]:
    base = _base_view(m, options)
    params = tuple(f"base_layer.{p}" for p in base.params)
    adapter = _active_adapter(m)
    if adapter is None:
        return [LayerView("", base.spec, params)]
    lora_a, lora_b = m.lora_A[adapter], m.lora_B[adapter]
    if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
        raise ValueError(f"LoRA adapter {adapter!r}: expected Linear lora_A / lora_B, but got "
                         f"{type(lora_a).__name__} / {type(lora_b).__name__}")
    scale = m.scaling[adapter]
    if not isinstance(scale, (int, float)):
        raise ValueError(f"LoRA adapter {adapter!r}: expected a numeric scaling, but got {scale!r}")
    spec = LoRASpec(base.spec, MatrixSpec(lambda: lora_a.weight), MatrixSpec(lambda: lora_b.weight), float(scale))
    return [LayerView("", spec, params + (f"lora_A.{adapter}.weight", f"lora_B.{adapter}.weight"))]


def _refuse_other_lora(m: nn.Module, options: ViewOptions) -> list[LayerView]:
    raise ValueError(f"LoRA on {type(m).__name__} layers is not supported (only peft's LoRA Linear, including "
                     "Conv1D bases); merge the adapter (merge_and_unload) or leave this module out of the LoRA config")


PEFT_LORA = register_layer_kind(LayerKind(
    "peft_lora", (PEFT_LORA_LINEAR,), _lora_views, feature_axis=-1, fold_norm="features", prune="none",
    truncate="none", claims_children=True))
PEFT_LORA_OTHER = register_layer_kind(LayerKind(
    "peft_lora_unsupported", (_PEFT_LORA_LAYER,), _refuse_other_lora, claims_children=True))
