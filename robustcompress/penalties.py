"""Loss terms on the head (sensitivity) and tail (compressibility) of each layer's spectrum.

Every term is an ``nn.Module`` whose ``forward()`` returns a scalar to add to
the loss. All terms read one shared :class:`~robustcompress.spectral.SpectralState`
(warm top-k singular directions of every layer), so a training step reads each
weight once however many terms are active:

* **head** (sensitive directions): :class:`SpectralNormPenalty` (``σ₁²``, the
  hinge ``max(0, σ₁ − τ)²`` or ``log K₂ = Σ_l log σ₁(W_l)`` of the chain),
  :class:`HeadSpreadPenalty` (``σ₁² / mean_{j≤k} σ_j² − 1``),
  :class:`RowL1Penalty` (smooth max of the row ℓ1 norms, or the top-k row balance);
* **tail** (compression): :class:`L1Penalty`, :class:`GroupLassoPenalty`,
  :class:`NuclearNormPenalty`, :class:`TailEnergyPenalty` (``‖W‖_F² − Σ_{j≤k} σ_j²``).

Gradients flow through ``σ_j = u_jᵀ W v_j`` with the warm ``u_j, v_j``
detached (``∂σ_j/∂W = u_j v_jᵀ``, exact for a converged, simple singular
value) or through closed forms; no term takes a full SVD of a large layer.

Who steps the state: a penalty built from a *model* owns its state and steps
it once per active ``forward()``; a penalty given a *state* never steps it —
its owner (you, or :func:`robustcompress.optim.wrap`) calls ``state.step()``
once per training step, before the penalties.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from robustcompress.spectral import SpectralState
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> state = SpectralState(model, k=4)
    >>> penalty = SpectralNormPenalty(state, strength=1e-3) + TailEnergyPenalty(state, k=4, strength=1e-4)
    >>> state.step()                      # once per training step
    >>> loss = model(torch.randn(5, 8)).square().mean() + penalty()
    >>> loss.backward()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ._checks import nonnegative_float, positive_float, positive_int
from .layers import LowRankSpec, MatrixSpec, ViewOptions, batchnorm_scale, find_layers
from .selection import LayerSpec, frozen_layers, select_layers
from .spectral import LowRankView, MatrixView, SpectralState

__all__ = [
    "StateTerm",
    "Penalty",
    "PenaltySum",
    "SpectralNormPenalty",
    "HeadSpreadPenalty",
    "RowL1Penalty",
    "L1Penalty",
    "GroupLassoPenalty",
    "NuclearNormPenalty",
    "TailEnergyPenalty",
    "default_penalties",
    "unwrap_model",
    "DEFAULT_STRENGTH",
    "SpectralMode",
    "SPECTRAL_MODES",
]

#: Strength of the σ₁² term in :func:`default_penalties` (chosen on the digits MLP, see its docstring).
DEFAULT_STRENGTH = 1e-2
# SpectralNormPenalty(mode="log_k2"): σ₁ below this counts as flat (log σ₁ is
# clamped there), so the gradient 1/σ₁ stays ≤ 1e4 and a zero layer stays zero.
LOG_FLOOR = 1e-4

def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile``.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(m)) is m
        True
    """
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _strength_arg(strength: Any) -> float | Callable[[int], float]:
    if callable(strength) and not isinstance(strength, (int, float)):
        return strength
    return nonnegative_float(strength, "strength")


