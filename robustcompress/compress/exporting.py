"""Export a compressed model to one file and rebuild it from a fresh base model.

The file holds the state dict, per layer the class and shape needed to resize
a fresh base model (pruned widths, factorised layers), and a SHA-256 checksum
of the tensors, verified on load.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "small.pt")
    >>> export(nn.Sequential(nn.Linear(4, 2)), path)
    >>> load_exported(path, nn.Sequential(nn.Linear(4, 2)))[0].out_features
    2
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
import zipfile
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .._checks import module_arg
from ..layers import LowRankConv2d, LowRankLinear
from ._common import mask_hooks, set_submodule

__all__ = ["export", "load_exported", "read_torch_file", "EXPORT_FORMAT"]

#: format tag of files written by export (version 2 carries a checksum)
EXPORT_FORMAT = "robustcompress.compress/2"
_FORMAT_V1 = "robustcompress.compress/1"


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
        >>> small = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))   # e.g. a pruned 4-8-2 MLP
        >>> path = os.path.join(tempfile.mkdtemp(), "small.pt")
        >>> export(small, path)
        >>> load_exported(path, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))[0].out_features
        4
    """
    model = module_arg(model)
    if info is not None and not isinstance(info, Mapping):
        raise TypeError(f"Expected info to be None or a mapping, but got {type(info).__name__}")
    for module in model.modules():
        for _, hook in mask_hooks(module):
            hook.zero_(module)  # the saved weights are the masked ones
    layers = {}
    for name, module in model.named_modules():
        spec = _layer_spec(module)
        if spec is not None:
            layers[name] = spec
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": EXPORT_FORMAT, "layers": layers, "state_dict": state, "info": dict(info or {}),
                "sha256": state_checksum(state)}, path)


def state_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict: each entry's name, dtype, shape and bytes, in sorted name order.

    Example:
        >>> a = {"w": torch.zeros(2)}
        >>> state_checksum(a) == state_checksum({"w": torch.zeros(2)}) != state_checksum({"w": torch.ones(2)})
        True
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_torch_file(path: str | os.PathLike, *, trust: bool = False, what: str = "checkpoint") -> Any:
    """``torch.load`` a file on the CPU, with one clear ``ValueError`` per way it can be unreadable.

    Missing, a directory, a text file, truncated or damaged (an incomplete zip
    archive or pickle stream), or — without ``trust`` — refused because it
    holds pickled Python objects beyond tensors and containers (loading those
    runs code from the file). Every message names the file and the cause.

    Args:
        path: the file.
        trust: allow a full unpickling (``weights_only=False``) of a file the user trusts.
        what: how messages name the file ("checkpoint", "export", ...).

    Returns:
        The loaded object.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "notes.pt")
        >>> with open(p, "w") as f:
        ...     _ = f.write("hello")
        >>> read_torch_file(p)
        Traceback (most recent call last):
        ...
        ValueError: checkpoint '...notes.pt' is a text file, not a PyTorch file saved with torch.save
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ValueError(f"{what} {name!r} does not exist")
    if os.path.isdir(name):
        raise ValueError(f"{what} {name!r} is a directory, not a file saved with torch.save")
    with open(name, "rb") as f:
        head = f.read(512)
    if not head:
        raise ValueError(f"{what} {name!r} is empty")
    is_zip = head.startswith(b"PK\x03\x04")
    if is_zip and not zipfile.is_zipfile(name):
        raise ValueError(f"{what} {name!r} is truncated or damaged: its zip archive has no end record "
                         "(an interrupted save or copy?)")
    if not is_zip and not head.startswith(b"\x80") and _looks_like_text(head):
        raise ValueError(f"{what} {name!r} is a text file, not a PyTorch file saved with torch.save")
    try:
        return torch.load(name, map_location="cpu", weights_only=not trust)
    except Exception as err:
        text = str(err)
        if not trust and "Weights only load failed" in text:
            raise ValueError(f"{what} {name!r} was refused: it holds pickled Python objects beyond tensors "
                             "(e.g. a whole model), and unpickling them runs code from the file; save "
                             "model.state_dict() instead, or pass --trust-checkpoint (trust=True) for a file you "
                             "trust") from err
        if isinstance(err, (EOFError,)) or "truncated" in text or "EOF" in text:
            raise ValueError(f"{what} {name!r} is truncated (the data ends early)") from err
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise ValueError(f"{what} {name!r} is damaged or not a PyTorch file: {first}") from err


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


def _check_payload(payload: Any, name: str) -> None:
    """Format tag, structure and checksum of a loaded export (a v1 file carries no checksum: a warning)."""
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in (EXPORT_FORMAT, _FORMAT_V1):
        raise ValueError(f"export {name!r} is not a robustcompress export (format {EXPORT_FORMAT!r}); "
                         f"it holds a {type(payload).__name__}" + (f" with format {fmt!r}" if fmt else ""))
    if not isinstance(payload.get("layers"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise ValueError(f"export {name!r} is damaged: its 'layers' or 'state_dict' entry is missing")
    if fmt == _FORMAT_V1:
        warnings.warn(f"export {name!r} was written before exports carried a checksum; its weights cannot be "
                      "verified (export it again to add one)", UserWarning, stacklevel=3)
        return
    if payload.get("sha256") != state_checksum(payload["state_dict"]):
        raise ValueError(f"export {name!r} is corrupted: the checksum of its weights does not match the one "
                         "recorded at export")


def load_exported(path: str | os.PathLike, base: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a model saved by :func:`export` from a fresh base model (or a factory) and load its weights.

    The file's SHA-256 checksum of the weights is verified first (a corrupted
    file is an error; a file exported before checksums loads with a warning).
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
    payload = read_torch_file(path, what="export")
    _check_payload(payload, os.fspath(path))
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
        set_submodule(model, name, new)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"The exported weights do not fit the rebuilt base model: {err}") from None
    return model.eval()

