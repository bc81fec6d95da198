"""Compress for real: structured pruning, rank truncation, fine-tuning, re-measuring, export.

Two ways to make a trained network smaller, each returning the compressed model:

* :func:`prune` removes whole neurons / filters. Each layer's output units are
  ranked by an importance score (row norm ``‖w_i‖_p``, or a sensitivity-aware
  score that favours removing the directions attackers use) and the lowest
  ``⌊amount·m⌋`` of the ``m`` units go. Torch-Pruning (``torch_pruning``,
  optional extra ``compress``) traces the model and removes every coupled
  slice with them — the next layer's input columns, BatchNorm channels, the
  other branch of a residual add — so no dependency graph is written here.
  ``mask_only=True`` keeps the shapes and zeroes the same slices instead
  (masks re-applied by forward pre-hooks): the same outputs as the
  physically pruned model, for quick measurement.
* :func:`truncate` replaces Linear / Conv2d layers by their best rank-``r``
  factorisation ``W ≈ B·A`` (:class:`~robustcompress.layers.LowRankLinear`,
  :class:`~robustcompress.layers.LowRankConv2d`; Eckart–Young: the error
  ``‖W − B·A‖_F² = Σ_{j>r} σ_j²`` is the smallest any rank-``r`` matrix reaches),
  ``r`` per layer from an energy threshold, a fixed rank, or a global
  parameter budget.

Then :func:`finetune` (optionally with the project's penalties and
adversarial training), :func:`measure` (clean and PGD robust accuracy, UAP
fooling rate, parameters, multiply-accumulates), :func:`compression_curve`
(the whole sweep as a table and a plot) and :func:`export` /
:func:`load_exported` (a state dict plus the per-layer shapes needed to
rebuild the smaller model from a fresh base model).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> pruned = prune(model, 0.5, example_inputs=torch.zeros(1, 8))
    >>> pruned[0].out_features, pruned[2].in_features
    (8, 8)
    >>> small = truncate(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)), rank=4)
    >>> type(small[0]).__name__
    'LowRankLinear'
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import heapq
import importlib
import json
import math
import os
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import batches, eval_mode
from ._checks import bool_arg, fraction, module_arg, nonnegative_float, nonnegative_int, norm_arg, positive_float, positive_int
from .layers import LowRankConv2d, LowRankLinear, to_low_rank
from .metrics import as_matrix, rank_for_energy, row_norms, rows_for_energy

__all__ = [
    "SensitivityImportance",
    "prune",
    "remove_masks",
    "amounts_for_energy",
    "truncate",
    "ranks_for_budget",
    "count_parameters",
    "count_macs",
    "finetune",
    "measure",
    "compression_curve",
    "export",
    "load_exported",
    "add_arguments",
    "run_cli",
]

#: layers whose output units (rows / filters) :func:`prune` removes
PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: per-channel modules that follow the channels they read (pruned along, never roots)
_CHANNEL_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
#: layers :func:`truncate` factorises
TRUNCATABLE_LAYERS = (nn.Linear, nn.Conv2d)
_LOW_RANK = (LowRankLinear, LowRankConv2d)

_EXPORT_FORMAT = "robustcompress.compress/1"
_TP_HINT = ("prune needs Torch-Pruning: pip install 'torch-pruning>=1.6,<1.7' "
            "(or the optional extra: pip install 'robustcompress[compress]')")


# --------------------------------------------------------------------------- small helpers


def _first_param(model: nn.Module) -> torch.Tensor | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t
    return None


@contextlib.contextmanager
def _all_require_grad(model: nn.Module) -> Iterator[None]:
    """Torch-Pruning traces the autograd graph, so frozen parameters would hide their layers.

    Flags are restored by name: pruning replaces the parameter objects.
    """
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))


class _ChannelMask:
    """Forward pre-hook that keeps pruned entries of a layer's parameters at zero.

    The parameters stay plain leaf tensors (so the model deep-copies, saves and
    feeds the spectral core as usual); the masked entries are zeroed in place
    before a forward pass whenever the parameter changed since the last
    zeroing (an optimizer step), and not otherwise, so a graph that saved
    the weight is never invalidated by a second forward pass.
    """

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self._versions: dict[str, int] = {}

    def zero_(self, module: nn.Module) -> None:
        with torch.no_grad():
            for pname, mask in self.masks.items():
                p = getattr(module, pname)
                if self._versions.get(pname) == p._version:
                    continue
                if mask.device != p.device or mask.dtype != p.dtype:
                    mask = self.masks[pname] = mask.to(p)
                p.mul_(mask)
                self._versions[pname] = p._version

    def __call__(self, module: nn.Module, _args: Any) -> None:
        self.zero_(module)


def _mask_hooks(module: nn.Module) -> list[tuple[int, _ChannelMask]]:
    return [(k, h) for k, h in module._forward_pre_hooks.items() if isinstance(h, _ChannelMask)]


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
        for key, hook in _mask_hooks(module):
            hook.zero_(module)
            del module._forward_pre_hooks[key]
    return model


def _example_from(data: Any) -> torch.Tensor:
    for xb, _ in batches(data, 1):
        return xb[:1]
    raise ValueError("Expected data to hold at least one example")


def _default_example(model: nn.Module, example_inputs: Any) -> torch.Tensor:
    """``example_inputs`` as given, or a zero input for models whose first layer is a Linear."""
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor) or not example_inputs.is_floating_point():
            raise TypeError("Expected example_inputs to be a floating-point tensor (a batch of one or more "
                            f"inputs), but got {type(example_inputs).__name__}")
        return example_inputs
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return torch.zeros(1, module.in_features, device=module.weight.device, dtype=module.weight.dtype)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d) + _LOW_RANK):
            break
    raise ValueError("Expected example_inputs (one input batch, e.g. torch.zeros(1, 3, 32, 32)): it can only be "
                     "inferred for models whose first layer is a Linear")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --------------------------------------------------------------------------- importance


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


_IMPORTANCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "l2": lambda rows: row_norms(rows, 2),
    "l1": lambda rows: row_norms(rows, 1),
    "sensitivity": SensitivityImportance(norm=2),
    "sensitivity-linf": SensitivityImportance(norm=float("inf")),
}


def _importance_arg(importance: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(importance, str) and importance.lower() in _IMPORTANCES:
        return _IMPORTANCES[importance.lower()]
    if callable(importance) and not isinstance(importance, str):
        return importance
    raise ValueError(f"Expected importance to be one of {sorted(_IMPORTANCES)} or a callable rows -> scores, "
                     f"but got importance={importance!r}")


def _bn_scale(bn: nn.Module) -> torch.Tensor | None:
    """``|γ|/√(var + eps)`` of an eval-mode BatchNorm (None without running statistics)."""
    if not isinstance(bn, _CHANNEL_MODULES) or bn.running_var is None:
        return None
    s = (bn.running_var.detach().double() + bn.eps).rsqrt()
    if bn.affine:
        s = s * bn.weight.detach().double().abs()
    return s


# --------------------------------------------------------------------------- pruning


def _check_prunable(model: nn.Module, mask_only: bool) -> None:
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            raise ValueError(f"prune supports ungrouped convolutions only, but layer {name!r} has "
                             f"groups={module.groups}")
        if not isinstance(module, PRUNABLE_LAYERS + _CHANNEL_MODULES):
            hint = " (prune before truncating)" if isinstance(module, _LOW_RANK) else ""
            raise ValueError(f"prune supports models built of Linear, Conv1d, Conv2d (groups=1) and BatchNorm1d/2d "
                             f"layers, but layer {name!r} is a {type(module).__name__}{hint}")
        if not mask_only and _mask_hooks(module):
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
    """One coupled channel group to prune: its root layer, the root indices to remove, its layer names."""

    def __init__(self, root: nn.Module, idxs: list[int], names: list[str], channels: int) -> None:
        self.root, self.idxs, self.names, self.channels = root, idxs, names, channels


def _out_items(graph: Any, group: Any) -> list[tuple[nn.Module, list[int], list[int]]]:
    """(layer, layer indices, root indices) of every Linear/Conv whose *outputs* the group removes."""
    items = []
    for item in group:
        dep, idxs = item.dep, item.idxs
        if isinstance(dep.target.module, PRUNABLE_LAYERS) and graph.is_out_channel_pruning_fn(dep.handler):
            items.append((dep.target.module, list(idxs), list(item.root_idxs)))
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
            s = _bn_scale(bn) if bn is not None else None
            if s is not None:
                rows = rows * s.cpu()[:, None]
        scores = score_fn(rows)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (rows.shape[0],):
            raise ValueError(f"importance must return one score per row ({rows.shape[0]} for layer "
                             f"{names_of[layer]!r}), but returned "
                             f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
        scores = scores.detach().double().cpu()
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"importance returned non-finite scores for layer {names_of[layer]!r}")
        total.index_add_(0, torch.tensor(root_idxs), scores[torch.tensor(idxs)])
    return total


def _plan_pruning(graph: Any, model: nn.Module, amount: float | dict[str, float], layers: Sequence[str] | None,
                  score_fn: Callable, fold_bn: bool) -> list[_Plan]:
    names_of = {m: n for n, m in model.named_modules()}
    named = dict(model.named_modules())
    groups = []
    head_names: set[str] = set()
    prunable: set[str] = set()
    for group in graph.get_all_groups(root_module_types=PRUNABLE_LAYERS):
        outs = [names_of[m] for m, _, _ in _out_items(graph, group)]
        if _reaches_output(graph, group):
            head_names.update(outs)
        else:
            prunable.update(outs)
            groups.append((group, outs))

    asked = list(layers or []) + (list(amount) if isinstance(amount, dict) else [])
    for name in asked:
        if name not in named:
            raise ValueError(f"Unknown layer {name!r}; prunable layers: {sorted(prunable)}")
        if name in head_names:
            raise ValueError(f"Layer {name!r} produces the model's output (the classifier head: its output rows "
                             "are the classes); its outputs cannot be pruned")
        if not isinstance(named[name], PRUNABLE_LAYERS):
            raise ValueError(f"Layer {name!r} is a {type(named[name]).__name__}; only the output units of "
                             "Linear, Conv1d and Conv2d layers can be pruned")
        if name not in prunable:
            raise ValueError(f"Layer {name!r} was not reached when tracing the model with example_inputs; "
                             f"prunable layers: {sorted(prunable)}")

    plans = []
    for group, outs in groups:
        if layers is not None and not set(outs) & set(layers):
            continue
        if isinstance(amount, dict):
            asked_here = [amount[n] for n in outs if n in amount]
            if not asked_here:
                continue
            # Coupled layers share their channels: remove the least any of them asked for.
            a = min(asked_here)
        else:
            a = amount
        channels = len(group[0].idxs)
        n_remove = min(channels - 1, int(math.floor(a * channels + 1e-6)))
        if n_remove <= 0:
            continue
        scores = _group_scores(graph, group, score_fn, channels, fold_bn, names_of)
        order = torch.sort(scores, stable=True).indices
        idxs = sorted(int(i) for i in order[:n_remove])
        plans.append(_Plan(group[0].dep.target.module, idxs, outs, channels))
    return plans


def _apply_masks(graph: Any, plans: Sequence[_Plan]) -> None:
    """Zero the pruned rows and every dependent slice, and keep them zero with mask hooks.

    A pruned channel's outputs become 0 and every consumer's input columns for
    it are masked, so nothing downstream reads it: the outputs equal those of
    the physically pruned model (up to summation order).
    """
    masks: dict[nn.Module, dict[str, torch.Tensor]] = {}

    def zero(module: nn.Module, pname: str, idxs: list[int], dim: int) -> None:
        param = getattr(module, pname, None)
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
            if isinstance(module, PRUNABLE_LAYERS):
                if graph.is_out_channel_pruning_fn(handler):
                    zero(module, "weight", idxs, 0)
                    zero(module, "bias", idxs, 0)
                elif graph.is_in_channel_pruning_fn(handler):
                    zero(module, "weight", idxs, 1)
            elif isinstance(module, _CHANNEL_MODULES) and module.affine:
                zero(module, "weight", idxs, 0)
                zero(module, "bias", idxs, 0)
    for module, per_module in masks.items():
        existing = _mask_hooks(module)
        if existing:  # masking a masked model again: combine with the masks already there
            hook = existing[0][1]
            for pname, mask in per_module.items():
                hook.masks[pname] = hook.masks[pname].to(mask) * mask if pname in hook.masks else mask
            hook._versions.clear()
        else:
            hook = _ChannelMask(per_module)
            module.register_forward_pre_hook(hook)
        hook.zero_(module)


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

    Args:
        model: a network of Linear, Conv1d, Conv2d (groups=1) and BatchNorm1d/2d
            layers (plus parameter-free modules and functions).
        amount: fraction of units removed per layer, in ``[0, 1)``, or a
            ``{layer name: fraction}`` mapping (unnamed layers are kept; coupled
            layers take the smallest fraction asked for any of them).
        example_inputs: one input batch to trace the model with; inferred
            (zeros) when the first layer is a Linear.
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
    example = _default_example(model, example_inputs)
    first = _first_param(model)
    if first is not None:
        example = example.to(first.device)
    try:
        import torch_pruning as tp
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_TP_HINT) from err

    target = model if inplace else copy.deepcopy(model)
    with eval_mode(target), _all_require_grad(target):
        graph = tp.DependencyGraph().build_dependency(target, example_inputs=example, verbose=False)
        with torch.no_grad():
            before = target(example)
        # Everything is planned and checked before the first change, so a failure leaves the model whole.
        plans = _plan_pruning(graph, target, amount, layers, score_fn, fold_bn)
        for plan in plans:
            pruner = graph.get_pruner_of_module(plan.root)
            if not graph.check_pruning_group(graph.get_pruning_group(plan.root, pruner.prune_out_channels, plan.idxs)):
                raise ValueError(f"Pruning {len(plan.idxs)} of {plan.channels} channels of {plan.names} would "
                                 "empty a coupled layer; use a smaller amount")
        if mask_only:
            _apply_masks(graph, plans)
        else:
            for plan in plans:
                pruner = graph.get_pruner_of_module(plan.root)
                graph.get_pruning_group(plan.root, pruner.prune_out_channels, plan.idxs).prune()
        with torch.no_grad():
            after = target(example)
    if after.shape != before.shape:  # pragma: no cover - guards against a tracing surprise
        raise RuntimeError(f"Pruning changed the model's output shape from {tuple(before.shape)} to "
                           f"{tuple(after.shape)}; please report this model")
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


# --------------------------------------------------------------------------- truncation


def _truncatable(name: str, module: nn.Module) -> str | None:
    """Why ``module`` cannot be factorised (None when it can)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return (f"layer {name!r}: only ungrouped Conv2d with numeric zero padding can be factorised "
                    f"(groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r})")
        return None
    if isinstance(module, nn.Linear):
        return None
    return (f"layer {name!r} is a {type(module).__name__}; only nn.Linear and nn.Conv2d layers can be "
            "truncated to low rank")


