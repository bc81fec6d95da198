"""What the ``report`` and ``compress`` subcommands share: model, checkpoint, data and input-shape arguments.

Both read the same checkpoint layouts — a bare state dict, ``{"model": …}``,
``{"state_dict": …}`` or ``{"model_state_dict": …}``, a file written by
:func:`robustcompress.compress.export`, or (with ``--trust-checkpoint``) a fully
pickled model — build the model from ``--model MODULE:FACTORY`` with
``--model-kwargs``, and refuse weights holding NaN or Inf. Every failure is one
line on stderr naming the file and the cause, exit code 2 (``--debug`` shows
the traceback instead).

Example:
    >>> parse_shape("3,32,32")
    (3, 32, 32)
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .._utils import batches
from ..compress.exporting import load_exported, read_torch_file
from ..data import digits
from ..reporting import json_safe

__all__ = ["add_model_arguments", "add_data_arguments", "parse_shape", "model_factory", "load_model",
           "load_data", "example_input", "run_guarded", "json_safe"]

_STATE_KEYS = ("state_dict", "model_state_dict", "model")
#: built-in data sets of --data
NAMED_DATA = ("digits", "digits-image")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``CHECKPOINT``, ``--model``, ``--model-kwargs``, ``--trust-checkpoint``, ``--input-shape``, ``--debug``."""
    parser.add_argument("checkpoint", help="a state dict (bare, or under 'model' / 'state_dict'), or a file written "
                                           "by compress / robustcompress.compress.export")
    parser.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                        help="builds the model: FACTORY(**MODEL_KWARGS) from MODULE, e.g. "
                             "robustcompress.models:resnet18 (not needed for a trusted fully pickled model)")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help='keyword arguments of the factory as a JSON object, e.g. \'{"widths": [256, 256]}\'')
    parser.add_argument("--input-shape", default=None, metavar="C,H,W",
                        help="one input without batch, e.g. 3,32,32 (needed for convolutions unless --data gives it)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a fully pickled model (runs arbitrary code from the file: trusted files only)")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def add_data_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--data``: a built-in data set name or ``MODULE:FACTORY``."""
    parser.add_argument("--data", default=None, metavar="NAME|MODULE:FACTORY", help=help_text)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` (or ``3x32x32``) as a tuple of positive integers."""
    parts = re.split(r"[,x×]", text.strip())
    if not parts or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"Expected --input-shape as positive integers separated by commas (e.g. 3,32,32), "
                         f"but got {text!r}")
    return tuple(int(p) for p in parts)


def _import_attr(spec: str, option: str, example: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"Expected {option} as MODULE:FACTORY (e.g. {example}), but got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import module {module_name!r} named in {option}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"Module {module_name!r} named in {option} has no callable {attr!r}")
    return factory


def model_factory(spec: str | None, kwargs_json: str) -> Callable[[], nn.Module]:
    """A zero-argument factory from ``--model`` and ``--model-kwargs`` (checked, not yet called)."""
    if spec is None:
        raise ValueError("--model MODULE:FACTORY is required to build the model for this checkpoint")
    factory = _import_attr(spec, "--model", "robustcompress.models:MLP")
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as err:
        raise ValueError(f"Expected --model-kwargs to be a JSON object, but got {kwargs_json!r} ({err})") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"Expected --model-kwargs to be a JSON object, but got {kwargs_json!r}")

    def build() -> nn.Module:
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec}(**{kwargs}) returned a {type(model).__name__}, not an nn.Module")
        return model

    return build


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, path: str) -> dict[str, torch.Tensor] | nn.Module:
    if isinstance(obj, nn.Module) or _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), nn.Module) or _is_state_dict(obj.get(key)):
                return obj[key]
    raise ValueError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict (a dict of parameter "
                     "name -> tensor, bare or under 'model' / 'state_dict'); save it with "
                     "torch.save(model.state_dict(), PATH)")