class StateTerm(nn.Module):
    """Base of everything that reads a :class:`SpectralState` on a selection of layers.

    Holds the state (shared, or owned when built from a model), the selected
    layer names with per-layer weights, and the ``every`` counter. The counter
    is a Python int saved through ``get_extra_state`` so off-steps cost no
    device work and resuming from a ``state_dict`` is exact.

    Args:
        state_or_model: a shared ``SpectralState`` (never stepped here) or a model
            (a state is built and owned, and stepped once per active call).
        layers: None (every Linear/Conv except the classifier head), a sequence
            of names, a module type or tuple of types, or a predicate
            ``(name, module) -> bool``.
        weights: ``{name: weight ≥ 0}`` per-layer multipliers (default 1).
        every: act only on every ``every``-th call (the first call acts).
        k: directions the term needs per layer (a shared state must track at least that many).
        view: ``"matrix"`` or ``"operator"`` for convolutions; with a shared
            state, None means the state's view and anything else must match it.
        fold_bn: act on ``diag(γ/√(var+ε))·W`` when BatchNorm follows a layer
            (only used when building a state; a shared state decides itself).
        exclude_head: leave the classifier head out of type / predicate / default selections.
        input_shape: the model's input shape (operator view, when building a state).
        attention: attention operators when building a state: ``"projections"``
            or ``"circuits"`` (see :class:`robustcompress.layers.ViewOptions`).

    Frozen layers: a selected layer whose operator parameters all have
    ``requires_grad=False`` is left out (listed in :attr:`frozen`); nothing a
    term computes reaches a frozen tensor (gradients flow only to trainable
    ones, closed-form and proximal updates target only trainable weights). A
    selection whose layers are all frozen is an error.
    """

    #: directions of the spectrum the term reads (0: none, it uses rows only)
    needs_k: int = 1

    def __init__(self, state_or_model: SpectralState | nn.Module, *, layers: LayerSpec = None,
                 weights: Mapping[str, float] | None = None, every: int = 1, k: int | None = None,
                 view: str | None = None, fold_bn: bool = True, exclude_head: bool = True,
                 input_shape: Sequence[int] | None = None, attention: str = "projections") -> None:
        super().__init__()
        self.every = positive_int(every, "every")
        if k is not None:
            positive_int(k, "k")
        if view not in (None, "matrix", "operator"):
            raise ValueError(f"Expected view to be 'matrix' or 'operator', but got view={view!r}")
        need = max(1, k or self.needs_k)
        if isinstance(state_or_model, SpectralState):
            state = state_or_model
            if view is not None and view != state.view:
                raise ValueError(f"view={view!r} differs from the shared state's view={state.view!r}; "
                                 "build the SpectralState with the view you want")
            catalog = find_layers(state.model, state.options)
            names = select_layers(state.model, layers, exclude_head=exclude_head, candidates=state.names,
                                  catalog=catalog)
            names, self.frozen = self._trainable(catalog, names)
            self._owns_state = False
            object.__setattr__(self, "_state", state)  # shared: not a submodule, not saved twice
        elif isinstance(state_or_model, nn.Module):
            model = unwrap_model(state_or_model)
            options = ViewOptions(attention=attention)
            catalog = find_layers(model, options)
            names = select_layers(model, layers, exclude_head=exclude_head, catalog=catalog)
            names, self.frozen = self._trainable(catalog, names)
            state = SpectralState(model, k=need, layers=names, view=view or "matrix", fold_bn=fold_bn,
                                  input_shape=input_shape, attention=attention)
            names = [n for n in names if n in state.names]
            self._owns_state = True
            self.owned_state = state
            object.__setattr__(self, "_state", state)
        else:
            raise TypeError(f"Expected state_or_model to be a SpectralState or an nn.Module, "
                            f"but got {type(state_or_model).__name__}")
        self.names = names
        self._check_k(need)
        w = dict(weights or {})
        extra = [n for n in w if n not in names]
        if extra:
            raise ValueError(f"weights names layers that are not selected: {extra}; selected: {names}")
        self.layer_weights = {n: nonnegative_float(w.get(n, 1.0), f"weights[{n!r}]") for n in names}
        self._calls = 0

    @staticmethod
    def _trainable(catalog, names: list[str]) -> tuple[list[str], list[str]]:
        frozen = frozen_layers(catalog, names)
        if frozen and len(frozen) == len(names):
            raise ValueError(f"Every selected layer is frozen (all its parameters have requires_grad=False): "
                             f"{frozen}; a penalty on them could not change anything. Select trainable layers "
                             "with layers=..., or unfreeze them")
        return [n for n in names if n not in frozen], frozen

    def _check_k(self, need: int) -> None:
        if self.needs_k == 0:
            return
        for name in self.names:
            if self._exact_layer(name):
                continue  # computed from svdvals: k is never read for this layer
            m, n = self._state.operator(name).shape
            if need > min(m, n):
                raise ValueError(f"k={need} is larger than min(shape)={min(m, n)} of layer {name!r} "
                                 f"(operator {m}×{n}); choose k <= {min(m, n)} or leave the layer out")
            if self._state.k_of(name) < need:
                raise ValueError(f"{type(self).__name__} needs the top {need} directions of layer {name!r}, but the "
                                 f"shared SpectralState tracks {self._state.k_of(name)}; build it with k>={need}")

    # -------------------------------------------------------------- access
    @property
    def state(self) -> SpectralState:
        """The spectral state this term reads."""
        return self._state

    @property
    def owns_state(self) -> bool:
        """True when the term built (and steps) its own state."""
        return self._owns_state

    @property
    def calls(self) -> int:
        """How many times the term was called (active or not)."""
        return self._calls

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError unless this term's state tracks ``model`` (wrappers unwrapped)."""
        if unwrap_model(model) is not self._state.model:
            raise ValueError(f"{type(self).__name__} was built for a different model than the one it is used with; "
                             "build it (or its SpectralState) from this model")

    def parameters_acted_on(self) -> list[nn.Parameter]:
        """The trainable parameters the term reaches: its layers' operator tensors and folded BatchNorms' affine ones."""
        seen: dict[int, nn.Parameter] = {}
        for name in self.names:
            params = list(self._state.operator_tensors(name))
            bn = self._state.folded_bn(name)
            if bn is not None:
                params += list(bn.parameters(recurse=False))
            for p in params:
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def _exact_layer(self, name: str) -> bool:
        """Whether the term computes layer ``name`` exactly (no tracked directions needed)."""
        return False

    def _tick(self) -> tuple[bool, int]:
        """Advance the call counter; return (active, step index)."""
        step = self._calls
        self._calls += 1
        return step % self.every == 0, step

    def get_extra_state(self) -> dict:
        return {"calls": self._calls}

    def set_extra_state(self, extra: dict) -> None:
        self._calls = int(extra["calls"])

    # -------------------------------------------------------------- weights seen as rows
    def _rows(self, name: str) -> torch.Tensor:
        """The (BN-folded) matrix view as ``out × (in·k…)``: rows are neurons / filters."""
        view = self._state.matrix_operator(name)
        return view.matrix2d() if isinstance(view, MatrixView) else view.matrix()

    def _device(self) -> torch.device:
        return self._state.layers[next(iter(self._state.layers.keys()))].V.device

    def extra_repr(self) -> str:
        return f"layers={self.names}, every={self.every}, owns_state={self._owns_state}"


