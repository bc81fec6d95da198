"""Structured pruning: remove whole neurons / filters, ranked by an importance score.

Each layer's output units are ranked by an importance score (row norm
``‖w_i‖_p``, or a sensitivity-aware score that favours removing the directions
attackers use) and the lowest ``⌊amount·m⌋`` of the ``m`` units go.
Torch-Pruning (``torch_pruning``, optional extra ``compress``) traces the model
and removes every coupled slice with them — the next layer's input columns,
BatchNorm channels, the other branch of a residual add — so no dependency graph
is written here. ``mask_only=True`` keeps the shapes and zeroes the same slices
instead (masks re-applied by forward pre-hooks): the same outputs as the
physically pruned model, for quick measurement.

Transformers: attention blocks whose layer kind prunes ``"heads"`` lose whole
heads (head ``h``: rows ``h·d_h … (h+1)·d_h − 1`` of Q, K, V and the same
columns of O; the block's head-count attributes are updated), feed-forward
layers lose neurons, and the residual stream (features a LayerNorm, an
Embedding or an attention block reads together) keeps its width.

Example:
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> pruned = prune(model, 0.5, example_inputs=torch.zeros(1, 8))
    >>> pruned[0].out_features, pruned[2].in_features
    (8, 8)
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from einops import rearrange
from torch import nn

from .._checks import bool_arg, fraction, module_arg, norm_arg, positive_int
from .._utils import eval_mode
from ..layers import layer_kind
from ..layers.attention import HeadLayout, head_layout, set_num_heads
from ..metrics import as_matrix, row_norms, rows_for_energy
from ._common import ChannelMask, all_require_grad, default_example, first_param, mask_hooks
from ._kinds import CHANNEL_MODULES, PRUNABLE_LAYERS, bn_scale, is_depthwise, prune_refusal

__all__ = ["SensitivityImportance", "IMPORTANCES", "prune", "remove_masks", "amounts_for_energy"]

_TP_HINT = ("prune needs Torch-Pruning: pip install 'torch-pruning>=1.6,<1.7' "
            "(or the optional extra: pip install 'robustcompress[compress]')")


def remove_masks(model: nn.Module) -> nn.Module:
    """Make the masks of a ``prune(..., mask_only=True)`` model permanent and remove their hooks (in place).

    The masked entries are zeroed once more and then stay ordinary (trainable)
    weights; the model keeps its shapes.

    Args:
        model: a model returned by ``prune(..., mask_only=True)``.

    Returns:
        ``model``.

    Example:
        >>> masked = prune(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 0.5, mask_only=True)
        >>> int((remove_masks(masked)[0].weight == 0).all(1).sum())
        2
    """
    model = module_arg(model)
    for module in model.modules():
        for key, hook in mask_hooks(module):
            hook.zero_(module)
            del module._forward_pre_hooks[key]
    return model



class SensitivityImportance:
    """Sensitivity-aware neuron importance: row energy minus the part attackers use.

    For a layer's (BatchNorm-folded) row ``w_i ∈ R^n``::

        norm=2:    s_i = ‖w_i‖₂ − λ · ‖V_kᵀ w_i‖₂² / ‖w_i‖₂
        norm=inf:  s_i = ‖w_i‖₂ − λ · ‖w_i‖₁ / √n

    ``V_k`` holds the layer's top-``k`` right singular vectors, the L2
    attacker's directions, so ``‖V_kᵀ w_i‖² / ‖w_i‖²`` is the share of the
    row's energy that lies in them; ``‖w_i‖₁`` is the neuron's L∞ gain
    (``δ = ε·sign(w_i)`` moves it by ``ε‖w_i‖₁``) and ``‖w_i‖₁/√n ≤ ‖w_i‖₂``.
    Both scores lie in ``[(1 − λ)‖w_i‖₂, ‖w_i‖₂]``: ``λ = 0`` is the row norm,
    larger ``λ`` ranks rows aligned with the sensitive directions lower, so
    pruning removes them first.

    Args:
        norm: the attacker's norm, ``2`` or ``float("inf")``.
        weight: ``λ ∈ [0, 1]``.
        k: top singular directions counted for ``norm=2`` (capped at the layer's rank).

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 0.9]], dtype=torch.float64)
        >>> SensitivityImportance(norm=2, weight=0.5, k=1)(w)     # row 0 is the top direction
        tensor([0.5000, 0.9000], dtype=torch.float64)
    """

    def __init__(self, norm: float | str = 2, weight: float = 0.5, k: int = 1) -> None:
        self.norm = norm_arg(norm)
        self.weight = fraction(weight, "weight", closed_right=True)
        self.k = positive_int(k, "k")

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = as_matrix(rows)
        l2 = row_norms(rows, 2)
        if self.norm == 2:
            k = min(self.k, min(rows.shape))
            vh = torch.linalg.svd(rows, full_matrices=False)[2][:k]
            attack = (rows @ vh.T).square().sum(1) / l2.clamp_min(torch.finfo(rows.dtype).tiny)
        else:
            attack = row_norms(rows, 1) / math.sqrt(rows.shape[1])
        return l2 - self.weight * attack

    def __repr__(self) -> str:
        return f"SensitivityImportance(norm={self.norm}, weight={self.weight}, k={self.k})"


IMPORTANCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "l2": lambda rows: row_norms(rows, 2),
    "l1": lambda rows: row_norms(rows, 1),
    "sensitivity": SensitivityImportance(norm=2),
    "sensitivity-linf": SensitivityImportance(norm=float("inf")),
}


def _importance_arg(importance: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(importance, str) and importance.lower() in IMPORTANCES:
        return IMPORTANCES[importance.lower()]
    if callable(importance) and not isinstance(importance, str):
        return importance
    raise ValueError(f"Expected importance to be one of {sorted(IMPORTANCES)} or a callable rows -> scores, "
                     f"but got importance={importance!r}")



def _check_prunable(model: nn.Module, mask_only: bool) -> None:
    for name, module in model.named_modules():
        if list(module.parameters(recurse=False)) or layer_kind(module) is not None:
            reason = prune_refusal(name, module)
            if reason is not None:
                raise ValueError(f"prune cannot handle this model: {reason}")
        if not mask_only and mask_hooks(module):
            raise ValueError(f"Layer {name!r} carries pruning masks (a mask_only=True result); prune the unmasked "
                             "model, or make the masks permanent with remove_masks(model) first")


def _amount_arg(amount: Any) -> float | dict[str, float]:
    if isinstance(amount, Mapping):
        out = {}
        for k, v in amount.items():
            if not isinstance(k, str):
                raise TypeError(f"Expected the keys of amount to be layer names, but got {k!r}")
            out[k] = fraction(v, f"amount[{k!r}]")
        return out
    return fraction(amount, "amount")


class _Plan:
    """One coupled channel group to prune: its root layer, the root indices to remove, its layer names.

    ``attention`` is ``(module, layout, heads removed)`` when the group is an
    attention block's Q/K/V rows and O columns (whole heads are removed).
    """

    def __init__(self, root: nn.Module, idxs: list[int], names: list[str], channels: int,
                 attention: tuple[nn.Module, HeadLayout, int] | None = None) -> None:
        self.root, self.idxs, self.names, self.channels = root, idxs, names, channels
        self.attention = attention


class _PackedHeads:
    """Heads to remove from an ``nn.MultiheadAttention`` (packed Q/K/V; pruned by masks, not by Torch-Pruning)."""

    def __init__(self, name: str, module: nn.MultiheadAttention, heads: list[int]) -> None:
        self.name, self.module, self.heads = name, module, heads


def _out_items(graph: Any, group: Any) -> list[tuple[nn.Module, list[int], list[int]]]:
    """(layer, layer indices, root indices) of every Linear/Conv whose *outputs* the group removes."""
    items = []
    for item in group:
        dep, idxs = item.dep, item.idxs
        if isinstance(dep.target.module, PRUNABLE_LAYERS) and graph.is_out_channel_pruning_fn(dep.handler):
            items.append((dep.target.module, list(idxs), list(item.root_idxs)))
    return items


def _in_items(graph: Any, group: Any) -> list[tuple[nn.Module, list[int], list[int]]]:
    """(layer, layer indices, root indices) of every Linear whose *input columns* the group removes."""
    items = []
    for item in group:
        dep = item.dep
        if type(dep.target.module) is nn.Linear and graph.is_in_channel_pruning_fn(dep.handler):
            items.append((dep.target.module, list(item.idxs), list(item.root_idxs)))
    return items


def _reaches_output(graph: Any, group: Any) -> bool:
    """True when the group's channels are the model's outputs (the head: its rows are classes)."""
    import torch_pruning as tp

    for item in group:
        node = item.dep.target
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return True
        if not node.outputs and graph.is_out_channel_pruning_fn(item.dep.handler):
            return True
    return False


def _checked_scores(score_fn: Callable, rows: torch.Tensor, name: str) -> torch.Tensor:
    scores = score_fn(rows)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (rows.shape[0],):
        raise ValueError(f"importance must return one score per row ({rows.shape[0]} for layer "
                         f"{name!r}), but returned "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    scores = scores.detach().double().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"importance returned non-finite scores for layer {name!r}")
    return scores


def _group_scores(graph: Any, group: Any, score_fn: Callable, channels: int, fold_bn: bool,
                  names_of: Mapping[nn.Module, str]) -> torch.Tensor:
    """Importance per root channel: the scores of the coupled layers' rows, added."""
    total = torch.zeros(channels, dtype=torch.float64)
    for layer, idxs, root_idxs in _out_items(graph, group):
        rows = as_matrix(layer.weight.detach().double().cpu())
        if fold_bn:
            # BN rescales each output unit; the unit's real size is the folded row diag(s)·W.
            node = graph.module2node[layer]
            bn = node.outputs[0].module if len(node.outputs) == 1 else None
            s = bn_scale(bn) if bn is not None else None
            if s is not None:
                rows = rows * s.cpu()[:, None]
        scores = _checked_scores(score_fn, rows, names_of[layer])
        total.index_add_(0, torch.tensor(root_idxs), scores[torch.tensor(idxs)])
    return total