def _check_finite(tensors: Any, path: str) -> None:
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kinds = [k for k, bad in (("NaN", torch.isnan(t).any()), ("Inf", torch.isinf(t).any())) if bool(bad)]
            raise ValueError(f"checkpoint {path!r}: tensor {name!r} holds {'/'.join(kinds)} values "
                             f"({int((~torch.isfinite(t)).sum())} of {t.numel()} entries); the model cannot be "
                             "measured or compressed")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def load_model(path: str, spec: str | None, kwargs_json: str, trust: bool = False) -> nn.Module:
    """The model a checkpoint describes, in eval mode, with finite weights.

    Args:
        path: the checkpoint.
        spec: ``--model`` (``MODULE:FACTORY``); may be None only for a trusted fully pickled model.
        kwargs_json: ``--model-kwargs``.
        trust: ``--trust-checkpoint``.

    Returns:
        The model.
    """
    obj = read_torch_file(path, trust=trust)
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("robustcompress.compress/"):
        if isinstance(obj.get("state_dict"), dict):
            _check_finite(obj["state_dict"].items(), path)
        return load_exported(path, model_factory(spec, kwargs_json))
    obj = _unwrap(obj, path)
    if isinstance(obj, nn.Module):
        _check_finite(obj.state_dict().items(), path)
        return obj.eval()
    _check_finite(obj.items(), path)
    model = model_factory(spec, kwargs_json)()
    try:
        model.load_state_dict(obj)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path!r} does not fit the model built by --model {spec} with "
                         f"--model-kwargs {kwargs_json}: {_one_line(str(err))[:400]}") from None
    return model.eval()


def load_data(spec: str | None) -> tuple[Any, Any] | None:
    """``(train, test)`` data from ``--data``, or None without it.

    ``digits`` / ``digits-image`` are the built-in data sets; ``MODULE:FACTORY``
    calls ``FACTORY()``, which returns a Dataset or DataLoader of ``(x, y)``
    (used for both fine-tuning and measuring) or a pair ``(train, test)``.
    """
    if spec is None:
        return None
    if spec in NAMED_DATA:
        return digits(seed=0, image=spec == "digits-image")
    data = _import_attr(spec, "--data", "mypackage.data:test_set")()
    pair = data if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], torch.Tensor) \
        else (data, data)
    for d in pair:
        if not isinstance(d, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
            raise ValueError(f"--data {spec}() must return a Dataset or DataLoader of (x, y) (or a pair of them "
                             f"for training and testing), but returned a {type(d).__name__}")
    return pair[0], pair[1]


def example_input(data: Any, shape: tuple[int, ...] | None, model: nn.Module) -> torch.Tensor | None:
    """One input batch: the first example of ``data``, else zeros of ``--input-shape``, else None."""
    if data is not None:
        for xb, _ in batches(data, 1):
            return xb[:1]
        raise ValueError("--data holds no examples")
    if shape is not None:
        first = next(iter(model.parameters()), None)
        return torch.zeros(1, *shape, dtype=first.dtype if first is not None else torch.float32)
    return None


def run_guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``; any error becomes one line ``error: FILE: cause`` on stderr and exit code 2.

    Warnings are printed as one ``warning: …`` line each.

    With ``--debug`` the exception propagates (full traceback).
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return int(run(args) or 0)
            finally:
                for w in caught:
                    print(f"warning: {_one_line(str(w.message))}", file=sys.stderr)
    except Exception as err:  # the CLI's boundary: every failure is reported, none as a traceback
        if getattr(args, "debug", False):
            raise
        text = _one_line(str(err)) or type(err).__name__
        if not isinstance(err, (ValueError, TypeError)):
            text = f"{type(err).__name__}: {text}"
        path = getattr(args, "checkpoint", None)
        if path and path not in text:
            text = f"{path}: {text}"
        print(f"error: {text}", file=sys.stderr)
        return 2
