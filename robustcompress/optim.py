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
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ._checks import positive_float
from .layers import LowRankConv2d, LowRankLinear
from .penalties import Penalty, PenaltySum, StateTerm, flatten_penalties, unwrap_model
from .spectral import MatrixView, SpectralState
from .spectral.sharded import is_sharded

__all__ = ["wrap", "PenalizedOptimizer", "Projection", "SpectralNormClip", "RowL1Cap", "broadcast_state"]


# ====================================================================== projections
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
        if self._owns_state:
            self._state.step()
        with torch.no_grad():
            for name in self.names:
                self.project_(name)

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
            mod = self._state.module(name)
            if not (isinstance(op, MatrixView) and op.groups == 1 and isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))):
                raise ValueError(f"SpectralNormClip needs ungrouped dense Linear/Conv layers in the matrix view; "
                                 f"layer {name!r} ({type(mod).__name__}) is not")

    def project_(self, name):
        op = self._state.operator(name)
        u, v = self._state.vectors(name)
        u, v = u[:, :1], v[:, :1]
        sig = (u * op.matvec(v)).sum()
        excess = (sig - self.target).clamp_min(0)
        w = self._state.module(name).weight
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

    def project_(self, name):
        r = self._rows(name).abs().sum(1)
        factor = torch.clamp(self.max_l1 / r.clamp_min(torch.finfo(r.dtype).tiny), max=1.0)
        mod = self._state.module(name)
        w = mod.weight_b if isinstance(mod, (LowRankLinear, LowRankConv2d)) else mod.weight
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


# ====================================================================== the wrapper
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


class PenalizedOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` that adds penalty gradients and projections to another one.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's
    own objects (as in Lookahead-style wrappers), so schedulers and
    ``GradScaler`` see one optimizer. Build it with :func:`wrap`.
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module, penalties: Sequence[Any] = (),
                 projections: Sequence[Projection] = (), state: SpectralState | None = None,
                 sync_state: bool | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Expected optimizer to be a torch.optim.Optimizer, but got {type(optimizer).__name__}")
        if isinstance(optimizer, PenalizedOptimizer):
            raise ValueError("optimizer is already wrapped; pass every penalty to one wrap() call")
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
            raise ValueError("The SpectralState was built for a different model than the one given to wrap(); "
                             "build it from this model")
        for t in terms + projs:
            t.check_model(base)
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for t in terms:
            outside = [n for n in t.names if any(p.requires_grad and id(p) not in in_opt
                                                 for p in t.state.module(n).parameters(recurse=False))]
            if outside:
                raise ValueError(f"{type(t).__name__} acts on layers {outside} whose parameters the optimizer does "
                                 "not update; add them to the optimizer or leave them out with layers=...")

        # param_groups, state and defaults are properties reading the wrapped
        # optimizer, so schedulers and GradScaler see the live objects, also after
        # load_state_dict() (which replaces them on the inner optimizer).
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.model = base
        self.penalties = terms
        self.projections = projs
        self.sync_state = sync_state
        self.steps = 0
        self.last_penalty: torch.Tensor | None = None

    # -------------------------------------------------------------- Optimizer interface
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> dict:
        return self.optimizer.state

    @state.setter
    def state(self, value: dict) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def spectral_state(self) -> SpectralState | None:
        """The shared state this wrapper steps once per real step (None if every term owns its own)."""
        return self._shared_state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (f"PenalizedOptimizer({self.optimizer!r}, penalties={[type(p).__name__ for p in self.penalties]}, "
                f"projections={[type(p).__name__ for p in self.projections]})")

    def _sync(self, state: SpectralState) -> None:
        do = self.sync_state
        if do is None:
            do = state.steps.device.type == "cuda"
        if do:
            broadcast_state(state)

    def _param_lr(self) -> dict[int, float]:
        return {id(p): float(g["lr"]) for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def _add_grads(self, total: torch.Tensor, params: list[nn.Parameter]) -> None:
        with torch.enable_grad():
            grads = torch.autograd.grad(total, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                continue
            g = g.to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    @torch.no_grad()
    def _add_rank_one(self, updates: list) -> None:
        for p, u, v, alpha in updates:
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            # alpha stays a device tensor folded into u: no host synchronisation.
            u = u * alpha
            if p.grad.is_contiguous():
                g = p.grad.view(p.shape[0], -1)
                g.addr_(u.to(g.dtype), v.to(g.dtype))
            else:
                p.grad.add_(torch.outer(u, v).reshape(p.shape).to(p.grad.dtype))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Add penalty gradients, step the wrapped optimizer, then prox and project.

        Args:
            closure: re-evaluates the task loss and calls ``backward()`` (as for any
                optimizer). The wrapped optimizer calls it (LBFGS several times); the
                penalty gradients are added after every evaluation, with the state
                stepped and the term counters advanced once per real step.

        Returns:
            The closure's loss plus the penalty, if a closure was given.
        """
        gradient_terms = [p for p in self.penalties if not p.proximal]
        if self._shared_state is not None:
            self._shared_state.step()
            self._sync(self._shared_state)
        # Each term's counter advances once per real step, also when a closure
        # is evaluated several times (LBFGS); a failing term rolls them all back.
        calls = {id(t): t._calls for t in gradient_terms}
        try:
            active = []
            for term in gradient_terms:
                strength = term.begin_step()
                if strength is not None:
                    active.append((term, strength))
        except Exception:
            for t in gradient_terms:
                t._calls = calls[id(t)]
            raise
        if closure is None:
            self._add_penalty_grads(active)
            self.optimizer.step()
            loss = None
        else:
            def closure_with_penalties():
                with torch.enable_grad():
                    value = closure()
                self._add_penalty_grads(active)
                # The loss the optimizer sees matches the gradient it gets (LBFGS line search).
                if isinstance(value, torch.Tensor) and self.last_penalty is not None:
                    value = value + self.last_penalty.to(value.device, value.dtype)
                return value

            loss = self.optimizer.step(closure_with_penalties)
        self._post_step()
        self.steps += 1
        return loss

    def _add_penalty_grads(self, active: list[tuple[Penalty, float]]) -> None:
        """``θ.grad += ∇_θ Σ strength·term`` for the active gradient terms.

        Every term is evaluated before any gradient is touched: a failing term
        (NaN weights, say) leaves the gradients as they were.
        """
        total, logged, updates = None, [], []
        if active:
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
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
            if total is not None and total.requires_grad:
                self._add_grads(total, params)
            self._add_rank_one(updates)
        self.last_penalty = torch.stack([v.float().to(logged[0].device) for v in logged]).sum() if logged else None

    @torch.no_grad()
    def _post_step(self) -> None:
        proximal = [p for p in self.penalties if p.proximal]
        if proximal:
            lrs = self._param_lr()
            for term in proximal:
                active, step = term._tick()
                if not active:
                    continue
                s = term.strength_at(step)
                for name in term.names:
                    w = term.state.module(name).weight
                    lr = lrs.get(id(w))
                    if lr is None or s == 0:
                        continue
                    term.prox_(name, lr * s * term.layer_weights[name])
                term.last_value = (s * term.value_now()).detach()
        for proj in self.projections:
            proj.apply()

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, the shared state (warm vectors) and every term's state."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "spectral_state": None if self._shared_state is None else self._shared_state.state_dict(),
            "penalties": [p.state_dict() for p in self.penalties],
            "projections": [p.state_dict() for p in self.projections],
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; everything is checked before anything is loaded.

        A plain optimizer checkpoint (keys ``state`` and ``param_groups``, saved
        before the penalties were added) is loaded into the wrapped optimizer;
        the warm vectors and term counters then start afresh (with a warning).
        """
        if isinstance(state_dict, dict) and set(state_dict) == {"state", "param_groups"}:
            self.optimizer.load_state_dict(state_dict)
            warnings.warn("Loaded a plain optimizer state dict: the wrapped optimizer resumes, the spectral "
                          "state and penalty counters start afresh", UserWarning, stacklevel=2)
            return
        if not isinstance(state_dict, dict) or not {"optimizer", "spectral_state", "penalties", "projections",
                                                      "steps"} <= set(state_dict):
            raise ValueError("Expected a state dict saved by PenalizedOptimizer.state_dict() (keys optimizer, "
                             "spectral_state, penalties, projections, steps)")
        if (state_dict["spectral_state"] is None) != (self._shared_state is None):
            raise ValueError("The checkpoint and this wrapper disagree on whether a shared SpectralState exists")
        if len(state_dict["penalties"]) != len(self.penalties) or len(state_dict["projections"]) != len(self.projections):
            raise ValueError(f"The checkpoint holds {len(state_dict['penalties'])} penalties and "
                             f"{len(state_dict['projections'])} projections; this wrapper has {len(self.penalties)} "
                             f"and {len(self.projections)}")
        if self._shared_state is not None:
            _module_state_compatible(self._shared_state, state_dict["spectral_state"], "the shared SpectralState")
        for i, (t, sd) in enumerate(zip(self.penalties + self.projections,
                                        state_dict["penalties"] + state_dict["projections"])):
            _module_state_compatible(t, sd, f"term {i} ({type(t).__name__})")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if self._shared_state is not None:
            self._shared_state.load_state_dict(state_dict["spectral_state"])
        for t, sd in zip(self.penalties + self.projections, state_dict["penalties"] + state_dict["projections"]):
            t.load_state_dict(sd)
        self.steps = int(state_dict["steps"])


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