def _head_scores(graph: Any, group: Any, score_fn: Callable, layout: HeadLayout,
                 names_of: Mapping[nn.Module, str]) -> torch.Tensor:
    """Importance per head: the scores of its Q/K/V rows and of its O columns (rows of Oᵀ), added."""
    total = _group_scores(graph, group, score_fn, layout.heads * layout.head_dim, False, names_of)
    for layer, idxs, root_idxs in _in_items(graph, group):
        scores = _checked_scores(score_fn, layer.weight.detach().double().cpu().T, names_of[layer])
        total.index_add_(0, torch.tensor(root_idxs), scores[torch.tensor(idxs)])
    return rearrange(total, "(h d) -> h d", h=layout.heads).sum(1)


def _packed_head_scores(m: nn.MultiheadAttention, score_fn: Callable, name: str) -> torch.Tensor:
    """Head importance of an ``nn.MultiheadAttention``: its Q/K/V row blocks and ``out_proj`` columns."""
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        qkv = [m.in_proj_weight[i * e:(i + 1) * e] for i in range(3)]
    else:
        qkv = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
    total = torch.zeros(e, dtype=torch.float64)
    for w, label in zip(qkv + [m.out_proj.weight.T], ("q", "k", "v", "out_proj")):
        total += _checked_scores(score_fn, w.detach().double().cpu(), f"{name}.{label}")
    return rearrange(total, "(h d) -> h d", h=m.num_heads).sum(1)