def _head(model: nn.Module) -> str | None:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d) + _LOW_RANK):
            last = name
    return last


def _truncation_layers(model: nn.Module, layers: Sequence[str] | None, exclude_head: bool) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    head = _head(model) if exclude_head else None
    if layers is None:
        return {n: m for n, m in named.items() if isinstance(m, TRUNCATABLE_LAYERS)
                and n != head and _truncatable(n, m) is None}
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise TypeError(f"Expected layers to be a sequence of layer names, but got layers={layers!r}")
    out = {}
    for n in layers:
        if n not in named:
            raise ValueError(f"Unknown layer {n!r}; Linear/Conv2d layers: "
                             f"{[k for k, m in named.items() if isinstance(m, TRUNCATABLE_LAYERS)]}")
        reason = _truncatable(n, named[n])
        if reason is not None:
            raise ValueError(reason)
        if n == head:
            raise ValueError(f"Layer {n!r} is the classifier head; pass exclude_head=False to truncate it too")
        out[n] = named[n]
    return out


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    return int(module.weight.shape[0]), int(module.weight[0].numel())


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def ranks_for_budget(model: nn.Module, budget: float, layers: Sequence[str] | None = None,
                     exclude_head: bool = True) -> dict[str, int]:
    """Per-layer ranks that keep at most ``budget`` of the model's parameters, by greedy energy per parameter.

    A layer ``m × n`` at rank ``r`` costs ``r·(m + n)`` weights while that is
    below ``m·n``, else it stays dense (``m·n``, full rank). Every layer starts
    at rank 1; then singular values are added in decreasing order of
    ``(σ_{l,j}² / ‖W_l‖_F²) / (m_l + n_l)`` — relative energy per parameter, so
    the rescaling of a layer changes nothing — as long as the total stays
    within ``budget · (all parameters of the model)``.

    Args:
        model: the network.
        budget: fraction of the model's parameters to keep, in (0, 1].
        layers: the layers to factorise (default: every Linear/Conv2d but the head).
        exclude_head: leave the classifier head dense.

    Returns:
        ``{layer name: rank}``; a rank equal to ``min(m, n)`` means "stays dense".

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> ranks_for_budget(model, 0.5)['0'] < 64
        True
    """
    model = module_arg(model)
    budget = fraction(budget, "budget", closed_right=True)
    if budget == 0:
        raise ValueError("Expected budget to lie in (0, 1], but got budget=0")
    chosen = _truncation_layers(model, layers, exclude_head)
    total = _unique_params(model)
    limit = budget * total
    shapes = {n: _matrix_shape(m) for n, m in chosen.items()}
    sig2 = {n: torch.linalg.svdvals(as_matrix(m.weight.detach().double())).square() for n, m in chosen.items()}

    def cost(name: str, r: int) -> int:
        m, n = shapes[name]
        return r * (m + n) if r < min(m, n) and r * (m + n) < m * n else m * n

    ranks = {n: 1 for n in chosen}
    used = total - sum(shapes[n][0] * shapes[n][1] for n in chosen) + sum(cost(n, 1) for n in chosen)
    if used > limit:
        raise ValueError(f"budget={budget} is below the smallest reachable share {used / total:.4g} "
                         "(every chosen layer at rank 1 and the other parameters kept)")
    heap = []
    for n in chosen:
        if cost(n, 1) == shapes[n][0] * shapes[n][1]:  # already dense at rank 1
            ranks[n] = min(shapes[n])
            continue
        if len(sig2[n]) > 1:
            tot = float(sig2[n].sum()) or 1.0
            heapq.heappush(heap, (-float(sig2[n][1]) / tot / sum(shapes[n]), n))
    while heap:
        _, n = heapq.heappop(heap)
        r = ranks[n] + 1
        extra = cost(n, r) - cost(n, ranks[n])
        if used + extra > limit:
            continue  # this layer cannot grow any more; the others may
        used += extra
        m_, n_ = shapes[n]
        if cost(n, r) == m_ * n_:
            ranks[n] = min(m_, n_)
            continue
        ranks[n] = r
        if r < len(sig2[n]):
            tot = float(sig2[n].sum()) or 1.0
            heapq.heappush(heap, (-float(sig2[n][r]) / tot / (m_ + n_), n))
    return ranks


