"""Finding what a model's spectral state iterates: observed forward passes, input shapes, BatchNorm successors, coverage.

These run once, when a :class:`~robustcompress.spectral.SpectralState` is
built: a forward pass with hooks records each convolution's input shape (for
the exact operator view) and which BatchNorm follows which layer (for
folding); :class:`Coverage` summarises what was tracked, skipped or frozen.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    >>> record_input_shapes(model, torch.zeros(1, 1, 5, 5))
    {'0': (1, 5, 5)}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..layers import Layer, layer_kind

__all__ = ["observed_forward", "record_input_shapes", "observe_forward", "unsupported_reason", "Coverage",
           "layer_problem", "find_bn_successors"]


@contextlib.contextmanager
def observed_forward() -> Iterator[None]:
    """A context in which every submodule's forward runs, so module hooks see every layer.

    Inference fast paths (``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention`` in eval mode without gradients) compute the whole
    block in one fused call and skip their submodules' forwards and hooks;
    they are turned off inside the context and restored after it.

    Example:
        >>> with observed_forward():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def record_input_shapes(model: nn.Module, example_input: torch.Tensor,
                        modules: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Run one forward pass and record each layer's input shape (batch dimension dropped).

    The model's train/eval mode is restored and no gradient is recorded.
    Modules whose first input is not a tensor (a ``PackedSequence``) are not recorded.

    Args:
        model: the network.
        example_input: one batch as the model takes it.
        modules: module names to record (default: every module with a registered layer kind).

    Returns:
        ``{module name: input_shape}``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> record_input_shapes(model, torch.zeros(1, 1, 4, 4))
        {'0': (1, 4, 4), '2': (8,)}
    """
    named = dict(model.named_modules())
    layered = [n for n, m in named.items() if layer_kind(m) is not None]
    wanted = list(modules) if modules is not None else layered
    unknown = [n for n in wanted if n not in named]
    if unknown:
        raise ValueError(f"Unknown module names {unknown}; layers of this model: {layered}")
    shapes: dict[str, tuple[int, ...]] = {}

    def observe(name: str, args: tuple, out: object) -> None:
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(name, tuple(args[0].shape[1:]))
    observe_forward(model, example_input, wanted, observe)
    return shapes


def observe_forward(model: nn.Module, example_input: torch.Tensor, names: Iterable[str],
                     observe: Callable[[str, tuple, object], object]) -> None:
    """One eval-mode, no-grad forward pass calling ``observe(name, args, output)`` for each named module.

    The hooks never change an output, are always removed, and every module's
    train/eval mode is restored, also on error. Inference fast paths are off
    (:func:`observed_forward`) so every hook runs.
    """
    handles = []
    modes = [(m, m.training) for m in model.modules()]
    try:
        for name in names:
            def hook(mod, args, out, name=name) -> None:
                observe(name, args, out)
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        model.eval()
        with torch.no_grad(), observed_forward():
            model(example_input)
    finally:
        for m, training in modes:
            m.training = training
        for h in handles:
            h.remove()


def unsupported_reason(module: nn.Module) -> str | None:
    """Why penalties leave ``module`` out by default, from the layer registry.

    Returns:
        None for a module with a registered layer kind that penalties act on;
        ``""`` if it holds no weight of its own (containers, activations, …);
        otherwise the reason (a metrics-only kind, or no registered kind), for messages.

    Example:
        >>> unsupported_reason(nn.Linear(2, 2)) is None, unsupported_reason(nn.ReLU())
        (True, '')
    """
    kind = layer_kind(module)
    if kind is not None:
        return None if kind.penalize else kind.exclusion_reason
    own = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if not own:
        return ""
    return f"no registered layer kind for {type(module).__name__} (weights {own})"


@dataclass(frozen=True)
class Coverage:
    """What a :class:`SpectralState` tracks of its model.

    ``share = tracked_elements / weight_elements``: the elements of the
    model's parameters with two or more axes (each tensor counted once) that
    some tracked operator reads. ``frozen`` lists the tracked layers whose
    parameters all have ``requires_grad=False`` (penalties leave them out).
    """

    tracked: int
    skipped: int
    frozen: list[str]
    tracked_elements: int
    weight_elements: int

    @property
    def share(self) -> float:
        """Fraction of weight elements tracked (1.0 for a model without weights)."""
        return self.tracked_elements / self.weight_elements if self.weight_elements else 1.0


def layer_problem(layer: Layer) -> str | None:
    params = layer.parameters
    if any(not p.is_floating_point() for p in params):
        return f"its weight is not a floating-point tensor (dtype={params[0].dtype})"
    if any(p.numel() == 0 for p in params):
        return "its weight is empty"
    return None


def find_bn_successors(model: nn.Module, layers: dict[str, Layer],
                        example_input: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """Single-operator layers whose only consumer is a BatchNorm over their output features, found with torch.fx.

    BatchNorm scales dim 1. The layer kind says where that is its feature
    axis (``fold_norm``): ``"channels"`` (a convolution's output channels, any
    rank), ``"features"`` (a Linear, only when its output is ``(N, F)`` — on
    ``(N, L, F)`` the BN would act on ``L``). The feature counts must match;
    with an example input the output rank is checked too.

    Returns:
        ``{layer name: BatchNorm}``.
    """
    by_module = {layer.module_name: layer for layer in layers.values()
                 if layer.kind.fold_norm is not None and layer.view.name == ""}
    if not by_module:
        return {}
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model simply gets no folding
        return {}
    ranks: dict[str, int] = {}
    if example_input is not None:
        def observe(name: str, args: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor):
                ranks.setdefault(name, out.dim())
        observe_forward(model, example_input, list(by_module), observe)
    named = dict(model.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in by_module or len(node.users) != 1:
            continue
        (user,) = node.users
        bn = named.get(user.target) if user.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats or bn.running_var is None:
            continue
        layer = by_module[node.target]
        if bn.num_features != layer.spec.shape[0]:
            continue
        if layer.kind.fold_norm == "features" and ranks.get(node.target, 2) != 2:
            continue
        found[layer.name] = bn
    return found