def _lowest(scores: torch.Tensor, n_remove: int) -> list[int]:
    return sorted(int(i) for i in torch.sort(scores, stable=True).indices[:n_remove])


def _n_remove(a: float, units: int) -> int:
    return min(units - 1, int(math.floor(a * units + 1e-6)))


def _attention_blocks(model: nn.Module) -> tuple[dict[nn.Module, tuple[str, nn.Module, HeadLayout]],
                                                  list[tuple[str, nn.Module, HeadLayout]]]:
    """Blocks whose layer kind prunes heads: ``{projection Linear: block}`` and the packed ones."""
    by_projection, packed = {}, []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or kind.prune != "heads":
            continue
        layout = head_layout(module)
        if layout.projections is None:
            packed.append((name, module, layout))
        else:
            for path in layout.projections:
                by_projection[module.get_submodule(path)] = (name, module, layout)
    return by_projection, packed


def _plan_pruning(graph: Any, model: nn.Module, amount: float | dict[str, float], layers: Sequence[str] | None,
                  score_fn: Callable, fold_bn: bool) -> tuple[list[_Plan], list[_PackedHeads], dict[str, str]]:
    names_of = {m: n for n, m in model.named_modules()}
    named = dict(model.named_modules())
    by_projection, packed = _attention_blocks(model)
    groups = []
    head_names: set[str] = set()
    prunable: set[str] = {name for name, _, _ in packed}
    whole: dict[str, str] = {}
    for group in graph.get_all_groups(root_module_types=PRUNABLE_LAYERS):
        outs = [names_of[m] for m, _, _ in _out_items(graph, group)]
        if _reaches_output(graph, group):
            head_names.update(outs)
            continue
        real = list(dict.fromkeys(item.dep.target.module for item in group if item.dep.target.module in names_of))
        other = [m for m in real if not isinstance(m, PRUNABLE_LAYERS + CHANNEL_MODULES)]
        if other:
            # A LayerNorm, Embedding or attention module reads these features together (the residual
            # stream of a transformer): removing one would change the others' outputs, so they stay.
            reason = (f"coupled with {names_of[other[0]]!r} ({type(other[0]).__name__}), which prune keeps "
                      "whole (the features a normalisation, embedding or attention block reads together)")
            whole.update((n, reason) for n in outs)
            continue
        blocks = list(dict.fromkeys(by_projection[m][0] for m in real if m in by_projection))
        if not blocks:
            prunable.update(outs)
            groups.append((group, outs, None))
            continue
        aname, block, layout = next(v for v in by_projection.values() if v[0] == blocks[0])
        q, k, v, o = (block.get_submodule(p) for p in layout.projections)
        ok = (len(blocks) == 1 and {q, k, v} <= {m for m, _, _ in _out_items(graph, group)}
              and o in {m for m, _, _ in _in_items(graph, group)} and len(group[0].idxs) == layout.heads * layout.head_dim)
        if not ok:
            reason = f"coupled with attention block(s) {blocks} in a way that does not split into whole heads"
            whole.update((n, reason) for n in outs)
            continue
        prunable.update(outs + [aname])
        groups.append((group, outs + [aname], (aname, block, layout)))

    asked = list(layers or []) + (list(amount) if isinstance(amount, dict) else [])
    for name in asked:
        if name not in named:
            raise ValueError(f"Unknown layer {name!r}; prunable layers: {sorted(prunable)}")
        if name in head_names:
            raise ValueError(f"Layer {name!r} produces the model's output (the classifier head: its output rows "
                             "are the classes); its outputs cannot be pruned")
        if name in prunable:
            continue
        if name in whole:
            raise ValueError(f"Layer {name!r} cannot be pruned: its outputs are {whole[name]}")
        if not isinstance(named[name], PRUNABLE_LAYERS):
            raise ValueError(f"Layer {name!r} is a {type(named[name]).__name__}; only the output units of "
                             "Linear, Conv1d and Conv2d layers and the heads of attention blocks can be pruned")
        raise ValueError(f"Layer {name!r} was not reached when tracing the model with example_inputs; "
                         f"prunable layers: {sorted(prunable)}")

    def amount_for(names: list[str]) -> float | None:
        if layers is not None and not set(names) & set(layers):
            return None
        if isinstance(amount, dict):
            asked_here = [amount[n] for n in names if n in amount]
            # Coupled layers share their channels: remove the least any of them asked for.
            return min(asked_here) if asked_here else None
        return amount

    plans = []
    for group, outs, attention in groups:
        a = amount_for(outs)
        if a is None:
            continue
        channels = len(group[0].idxs)
        if attention is not None:
            _, block, layout = attention
            n_remove = _n_remove(a, layout.heads)
            if n_remove <= 0:
                continue
            heads = _lowest(_head_scores(graph, group, score_fn, layout, names_of), n_remove)
            idxs = [h * layout.head_dim + j for h in heads for j in range(layout.head_dim)]
            plans.append(_Plan(group[0].dep.target.module, idxs, outs, channels, (block, layout, n_remove)))
            continue
        n_remove = _n_remove(a, channels)
        if n_remove <= 0:
            continue
        scores = _group_scores(graph, group, score_fn, channels, fold_bn, names_of)
        plans.append(_Plan(group[0].dep.target.module, _lowest(scores, n_remove), outs, channels))
    packed_plans = []
    for name, module, layout in packed:
        a = amount_for([name])
        if a is None:
            continue
        n_remove = _n_remove(a, layout.heads)
        if n_remove > 0:
            heads = _lowest(_packed_head_scores(module, score_fn, name), n_remove)
            packed_plans.append(_PackedHeads(name, module, heads))
    return plans, packed_plans, whole