class Penalty(StateTerm):
    """A loss term: ``strength(step) · Σ_l weight_l · value_l(W_l)``.

    Subclasses implement :meth:`layer_value` (a differentiable scalar per layer).
    ``forward()`` returns the term to add to the loss (a zero constant on
    off-steps of ``every``); ``last_value`` keeps the latest value (detached,
    no host synchronisation) and ``value`` reads it as a float.

    Args:
        state_or_model: see :class:`StateTerm`.
        strength: ``≥ 0``, or a callable ``step -> strength`` (warm-up schedules).
        **kwargs: layer selection and the rest, see :class:`StateTerm`.
    """

    #: proximal terms are applied by the optimizer wrapper as a prox step, not as a gradient
    supports_proximal: bool = False

    def __init__(self, state_or_model: SpectralState | nn.Module, strength: float | Callable[[int], float] = 1.0,
                 **kwargs: Any) -> None:
        self.proximal = bool(kwargs.pop("proximal", False))
        super().__init__(state_or_model, **kwargs)
        self.strength = _strength_arg(strength)
        if self.proximal and not self.supports_proximal:
            raise ValueError(f"{type(self).__name__} has no proximal form; proximal=True is for L1Penalty "
                             "and GroupLassoPenalty")
        self.last_value: torch.Tensor | None = None

    def strength_at(self, step: int) -> float:
        """The strength at call ``step`` (validated when it comes from a callable)."""
        if callable(self.strength):
            s = self.strength(step)
            if isinstance(s, torch.Tensor) and s.numel() == 1:
                s = float(s)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
                raise ValueError(f"strength({step}) returned {s!r}; a strength schedule must return a finite "
                                 "real >= 0")
            return float(s)
        return self.strength

    def layer_value(self, name: str) -> torch.Tensor:
        """The differentiable term of one layer (before weight and strength)."""
        raise NotImplementedError

    def value_now(self) -> torch.Tensor:
        """``Σ_l weight_l · value_l`` at the current weights (no strength, no counter, no state step)."""
        total = None
        for name in self.names:
            w = self.layer_weights[name]
            if w == 0:
                continue
            v = w * self.layer_value(name)
            total = v if total is None else total + v
        if total is None:
            total = torch.zeros((), device=self._device())
        return total

    def begin_step(self) -> float | None:
        """Advance the counter; on an active call step an owned state and return the strength, else None."""
        active, step = self._tick()
        if not active:
            return None
        s = self.strength_at(step)
        if s == 0:
            # An active step at zero strength contributes exactly 0; log that, skip the work.
            self.last_value = torch.zeros((), device=self._device())
            return None
        if self._owns_state and self.needs_k > 0:
            self._state.step()
        return s

    def closed_form(self, strength: float) -> tuple[torch.Tensor, list] | None:
        """Value and gradient without autograd, where a term has a cheap closed form.

        Returns ``(value, updates)`` with ``updates`` a list of
        ``(param, u, v, alpha)`` meaning ``param.grad += alpha · u vᵀ`` (on the
        matrix view), or None when the term has no closed form for its layers.
        Nothing is modified.
        """
        return None

    def forward(self) -> torch.Tensor:
        s = self.begin_step()
        if s is None:
            return torch.zeros((), device=self._device())
        dev = self._device()
        # Penalties are computed in the state's float32/float64, not in an autocast dtype.
        with torch.autocast(device_type=dev.type, enabled=False):
            value = s * self.value_now()
        self.last_value = value.detach()
        return value

    @property
    def value(self) -> float | None:
        """The last computed value as a float (synchronises; None before the first active call)."""
        return None if self.last_value is None else float(self.last_value)

    def __add__(self, other: "Penalty") -> "PenaltySum":
        return PenaltySum(self, other)

    def __radd__(self, other: Any) -> "Penalty | PenaltySum":
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return PenaltySum(other, self)


