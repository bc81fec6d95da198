"""Trackers: representation and weight statistics recorded on forward passes, every N steps.

``track(model, every=100)`` registers forward hooks. A *step* is one
training-mode forward pass of the model (eval-mode passes are neither counted
nor recorded). On every ``every``-th step (the first included) each tracked
layer's output ``A`` (``batch × features``; a convolution's output as
``(batch·positions) × channels``: the feature axis comes from the layer
registry; the first element of a tuple output such as attention's or a
recurrent layer's, the data of a ``PackedSequence``) gives

* ``effective_rank``: ``exp(−Σ_j p_j log p_j)``, ``p_j = σ_j(A)/Σ_l σ_l(A)``;
* ``stable_rank``: ``‖A‖_F² / σ₁(A)²``;
* ``active_fraction``: the share of units positive for at least one example
  (alive after a ReLU);
* ``top_neuron_share``: ``max_i ‖A_{:,i}‖² / ‖A‖_F²`` (energy of the heaviest unit);

and, from the shared :class:`~robustcompress.spectral.SpectralState`, each
layer's ``sigma_1`` (warm estimate), ``frobenius`` and ``weight_stable_rank``
``‖W‖_F²/σ₁²``. Off-steps cost a counter check plus, with ``check_finite``,
one finiteness check per layer output, accumulated into a flag that is read
at the end of the forward pass that met it: a NaN/Inf raises there, naming
the first layer. On CUDA, reading the flag synchronises with the host;
``check_every=N`` reads it every N training forwards instead (a NaN is then
reported up to N − 1 steps late). On CPU it is read every forward, whatever N.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> records = []
    >>> tracker = track(model, every=2, sink=records)
    >>> for _ in range(3):
    ...     _ = model(torch.randn(32, 8))
    >>> sorted({r["step"] for r in records})
    [0, 2]
    >>> tracker.remove()
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Any, Callable

import torch
from einops import rearrange
from torch import nn

from ._checks import positive_int
from .layers import find_layers
from .penalties import unwrap_model
from .selection import select_layers
from .spectral import SpectralState

from .metrics import effective_rank, stable_rank

__all__ = ["track", "Tracker"]


def _spectrum_stats(s: torch.Tensor) -> tuple[float, float]:
    """(effective rank, stable rank) from all singular values ``s`` (descending)."""
    if float(s[0]) == 0:
        return float("nan"), float("nan")
    return float(effective_rank(s)), float(stable_rank(s))


class _Sink:
    """Records in long format ``{"step", "layer", "metric", "value"}`` to one destination."""

    def __init__(self, sink: Any, records: list) -> None:
        self._file = None
        self._writer = None
        if sink is None:
            self.kind, self.target = "list", records
        elif isinstance(sink, list):
            self.kind, self.target = "list", sink
        elif hasattr(sink, "add_scalar"):
            self.kind, self.target = "scalar", sink
        elif isinstance(sink, (str, os.PathLike)):
            path = pathlib.Path(sink)
            if path.suffix not in (".csv", ".jsonl"):
                raise ValueError(f"Expected a sink path ending in .csv or .jsonl, but got sink={str(sink)!r}")
            self.kind, self.target = path.suffix[1:], path
        elif callable(sink):
            self.kind, self.target = "call", sink
        else:
            raise TypeError("Expected sink to be None, a list, a callable, a .csv/.jsonl path or an object with "
                            f"add_scalar (e.g. a TensorBoard SummaryWriter), but got {type(sink).__name__}")

    def write(self, rows: list[dict]) -> None:
        if self.kind == "list":
            self.target.extend(rows)
        elif self.kind == "call":
            for r in rows:
                self.target(r)
        elif self.kind == "scalar":
            for r in rows:
                self.target.add_scalar(f"{r['layer']}/{r['metric']}", r["value"], r["step"])
        else:
            if self._file is None:
                new = not self.target.exists() or self.target.stat().st_size == 0
                self._file = open(self.target, "a", newline="")
                if self.kind == "csv":
                    self._writer = csv.DictWriter(self._file, fieldnames=["step", "layer", "metric", "value"])
                    if new:
                        self._writer.writeheader()
            for r in rows:
                if self.kind == "csv":
                    self._writer.writerow(r)
                else:
                    self._file.write(json.dumps(r) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _output_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a layer's output carries: itself, a tuple's first element, a PackedSequence's data."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, nn.utils.rnn.PackedSequence):
        out = out.data
    return out if isinstance(out, torch.Tensor) else None


class Tracker:
    """The handle :func:`track` returns: ``remove()`` takes every hook off (and closes file sinks).

    Attributes:
        records: the in-memory record list (used when ``sink`` is None).
        steps: training-mode forward passes counted so far.
    """

    def __init__(self, model: nn.Module, every: int, names: list[str], sink: Any, state: SpectralState | None,
                 owns_state: bool, check_finite: bool, activations: bool, check_every: int = 1) -> None:
        self.model = model
        self.every = every
        self.names = names
        self.records: list[dict] = []
        self._sink = _Sink(sink, self.records)
        self.state = state
        self._owns_state = owns_state
        self.check_finite = check_finite
        self.check_every = check_every
        self._unchecked = 0
        self.activations = activations
        self.steps = 0
        self._active = False
        self._step = -1
        self._pending: list[dict] = []
        self._flags: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        # Activations are a module's: one hook per module (attention's Q/K/V/O views
        # share one output), statistics over the registry's feature axis.
        catalog = find_layers(model, state.options if state is not None else None)
        self._modules: dict[str, tuple[nn.Module, int]] = {}
        for name in names:
            layer = catalog[name]
            self._modules.setdefault(layer.module_name, (layer.module, layer.kind.feature_axis))
        self._handles.append(model.register_forward_pre_hook(self._root_pre))
        for mname, (module, axis) in self._modules.items():
            self._handles.append(module.register_forward_hook(self._layer_hook(mname, axis)))
        # Last: when the model is itself a tracked layer its layer hook runs first.
        self._handles.append(model.register_forward_hook(self._root_post))

    # -------------------------------------------------------------- hooks
    def _root_pre(self, module: nn.Module, args: Any) -> None:
        if not module.training:
            self._active = False
            return
        step = self.steps
        self.steps += 1
        self._active = step % self.every == 0
        if self._active:
            self._step = step
            self._pending = []  # rows of a tracked forward that raised are dropped, not written late
            self._raise_nonfinite()

    def _layer_hook(self, name: str, feature_axis: int) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            out = _output_tensor(out)
            if not self.model.training or out is None:
                return
            if self.check_finite:
                with torch.no_grad():
                    # The sum is non-finite iff an element is NaN/Inf: one pass, ~10x cheaper
                    # than isfinite().all(). Summed in float64, so large finite fp16/fp32
                    # outputs cannot overflow into a false alarm.
                    bad = ~torch.isfinite(out.detach().sum(dtype=torch.float64))
                    flag = self._flags.get(name)
                    if flag is None:
                        self._flags[name] = bad
                    else:
                        flag.logical_or_(bad)
            if self._active and self.activations:
                self._pending.extend(self._activation_rows(name, out, feature_axis))
        return hook

    def _root_post(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.check_finite and module.training:
            self._unchecked += 1
            on_cuda = any(f.device.type == "cuda" for f in self._flags.values())
            if self._unchecked >= self.check_every or not on_cuda:
                self._unchecked = 0
                try:
                    self._raise_flagged_outputs()
                except FloatingPointError:
                    self._active, self._pending = False, []
                    raise
        if not self._active:
            return
        self._active = False
        rows = self._pending + self._weight_rows()
        self._pending = []
        self._sink.write(rows)

    # -------------------------------------------------------------- statistics
    def _row(self, layer: str, metric: str, value: float) -> dict:
        return {"step": self._step, "layer": layer, "metric": metric, "value": float(value)}

    @torch.no_grad()
    def _activation_rows(self, name: str, out: torch.Tensor, feature_axis: int = -1) -> list[dict]:
        a = out.detach()
        if a.dim() < 2:
            return []
        # Rows are samples (and positions), columns the layer's units: channels
        # (dim 1) of a convolution, the last dim of a Linear on (N, …, F).
        a = rearrange(a.movedim(feature_axis, -1), "... f -> (...) f").float()
        if not bool(torch.isfinite(a).all()):
            return []  # reported by the flag at the next tracking step
        s = torch.linalg.svdvals(a)
        eff, stab = _spectrum_stats(s)
        energy = a.square().sum(0)
        total = energy.sum()
        share = float(energy.max() / total) if float(total) > 0 else float("nan")
        active = float((a > 0).any(0).float().mean())
        return [self._row(name, "effective_rank", eff), self._row(name, "stable_rank", stab),
                self._row(name, "active_fraction", active), self._row(name, "top_neuron_share", share)]

    @torch.no_grad()
    def _weight_rows(self) -> list[dict]:
        if self.state is None:
            return []
        if self._owns_state:
            self.state.step(2)
        rows = []
        for name in self.names:
            if name not in self.state.names:
                continue
            s1 = self.state.sigmas(name)[0]
            f = self.state.frobenius(name)
            # The residual interval of the top Ritz pair: some singular value lies in [low, high].
            low, high = self.state.residual_interval(name)[0].tolist()
            rows += [self._row(name, "sigma_1", s1), self._row(name, "frobenius", f),
                     self._row(name, "weight_stable_rank", f.square() / s1.square() if float(s1) > 0 else float("nan")),
                     self._row(name, "sigma_1_interval_low", low), self._row(name, "sigma_1_interval_high", high)]
        return rows

    def _raise_nonfinite(self) -> None:
        for name, (module, _) in self._modules.items():
            for pname, p in module.named_parameters():
                if not bool(torch.isfinite(p.detach()).all()):
                    raise FloatingPointError(f"Non-finite values (NaN/Inf) in the weights of layer {name!r} "
                                             f"({pname}), seen at tracking step {self._step}")
        self._raise_flagged_outputs()

    def _raise_flagged_outputs(self) -> None:
        for name in self._modules:
            flag = self._flags.get(name)
            if flag is not None and bool(flag):
                self._flags = {}
                raise FloatingPointError(f"Non-finite values (NaN/Inf) in the output of layer {name!r} "
                                         f"(training forward pass {self.steps - 1} or up to check_every - 1 before it)")

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this tracker's step numbering and records.

        ``{"steps", "every", "layers", "nonfinite", "state"}``: the training-mode
        forward passes counted so far, the schedule and layers (checked on load),
        the pending non-finite flags (as Python bools) and, when the tracker owns
        its ``SpectralState``, that state's ``state_dict`` (its warm vectors
        decide the logged ``sigma_1``). A shared state is saved by its owner.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> t = track(model, every=2)
            >>> _ = model(torch.randn(3, 4))
            >>> t.state_dict()["steps"]
            1
        """
        return {
            "steps": self.steps,
            "every": self.every,
            "layers": list(self.names),
            "nonfinite": {name: bool(flag) for name, flag in self._flags.items()},
            "state": self.state.state_dict() if (self._owns_state and self.state is not None) else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from what :meth:`state_dict` saved (checked first; nothing changes on a mismatch).

        Raises:
            ValueError: the saved schedule ``every`` or layer list differs from
                this tracker's, or the owned state's entry does not fit.
        """
        keys = {"steps", "every", "layers", "nonfinite", "state"}
        if not isinstance(state_dict, dict) or set(state_dict) != keys:
            raise ValueError(f"Expected a Tracker state dict with keys {sorted(keys)}, but got "
                             f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"Tracker state: expected steps to be an int >= 0, but got steps={steps!r}")
        if state_dict["every"] != self.every:
            raise ValueError(f"Tracker state was saved with every={state_dict['every']}, this tracker has "
                             f"every={self.every}")
        if list(state_dict["layers"]) != list(self.names):
            raise ValueError(f"Tracker state was saved for layers {list(state_dict['layers'])}, this tracker "
                             f"tracks {list(self.names)}")
        unknown = [n for n in state_dict["nonfinite"] if n not in self.names]
        if unknown:
            raise ValueError(f"Tracker state flags layers it does not track: {unknown}")
        owned = self._owns_state and self.state is not None
        if (state_dict["state"] is not None) != owned:
            raise ValueError("Tracker state and this tracker disagree on whether the tracker owns its SpectralState "
                             f"(saved: {state_dict['state'] is not None}, here: {owned})")
        if owned:
            own, saved = self.state.state_dict(), state_dict["state"]
            bad = sorted(k for k in set(own) | set(saved) if k not in own or k not in saved
                         or getattr(own[k], "shape", None) != getattr(saved[k], "shape", None))
            if bad:
                raise ValueError(f"Tracker state: its SpectralState entry does not fit this tracker's ({bad[:5]})")
            self.state.load_state_dict(saved)
        self.steps = steps
        self._flags = {n: torch.tensor(bool(f)) for n, f in state_dict["nonfinite"].items()}

    # -------------------------------------------------------------- handle
    def remove(self) -> None:
        """Remove every hook and close file sinks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._sink.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def track(model: nn.Module, every: int = 100, layers: Any = None, sink: Any = None,
          state: SpectralState | None = None, check_finite: bool = True, activations: bool = True,
          weights: bool = True, check_every: int = 1) -> Tracker:
    """Record representation and weight statistics every ``every`` training steps.

    Args:
        model: the network (DDP / ``torch.compile`` wrappers are unwrapped).
        every: record on steps ``0, every, 2·every, …`` (a step = a training-mode forward pass).
        layers: None (every layer whose kind penalties act on, head included), names, a type
            or tuple of types, or a predicate ``(name, module) -> bool``.
        sink: None (keep ``tracker.records``), a list, a callable taking one
            record, a ``.csv`` / ``.jsonl`` path, or anything with ``add_scalar``
            (a TensorBoard ``SummaryWriter``). Records are
            ``{"step", "layer", "metric", "value"}``.
        state: a shared ``SpectralState`` of ``model`` for the weight metrics;
            None builds one (stepped twice per tracking step).
        check_finite: check layer outputs for NaN/Inf on every training forward
            and raise at the end of the forward that met one, naming the layer.
        check_every: on CUDA, read the device-side flag every this many
            training forwards (1: every forward, one host synchronisation each;
            N > 1 defers the error by up to N − 1 steps). CPU flags are read
            every forward regardless (reading them costs nothing).
        activations: record the representation statistics.
        weights: record the weight metrics.

    Returns:
        A :class:`Tracker` handle; ``tracker.remove()`` removes every hook.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with track(model, every=1) as t:
        ...     _ = model(torch.randn(16, 4))
        >>> sorted({r["metric"] for r in t.records})[:3]
        ['active_fraction', 'effective_rank', 'frobenius']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    positive_int(every, "every")
    positive_int(check_every, "check_every")
    for flag, nm in ((check_finite, "check_finite"), (activations, "activations"), (weights, "weights")):
        if not isinstance(flag, bool):
            raise TypeError(f"Expected {nm} to be a bool, but got {nm}={flag!r}")
    base = unwrap_model(model)
    if state is not None:
        if not isinstance(state, SpectralState):
            raise TypeError(f"Expected state to be a SpectralState or None, but got {type(state).__name__}")
        if state.model is not base:
            raise ValueError("The SpectralState given to track() was built for a different model")
    names = select_layers(base, layers, exclude_head=False,
                          candidates=None if state is None else state.names)
    owns = False
    if weights and state is None:
        state = SpectralState(base, k=1, layers=names, init_iter=50)
        owns = True
    elif not weights:
        state = None
    return Tracker(base, every, names, sink, state, owns, check_finite, activations, check_every)
