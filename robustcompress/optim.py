"""An optimizer wrapper that adds penalty gradients in ``step()``, plus post-step projections.

``wrap(optimizer, model, penalties=[...])`` returns a ``torch.optim.Optimizer``
that shares ``param_groups`` and ``state`` with the optimizer it wraps, so LR
schedulers, ``torch.amp.GradScaler`` and gradient accumulation keep working
with an unchanged loss. Per real step (one ``step()`` call):

1. the shared :class:`~robustcompress.spectral.SpectralState` is stepped once
   (one read of every weight), then every penalty is evaluated;
2. ``∂(Σ penalties)/∂θ`` is added to ``θ.grad`` (``torch.autograd.grad``, so
   no DDP gradient hook fires and nothing is accumulated twice);
3. the wrapped optimizer steps;
4. proximal terms (L1 / group lasso with ``proximal=True``) apply their
   threshold with each parameter's learning rate, then projections run.

``GradScaler`` unscales the gradients before it calls ``step()`` and skips the
call entirely on inf/NaN gradients, so penalties are added unscaled and a
skipped step skips them too (and does not advance the state).

Distributed: under ``DistributedDataParallel`` the task gradients are
all-reduced in ``backward()``; the penalty gradients are computed afterwards
on every rank from identical parameters and an identical warm state. On CPU
the state's update is deterministic, so ranks agree bit for bit; on CUDA
(where reductions need not be bit-reproducible) ``sync_state`` broadcasts the
state's buffers from rank 0 after every state step (the default there).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from robustcompress.spectral import SpectralState
    >>> from robustcompress.penalties import SpectralNormPenalty
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> state = SpectralState(model)
    >>> opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, [SpectralNormPenalty(state, 1e-3)])
    >>> model(torch.randn(4, 8)).sum().backward()
    >>> opt.step()
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ._checks import positive_float
from .layers import LowRankSpec, MatrixSpec
from .penalties import Penalty, PenaltySum, StateTerm, flatten_penalties, unwrap_model
from .spectral import MatrixView, SpectralState
from .spectral.sharded import is_sharded

__all__ = ["wrap", "attach", "PenaltyHooks", "PenalizedOptimizer", "describe_term", "Projection", "SpectralNormClip", "RowL1Cap", "broadcast_state"]


# ====================================================================== projections
def _row_weight(state: SpectralState, name: str) -> nn.Parameter:
    layer = state.layer(name)
    spec = layer.spec.b if isinstance(layer.spec, LowRankSpec) else layer.spec
    w = spec.weight() if isinstance(spec, MatrixSpec) else None
    plain = isinstance(spec, MatrixSpec) and not spec.transpose and spec.rows is None and spec.cols is None
    if not plain or not any(w is p for p in layer.parameters):
        raise ValueError(f"Layer {name!r} ({type(layer.module).__name__}, kind {layer.kind.name!r}) has no stored "
                         "weight whose rows are its operator's rows (a transposed, sliced or parametrized weight); "
                         "projections act on plain and low-rank weights only")
    return w


class Projection(StateTerm):
    """A post-step map applied to selected layers after the optimizer's update.

    Subclasses implement :meth:`project_` (in place, under ``no_grad``).
    Arguments as for :class:`~robustcompress.penalties.StateTerm`.
    """

    def apply(self) -> None:
        """Project every selected layer (on active calls of ``every``)."""
        active, _ = self._tick()
        if not active:
            return
        if self.owns_state:
            self.state.step()
        with torch.no_grad():
            for name in self.names:
                if self.projected_weight(name).requires_grad:  # frozen layers are never moved
                    self.project_(name)

    def projected_weight(self, name: str) -> torch.Tensor:
        """The parameter :meth:`project_` changes for layer ``name``: the stored weight whose rows are the operator's.

        Read from the layer registry's descriptor: a plain matrix view's weight, or ``B`` of a low-rank
        layer ``B·A``. A transposed, sliced or parametrized weight has no such parameter: a clear error.
        """
        return _row_weight(self.state, name)

    def project_(self, name: str) -> None:
        raise NotImplementedError


class SpectralNormClip(Projection):
    """Clip the top singular value of each layer to ``target`` along its warm direction.

    With ``(u, v)`` the state's top pair and ``σ̂ = uᵀ W v`` at the updated
    weights, ``W ← W − max(0, σ̂ − τ)·u vᵀ`` (for a BN-folded layer the change
    is applied to the raw weight as ``diag(1/s)``·…), so afterwards ``uᵀ W v = min(σ̂, τ)``.
    With converged vectors this is the exact projection onto ``σ₁ ≤ τ`` when
    only σ₁ exceeds it. Dense, ungrouped Linear/Conv layers in the matrix view.

    Args:
        state_or_model: a shared ``SpectralState`` or a model.
        target: ``τ > 0``.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> clip = SpectralNormClip(model, target=0.1)
        >>> clip.apply()
    """

    def __init__(self, state_or_model, target: float, **kwargs):
        super().__init__(state_or_model, **kwargs)
        self.target = positive_float(target, "target")
        for name in self.names:
            op = self._state.operator(name)
            spec = self._state.layer(name).spec
            if not (isinstance(op, MatrixView) and isinstance(spec, MatrixSpec) and op.groups == 1):
                raise ValueError(f"SpectralNormClip needs ungrouped dense Linear/Conv layers in the matrix view; "
                                 f"layer {name!r} ({type(self._state.module(name)).__name__}) is not")
            _row_weight(self._state, name)

    def project_(self, name):
        op = self._state.operator(name)
        u, v = self._state.vectors(name)
        u, v = u[:, :1], v[:, :1]
        sig = (u * op.matvec(v)).sum()
        excess = (sig - self.target).clamp_min(0)
        w = _row_weight(self._state, name)
        bn = self._state.folded_bn(name)
        if bn is not None:
            s = op.row_scale().to(u.dtype)
            if bool((s == 0).any()):
                raise ValueError(f"Layer {name!r}: a folded BatchNorm scale is 0, the clip cannot be undone per row")
            u = u / s[:, None]
        delta = excess * (u @ v.T)
        w.sub_(delta.reshape(w.shape).to(w.dtype))


class RowL1Cap(Projection):
    """Cap every row's ℓ1 norm (the per-neuron L∞ sensitivity) at ``max_l1`` by rescaling the row.

    ``w_i ← w_i · min(1, c / ‖s_i w_i‖_1)`` on the (BN-folded) rows; for a
    low-rank layer ``B·A`` the rows of ``B`` are scaled (row i of ``BA`` is ``B_i A``).

    Args:
        state_or_model: a shared ``SpectralState`` or a model.
        max_l1: ``c > 0``.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> RowL1Cap(model, max_l1=0.5).apply()
        >>> bool(model[0].weight.abs().sum(1).max() <= 0.5 + 1e-6)
        True
    """

    needs_k = 0

    def __init__(self, state_or_model, max_l1: float, **kwargs):
        super().__init__(state_or_model, **kwargs)
        self.max_l1 = positive_float(max_l1, "max_l1")
        for name in self.names:
            _row_weight(self._state, name)  # a clear error now rather than at the first step

    def project_(self, name):
        r = self._rows(name).abs().sum(1)
        factor = torch.clamp(self.max_l1 / r.clamp_min(torch.finfo(r.dtype).tiny), max=1.0)
        w = self.projected_weight(name)
        w.mul_(factor.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))


# ====================================================================== distributed
def broadcast_state(state: SpectralState, src: int = 0, group: Any = None) -> None:
    """Broadcast every buffer of a ``SpectralState`` from rank ``src`` (no-op without torch.distributed).

    Example:
        >>> broadcast_state(SpectralState(nn.Linear(3, 3)))  # not initialised: nothing happens
    """
    if not isinstance(state, SpectralState):
        raise TypeError(f"Expected state to be a SpectralState, but got {type(state).__name__}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    for buf in state.buffers():
        if is_sharded(buf):
            # The sharded block of an FSDP2 layer differs by rank by design; its replicated
            # block and σ come out of one all-reduce, identical on every rank already.
            continue
        dist.broadcast(buf, src=src, group=group)


# ====================================================================== the engine
# Optimizers that already carry penalties (through wrap() or attach()): a second
# set would add every penalty gradient twice. Both sides are weak: a wrapper
# that is dropped frees its optimizer for another wrap().
_CARRIERS: "weakref.WeakKeyDictionary[Optimizer, weakref.ref]" = weakref.WeakKeyDictionary()


def _carries_penalties(optimizer: Optimizer) -> bool:
    ref = _CARRIERS.get(optimizer)
    return ref is not None and ref() is not None


def _module_state_compatible(module: nn.Module, sd: Any, what: str) -> None:
    """Check keys and shapes before loading, so a bad checkpoint changes nothing."""
    if not isinstance(sd, dict):
        raise ValueError(f"Checkpoint entry for {what} is not a state dict")
    own = module.state_dict()
    if set(own) != set(sd):
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        raise ValueError(f"Checkpoint does not match {what}: missing keys {missing}, unexpected keys {extra}")
    for key, val in own.items():
        if isinstance(val, torch.Tensor) and tuple(val.shape) != tuple(sd[key].shape):
            raise ValueError(f"Checkpoint does not match {what}: {key} has shape {tuple(sd[key].shape)}, "
                             f"expected {tuple(val.shape)}")


_CONFIG_FIELDS = ("every", "proximal", "mode", "target", "k", "temperature", "method", "bound")


def describe_term(term: StateTerm) -> dict[str, Any]:
    """What a checkpoint records of a penalty or projection to check that it loads into the same kind of term.

    ``{"type": class name, "layers": selected layer names, ...}`` plus the
    configuration fields the term has among ``every``, ``proximal``, ``mode``,
    ``target``, ``k``, ``temperature``, ``method``, ``bound`` (plain Python values).

    Example:
        >>> from robustcompress.penalties import SpectralNormPenalty
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> d = describe_term(SpectralNormPenalty(model, 1e-3))
        >>> d["type"], d["layers"], d["mode"]
        ('SpectralNormPenalty', ['0'], 'square')
    """
    if not isinstance(term, StateTerm):
        raise TypeError(f"Expected a penalty or projection, but got {type(term).__name__}")
    out: dict[str, Any] = {"type": type(term).__qualname__, "layers": list(term.names)}
    for field in _CONFIG_FIELDS:
        val = getattr(term, field, None)
        if isinstance(val, (bool, int, float, str)):
            out[field] = val
    return out


class PenaltyHooks:
    """Penalty gradients, proximal steps and projections applied around an optimizer's ``step()``.

    The engine behind :func:`wrap`, :func:`attach` and the Lightning and Hugging
    Face callbacks. Per real step (one ``step()`` that the optimizer runs):

    1. :meth:`begin_step`: the shared state is stepped once, every term's counter advances;
    2. :meth:`add_gradients`: ``θ.grad += ∇_θ Σ strength·term`` on trainable parameters
       (after the task gradient is final, i.e. after any clipping: penalty
       gradients are never clipped);
    3. the optimizer updates the parameters;
    4. :meth:`finish_step`: proximal thresholds with each parameter's learning rate, then projections.

    Frozen parameters (``requires_grad=False``) are never given a gradient and
    never changed by a proximal step or a projection.

    Args:
        model: the model the terms were built for (DDP / ``torch.compile`` wrappers accepted).
        penalties: penalties (or sums of them).
        projections: post-step :class:`Projection` objects.
        state: the shared ``SpectralState`` (found from the penalties when omitted).
        sync_state: broadcast the state's buffers from rank 0 after each state
            step under torch.distributed (None: on CUDA only).

    Example:
        >>> from robustcompress.penalties import default_penalties
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> hooks = PenaltyHooks(model, default_penalties(model)).attach(opt)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step()
        >>> hooks.steps
        1
        >>> hooks.detach()
    """

    def __init__(self, model: nn.Module, penalties: Sequence[Any] = (), projections: Sequence[Projection] = (),
                 state: SpectralState | None = None, sync_state: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
        if isinstance(penalties, (Penalty, PenaltySum)):
            penalties = [penalties]
        if isinstance(projections, Projection):
            projections = [projections]
        terms = flatten_penalties(penalties)
        projs = list(projections)
        for p in projs:
            if not isinstance(p, Projection):
                raise TypeError(f"Expected projections to be Projection objects, but got {type(p).__name__}")
        if state is not None and not isinstance(state, SpectralState):
            raise TypeError(f"Expected state to be a SpectralState or None, but got {type(state).__name__}")
        if sync_state is not None and not isinstance(sync_state, bool):
            raise TypeError(f"Expected sync_state to be a bool or None, but got sync_state={sync_state!r}")
        base = unwrap_model(model)
        # The one shared state: the one given, or the one the non-owning terms read.
        shared = {id(t.state): t.state for t in terms + projs if not t.owns_state}
        if state is not None:
            shared.setdefault(id(state), state)
        if len(shared) > 1:
            raise ValueError(f"The penalties read {len(shared)} different shared SpectralStates; build every "
                             "term on one state (one read of each weight per step)")
        self._shared_state: SpectralState | None = next(iter(shared.values()), None)
        if state is not None and self._shared_state is not state:
            raise ValueError("state= differs from the state the penalties read")
        if self._shared_state is not None and self._shared_state.model is not base:
            raise ValueError("The SpectralState was built for a different model than the one given; "
                             "build it from this model")
        for t in terms + projs:
            t.check_model(base)
        self.model = base
        self.penalties = terms
        self.projections = projs
        self.sync_state = sync_state
        self.steps = 0
        self.last_penalty: torch.Tensor | None = None
        self.optimizer: Optimizer | None = None
        self._handles: list[Any] = []
        self._active: list[tuple[Penalty, float]] | None = None
        self._skipped = False

    @property
    def spectral_state(self) -> SpectralState | None:
        """The shared state stepped once per real step (None if every term owns its own)."""
        return self._shared_state

    @classmethod
    def from_terms(cls, penalties: Sequence[Any] = (), projections: Sequence[Projection] = (),
                   state: SpectralState | None = None, sync_state: bool | None = None) -> "PenaltyHooks":
        """Build from the terms alone: the model is the one their state was built for.

        Raises:
            ValueError: no penalty, projection or state was given.

        Example:
            >>> from robustcompress.penalties import default_penalties
            >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
            >>> PenaltyHooks.from_terms(default_penalties(model)).model is model
            True
        """
        if isinstance(penalties, (Penalty, PenaltySum)):
            penalties = [penalties]
        if isinstance(projections, Projection):
            projections = [projections]
        items = flatten_penalties(penalties) + list(projections)
        if state is None and not items:
            raise ValueError("Expected at least one penalty or projection (or state=), but got none")
        model = state.model if isinstance(state, SpectralState) else getattr(items[0], "state", None)
        model = model.model if isinstance(model, SpectralState) else model
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected penalties/projections built on a SpectralState, but got {type(items[0]).__name__}")
        return cls(model, penalties, projections, state, sync_state)

    # -------------------------------------------------------------- optimizer
    def check_optimizer(self, optimizer: Optimizer) -> None:
        """Raise ValueError if a term acts on trainable parameters the optimizer does not update."""
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for t in self.penalties:
            outside = [n for n in t.names if any(p.requires_grad and id(p) not in in_opt
                                                 for p in t.state.module(n).parameters(recurse=False))]
            if outside:
                raise ValueError(f"{type(t).__name__} acts on layers {outside} whose parameters the optimizer does "
                                 "not update; add them to the optimizer or leave them out with layers=...")

    def attach(self, optimizer: Optimizer) -> "PenaltyHooks":
        """Register on ``optimizer`` a step pre-hook (penalty gradients) and post-hook (prox, projections).

        ``step()`` without a closure gets the penalty gradients before its update;
        ``step(closure)`` gets a closure that adds them after every evaluation
        (Lightning runs backward and gradient clipping inside that closure), so
        either way they come after clipping. For a fused optimizer under
        ``GradScaler`` (which unscales inside ``step`` by the ``grad_scale`` the
        scaler sets on it), the penalty gradients are multiplied by that scale first.

        Returns:
            ``self``, for chaining.

        Raises:
            ValueError: the optimizer already carries penalties (through :func:`wrap`
                or another ``attach``), or misses parameters the terms act on.
        """
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Expected optimizer to be a torch.optim.Optimizer, but got {type(optimizer).__name__}")
        if self.optimizer is not None:
            raise ValueError("These PenaltyHooks are already attached to an optimizer; detach() them first")
        own_wrapper = isinstance(optimizer, PenalizedOptimizer) and optimizer.__dict__.get("_hooks") is self
        if (isinstance(optimizer, PenalizedOptimizer) and not own_wrapper) or _carries_penalties(optimizer):
            raise ValueError("This optimizer already adds penalties (it was built by wrap(), or penalties were "
                             "attached to it); use either wrap() or one callback/attach(), never both")
        self.check_optimizer(optimizer)
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook),
                         optimizer.register_step_post_hook(self._post_hook)]
        self.optimizer = optimizer
        _CARRIERS[optimizer] = weakref.ref(self)
        return self

    def detach(self) -> None:
        """Remove the hooks from the optimizer (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.optimizer is not None:
            _CARRIERS.pop(self.optimizer, None)
        self.optimizer = None

    def _pre_hook(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._skipped = False
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            found_inf = getattr(optimizer, "found_inf", None)
            if isinstance(found_inf, torch.Tensor) and bool(found_inf.any()):
                # The fused step skips its update (inf/NaN gradients): so do the penalties,
                # as GradScaler skips step() altogether for other optimizers.
                self._skipped = True
                return None
        # A fused optimizer under GradScaler unscales inside step(): GradScaler hands
        # it the scale as the public attribute ``grad_scale`` (None once unscaled).
        scale = getattr(optimizer, "grad_scale", None) if getattr(optimizer, "_step_supports_amp_scaling",
                                                                  False) else None
        if "grad_scaler" in kwargs:
            raise RuntimeError("This optimizer unscales through a grad_scaler= step argument, which penalties "
                               "cannot follow; use a non-fused optimizer or one reading grad_scale")
        self._active = self.begin_step()
        # torch passes the bound method's arguments: args[0] is the optimizer itself.
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            self.add_gradients(self._active, scale)
            return None
        active = self._active

        def closure_with_penalties():
            with torch.enable_grad():
                value = closure()
            self.add_gradients(active, scale)
            # The loss the optimizer sees matches the gradient it gets (LBFGS line search).
            if isinstance(value, torch.Tensor) and self.last_penalty is not None:
                value = value + self.last_penalty.to(value.device, value.dtype)
            return value

        if len(args) > 1:
            return (args[0], closure_with_penalties, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_with_penalties}

    def _post_hook(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        if self._skipped:
            self._skipped = False
            return
        self.finish_step()

    # -------------------------------------------------------------- one step
    def begin_step(self) -> list[tuple[Penalty, float]]:
        """Step the shared state and advance every gradient term's counter; return the active ``(term, strength)``.

        A term that fails here rolls every counter back (through the terms'
        public ``get_extra_state`` / ``set_extra_state``, which hold the counter).
        """
        gradient_terms = [p for p in self.penalties if not p.proximal]
        if self._shared_state is not None:
            self._shared_state.step()
            self._sync(self._shared_state)
        saved = [t.get_extra_state() for t in gradient_terms]
        try:
            active = []
            for term in gradient_terms:
                strength = term.begin_step()
                if strength is not None:
                    active.append((term, strength))
        except Exception:
            for t, extra in zip(gradient_terms, saved):
                t.set_extra_state(extra)
            raise
        return active

    def add_gradients(self, active: list[tuple[Penalty, float]], scale: torch.Tensor | float | None = None) -> None:
        """``θ.grad += scale · ∇_θ Σ strength·term`` for the active terms, on trainable parameters only.

        Every term is evaluated before any gradient is touched: a failing term
        (NaN weights, say) leaves the gradients as they were.

        Args:
            active: what :meth:`begin_step` returned.
            scale: a loss scale the gradients carry at this point (None: 1).
        """
        total, logged, updates = None, [], []
        if active:
            params = self._trainable()
            dev = params[0].device if params else torch.device("cpu")
            with torch.enable_grad(), torch.autocast(device_type=dev.type, enabled=False):
                for term, strength in active:
                    if term.owns_state:
                        self._sync(term.state)
                    closed = term.closed_form(strength)
                    if closed is not None:
                        value, ups = closed
                        updates.extend(ups)
                    else:
                        value = strength * term.value_now()
                        total = value if total is None else total + value.to(total.device)
                    term.last_value = value.detach()
                    logged.append(term.last_value)
            if total is not None and total.requires_grad and params:
                self._add_grads(total, params, scale)
            self._add_rank_one([u for u in updates if u[0].requires_grad], scale)
        self.last_penalty = torch.stack([v.float().to(logged[0].device) for v in logged]).sum() if logged else None

    @torch.no_grad()
    def finish_step(self) -> None:
        """Proximal thresholds (each parameter's learning rate), then projections; counts the step."""
        proximal = [p for p in self.penalties if p.proximal]
        if proximal:
            lrs = self._param_lr()
            for term in proximal:
                s = term.begin_step()
                if s is None:
                    continue
                for name in term.names:
                    w = term.state.module(name).weight
                    lr = lrs.get(id(w))
                    if lr is None or not w.requires_grad:
                        continue
                    term.prox_(name, lr * s * term.layer_weights[name])
                term.last_value = (s * term.value_now()).detach()
        for proj in self.projections:
            proj.apply()
        self.steps += 1

    # -------------------------------------------------------------- helpers
    def _trainable(self) -> list[nn.Parameter]:
        if self.optimizer is not None:
            groups = self.optimizer.param_groups
            return [p for g in groups for p in g["params"] if p.requires_grad]
        return [p for p in self.model.parameters() if p.requires_grad]

    def _param_lr(self) -> dict[int, float]:
        if self.optimizer is None:
            return {}
        return {id(p): float(g["lr"]) for g in self.optimizer.param_groups for p in g["params"]}

    def _sync(self, state: SpectralState) -> None:
        do = self.sync_state
        if do is None:
            do = state.steps.device.type == "cuda"
        if do:
            broadcast_state(state)

    @torch.no_grad()
    def _add_grads(self, total: torch.Tensor, params: list[nn.Parameter], scale: Any) -> None:
        with torch.enable_grad():
            grads = torch.autograd.grad(total, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                continue
            g = g.to(p.dtype)
            if scale is not None:
                g = g * scale
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    @torch.no_grad()
    def _add_rank_one(self, updates: list, scale: Any) -> None:
        for p, u, v, alpha in updates:
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            # alpha stays a device tensor folded into u: no host synchronisation.
            u = u * alpha
            if scale is not None:
                u = u * scale
            if p.grad.is_contiguous():
                g = p.grad.view(p.shape[0], -1)
                g.addr_(u.to(g.dtype), v.to(g.dtype))
            else:
                p.grad.add_(torch.outer(u, v).reshape(p.shape).to(p.grad.dtype))

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The shared state (warm vectors), every term's state and description, and the step count."""
        return {
            "spectral_state": None if self._shared_state is None else self._shared_state.state_dict(),
            "penalties": [p.state_dict() for p in self.penalties],
            "projections": [p.state_dict() for p in self.projections],
            "terms": [describe_term(t) for t in self.penalties + self.projections],
            "steps": self.steps,
        }

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ValueError, changing nothing, unless :meth:`load_state_dict` can load ``state_dict``."""
        keys = {"spectral_state", "penalties", "projections", "steps"}
        if not isinstance(state_dict, dict) or not keys <= set(state_dict):
            raise ValueError(f"Expected a penalty state saved by state_dict() (keys {sorted(keys | {'terms'})}), "
                             f"but got {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
        if (state_dict["spectral_state"] is None) != (self._shared_state is None):
            raise ValueError("The checkpoint and these penalties disagree on whether a shared SpectralState exists")
        if len(state_dict["penalties"]) != len(self.penalties) or len(state_dict["projections"]) != len(self.projections):
            raise ValueError(f"The checkpoint holds {len(state_dict['penalties'])} penalties and "
                             f"{len(state_dict['projections'])} projections; these have {len(self.penalties)} "
                             f"and {len(self.projections)}")
        terms = self.penalties + self.projections
        if "terms" in state_dict:
            for i, (t, saved) in enumerate(zip(terms, state_dict["terms"])):
                own = describe_term(t)
                if own != saved:
                    diff = sorted(k for k in set(own) | set(saved) if own.get(k) != saved.get(k))
                    raise ValueError(f"The checkpoint's term {i} is {saved.get('type')} {saved}; this one is "
                                     f"{own['type']} {own} (they differ in {diff})")
        if self._shared_state is not None:
            _module_state_compatible(self._shared_state, state_dict["spectral_state"], "the shared SpectralState")
        for i, (t, sd) in enumerate(zip(terms, state_dict["penalties"] + state_dict["projections"])):
            _module_state_compatible(t, sd, f"term {i} ({type(t).__name__})")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; everything is checked before anything is loaded.

        A state saved before term descriptions were recorded (no ``terms`` key)
        loads with a warning that the penalty types could not be checked.
        """
        self.check_state_dict(state_dict)
        if "terms" not in state_dict:
            warnings.warn("The checkpoint records no penalty types (saved by an older version): the terms were "
                          "matched by position and state shape only", UserWarning, stacklevel=2)
        if self._shared_state is not None:
            self._shared_state.load_state_dict(state_dict["spectral_state"])
        for t, sd in zip(self.penalties + self.projections, state_dict["penalties"] + state_dict["projections"]):
            t.load_state_dict(sd)
        self.steps = int(state_dict["steps"])


def attach(optimizer: Optimizer, model: nn.Module, penalties: Sequence[Any] = (),
           projections: Sequence[Projection] = (), state: SpectralState | None = None,
           sync_state: bool | None = None) -> PenaltyHooks:
    """Add penalties to an optimizer in place, through its public step hooks.

    The alternative to :func:`wrap` when the optimizer object must stay the same
    (a training framework holds it). ``step()`` then does what the wrapper's
    does; ``hooks.detach()`` undoes it. Save ``hooks.state_dict()`` beside the
    optimizer's.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        model, penalties, projections, state, sync_state: as for :func:`wrap`.

    Returns:
        The attached :class:`PenaltyHooks`.

    Example:
        >>> from robustcompress.penalties import default_penalties
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> hooks = attach(opt, model, default_penalties(model))
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step()
        >>> hooks.steps
        1
    """
    return PenaltyHooks(model, penalties, projections, state, sync_state).attach(optimizer)


# ====================================================================== the wrapper
class PenalizedOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` that adds penalty gradients and projections to another one.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's
    own objects (as in Lookahead-style wrappers), so schedulers and
    ``GradScaler`` see one optimizer. The penalties run in this optimizer's
    step hooks (:class:`PenaltyHooks`). Build it with :func:`wrap`.
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module, penalties: Sequence[Any] = (),
                 projections: Sequence[Projection] = (), state: SpectralState | None = None,
                 sync_state: bool | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Expected optimizer to be a torch.optim.Optimizer, but got {type(optimizer).__name__}")
        if isinstance(optimizer, PenalizedOptimizer):
            raise ValueError("optimizer is already wrapped; pass every penalty to one wrap() call")
        if _carries_penalties(optimizer):
            raise ValueError("Penalties are already attached to this optimizer (a Lightning or Hugging Face "
                             "callback, or attach()); use either wrap() or the callback, never both")
        hooks = PenaltyHooks(model, penalties, projections, state, sync_state)
        hooks.check_optimizer(optimizer)
        # Optimizer.__init__ is run for its public set-up (hook registries, the
        # step-hook patch). The state, param_groups and defaults it builds land in
        # throw-away slots (see the properties: they forward only once
        # self.optimizer is set), so the wrapped optimizer's objects stay untouched.
        params = [p for g in optimizer.param_groups for p in g["params"]]
        Optimizer.__init__(self, params or [torch.zeros(0)], dict(optimizer.defaults))
        for slot in ("_init_state", "_init_param_groups", "_init_defaults"):
            self.__dict__.pop(slot, None)
        self.optimizer = optimizer
        self._hooks = hooks
        hooks.attach(self)
        _CARRIERS[optimizer] = weakref.ref(self)

    # -------------------------------------------------------------- Optimizer interface
    def _inner(self) -> Optimizer | None:
        return self.__dict__.get("optimizer")

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        inner = self._inner()
        return self.__dict__["_init_param_groups"] if inner is None else inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        inner = self._inner()
        if inner is None:
            self.__dict__["_init_param_groups"] = value
        else:
            inner.param_groups = value

    @property
    def state(self) -> dict:
        inner = self._inner()
        return self.__dict__["_init_state"] if inner is None else inner.state

    @state.setter
    def state(self, value: dict) -> None:
        inner = self._inner()
        if inner is None:
            self.__dict__["_init_state"] = value
        else:
            inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        inner = self._inner()
        return self.__dict__["_init_defaults"] if inner is None else inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        inner = self._inner()
        if inner is None:
            self.__dict__["_init_defaults"] = value
        else:
            inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        inner = self._inner()
        if inner is None:
            super().add_param_group(param_group)
        else:
            inner.add_param_group(param_group)

    @property
    def hooks(self) -> PenaltyHooks:
        """The :class:`PenaltyHooks` this wrapper runs in its step hooks."""
        return self._hooks

    @property
    def model(self) -> nn.Module:
        return self._hooks.model

    @property
    def penalties(self) -> list[Penalty]:
        return self._hooks.penalties

    @property
    def projections(self) -> list[Projection]:
        return self._hooks.projections

    @property
    def spectral_state(self) -> SpectralState | None:
        """The shared state this wrapper steps once per real step (None if every term owns its own)."""
        return self._hooks.spectral_state

    @property
    def sync_state(self) -> bool | None:
        return self._hooks.sync_state

    @property
    def steps(self) -> int:
        """Real steps taken (``step()`` calls the wrapped optimizer completed)."""
        return self._hooks.steps

    @property
    def last_penalty(self) -> torch.Tensor | None:
        """The summed penalty value of the last step (detached; None if no term was active)."""
        return self._hooks.last_penalty

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (f"PenalizedOptimizer({self.optimizer!r}, penalties={[type(p).__name__ for p in self.penalties]}, "
                f"projections={[type(p).__name__ for p in self.projections]})")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Add penalty gradients, step the wrapped optimizer, then prox and project.

        The penalty gradients are added by this optimizer's step pre-hook, i.e.
        after the task gradients are final: a ``clip_grad_norm_`` before
        ``step()`` clips the task gradient only, never the penalty gradient.

        Args:
            closure: re-evaluates the task loss and calls ``backward()`` (as for any
                optimizer). The wrapped optimizer calls it (LBFGS several times); the
                penalty gradients are added after every evaluation, with the state
                stepped and the term counters advanced once per real step.

        Returns:
            The closure's loss plus the penalty, if a closure was given.
        """
        if closure is None:
            return self.optimizer.step()
        return self.optimizer.step(closure)

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, the shared state (warm vectors), every term's state and type."""
        return {"optimizer": self.optimizer.state_dict(), **self._hooks.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; everything is checked before anything is loaded.

        A plain optimizer checkpoint (keys ``state`` and ``param_groups``, saved
        before the penalties were added) is loaded into the wrapped optimizer;
        the warm vectors and term counters then start afresh (with a warning).
        A checkpoint whose penalties differ in type, layers or configuration
        from this wrapper's is refused with a ValueError naming both.
        """
        if isinstance(state_dict, dict) and set(state_dict) == {"state", "param_groups"}:
            self.optimizer.load_state_dict(state_dict)
            warnings.warn("Loaded a plain optimizer state dict: the wrapped optimizer resumes, the spectral "
                          "state and penalty counters start afresh", UserWarning, stacklevel=2)
            return
        if not isinstance(state_dict, dict) or "optimizer" not in state_dict:
            raise ValueError("Expected a state dict saved by PenalizedOptimizer.state_dict() (keys optimizer, "
                             "spectral_state, penalties, projections, terms, steps)")
        rest = {k: v for k, v in state_dict.items() if k != "optimizer"}
        self._hooks.check_state_dict(rest)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._hooks.load_state_dict(rest)


def wrap(optimizer: Optimizer, model: nn.Module, penalties: Sequence[Any] = (),
         projections: Sequence[Projection] = (), state: SpectralState | None = None,
         sync_state: bool | None = None) -> PenalizedOptimizer:
    """Wrap an optimizer so each ``step()`` adds the penalties' gradients (and applies projections).

    ``step()`` does, once per real step: ``state.step()`` on the shared state →
    ``θ.grad += ∇_θ Σ_p p()`` → ``optimizer.step()`` → proximal thresholds →
    projections. The loss is unchanged; under gradient accumulation the
    penalty enters once per ``step()``, not once per micro-batch.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        model: the model the terms were built for (DDP / ``torch.compile`` wrappers accepted).
        penalties: penalties (or sums of them); proximal ones are applied as prox steps.
        projections: post-step :class:`Projection` objects (``SpectralNormClip``, ``RowL1Cap``).
        state: the shared ``SpectralState`` (found from the penalties when omitted).
        sync_state: broadcast state buffers from rank 0 after each state step
            under torch.distributed (None: on CUDA only; the CPU path is deterministic).

    Returns:
        A :class:`PenalizedOptimizer` (a ``torch.optim.Optimizer``).

    Raises:
        ValueError: the terms were built for another model, read different
            shared states, or act on parameters the optimizer does not update.

    Example:
        >>> from robustcompress.penalties import default_penalties
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, default_penalties(model))
        >>> isinstance(opt, torch.optim.Optimizer)
        True
    """
    return PenalizedOptimizer(optimizer, model, penalties, projections, state, sync_state)