def flatten_penalties(items: Any) -> list[Penalty]:
    """The individual terms of penalties and sums of penalties, in order."""
    flat: list[Penalty] = []
    for t in items:
        if isinstance(t, PenaltySum):
            flat.extend(t.terms)
        elif isinstance(t, Penalty):
            flat.append(t)
        else:
            raise TypeError(f"Expected penalties (Penalty objects or sums of them), but got {type(t).__name__}")
    return flat


class PenaltySum(nn.Module):
    """Several penalties as one: ``forward()`` returns their sum; built with ``+``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> total = L1Penalty(model, 1e-4) + GroupLassoPenalty(model, 1e-4)
        >>> len(total.terms)
        2
    """

    def __init__(self, *terms: "Penalty | PenaltySum") -> None:
        super().__init__()
        self.terms = nn.ModuleList(flatten_penalties(terms))

    def forward(self) -> torch.Tensor:
        values = [t() for t in self.terms]
        out = values[0]
        for v in values[1:]:
            out = out + v
        return out

    @property
    def last_value(self) -> torch.Tensor | None:
        vals = [t.last_value for t in self.terms if t.last_value is not None]
        return None if not vals else torch.stack([v.to(vals[0]) for v in vals]).sum()

    def __add__(self, other: "Penalty | PenaltySum") -> "PenaltySum":
        return PenaltySum(self, other)

    def __radd__(self, other: Any) -> "PenaltySum":
        if isinstance(other, (int, float)) and other == 0:
            return self
        return PenaltySum(other, self)


# ====================================================================== head terms
@dataclass(frozen=True)
class SpectralMode:
    """One way to turn a layer's ``σ₁`` into a loss ``f(σ₁)``: an entry of :data:`SPECTRAL_MODES`.

    ``value(σ, c)`` is ``f`` (differentiable: :class:`SpectralNormPenalty`
    takes autograd through it when the layer has no closed form) and
    ``slope(σ, c)`` its derivative ``f′`` for the closed-form rank-one update
    ``f′(σ₁)·u vᵀ``; the two must agree wherever autograd of ``value`` is
    defined. ``c`` is the mode's one parameter (``None`` when it takes none):
    the keyword ``option`` of the penalty, with ``default`` when not given
    (``None``: required). ``includes_head``: the mode selects the head layer
    by default (a chain quantity such as ``log K₂`` needs every layer).

    Example:
        >>> s = torch.tensor(3.0)
        >>> SPECTRAL_MODES["hinge"].value(s, 1.0), SPECTRAL_MODES["hinge"].slope(s, 1.0)
        (tensor(4.), tensor(4.))
    """

    value: Callable[[torch.Tensor, float | None], torch.Tensor]
    slope: Callable[[torch.Tensor, float | None], torch.Tensor]
    option: str | None = None
    default: float | None = None
    meaning: str = ""
    includes_head: bool = False


def _log_slope(s: torch.Tensor, floor: float) -> torch.Tensor:
    # d log σ/dσ = 1/σ, clamped: 0 below the floor (as autograd of clamp_min in value).
    return torch.where(s > floor, 1 / s.clamp_min(floor), torch.zeros_like(s))


#: The modes of :class:`SpectralNormPenalty`; a new mode is one entry (and a keyword of the
#: penalty if it takes a parameter no mode took before).
SPECTRAL_MODES: dict[str, SpectralMode] = {
    "square": SpectralMode(value=lambda s, _: s.square(), slope=lambda s, _: 2 * s),
    "hinge": SpectralMode(value=lambda s, t: torch.relu(s - t).square(), slope=lambda s, t: 2 * torch.relu(s - t),
                          option="target", meaning="the σ₁ above which the penalty acts"),
    "log_k2": SpectralMode(value=lambda s, d: torch.log(s.clamp_min(d)), slope=_log_slope, option="log_floor",
                           default=LOG_FLOOR, meaning="the σ₁ below which a layer counts as flat",
                           includes_head=True),
}


def _mode_of(option: str) -> str:
    return next(name for name, entry in SPECTRAL_MODES.items() if entry.option == option)


