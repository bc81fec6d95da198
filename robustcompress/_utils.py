"""Helpers shared by the attack, evaluation and compression modules (not part of the public API)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
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
            generator: torch.Generator | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    """Iterate ``(x, y)`` batches of a Dataset, a DataLoader, or an ``(x, y)`` tuple.

    A DataLoader is iterated as given (its own batch size and order); the
    other sources are cut into ``batch_size`` batches, shuffled with
    ``generator`` when ``shuffle``. ``x`` is a tensor or a dict of tensors
    (keyword inputs of the model); a batch that is itself a dict, as
    Hugging Face collators make, gives its ``"labels"`` (or ``"label"``)
    entry as ``y`` and the rest as ``x``.
    """
    if isinstance(data, DataLoader):
        source: Any = data
    elif isinstance(data, (tuple, list)) or (isinstance(data, TensorDataset) and len(data.tensors) == 2):
        if isinstance(data, TensorDataset):
            xs, ys = data.tensors
        elif len(data) == 2 and isinstance(data[1], torch.Tensor) and (
                isinstance(data[0], torch.Tensor) or _tensor_dict(data[0])):
            xs, ys = data
        else:
            raise TypeError("Expected data=(x, y) to be a pair of tensors (x may be a dict of tensors)")
        n = batch_size_of(xs)
        if n != ys.shape[0]:
            raise ValueError(f"Expected x and y of data to have the same length, but got {n} and {ys.shape[0]}")
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        source = ((_take(xs, i.to(ys.device)), ys[i.to(ys.device)]) for i in order.split(batch_size))
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
        if isinstance(batch, Mapping):
            label = "labels" if "labels" in batch else "label" if "label" in batch else None
            if label is None:
                raise TypeError(f"Expected a dict batch of data to hold 'labels', but got keys {sorted(batch)}")
            yield {k: v for k, v in batch.items() if k != label}, batch[label]
            continue
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError("Expected every batch of data to be a pair (x, y)")
        yield batch[0], batch[1]


def _tensor_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())


def _take(x: Any, index: torch.Tensor) -> Any:
    if isinstance(x, Mapping):
        return {k: v[index.to(v.device)] for k, v in x.items()}
    return x[index.to(x.device)]


# --------------------------------------------------------------------------- running a model (attacks, evaluation)


def batch_size_of(x: Any) -> int:
    """The number of examples in a model input: a tensor's first dimension, or a dict's common one."""
    if isinstance(x, torch.Tensor):
        return x.shape[0] if x.dim() else 1
    if isinstance(x, Mapping):
        sizes = {v.shape[0] for v in x.values() if isinstance(v, torch.Tensor) and v.dim()}
        if len(sizes) == 1:
            return sizes.pop()
        raise ValueError(
            "Expected the tensors of a dict input to share their first (batch) dimension, but got "
            + ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in x.items() if isinstance(v, torch.Tensor))
        )
    raise TypeError(f"Expected a model input to be a tensor or a dict of tensors, but got {type(x).__name__}")


def to_device(x: Any, device: torch.device | None) -> Any:
    """Move a tensor, or every tensor of a dict input, to ``device`` (``None``: leave it where it is)."""
    if device is None:
        return x
    if isinstance(x, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return x.to(device)


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device | None:
    """The device of the model's first parameter or buffer; ``default`` for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return default


def logits_of(model: nn.Module, x: Any) -> torch.Tensor:
    """Run ``model`` on ``x`` and return its logits ``(N, C)``, checked to be finite.

    ``x`` is a tensor (``model(x)``) or a dict of keyword inputs
    (``model(**x)``, e.g. ``{"input_ids": …, "attention_mask": …}``). The
    output is read through its logits: a tensor as it is, an object with a
    ``logits`` attribute (a transformers ``ModelOutput``) or key, or the
    first element of a tuple/list.

    Raises:
        ValueError: the logits are not a tensor of shape ``(N, num_classes)``.
        FloatingPointError: some logits are NaN or ±inf (counted per example),
            so no accuracy or attack result is computed from them.

    Example:
        >>> class Keywords(nn.Module):
        ...     def forward(self, a, b):
        ...         return (a + b, "extra")
        >>> logits_of(Keywords(), {"a": torch.zeros(2, 3), "b": torch.ones(2, 3)}).shape
        torch.Size([2, 3])
    """
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return read_logits(out, batch_size_of(x))


def read_logits(out: Any, n: int) -> torch.Tensor:
    """The logits ``(n, C)`` inside a model's output, checked to be finite (see :func:`logits_of`)."""
    logits = out
    if isinstance(out, Mapping) and "logits" in out:
        logits = out["logits"]
    elif not isinstance(out, torch.Tensor) and isinstance(getattr(out, "logits", None), torch.Tensor):
        logits = out.logits
    elif isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"Expected the model to return logits of shape ({n}, num_classes), but got {shape}")
    bad = ~torch.isfinite(logits.detach()).all(1)
    if bool(bad.any()):
        raise FloatingPointError(
            f"The model returned non-finite logits (nan or inf) for {int(bad.sum())} of {n} examples; "
            "check the model's weights and the inputs"
        )
    return logits


def num_batches(data: Any, batch_size: int) -> int | None:
    """How many batches :func:`batches` yields for ``data``, or ``None`` when the source has no length."""
    if isinstance(data, DataLoader):
        try:
            return len(data)
        except TypeError:
            return None
    if isinstance(data, (tuple, list)):
        try:
            return math.ceil(batch_size_of(data[0]) / batch_size) if data else None
        except (TypeError, ValueError):
            return None
    if isinstance(data, Dataset):
        try:
            return math.ceil(len(data) / batch_size)
        except TypeError:
            return None
    return None