def _warn_whole(whole: Mapping[str, str]) -> None:
    by_reason: dict[str, list[str]] = {}
    for name, reason in whole.items():
        by_reason.setdefault(reason, []).append(name)
    lines = "; ".join(f"{', '.join(repr(n) for n in names)}: {reason}" for reason, names in by_reason.items())
    warnings.warn(f"prune keeps {len(whole)} layer(s) at full width — {lines}", stacklevel=3)


def _param_or_none(module: nn.Module, pname: str) -> torch.Tensor | None:
    owner_name, _, attr = pname.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return getattr(owner, attr, None)


def _apply_masks(graph: Any, model: nn.Module, plans: Sequence[_Plan], packed: Sequence[_PackedHeads]) -> None:
    """Zero the pruned rows and every dependent slice, and keep them zero with mask hooks.

    A pruned channel's outputs become 0 and every consumer's input columns for
    it are masked, so nothing downstream reads it: the outputs equal those of
    the physically pruned model (up to summation order). A removed head's
    Q/K/V rows and O columns are zeroed: its logits are 0 (uniform weights)
    and its values, and what O reads of them, are 0.
    """
    masks: dict[nn.Module, dict[str, torch.Tensor]] = {}

    def zero(module: nn.Module, pname: str, idxs: list[int], dim: int) -> None:
        param = _param_or_none(module, pname)
        if param is None:
            return
        per_module = masks.setdefault(module, {})
        if pname not in per_module:
            per_module[pname] = torch.ones_like(param)
        per_module[pname].index_fill_(dim, torch.tensor(idxs, device=param.device), 0)

    for plan in plans:
        pruner = graph.get_pruner_of_module(plan.root)
        group = graph.get_pruning_group(plan.root, pruner.prune_out_channels, plan.idxs)
        for item in group:
            module, handler, idxs = item.dep.target.module, item.dep.handler, list(item.idxs)
            if is_depthwise(module):  # one filter per channel: its input and output channels are the same
                zero(module, "weight", idxs, 0)
                zero(module, "bias", idxs, 0)
            elif isinstance(module, PRUNABLE_LAYERS):
                if graph.is_out_channel_pruning_fn(handler):
                    zero(module, "weight", idxs, 0)
                    zero(module, "bias", idxs, 0)
                elif graph.is_in_channel_pruning_fn(handler):
                    zero(module, "weight", idxs, 1)
            elif isinstance(module, CHANNEL_MODULES) and module.affine:
                zero(module, "weight", idxs, 0)
                zero(module, "bias", idxs, 0)
    for plan in packed:
        m, e, dh = plan.module, plan.module.embed_dim, plan.module.head_dim
        rows = [h * dh + j for h in plan.heads for j in range(dh)]
        # The hook sits on the block's parent: out_proj's own forward never runs, and
        # TransformerEncoderLayer's fused inference path reads the weights without calling the block.
        parent, _, child = plan.name.rpartition(".")
        holder = model.get_submodule(parent) if plan.name else model
        prefix = f"{child}." if plan.name else ""
        if m._qkv_same_embed_dim:
            zero(holder, prefix + "in_proj_weight", [r + i * e for i in range(3) for r in rows], 0)
        else:
            for x in "qkv":
                zero(holder, f"{prefix}{x}_proj_weight", rows, 0)
        zero(holder, prefix + "in_proj_bias", [r + i * e for i in range(3) for r in rows], 0)
        zero(holder, prefix + "out_proj.weight", rows, 1)
    for module, per_module in masks.items():
        existing = mask_hooks(module)
        if existing:  # masking a masked model again: combine with the masks already there
            hook = existing[0][1]
            for pname, mask in per_module.items():
                hook.masks[pname] = hook.masks[pname].to(mask) * mask if pname in hook.masks else mask
            hook._versions.clear()
        else:
            hook = ChannelMask(per_module)
            module.register_forward_pre_hook(hook)
        hook.zero_(module)