class SpectralNormPenalty(Penalty):
    """Penalise the top singular value ``σ₁`` of each selected layer.

    Modes (per layer, ``σ₁ = uᵀ W v`` with the warm vectors detached):

    * ``"square"``: ``σ₁²`` (gradient ``2σ₁ u vᵀ``);
    * ``"hinge"``: ``max(0, σ₁ − τ)²`` with ``target=τ`` (only above the target);
    * ``"log_k2"``: ``log max(σ₁, δ)`` with ``δ = log_floor``; summed over the
      chain this is ``log K₂`` up to the constant ``Σ log L_φ`` (the default
      selection then includes the head). The gradient ``u vᵀ/σ₁`` is thereby
      clamped: at most ``1/δ`` in norm, and 0 below the floor, where the layer
      counts as already flat (an all-zero layer, ``σ₁ = 0``, is left as it is
      instead of being thrown to ``‖W‖ ≈ lr·strength/tiny``).

    Args:
        state_or_model: a shared ``SpectralState`` or a model.
        strength: a float ≥ 0 or a callable of the step.
        mode: ``"square"``, ``"hinge"`` or ``"log_k2"``.
        target: ``τ > 0`` for the hinge.
        log_floor: ``δ > 0`` for ``"log_k2"`` (default 1e-4).
        **kwargs: layer selection, weights, every, view, … (see :class:`StateTerm`).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> p = SpectralNormPenalty(model, strength=1e-3)
        >>> p().backward()
    """

    def __init__(self, state_or_model, strength=1.0, mode: str = "square", target: float | None = None,
                 log_floor: float | None = None, **kwargs):
        if mode not in SPECTRAL_MODES:
            raise ValueError(f"Expected mode to be one of {sorted(SPECTRAL_MODES)}, but got mode={mode!r}")
        entry = SPECTRAL_MODES[mode]
        given = {"target": target, "log_floor": log_floor}
        for option, value in given.items():
            if option != entry.option and value is not None:
                raise ValueError(f"{option} is only used with mode={_mode_of(option)!r}, but got mode={mode!r}, "
                                 f"{option}={value!r}")
        parameter = None
        if entry.option is not None:
            value = given[entry.option] if given[entry.option] is not None else entry.default
            if value is None:
                raise ValueError(f"mode={mode!r} needs {entry.option} > 0 ({entry.meaning})")
            parameter = positive_float(value, entry.option)
        if entry.includes_head:
            kwargs.setdefault("exclude_head", False)
        super().__init__(state_or_model, strength, **kwargs)
        self.mode = mode
        #: the mode's one parameter (``target`` or ``log_floor``), None for ``"square"``
        self.parameter = parameter

    @property
    def target(self) -> float | None:
        """``τ`` of ``mode="hinge"`` (None for other modes)."""
        return self.parameter if SPECTRAL_MODES[self.mode].option == "target" else None

    @property
    def log_floor(self) -> float | None:
        """``δ`` of ``mode="log_k2"`` (None for other modes)."""
        return self.parameter if SPECTRAL_MODES[self.mode].option == "log_floor" else None

    def _closed_form_layers(self) -> bool:
        # The rank-one update u vᵀ lands on the stored weight: the operator must be
        # that weight itself (or its transpose), unsliced, ungrouped, unscaled.
        for name in self.names:
            layer = self._state.layer(name)
            spec = layer.spec
            if not (isinstance(spec, MatrixSpec) and spec.groups == 1 and spec.row_scale is None
                    and spec.rows is None and spec.cols is None and len(layer.parameters) == 1
                    and isinstance(self._state.operator(name), MatrixView) and self._state.folded_bn(name) is None):
                return False
            p = layer.parameters[0]
            if spec.weight() is not p or (spec.transpose and p.dim() != 2):
                return False
        return True

    def closed_form(self, strength):
        # σ = uᵀWv with u, v detached: ∂σ/∂W = u vᵀ, so each layer's gradient is
        # one rank-1 update (no m×n temporary, no autograd graph).
        if not self._closed_form_layers():
            return None
        total, updates = None, []
        with torch.no_grad():
            for name in self.names:
                w = self.layer_weights[name]
                if w == 0:
                    continue
                u, v = self._state.vectors(name)
                u, v = u[:, 0], v[:, 0]
                if self._state.k_of(name) == 1:
                    # The k = 1 step stores σ = uᵀ W v for the current (u, v): no product needed.
                    sig = self._state.sigmas(name)[0]
                else:
                    sig = u @ self._state.operator(name).matvec(v[:, None])[:, 0]
                entry = SPECTRAL_MODES[self.mode]
                val, dval = entry.value(sig, self.parameter), entry.slope(sig, self.parameter)
                total = strength * w * val if total is None else total + strength * w * val
                (p,) = self._state.operator_tensors(name)
                if not p.requires_grad:
                    continue  # never reached: frozen layers are not selected
                # A weight stored in × out (operator Wᵀ) takes the update v uᵀ in its own layout.
                pair = (v, u) if self._state.layer(name).spec.transpose else (u, v)
                updates.append((p, *pair, strength * w * dval))
        if total is None:
            total = torch.zeros((), device=self._device())
        return total, updates

    def layer_value(self, name):
        return SPECTRAL_MODES[self.mode].value(self._state.sigma(name), self.parameter)