def truncate(
    model: nn.Module,
    *,
    energy: float | None = None,
    rank: int | Mapping[str, int] | None = None,
    budget: float | None = None,
    layers: Sequence[str] | None = None,
    exclude_head: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Replace Linear / Conv2d layers by their best rank-``r`` factorisation ``W ≈ B·A``.

    Exactly one of:

    * ``energy``: per layer the smallest ``r`` with ``Σ_{j≤r} σ_j² ≥ energy · Σ_j σ_j²``
      (float64 singular values of the matrix view ``out × (in·kh·kw)``);
    * ``rank``: one rank for every chosen layer, or ``{name: rank}``;
    * ``budget``: a global parameter budget (fraction of the model's parameters
      kept), ranks from :func:`ranks_for_budget`.

    A layer whose rank equals ``min(m, n)`` is left dense (exact); the others
    become :class:`~robustcompress.layers.LowRankLinear` /
    :class:`~robustcompress.layers.LowRankConv2d` holding the truncated SVD
    (Eckart–Young: ``‖W − B·A‖_F² = Σ_{j>r} σ_j²``, the least any rank-``r`` matrix reaches).

    Args:
        model: the network.
        energy: share of ``‖W‖_F²`` kept per layer, in (0, 1].
        rank: ``1 ≤ rank ≤ min(m, n)`` for every chosen layer, or a mapping.
        budget: fraction of parameters kept, in (0, 1].
        layers: the layers to factorise (default: every Linear / ungrouped Conv2d but the head).
        exclude_head: leave the classifier head dense.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The truncated model.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> truncate(model, rank=2)[0].rank
        2
    """
    model = module_arg(model)
    inplace = bool_arg(inplace, "inplace")
    exclude_head = bool_arg(exclude_head, "exclude_head")
    given = [k for k, v in (("energy", energy), ("rank", rank), ("budget", budget)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"Expected exactly one of energy, rank or budget, but got {given or 'none'}")
    if isinstance(rank, Mapping):
        if layers is not None:
            raise ValueError("Pass layers or a {name: rank} mapping, not both")
        layers = list(rank)
    chosen = _truncation_layers(model, layers, exclude_head)
    for module in chosen.values():
        for _, hook in _mask_hooks(module):
            hook.zero_(module)  # factorise what the masked layer computes (a no-op for its function)

    plan: dict[str, int] = {}
    if energy is not None:
        energy = fraction(energy, "energy", closed_right=True)
        if energy == 0:
            raise ValueError("Expected energy to lie in (0, 1], but got energy=0")
        for n, m in chosen.items():
            sig = torch.linalg.svdvals(as_matrix(m.weight.detach().double()))
            plan[n] = max(1, rank_for_energy(sig, energy) or len(sig))
    elif rank is not None:
        for n, m in chosen.items():
            r = positive_int(rank[n] if isinstance(rank, Mapping) else rank, f"rank for layer {n!r}")
            full = min(_matrix_shape(m))
            if r > full:
                raise ValueError(f"Expected rank <= min(shape) = {full} for layer {n!r} "
                                 f"(matrix view {_matrix_shape(m)}), but got rank={r}")
            plan[n] = r
    else:
        plan = ranks_for_budget(model, budget, list(chosen), exclude_head=exclude_head)
    factorised = {n: r for n, r in plan.items() if r < min(_matrix_shape(chosen[n]))}
    if not factorised:
        return model if inplace else copy.deepcopy(model)
    return to_low_rank(model, factorised, exclude_head=False, inplace=inplace)


# --------------------------------------------------------------------------- counting


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor once; a masked parameter counts its unmasked entries.

    Example:
        >>> count_parameters(nn.Linear(4, 3))
        15
    """
    model = module_arg(model)
    masked = {}
    for module in model.modules():
        for _, hook in _mask_hooks(module):
            for pname, mask in hook.masks.items():
                masked[id(getattr(module, pname))] = int(mask.count_nonzero())
    seen = {id(p): p for p in model.parameters()}
    return sum(masked.get(i, p.numel()) for i, p in seen.items())


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on one example, over Linear, Conv and low-rank layers.

    Counted with forward hooks on ``example_input[:1]`` (per output element):
    Linear ``n``; Conv ``(c_in/groups)·Π kernel``; LowRankLinear
    ``r·(n + m)`` per output vector; LowRankConv2d ``r·(c_in·kh·kw + c_out)``
    per output position. Masked layers count as dense.

    Args:
        model: the network (run in eval mode, mode restored).
        example_input: a batch; only its first example is used.

    Returns:
        The number of multiply-accumulates.

    Example:
        >>> count_macs(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.zeros(1, 4))
        18
    """
    model = module_arg(model)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError("Expected example_input to be a non-empty batch tensor (N, ...)")
    total = [0]

    def hook(module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        if isinstance(module, LowRankLinear):
            total[0] += out.numel() // module.out_features * module.rank * (module.in_features + module.out_features)
        elif isinstance(module, LowRankConv2d):
            kh, kw = module.kernel_size
            positions = out.numel() // module.out_channels
            total[0] += positions * module.rank * (module.in_channels * kh * kw + module.out_channels)
        elif isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features
        else:
            total[0] += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + _LOW_RANK
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    x = example_input[:1]
    first = _first_param(model)
    if first is not None:
        x = x.to(first.device)
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


# --------------------------------------------------------------------------- fine-tuning and measuring


def _penalties_arg(penalties: Any, model: nn.Module) -> list[nn.Module]:
    if penalties is None:
        return []
    if callable(penalties) and not isinstance(penalties, nn.Module):
        penalties = penalties(model)
    if isinstance(penalties, nn.Module):
        penalties = [penalties]
    out = list(penalties)
    for p in out:
        if not isinstance(p, nn.Module):
            raise TypeError(f"Expected penalties to be nn.Modules whose forward() returns a scalar, "
                            f"but got {type(p).__name__}")
        if hasattr(p, "check_model"):
            p.check_model(model)  # a penalty built on the uncompressed model reads the wrong weights
    return out


def finetune(
    model: nn.Module,
    data: Any,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    penalties: Sequence[nn.Module] | Callable[[nn.Module], Sequence[nn.Module]] | None = None,
    adversarial: Mapping[str, Any] | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Briefly retrain a compressed model in place: Adam on ``CE + Σ penalties``.

    ``loss = CE(f(x̃), y) + Σ_p p()`` per batch, where ``x̃`` is the clean batch
    or, with ``adversarial``, the mixed batch of
    :func:`robustcompress.attacks.adversarial_batch` (a share of PGD
    examples). Pruning masks stay in force (their entries get no gradient).
    The model's train/eval mode is restored and no gradient is left on its
    parameters.

    Args:
        model: the model to fine-tune (modified in place and returned).
        data: training data: a Dataset of ``(x, y)``, a DataLoader or a tuple ``(x, y)``.
        epochs: passes over ``data`` (0 returns the model unchanged).
        lr: Adam learning rate.
        batch_size: batch size (a DataLoader keeps its own).
        penalties: nn.Modules whose ``forward()`` returns a scalar loss term
            (e.g. :class:`robustcompress.penalties.SpectralNormPenalty` built on
            *this* model), or a callable ``model -> penalties`` (handy after
            compression, which creates new layers). A penalty that shares a
            ``SpectralState`` it does not own gets that state stepped once per step.
        adversarial: None, or keyword arguments of ``adversarial_batch``
            (``ratio``, ``eps``, ``norm``, ``steps``, ...).
        weight_decay: Adam weight decay.
        seed: seed of the batch order and the attacks.

    Returns:
        ``model``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = (torch.rand(32, 4), torch.randint(0, 2, (32,)))
        >>> finetune(model, data, epochs=1) is model
        True
    """
    model = module_arg(model)
    epochs = nonnegative_int(epochs, "epochs")
    lr = positive_float(lr, "lr")
    batch_size = positive_int(batch_size, "batch_size")
    weight_decay = nonnegative_float(weight_decay, "weight_decay")
    seed = nonnegative_int(seed, "seed")
    terms = _penalties_arg(penalties, model)
    if adversarial is not None and not isinstance(adversarial, Mapping):
        raise TypeError(f"Expected adversarial to be None or a mapping of adversarial_batch arguments, "
                        f"but got {type(adversarial).__name__}")
    adv = dict(adversarial or {})
    if epochs == 0:
        return model
    if adv:
        from .attacks import adversarial_batch
    shared_states = {}
    for p in terms:
        if getattr(p, "owns_state", True) is False and hasattr(p, "state"):
            shared_states[id(p.state)] = p.state
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("Expected the model to have parameters that require gradients")
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    step = 0
    try:
        for epoch in range(epochs):
            for xb, yb in batches(data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed + epoch)):
                dev = _first_param(model)
                xb, yb = xb.to(dev.device), yb.to(dev.device)
                if adv:
                    xb, yb = adversarial_batch(model, xb, yb, **{"seed": seed * 1_000_003 + step, **adv})
                for state in shared_states.values():
                    state.step()
                loss = F.cross_entropy(model(xb), yb)
                for p in terms:
                    loss = loss + p()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    finally:
        for m, t in modes:
            m.training = t
        opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = None
    return model


