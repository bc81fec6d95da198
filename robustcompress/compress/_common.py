"""Helpers shared by the compression modules: mask hooks, example inputs, module surgery."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .._utils import batches
from ._kinds import LOW_RANK

def first_param(model: nn.Module) -> torch.Tensor | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t
    return None


@contextlib.contextmanager
def all_require_grad(model: nn.Module) -> Iterator[None]:
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


class ChannelMask:
    """Forward pre-hook that keeps pruned entries of a layer's parameters at zero.

    The parameters stay plain leaf tensors (so the model deep-copies, saves and
    feeds the spectral core as usual); the masked entries are zeroed in place
    before a forward pass whenever the parameter changed since the last
    zeroing (an optimizer step), and not otherwise, so a graph that saved
    the weight is never invalidated by a second forward pass. Parameter
    names may be dotted (``"self_attn.out_proj.weight"``): a hook on a parent
    keeps the weights of a child whose own forward never runs (``out_proj``
    inside ``nn.MultiheadAttention``) or is bypassed by a fused fast path.
    """

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self._versions: dict[str, int] = {}

    def zero_(self, module: nn.Module) -> None:
        with torch.no_grad():
            for pname, mask in self.masks.items():
                p = module.get_parameter(pname)
                if self._versions.get(pname) == p._version:
                    continue
                if mask.device != p.device or mask.dtype != p.dtype:
                    mask = self.masks[pname] = mask.to(p)
                p.mul_(mask)
                self._versions[pname] = p._version

    def __call__(self, module: nn.Module, _args: Any) -> None:
        self.zero_(module)


def mask_hooks(module: nn.Module) -> list[tuple[int, ChannelMask]]:
    return [(k, h) for k, h in module._forward_pre_hooks.items() if isinstance(h, ChannelMask)]



def example_from(data: Any) -> torch.Tensor:
    for xb, _ in batches(data, 1):
        return xb[:1]
    raise ValueError("Expected data to hold at least one example")


def default_example(model: nn.Module, example_inputs: Any) -> torch.Tensor | dict[str, torch.Tensor]:
    """``example_inputs`` as given (a tensor, or a dict of keyword tensors such as token ids),
    or a zero input for models whose first layer is a Linear."""
    if example_inputs is not None:
        if isinstance(example_inputs, dict) and example_inputs and all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in example_inputs.items()):
            return example_inputs
        if not isinstance(example_inputs, torch.Tensor):
            raise TypeError("Expected example_inputs to be a tensor (a batch of one or more inputs; integer token "
                            "ids are fine) or a dict of keyword tensors, but got "
                            f"{type(example_inputs).__name__}")
        return example_inputs
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return torch.zeros(1, module.in_features, device=module.weight.device, dtype=module.weight.dtype)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d) + LOW_RANK):
            break
    raise ValueError("Expected example_inputs (one input batch, e.g. torch.zeros(1, 3, 32, 32)): it can only be "
                     "inferred for models whose first layer is a Linear")


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