class HeadSpreadPenalty(Penalty):
    """Flatten the head of the spectrum: ``σ₁² / mean_{j≤k} σ_j² − 1 ≥ 0``.

    Zero when the top ``k`` singular values are equal (a rank-k layer with
    ``σ₁ = ‖W‖_F/√k``), large for a single spike. Scale-free: it moves the
    concentration, not the size.

    Args:
        state_or_model: a shared ``SpectralState`` (tracking ≥ k directions) or a model.
        k: directions in the head, ``2 ≤ k ≤ min(m, n)``.
        strength: a float ≥ 0 or a callable of the step.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> float(HeadSpreadPenalty(model, k=4)().detach()) >= 0
        True
    """

    def __init__(self, state_or_model, k: int = 4, strength=1.0, **kwargs):
        positive_int(k, "k")
        if k < 2:
            raise ValueError(f"Expected k >= 2 (the head spread of one direction is always 0), but got k={k}")
        self.needs_k = k
        super().__init__(state_or_model, strength, k=k, **kwargs)
        self.k = k

    def layer_value(self, name):
        s = self._state.top_sigmas(name)[: self.k]
        sq = s.square()
        return sq[0] / sq.mean().clamp_min(torch.finfo(sq.dtype).tiny) - 1


class RowL1Penalty(Penalty):
    """The L∞ head: heavy rows (neurons / filters) measured by their ℓ1 norms ``r_i = ‖w_i‖_1``.

    * ``"smoothmax"``: ``t · log Σ_i exp(r_i / t)`` with ``t = temperature · mean_i r_i``
      (detached), so ``max_i r_i ≤ value ≤ max_i r_i + t log m``: the worst neuron's
      L∞ sensitivity ``ε‖w_i‖_1``, smoothed so every heavy row gets gradient;
    * ``"balance"``: ``r_(1)² / mean_{j≤k} r_(j)² − 1`` over the ``k`` heaviest rows
      (the row analogue of :class:`HeadSpreadPenalty`).

    Args:
        state_or_model: a shared ``SpectralState`` or a model.
        strength: a float ≥ 0 or a callable of the step.
        mode: ``"smoothmax"`` or ``"balance"``.
        temperature: relative temperature of the smooth max (> 0).
        k: rows in the head for ``"balance"`` (``2 ≤ k ≤`` rows).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> RowL1Penalty(model, 1e-3)().shape
        torch.Size([])
    """

    needs_k = 0

    def __init__(self, state_or_model, strength=1.0, mode: str = "smoothmax", temperature: float = 0.05,
                 k: int = 4, **kwargs):
        if mode not in ("smoothmax", "balance"):
            raise ValueError(f"Expected mode to be 'smoothmax' or 'balance', but got mode={mode!r}")
        self.temperature = positive_float(temperature, "temperature")
        positive_int(k, "k")
        if mode == "balance" and k < 2:
            raise ValueError(f"Expected k >= 2 for mode='balance', but got k={k}")
        super().__init__(state_or_model, strength, **kwargs)
        self.mode = mode
        self.k = k
        if mode == "balance":
            for name in self.names:
                rows = self._rows_count(name)
                if k > rows:
                    raise ValueError(f"k={k} is larger than the {rows} rows of layer {name!r}")

    def _rows_count(self, name: str) -> int:
        return int(self._state.operator(name).shape[0])

    def layer_value(self, name):
        r = self._rows(name).abs().sum(1)
        if self.mode == "smoothmax":
            t = (self.temperature * r.detach().mean()).clamp_min(torch.finfo(r.dtype).tiny)
            return t * torch.logsumexp(r / t, dim=0)
        top = torch.topk(r, self.k).values.square()
        return top[0] / top.mean().clamp_min(torch.finfo(top.dtype).tiny) - 1


# ====================================================================== tail terms
class _ProximalPenalty(Penalty):
    """A penalty the wrapper can apply as a proximal step (``proximal=True``) instead of a gradient."""

    needs_k = 0
    supports_proximal = True

    def __init__(self, state_or_model, strength=1.0, proximal: bool = False, **kwargs):
        super().__init__(state_or_model, strength, proximal=proximal, **kwargs)
        if self.proximal:
            _check_proximal_layers(self)