def measure(
    model: nn.Module,
    data: Any,
    eps_linf: float | None = 0.1,
    eps_l2: float | None = None,
    uap_eps: float | None = None,
    uap_norm: float | str = float("inf"),
    pgd_steps: int = 10,
    example_input: torch.Tensor | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float | int]:
    """Clean accuracy, PGD robust accuracy (L∞ and L2), UAP fooling rate, parameters and MACs.

    Accuracies come from :mod:`robustcompress.evaluate` (robust accuracy counts
    an example when it is classified correctly both clean and under a seeded
    PGD attack), the fooling rate from
    :func:`robustcompress.attacks.universal_perturbation`.

    Args:
        model: the classifier (run in eval mode, mode restored).
        data: test data: a Dataset of ``(x, y)``, a DataLoader or a tuple ``(x, y)``, inputs in [0, 1].
        eps_linf: PGD L∞ budget (None skips it).
        eps_l2: PGD L2 budget (None skips it).
        uap_eps: budget of a universal perturbation (None skips it).
        uap_norm: its norm.
        pgd_steps: PGD steps.
        example_input: input for :func:`count_macs` (default: the first example of ``data``).
        batch_size: evaluation batch size.
        seed: seed of the attacks.

    Returns:
        ``{"clean_acc", "robust_acc_linf"?, "robust_acc_l2"?, "uap_fooling_rate"?, "params", "macs"}``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> sorted(measure(model, (torch.rand(8, 4), torch.randint(0, 3, (8,))), eps_linf=None))
        ['clean_acc', 'macs', 'params']
    """
    from .attacks import universal_perturbation
    from .evaluate import accuracy, robust_accuracy

    model = module_arg(model)
    pgd_steps = positive_int(pgd_steps, "pgd_steps")
    batch_size = positive_int(batch_size, "batch_size")
    seed = nonnegative_int(seed, "seed")
    budgets = {}
    for key, eps in (("robust_acc_linf", eps_linf), ("robust_acc_l2", eps_l2)):
        if eps is not None:
            budgets[key] = nonnegative_float(eps, key.replace("robust_acc_", "eps_"))
    if uap_eps is not None:
        uap_eps = nonnegative_float(uap_eps, "uap_eps")
    example = example_input if example_input is not None else _example_from(data)
    out: dict[str, float | int] = {"clean_acc": accuracy(model, data, batch_size=batch_size)}
    for key, eps in budgets.items():
        norm = float("inf") if key.endswith("linf") else 2
        out[key] = robust_accuracy(model, data, "pgd", eps=eps, norm=norm, steps=pgd_steps, seed=seed,
                                   batch_size=batch_size)
    if uap_eps is not None:
        _, rate = universal_perturbation(model, data, uap_eps, norm=uap_norm, seed=seed, batch_size=batch_size)
        out["uap_fooling_rate"] = rate
    out["params"] = count_parameters(model)
    out["macs"] = count_macs(model, example)
    return out


