"""Private helpers shared by the attack, evaluation and compression modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards, also on error."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def batches(data: Any, batch_size: int, shuffle: bool = False,
             generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate ``(x, y)`` batches of a Dataset, a DataLoader, or an ``(x, y)`` tuple of tensors.

    A DataLoader is iterated as given (its own batch size and order); the
    other sources are cut into ``batch_size`` batches, shuffled with
    ``generator`` when ``shuffle``.
    """
    if isinstance(data, DataLoader):
        source: Any = data
    elif isinstance(data, (tuple, list)) or (isinstance(data, TensorDataset) and len(data.tensors) == 2):
        if isinstance(data, TensorDataset):
            xs, ys = data.tensors
        elif len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            xs, ys = data
        else:
            raise TypeError("Expected data=(x, y) to be a pair of tensors")
        if xs.shape[0] != ys.shape[0]:
            raise ValueError(f"Expected x and y of data to have the same length, but got {xs.shape[0]} and {ys.shape[0]}")
        order = torch.randperm(xs.shape[0], generator=generator) if shuffle else torch.arange(xs.shape[0])
        source = ((xs[i], ys[i]) for i in order.to(xs.device).split(batch_size))
    elif isinstance(data, Dataset):
        # A generator of its own: DataLoader otherwise draws its base seed from torch's global RNG.
        source = DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                            generator=generator if generator is not None else torch.Generator())
    else:
        raise TypeError(
            "Expected data to be a torch Dataset of (x, y) pairs, a DataLoader, or a tuple (x, y) of tensors, "
            f"but got {type(data).__name__}"
        )
    for batch in source:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError("Expected every batch of data to be a pair (x, y)")
        yield batch[0], batch[1]