class L1Penalty(_ProximalPenalty):
    """``Σ_ij |W_ij|`` of the (BN-folded) weight: element sparsity.

    With ``proximal=True`` the optimizer wrapper applies the soft threshold
    ``W ← sign(W)·max(|W| − lr·λ·|s_i|, 0)`` after each step instead of adding
    a subgradient (``s_i`` the folded BN scale of row i, 1 without BN), so
    weights reach exactly zero. Proximal updates need dense Linear/Conv layers.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> torch.allclose(L1Penalty(model, 1.0)(), model[0].weight.abs().sum())
        True
    """

    def layer_value(self, name):
        return self._rows(name).abs().sum()

    @torch.no_grad()
    def prox_(self, name: str, threshold: float) -> None:
        """Soft-threshold the raw weight of ``name`` by ``threshold·|s_i|`` per row."""
        w = self._state.module(name).weight
        if not w.requires_grad:
            return  # frozen weights are never changed (they are not selected either)
        t = threshold * _row_scale_abs(self, name, w)
        t = t.reshape(-1, *([1] * (w.dim() - 1)))
        w.copy_(torch.sign(w) * torch.clamp(w.abs() - t, min=0))


class GroupLassoPenalty(_ProximalPenalty):
    """``Σ_i ‖w_i‖_2`` over the rows (neurons; filters of a convolution): structured sparsity.

    With ``proximal=True`` the wrapper applies the block soft threshold
    ``w_i ← w_i · max(0, 1 − lr·λ·|s_i| / ‖w_i‖_2)`` after each step, so whole
    rows reach exactly zero and can be pruned.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> expected = model[0].weight.norm(dim=1).sum()
        >>> torch.allclose(GroupLassoPenalty(model, 1.0)(), expected)
        True
    """

    def layer_value(self, name):
        return torch.linalg.vector_norm(self._rows(name), dim=1).sum()

    @torch.no_grad()
    def prox_(self, name: str, threshold: float) -> None:
        """Block soft threshold of each raw row by ``threshold·|s_i|``."""
        w = self._state.module(name).weight
        if not w.requires_grad:
            return  # frozen weights are never changed (they are not selected either)
        t = threshold * _row_scale_abs(self, name, w)
        norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1).float(), dim=1)
        factor = torch.clamp(1 - t / norms.clamp_min(torch.finfo(norms.dtype).tiny), min=0)
        w.mul_(factor.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))


def _check_proximal_layers(term: StateTerm) -> None:
    # The prox acts on module.weight row by row: the operator must read exactly that
    # stored weight, rows as neurons (no transpose, slice or factorisation).
    bad = []
    for n in term.names:
        layer = term.state.layer(n)
        spec = layer.spec
        if not (isinstance(spec, MatrixSpec) and not spec.transpose and spec.rows is None and spec.cols is None
                and layer.view.params == ("weight",)):
            bad.append(n)
    if bad:
        raise ValueError(f"proximal=True needs dense layers whose operator is their stored weight (Linear, Conv); "
                         f"layers {bad} are not; leave them out with layers=... or use proximal=False")


def _row_scale_abs(term: StateTerm, name: str, w: torch.Tensor) -> torch.Tensor:
    bn = term.state.folded_bn(name)
    if bn is None:
        return torch.ones(w.shape[0], device=w.device, dtype=torch.float32)
    return batchnorm_scale(bn).detach().float().abs()