def _levels_arg(levels: Any, method: str) -> list[float]:
    if levels is None:
        return [0.0, 0.25, 0.5, 0.75, 0.9] if method == "prune" else [1.0, 0.5, 0.25, 0.1, 0.05]
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise TypeError(f"Expected levels to be a non-empty sequence of numbers, but got levels={levels!r}")
    if method == "prune":
        return [fraction(v, "levels[i] (pruning amount)") for v in levels]
    out = []
    for v in levels:
        v = fraction(v, "levels[i] (parameter budget)", closed_right=True)
        if v == 0:
            raise ValueError("Expected parameter budgets in (0, 1], but got 0")
        out.append(v)
    return out


def compression_curve(
    model: nn.Module,
    data: Any,
    levels: Sequence[float] | None = None,
    method: str = "prune",
    *,
    train_data: Any = None,
    example_inputs: torch.Tensor | None = None,
    importance: str | Callable = "l2",
    finetune_epochs: int = 0,
    finetune_kwargs: Mapping[str, Any] | None = None,
    eps_linf: float | None = 0.1,
    eps_l2: float | None = None,
    uap_eps: float | None = None,
    pgd_steps: int = 10,
    plot: str | os.PathLike | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Accuracy and robust accuracy against the fraction of parameters kept, one row per compression level.

    ``method="prune"``: each level is a pruning amount (fraction of units
    removed per layer, :func:`prune`); ``method="truncate"``: each level is a
    parameter budget (fraction of parameters kept, :func:`truncate`). Every
    level starts again from ``model`` (left unchanged), is optionally
    fine-tuned on ``train_data``, and is measured with :func:`measure` on ``data``.

    Args:
        model: the trained network.
        data: test data for :func:`measure`.
        levels: the compression levels (defaults: amounts 0, .25, .5, .75, .9 or budgets 1, .5, .25, .1, .05).
        method: ``"prune"`` or ``"truncate"``.
        train_data: data for fine-tuning (needed when ``finetune_epochs > 0``).
        example_inputs: for tracing / counting (default: the first example of ``data``).
        importance: pruning importance (see :func:`prune`).
        finetune_epochs: epochs of :func:`finetune` after compressing.
        finetune_kwargs: more arguments of :func:`finetune` (``lr``, ``penalties``, ``adversarial``, ...).
        eps_linf, eps_l2, uap_eps: budgets of :func:`measure` (None skips one).
        pgd_steps: PGD steps of :func:`measure`.
        plot: a path: save a matplotlib figure of the curve there.
        seed: seed of fine-tuning and attacks.

    Returns:
        A list of dicts with ``method, level, params, params_kept, macs, macs_kept, clean_acc``,
        and ``robust_acc_linf`` / ``robust_acc_l2`` / ``uap_fooling_rate`` when measured.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = (torch.rand(16, 4), torch.randint(0, 3, (16,)))
        >>> rows = compression_curve(model, data, levels=[0.0, 0.5], eps_linf=None)
        >>> [r["params"] for r in rows]
        [67, 35]
    """
    model = module_arg(model)
    if method not in ("prune", "truncate"):
        raise ValueError(f"Expected method to be 'prune' or 'truncate', but got method={method!r}")
    levels = _levels_arg(levels, method)
    finetune_epochs = nonnegative_int(finetune_epochs, "finetune_epochs")
    if finetune_epochs and train_data is None:
        raise ValueError("finetune_epochs > 0 needs train_data")
    kwargs = dict(finetune_kwargs or {})
    example = example_inputs if example_inputs is not None else _example_from(data)
    dev = _first_param(model)
    if dev is not None:
        example = example.to(dev.device)
    base_params = count_parameters(model)
    base_macs = count_macs(model, example)
    rows = []
    for level in levels:
        if method == "prune":
            small = prune(model, level, example_inputs=example, importance=importance)
        else:
            small = truncate(model, budget=level)
        if finetune_epochs:
            finetune(small, train_data, epochs=finetune_epochs, seed=seed, **kwargs)
        stats = measure(small, data, eps_linf=eps_linf, eps_l2=eps_l2, uap_eps=uap_eps, pgd_steps=pgd_steps,
                        example_input=example, seed=seed)
        rows.append({"method": method, "level": level, "params": stats["params"],
                     "params_kept": stats["params"] / base_params, "macs": stats["macs"],
                     "macs_kept": stats["macs"] / base_macs if base_macs else float("nan"),
                     **{k: v for k, v in stats.items() if k not in ("params", "macs")}})
    if plot is not None:
        _plot_curve(rows, plot)
    return rows


def _plot_curve(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure  # a Figure, not pyplot: no global figure state

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    x = [r["params_kept"] for r in rows]
    labels = {"clean_acc": "clean", "robust_acc_linf": "PGD L∞", "robust_acc_l2": "PGD L2",
              "uap_fooling_rate": "UAP fooling rate"}
    for key, label in labels.items():
        if key in rows[0]:
            ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("fraction of parameters kept")
    ax.set_ylabel("accuracy / rate")
    ax.set_title(f"compression curve ({rows[0]['method']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- export


def _layer_spec(module: nn.Module) -> dict[str, Any] | None:
    """Class and shape of a layer whose shape compression may change (None for other modules)."""
    if isinstance(module, LowRankLinear):
        return {"class": "LowRankLinear", "in_features": module.in_features, "out_features": module.out_features,
                "rank": module.rank, "bias": module.bias is not None}
    if isinstance(module, LowRankConv2d):
        a = module.conv_args
        return {"class": "LowRankConv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": tuple(module.kernel_size), "rank": module.rank, "stride": a["stride"],
                "padding": a["padding"], "dilation": a["dilation"], "bias": module.bias is not None}
    if type(module) is nn.Linear:
        return {"class": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if type(module) in (nn.Conv1d, nn.Conv2d):
        return {"class": type(module).__name__, "in_channels": module.in_channels,
                "out_channels": module.out_channels, "kernel_size": tuple(module.kernel_size),
                "stride": tuple(module.stride), "padding": module.padding if isinstance(module.padding, str)
                else tuple(module.padding), "dilation": tuple(module.dilation), "groups": module.groups,
                "bias": module.bias is not None, "padding_mode": module.padding_mode}
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return {"class": type(module).__name__, "num_features": module.num_features, "eps": module.eps,
                "momentum": module.momentum, "affine": module.affine,
                "track_running_stats": module.track_running_stats}
    return None


def _build_layer(spec: Mapping[str, Any], like: torch.Tensor | None) -> nn.Module:
    kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    s = dict(spec)
    cls = s.pop("class")
    if cls == "LowRankLinear":
        return LowRankLinear(**s, **kw)
    if cls == "LowRankConv2d":
        return LowRankConv2d(**s, **kw)
    if cls == "Linear":
        return nn.Linear(**s, **kw)
    if cls in ("Conv1d", "Conv2d"):
        return getattr(nn, cls)(**s, **kw)
    if cls in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, cls)(**s, **kw)
    raise ValueError(f"Unknown layer class {cls!r} in the export")


def export(model: nn.Module, path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> None:
    """Save a compressed model: its state dict and, per layer, the class and shape to rebuild it.

    The file (``torch.save``, loadable with ``weights_only=True``) holds
    ``{"format", "layers": {name: {"class", shape / rank ...}}, "state_dict", "info"}``
    for every Linear, Conv1d/2d, BatchNorm1d/2d and low-rank layer: enough for
    :func:`load_exported` to resize the layers of a fresh base model (pruned
    widths, factorised layers) and load the weights. A masked model is saved
    with its masked entries zero (it reloads without mask hooks).

    Args:
        model: the compressed model.
        path: the file to write.
        info: optional JSON-like metadata (method, amount, measurements, ...).

    Example:
        >>> import tempfile, os
        >>> small = prune(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5)
        >>> path = os.path.join(tempfile.mkdtemp(), "small.pt")
        >>> export(small, path)
        >>> load_exported(path, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))[0].out_features
        4
    """
    model = module_arg(model)
    if info is not None and not isinstance(info, Mapping):
        raise TypeError(f"Expected info to be None or a mapping, but got {type(info).__name__}")
    for module in model.modules():
        for _, hook in _mask_hooks(module):
            hook.zero_(module)  # the saved weights are the masked ones
    layers = {}
    for name, module in model.named_modules():
        spec = _layer_spec(module)
        if spec is not None:
            layers[name] = spec
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": _EXPORT_FORMAT, "layers": layers, "state_dict": state, "info": dict(info or {})}, path)


def load_exported(path: str | os.PathLike, base: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a model saved by :func:`export` from a fresh base model (or a factory) and load its weights.

    Every recorded layer whose class or shape differs from the base model's
    layer of the same name is replaced by a new one of the recorded class and
    shape (on the base layer's device and dtype); then the state dict is
    loaded strictly. The base model (when given) is deep-copied, not changed.

    Args:
        path: a file written by :func:`export`.
        base: the uncompressed architecture: a model or a zero-argument factory.

    Returns:
        The compressed model, in eval mode.

    Example:
        See :func:`export`.
    """
    if isinstance(base, nn.Module):
        model = copy.deepcopy(base)
    elif callable(base):
        model = base()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected base() to return an nn.Module, but got {type(model).__name__}")
    else:
        raise TypeError(f"Expected base to be an nn.Module or a factory, but got {type(base).__name__}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _EXPORT_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a robustcompress export (format {_EXPORT_FORMAT!r})")
    named = dict(model.named_modules())
    for name, spec in payload["layers"].items():
        if name not in named:
            raise ValueError(f"The export has a layer {name!r} that the base model lacks; is it the right base "
                             "architecture?")
        old = named[name]
        if _layer_spec(old) == spec:
            continue
        like = next(iter(old.parameters()), None)
        new = _build_layer(spec, like)
        new.train(old.training)
        _set_submodule(model, name, new)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"The exported weights do not fit the rebuilt base model: {err}") from None
    return model.eval()


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m robustcompress compress``."""
    parser.add_argument("checkpoint", help="state dict saved with torch.save(model.state_dict(), path)")
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="factory of the architecture, e.g. robustcompress.models:MLP")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help='keyword arguments of the factory as JSON, e.g. \'{"widths": [256, 256]}\'')
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--prune", type=float, metavar="AMOUNT", help="fraction of neurons/filters removed per layer")
    how.add_argument("--prune-energy", type=float, metavar="E",
                     help="keep the fewest rows holding this share of each layer's row energy")
    how.add_argument("--rank-energy", type=float, metavar="E", help="per-layer rank keeping this share of ‖W‖_F²")
    how.add_argument("--rank", type=int, metavar="R", help="one rank for every hidden layer")
    how.add_argument("--rank-budget", type=float, metavar="B", help="fraction of the parameters kept")
    parser.add_argument("--importance", default="l2", choices=sorted(_IMPORTANCES), help="pruning importance")
    parser.add_argument("--mask-only", action="store_true", help="zero pruned units instead of removing them")
    parser.add_argument("--finetune-epochs", type=int, default=0, metavar="N")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--data", default="digits", choices=("digits", "digits-image"),
                        help="data set (digits: N×64 inputs; digits-image: N×1×8×8)")
    parser.add_argument("--eps", type=float, default=0.1, help="PGD L∞ budget of the robust accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, metavar="PATH", help="where to export the compressed model")


def _factory(spec: str) -> Callable[..., nn.Module]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"Expected --model as MODULE:FACTORY (e.g. robustcompress.models:MLP), but got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot load --model {spec!r}: {err}") from None
    if not callable(factory):
        raise ValueError(f"--model {spec!r} is not callable")
    return factory


def run_cli(args: argparse.Namespace) -> int:
    """Run ``compress``: load, measure, compress, fine-tune, re-measure, export. Returns the exit status."""
    try:
        from .data import digits

        factory = _factory(args.model)
        kwargs = json.loads(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"Expected --model-kwargs to be a JSON object, but got {args.model_kwargs!r}")
        model = factory(**kwargs)
        try:
            model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        except RuntimeError as err:
            raise ValueError(f"The checkpoint does not fit the model built by --model {args.model} with "
                             f"--model-kwargs {args.model_kwargs}: {str(err).splitlines()[0]} ...") from None
        model.eval()
        train, test = digits(seed=0, image=args.data == "digits-image")
        example = test.tensors[0][:1]
        before = measure(model, test, eps_linf=args.eps, example_input=example, seed=args.seed)
        if args.prune is not None or args.prune_energy is not None:
            amount = args.prune if args.prune is not None else amounts_for_energy(model, args.prune_energy)
            setting = {"method": "prune", "amount": args.prune, "energy": args.prune_energy,
                       "importance": args.importance, "mask_only": args.mask_only}
            # Energy-based amounts are computed on the raw rows: score the same rows.
            small = prune(model, amount, example_inputs=example, importance=args.importance,
                          mask_only=args.mask_only, fold_bn=args.prune_energy is None)
        else:
            setting = {"method": "truncate", "energy": args.rank_energy, "rank": args.rank, "budget": args.rank_budget}
            small = truncate(model, energy=args.rank_energy, rank=args.rank, budget=args.rank_budget)
        if args.finetune_epochs:
            finetune(small, train, epochs=args.finetune_epochs, lr=args.lr, seed=args.seed)
        after = measure(small, test, eps_linf=args.eps, example_input=example, seed=args.seed)
    except (ValueError, TypeError, FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'':10s} {'params':>10s} {'MACs':>10s} {'clean':>7s} {'PGD-Linf':>9s}")
    for label, m in (("original", before), ("compressed", after)):
        print(f"{label:10s} {m['params']:10d} {m['macs']:10d} {m['clean_acc']:7.3f} {m['robust_acc_linf']:9.3f}")
    export(small, args.out, info={**setting, "model": args.model, "model_kwargs": kwargs,
                                   "finetune_epochs": args.finetune_epochs, "before": before, "after": after})
    print(f"exported to {args.out}")
    return 0