def _output_tensor(out: Any) -> torch.Tensor:
    """The tensor a model's output carries: itself, its ``logits`` / ``last_hidden_state``, or a tuple's first."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"prune reads the model's output as a tensor, a ModelOutput with logits or a tuple, but the "
                    f"model returned {type(out).__name__}")


def _run(model: nn.Module, example: Any) -> torch.Tensor:
    return _output_tensor(model(**example) if isinstance(example, dict) else model(example))


def prune(
    model: nn.Module,
    amount: float | Mapping[str, float],
    example_inputs: torch.Tensor | None = None,
    importance: str | Callable[[torch.Tensor], torch.Tensor] = "l2",
    mask_only: bool = False,
    layers: Sequence[str] | None = None,
    inplace: bool = False,
    fold_bn: bool = True,
) -> nn.Module:
    """Structured pruning: remove the least important ``⌊amount·m⌋`` of each layer's ``m`` output units.

    Each coupled channel group (a layer's outputs, with the BatchNorm after it,
    the next layers' inputs, and every layer tied to it by a residual add) is
    scored per channel by ``importance`` of the layers' rows (``w_i``, the
    rows of ``rearrange(W, "o i ... -> o (i ...)")``, multiplied by the
    following BatchNorm's ``|γ|/√(var+ε)`` when ``fold_bn``; coupled layers'
    scores add), and the ``⌊amount·m + 10⁻⁶⌋`` lowest channels (at most
    ``m − 1``; ties broken by index) are removed by Torch-Pruning. The
    classifier head's outputs (the channels that reach the model output) are
    never pruned.

    Attention heads: in a block with ``H`` heads of size ``d_h``, head ``h``
    scores ``Σ_{i ∈ h} [s(q_i) + s(k_i) + s(v_i) + s(o_{:,i})]`` — the
    importance ``s`` of its ``d_h`` rows of ``W_Q``, ``W_K``, ``W_V`` and of
    its ``d_h`` columns of ``W_O`` (so ``"l2"`` adds their Euclidean norms,
    ``"l1"`` their ℓ₁ norms) — and the ``⌊amount·H + 10⁻⁶⌋`` lowest heads (at
    most ``H − 1``) go whole. BERT/ViT-style blocks (separate Q/K/V/O
    ``nn.Linear``) are cut by Torch-Pruning, and ``num_attention_heads`` /
    ``all_head_size`` (``num_heads``, ``inner_dim``) are updated on the block
    (the shared config is not: layers may now differ). ``nn.MultiheadAttention``
    heads are removed in ``mask_only`` mode only (its inner width is tied to
    ``embed_dim``). A removed head's Q/K/V rows and O columns are zero in
    ``mask_only`` mode, so its output is exactly 0, as when it is cut out.
    Features that a LayerNorm, an Embedding or an attention block reads
    together (a transformer's residual stream) are left at full width: zeroing
    one would change the normalisation of the others; a warning lists the
    layers so kept (when no ``layers`` or per-layer ``amount`` was given). Modules refused, by
    their layer kind's prune rule: transformers' ``Conv1D`` and GPT-2
    attention, Conv3d, grouped (non-depthwise) convolutions, recurrent layers,
    LoRA adapters and low-rank layers.

    Args:
        model: a network of Linear, Conv1d, Conv2d (ungrouped or depthwise),
            BatchNorm1d/2d, LayerNorm, Embedding and attention layers (BERT- and
            ViT-style blocks, ``nn.MultiheadAttention``), plus parameter-free
            modules and functions.
        amount: fraction of units (neurons, channels, heads) removed per layer,
            in ``[0, 1)``, or a ``{layer name: fraction}`` mapping (unnamed
            layers are kept; an attention block is named by its module or any of
            its Q/K/V layers; coupled layers take the smallest fraction asked
            for any of them).
        example_inputs: one input batch to trace the model with: a tensor
            (integer token ids are fine) or a dict of keyword tensors
            (``model(**example_inputs)``); inferred (zeros) when the first layer
            is a Linear. A ``ModelOutput`` is read through its ``logits``.
        importance: ``"l2"`` (row norm ``‖w_i‖₂``, default), ``"l1"``
            (``‖w_i‖₁``, the L∞ gain), ``"sensitivity"`` /
            ``"sensitivity-linf"`` (:class:`SensitivityImportance` for L2 / L∞),
            or a callable ``rows (m × n float64) -> scores (m,)``, higher = keep.
        mask_only: keep the shapes and zero the pruned slices, kept at zero by
            forward pre-hooks (also while fine-tuning; :func:`remove_masks` drops them).
        layers: names of the layers whose outputs may be pruned (default: all but the head).
        inplace: modify ``model`` instead of a deep copy.
        fold_bn: score a layer followed by BatchNorm by its folded rows.

    Returns:
        The pruned model (``model`` itself when ``inplace``).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> small = prune(model, 0.25)
        >>> [m.out_features for m in small if isinstance(m, nn.Linear)]
        [12, 12, 3]
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 4, 16, batch_first=True), 1,
        ...                             enable_nested_tensor=False)
        >>> masked = prune(enc, 0.5, example_inputs=torch.zeros(1, 3, 8), mask_only=True)
        >>> int((masked.layers[0].self_attn.out_proj.weight == 0).all(0).sum())   # 2 of 4 heads, 2 columns each
        4
    """
    model = module_arg(model)
    amount = _amount_arg(amount)
    score_fn = _importance_arg(importance)
    mask_only = bool_arg(mask_only, "mask_only")
    inplace = bool_arg(inplace, "inplace")
    fold_bn = bool_arg(fold_bn, "fold_bn")
    if layers is not None:
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
            raise TypeError(f"Expected layers to be a sequence of layer names, but got layers={layers!r}")
        layers = list(layers)
    _check_prunable(model, mask_only)
    example = default_example(model, example_inputs)
    first = first_param(model)
    if first is not None:
        example = ({k: v.to(first.device) for k, v in example.items()} if isinstance(example, dict)
                   else example.to(first.device))
    try:
        import torch_pruning as tp
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_TP_HINT) from err

    target = model if inplace else copy.deepcopy(model)
    with eval_mode(target), all_require_grad(target):
        graph = tp.DependencyGraph().build_dependency(target, example_inputs=example, verbose=False,
                                                      output_transform=_output_tensor)
        with torch.no_grad():
            before = _run(target, example)
        # Everything is planned and checked before the first change, so a failure leaves the model whole.
        plans, packed, whole = _plan_pruning(graph, target, amount, layers, score_fn, fold_bn)
        for plan in plans:
            pruner = graph.get_pruner_of_module(plan.root)
            if not graph.check_pruning_group(graph.get_pruning_group(plan.root, pruner.prune_out_channels, plan.idxs)):
                raise ValueError(f"Pruning {len(plan.idxs)} of {plan.channels} channels of {plan.names} would "
                                 "empty a coupled layer; use a smaller amount")
        if packed and not mask_only:
            raise ValueError(f"nn.MultiheadAttention {packed[0].name!r}: its heads cannot be removed physically "
                             "(its inner width is tied to embed_dim, and Torch-Pruning's rule for it narrows "
                             "embed_dim instead); use mask_only=True, or restrict layers= to the feed-forward layers")
        if mask_only:
            _apply_masks(graph, target, plans, packed)
        else:
            for plan in plans:
                pruner = graph.get_pruner_of_module(plan.root)
                graph.get_pruning_group(plan.root, pruner.prune_out_channels, plan.idxs).prune()
                if plan.attention is not None:
                    block, layout, removed = plan.attention
                    set_num_heads(block, layout.heads - removed)
        with torch.no_grad():
            after = _run(target, example)
    if after.shape != before.shape:  # pragma: no cover - guards against a tracing surprise
        raise RuntimeError(f"Pruning changed the model's output shape from {tuple(before.shape)} to "
                           f"{tuple(after.shape)}; please report this model")
    if whole and layers is None and not isinstance(amount, dict):
        _warn_whole(whole)
    return target


def amounts_for_energy(model: nn.Module, energy: float = 0.99, layers: Sequence[str] | None = None) -> dict[str, float]:
    """Per-layer pruning amounts that keep the fewest rows holding ``energy`` of each layer's row energy.

    For a layer with rows ``w_1 … w_m`` keep ``κ = min{κ : Σ_{i≤κ} ‖w_(i)‖² ≥
    energy·Σ_i ‖w_i‖²}`` (rows by decreasing norm, :func:`metrics.rows_for_energy`,
    at least 1), i.e. ``amount = (m − κ)/m``; pass the result to :func:`prune`
    with ``importance="l2", fold_bn=False`` to remove exactly those light rows
    (with the default ``fold_bn=True`` a layer followed by BatchNorm is scored
    by its BN-folded rows, which can rank the rows differently).

    Args:
        model: the network.
        energy: share of the row energy to keep, in (0, 1].
        layers: names of Linear/Conv layers (default: all except the last one, the head).

    Returns:
        ``{layer name: amount}``.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     _ = m[0].weight.copy_(torch.tensor([[10.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.01, 0]]))
        >>> amounts_for_energy(m, 0.999)      # rows 10 and 1 hold 99.9 %
        {'0': 0.3333333333333333}
    """
    model = module_arg(model)
    named = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_LAYERS)}
    if layers is None:
        layers = list(named)[:-1]
    out = {}
    for name in layers:
        if name not in named:
            raise ValueError(f"Expected layer names of Linear/Conv layers, but got {name!r}; known: {list(named)}")
        w = named[name].weight
        m = w.shape[0]
        kept = max(1, rows_for_energy(w, energy))
        out[name] = (m - kept) / m
    return out

