"""Where certification stops, on any model: capture with torch.export where torch.fx cannot trace.

:func:`lipschitz_bound` needs a :mod:`torch.fx` graph, which every
``transformers`` model defeats. To still name the first computation without a
global Lipschitz rule, :func:`find_stop` captures the model with
``torch.export.export(model, args, kwargs, strict=False)`` (outputs read
through their logits, so a ``ModelOutput`` carrying a cache is fine), follows
what depends on the user's inputs, and maps each ATen node to the module that
ran it through its ``nn_module_stack``. A node is covered when its innermost
module has a rule (:data:`~robustcompress.bound.rules.MODULE_RULES`) or its
ATen op is one of ``ATEN_OPS_WITH_RULES`` (shape ops, adds, constant scales,
activations, pooling); the first other node is where certification stops:
attention, LayerNorm, and an embedding lookup of integer tokens (a discrete
input has no Lipschitz constant). When capture itself fails, the line names
the module where it stopped.

Example:
    >>> from torch import nn
    >>> stop = find_stop(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), torch.zeros(2, 4))
    >>> stop.module, stop.module_type
    ('1', 'LayerNorm')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .rules import rule_kind
from .walk import nodes_in

__all__ = ["ATEN_OPS_WITH_RULES", "Stop", "call_model", "logits_of", "find_stop"]

#: ATen ops (overload packet names) that a bound rule covers, whichever module runs them.
ATEN_OPS_WITH_RULES = frozenset({
    "view", "_unsafe_view", "reshape", "flatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "clone",
    "contiguous", "alias", "detach", "slice", "select", "unflatten", "_to_copy", "to", "type_as",
    "add", "add_", "sub", "sub_", "neg", "mul", "div", "cat", "concat", "mean", "dropout",
    "relu", "relu_", "gelu", "silu", "tanh", "sigmoid", "hardtanh", "leaky_relu", "elu", "hardswish", "mish",
    "softplus", "avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
})

_PRODUCTS = frozenset({"mul", "div"})


@dataclass(frozen=True)
class Stop:
    """Where certification stops.

    Attributes:
        line: one sentence for the user; module: the module's name in the model (``""``: the model
        itself, ``None``: unknown); module_type: its type name; op: the operation (``None`` when
        capture failed).
    """

    line: str
    module: str | None
    module_type: str | None
    op: str | None


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Run ``model`` on an input as it takes it: a dict as keywords, a tuple / list as positionals, else one tensor.

    Example:
        >>> call_model(nn.Identity(), {"input": torch.ones(1)})
        tensor([1.])
    """
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a ``ModelOutput`` / dict's ``logits``, or a tuple's first tensor.

    Example:
        >>> logits_of((torch.zeros(1, 3), None)).shape
        torch.Size([1, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"Cannot read logits from a model output of type {type(output).__name__}: expected a tensor, "
                    "an output with .logits, or a tuple whose first tensor is the logits")


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return logits_of(self.model(*args, **kwargs))


def _module_in_traceback(err: BaseException, model: nn.Module) -> str | None:
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None:
            obj = tb.tb_frame.f_locals.get("self")
            if isinstance(obj, nn.Module) and id(obj) in names:
                found = names[id(obj)]
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    return found


def _describe(name: str | None, model: nn.Module) -> tuple[str, str | None]:
    if name is None:
        return "an unknown module", None
    mtype = type(model.get_submodule(name)).__name__
    return (f"module {name!r} ({mtype})" if name else f"the model itself ({mtype})"), mtype


def find_stop(model: nn.Module, example_input: Any) -> Stop | None:
    """The first computation on the inputs without a global Lipschitz rule, found through ``torch.export``.

    Args:
        model: any network (eval mode for a meaningful answer).
        example_input: one batch as the model takes it (a tensor, a dict of keyword inputs, a tuple).

    Returns:
        A :class:`Stop` (also when capture fails: then it names the module where capture stopped), or
        ``None`` when every captured computation has a rule.

    Example:
        >>> find_stop(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.zeros(2, 4)) is None
        True
    """
    args, kwargs = ((), example_input) if isinstance(example_input, dict) else (
        (tuple(example_input), {}) if isinstance(example_input, (tuple, list)) else ((example_input,), {}))
    try:
        with torch.no_grad():
            ep = torch.export.export(_LogitsOnly(model), args, kwargs, strict=False)
    except Exception as err:  # export raises many types; the user needs the place and the reason
        where = _module_in_traceback(err, model)
        what, mtype = _describe(where, model)
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return Stop(f"Not certified: torch.fx and torch.export could not capture the model; capture stopped in "
                    f"{what} ({type(err).__name__}: {reason})", where, mtype, None)
    user = set(ep.graph_signature.user_inputs)
    dependent: set = set()
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in user:
                dependent.add(node)
            continue
        if node.op != "call_function":
            continue
        ins = [a for a in nodes_in((node.args, node.kwargs)) if a in dependent]
        if not ins:
            continue
        dependent.add(node)
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else "model"
        path = "" if path == "model" else path.removeprefix("model.")
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if rule_kind(model.get_submodule(path)) is not None:
            continue
        if op in ATEN_OPS_WITH_RULES and not (op in _PRODUCTS and len(ins) > 1):
            continue
        what, mtype = _describe(path, model)
        why = ("an embedding lookup of integer tokens: a discrete input has no Lipschitz constant"
               if op == "embedding" else "no global Lipschitz rule (attention, LayerNorm, products of inputs and "
               "the like have none)")
        return Stop(f"Not certified: certification stops at {what}, op {op!r} (node {node.name!r}): {why}",
                    path, mtype, op)
    return None