def _safe_sqrt(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``√max(x, 0)`` with a zero (not infinite) gradient where ``x`` is at rounding level of ``scale``."""
    floor = 64 * torch.finfo(x.dtype).eps * scale.detach()
    live = x > floor
    return torch.where(live, torch.where(live, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


class NuclearNormPenalty(Penalty):
    """The nuclear norm ``‖W‖_* = Σ_j σ_j``, exact on small layers, from the top-k estimate on large ones.

    With ``‖tail‖_F² = ‖W‖_F² − Σ_{j≤k} σ_j²`` and ``r = rank bound`` (``min(m, n)``,
    or a low-rank layer's inner rank):

        ``Σ_{j≤k} σ_j + ‖tail‖_F  ≤  ‖W‖_*  ≤  Σ_{j≤k} σ_j + √(r − k)·‖tail‖_F``

    (each tail singular value is at most ``‖tail‖_F``, and ``Σ_{j>k} σ_j ≤
    √(r−k)·‖tail‖_F`` by Cauchy–Schwarz). With estimated rather than exact top
    σ these are surrogates, not bounds. ``method="exact"`` differentiates
    ``torch.linalg.svdvals`` (the paper-style regulariser; cost ``O(mn·min(m,n))``).

    Args:
        state_or_model: a shared ``SpectralState`` (tracking ≥ k directions) or a model.
        strength: a float ≥ 0 or a callable of the step.
        k: top directions used by the bound.
        method: ``"auto"`` (exact when ``min(m, n) ≤ exact_max_dim``), ``"exact"`` or ``"bound"``.
        bound: ``"upper"`` or ``"lower"`` surrogate for the layers that use the bound.
        exact_max_dim: largest ``min(m, n)`` that ``"auto"`` treats exactly.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> p = NuclearNormPenalty(model, 1.0, method="exact")
        >>> torch.allclose(p(), torch.linalg.svdvals(model[0].weight).sum())
        True
    """

    def __init__(self, state_or_model, strength=1.0, k: int = 8, method: str = "auto", bound: str = "upper",
                 exact_max_dim: int = 64, **kwargs):
        positive_int(k, "k")
        if method not in ("auto", "exact", "bound"):
            raise ValueError(f"Expected method to be 'auto', 'exact' or 'bound', but got method={method!r}")
        if bound not in ("upper", "lower"):
            raise ValueError(f"Expected bound to be 'upper' or 'lower', but got bound={bound!r}")
        positive_int(exact_max_dim, "exact_max_dim")
        self.needs_k = 0 if method == "exact" else k
        # Set before the base class checks k per layer: that check skips exact layers.
        self.k, self.method, self.bound, self.exact_max_dim = k, method, bound, exact_max_dim
        super().__init__(state_or_model, strength, k=k, **kwargs)

    def _exact_layer(self, name: str) -> bool:
        return self.uses_exact(name)

    def uses_exact(self, name: str) -> bool:
        """Whether layer ``name`` is computed with ``svdvals``."""
        if self.method != "auto":
            return self.method == "exact"
        return min(self._state.operator(name).shape) <= self.exact_max_dim

    def _rank_bound(self, name: str) -> int:
        m, n = self._state.operator(name).shape
        spec = self._state.layer(name).spec
        r = min(m, n)
        if isinstance(spec, LowRankSpec) and isinstance(self._state.operator(name), LowRankView):
            r = min(r, spec.a.shape[0])
        return r

    def layer_value(self, name):
        op = self._state.operator(name)
        if self.uses_exact(name):
            return sum(torch.linalg.svdvals(b).sum() for b in op.blocks())
        s = self._state.top_sigmas(name)[: self.k]
        f = self._state.frobenius(name)
        f2 = f.square()
        tail = _safe_sqrt(f2 - s.square().sum(), f2)
        r = self._rank_bound(name)
        k = min(self.k, s.numel())
        mult = 1.0 if self.bound == "lower" else math.sqrt(max(r - k, 0))
        return s.sum() + mult * tail


class TailEnergyPenalty(Penalty):
    """Energy outside the top-k subspace: ``‖W‖_F² − Σ_{j≤k} σ_j² = Σ_{j>k} σ_j²``.

    Its gradient is ``2(W − W_k)``, ``W_k`` the rank-k truncation from the warm
    vectors: it pushes the layer toward rank k without an SVD and leaves the
    head alone.

    Args:
        state_or_model: a shared ``SpectralState`` (tracking ≥ k directions) or a model.
        k: the rank to push toward, ``1 ≤ k ≤ min(m, n)``.
        strength: a float ≥ 0 or a callable of the step.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> float(TailEnergyPenalty(model, k=2)().detach()) > 0
        True
    """

    def __init__(self, state_or_model, k: int = 8, strength=1.0, **kwargs):
        positive_int(k, "k")
        self.needs_k = k
        super().__init__(state_or_model, strength, k=k, **kwargs)
        self.k = k

    def layer_value(self, name):
        s = self._state.top_sigmas(name)[: self.k]
        return self._state.frobenius(name).square() - s.square().sum()


def default_penalties(model_or_state: nn.Module | SpectralState, strength: float = DEFAULT_STRENGTH) -> list[Penalty]:
    """The penalties the benchmarks call "default": ``σ₁²`` on every hidden layer.

    ``SpectralNormPenalty(mode="square")`` on every Linear/Conv except the
    classifier head, at ``strength=1e-2`` (the sum of ``σ₁²`` over the layers is
    multiplied by it). Chosen on the digits MLP 64-256-256-10 with the hidden
    layers factorised to rank 8 (trained from scratch): there it raised PGD
    L∞ (ε = 0.1) robust accuracy at nearly unchanged clean accuracy.

    Args:
        model_or_state: the model (a state is built, owned and stepped by the
            penalty) or a shared ``SpectralState``.
        strength: the σ₁² strength.

    Returns:
        A list of penalties, ready for :func:`robustcompress.optim.wrap`.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> [type(p).__name__ for p in default_penalties(model)]
        ['SpectralNormPenalty']
    """
    return [SpectralNormPenalty(model_or_state, strength=strength, mode="square")]
