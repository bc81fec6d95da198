"""Adversarial attacks on any ``nn.Module`` classifier, and adversarial batches for training.

Every attack here works on a batch ``x`` of shape ``(N, ...)`` with integer
labels ``y`` of shape ``(N,)``, on whatever device and dtype ``x`` has, and
returns ``x_adv`` with ``‖x_adv − x‖_p ≤ ε`` (per example, over all
non-batch dimensions) and ``lo ≤ x_adv ≤ hi`` for ``domain=(lo, hi)``: the
data's units, ``[0, 1]`` by default. A normalisation ``(x − μ)/σ`` belongs
*inside* the model, so budgets stay in data units.

Why clamping to the domain never breaks the budget: the box is convex and
contains ``x``, and projection onto a convex set is non-expansive, so
``‖clamp(x + δ) − x‖ = ‖P(x + δ) − P(x)‖ ≤ ‖δ‖`` for every norm used here.

Conventions shared by every function:

* **Model mode.** Attacks run the model in eval mode (dropout off, batch
  norm reads its running statistics and does not update them) and restore
  every submodule's own ``training`` flag afterwards, also on error. This is
  what protects BN running statistics when :func:`adversarial_batch` is
  called inside a training loop.
* **No parameter gradients.** Gradients are taken with
  ``torch.autograd.grad`` with respect to the input only; ``p.grad`` of the
  model's parameters is never touched.
* **Determinism.** Randomness comes from a local ``torch.Generator`` seeded
  with ``seed`` (drawn on the CPU, then moved, so CPU and CUDA runs start
  from the same point). ``seed=None`` draws that seed from torch's global
  generator, like ``torch.rand``.
* **Success** of an untargeted attack means ``argmax f(x_adv) ≠ y``; of a
  targeted one (``y`` holds the targets) ``argmax f(x_adv) = y``. The margin
  score ``s = max_{j≠y} z_j − z_y`` (untargeted) or ``z_t − max_{j≠t} z_j``
  (targeted) is positive exactly on success, and ranks the iterates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (attack_input, bool_arg, domain_arg, eps_arg, float_tensor, fraction, labels_arg, module_arg,
                      nonnegative_float, nonnegative_int, norm_arg, positive_float, positive_int, seed_arg)
from ._utils import batches, eval_mode, logits_of, model_device, num_batches, to_device
from .layers import MatrixSpec, layer_kind, layer_views
from .spectral.iteration import subspace_iteration
from .spectral.views import operator_for

__all__ = [
    "fgsm",
    "pgd",
    "multi_targeted_pgd",
    "random_search",
    "universal_perturbation",
    "fooling_rate",
    "sensitive_directions",
    "sensitive_direction_attack",
    "adversarial_batch",
]

_LOSSES = ("ce", "margin")
_SOURCES = ("first_layer", "jacobian")
_SCHEDULES = ("apgd", "constant")


# --------------------------------------------------------------------------- checks


def _loss_arg(loss: Any) -> str:
    if not isinstance(loss, str) or loss.lower() not in _LOSSES:
        raise ValueError(f"Expected loss to be one of {_LOSSES}, but got loss={loss!r}")
    return loss.lower()


def _validated(model, x, y, domain, targeted=False):
    """Shared front of every per-batch attack: checks, then the clean logits in eval mode."""
    model = module_arg(model)
    lo, hi = domain_arg(domain)
    x = attack_input(x, (lo, hi))
    with torch.no_grad():
        logits = logits_of(model, x)
    y = labels_arg(y, x.shape[0], logits.shape[1], "y (targets)" if targeted else "y")
    return model, x, y, lo, hi, logits


# --------------------------------------------------------------------------- geometry


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example vector (N,) to broadcast against ``like`` (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _norms(d: torch.Tensor, norm: float) -> torch.Tensor:
    flat = d.flatten(1)
    return flat.abs().amax(1) if math.isinf(norm) else flat.norm(dim=1)


def _ascent(g: torch.Tensor, norm: float) -> torch.Tensor:
    """The unit-norm steepest-ascent direction: sign(g) for L∞, g/‖g‖₂ for L2."""
    if math.isinf(norm):
        return g.sign()
    return g / _view(_norms(g, 2.0).clamp_min(1e-12), g)


def _project(delta: torch.Tensor, eps: torch.Tensor, norm: float) -> torch.Tensor:
    """Euclidean projection onto the ball ‖δ‖_p ≤ ε (per example)."""
    e = _view(eps, delta)
    if math.isinf(norm):
        return torch.maximum(torch.minimum(delta, e), -e)
    scale = (eps / _norms(delta, 2.0).clamp_min(1e-12)).clamp(max=1.0)
    return delta * _view(scale, delta)


def _random_start(x: torch.Tensor, eps: torch.Tensor, norm: float, gen: torch.Generator) -> torch.Tensor:
    """A uniform sample from the ε-ball (cube for L∞, ball for L2), drawn on the CPU."""
    shape, d = x.shape, x[0].numel()
    if math.isinf(norm):
        u = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    else:
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = g / _view(g.flatten(1).norm(dim=1).clamp_min(1e-12), g)
        r = torch.rand(shape[0], generator=gen, dtype=torch.float64) ** (1.0 / d)
        u = g * _view(r, g)
    return u.to(device=x.device, dtype=x.dtype) * _view(eps, x)


def _score(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Margin score, positive exactly on success (see the module docstring)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - others if targeted else others - z_y


def _objective(logits: torch.Tensor, y: torch.Tensor, loss: str, targeted: bool) -> torch.Tensor:
    """Per-example quantity the attack ascends."""
    if loss == "margin":
        return _score(logits, y, targeted)
    ce = F.cross_entropy(logits, y, reduction="none")
    return -ce if targeted else ce


# --------------------------------------------------------------------------- FGSM / PGD


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    norm: float | str = float("inf"),
    domain: tuple[float, float] = (0.0, 1.0),
    loss: str = "ce",
    targeted: bool = False,
) -> torch.Tensor:
    """Fast gradient (sign) method: one full step of size ε.

    ``x_adv = clamp(x + ε · d, lo, hi)`` with ``d = sign(∇ₓℓ)`` for L∞ and
    ``d = ∇ₓℓ / ‖∇ₓℓ‖₂`` for L2, where ``ℓ`` is the cross-entropy (or the
    margin score) of the true class, or its negative toward a target.

    Args:
        model: classifier returning logits ``(N, C)``; run in eval mode, mode restored.
        x: inputs ``(N, ...)`` inside ``domain``.
        y: labels ``(N,)`` (targets when ``targeted``).
        eps: budget ``≥ 0`` in data units, or a tensor ``(N,)`` of per-example budgets.
        norm: ``float("inf")`` or ``2``.
        domain: ``(lo, hi)`` the result is clamped to.
        loss: ``"ce"`` or ``"margin"``.
        targeted: move toward ``y`` instead of away from it.

    Returns:
        ``x_adv``, detached, same shape, dtype and device as ``x``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> x_adv = fgsm(model, x, y, eps=0.1)
        >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    norm = norm_arg(norm)
    loss = _loss_arg(loss)
    targeted = bool_arg(targeted, "targeted")
    with eval_mode(module_arg(model)):
        model, x, y, lo, hi, _ = _validated(model, x, y, domain, targeted)
        eps_t = eps_arg(eps, x.shape[0], x)
        xg = x.detach().clone().requires_grad_(True)
        obj = _objective(logits_of(model, xg), y, loss, targeted).sum()
        (g,) = torch.autograd.grad(obj, xg)
        return (x + _view(eps_t, x) * _ascent(g, norm)).clamp(lo, hi).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    norm: float | str = float("inf"),
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = False,
    loss: str = "ce",
    targeted: bool = False,
    early_stop: bool = True,
    domain: tuple[float, float] = (0.0, 1.0),
    seed: int | None = None,
    schedule: str = "apgd",
) -> torch.Tensor:
    """Projected gradient descent in L∞ or L2, by default with APGD's step-size schedule.

    Each step moves along the steepest-ascent direction ``d`` of the
    per-example objective (``sign(∇)`` for L∞, ``∇/‖∇‖₂`` for L2) and
    projects back: ``P(u) = clamp(x_0 + Π_ε(u − x_0), lo, hi)`` with ``Π_ε``
    the projection onto the ε-ball.

    * ``schedule="apgd"`` (default): the step-size schedule and momentum of
      APGD (Croce & Hein, 2020): ``z = P(x_k + η·d)``,
      ``x_{k+1} = P(x_k + 0.75(z − x_k) + 0.25(x_k − x_{k−1}))``, starting
      from ``η = 2ε``; at checkpoints an example whose objective stalls
      halves ``η`` and resumes from its best point. Large early steps
      explore, small late ones refine, so no step size must be tuned; at
      equal steps it is at least as strong as fixed-step PGD (``α = ε/10``
      or torchattacks' defaults) on the models tested here.
    * ``schedule="constant"``: Madry et al.'s PGD, ``x ← P(x + α·d)``.

    Per example the result is the iterate with the highest margin score over
    all steps and restarts (the clean point included), so a success is never
    lost. With ``early_stop`` an example stops being updated (and costs no
    more gradients) once it succeeds, and later restarts skip it; without it
    every example runs every step, as adversarial training wants.

    Args:
        model: classifier returning logits ``(N, C)``; run in eval mode, mode restored.
        x: inputs ``(N, ...)`` inside ``domain``.
        y: labels ``(N,)``, or the targets when ``targeted``.
        eps: budget ``≥ 0`` in data units, or a tensor ``(N,)`` of per-example budgets.
        norm: ``float("inf")`` or ``2``.
        steps: gradient steps per restart.
        step_size: ``α``: the initial step of ``"apgd"`` (default ``2ε``) or the fixed
            step of ``"constant"`` (default ``2.5·ε/steps``); per example.
        restarts: independent runs; every run after the first starts at a random point.
        random_start: start the first run, too, from a uniform point of the ε-ball instead
            of ``x``. Off by default: from ``x`` the first steps follow the clean gradient,
            which measured stronger at 10 and 50 steps than a random start.
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (the margin score).
        targeted: reach class ``y`` instead of leaving it.
        early_stop: freeze examples once they succeed.
        domain: ``(lo, hi)`` box every iterate is clamped to.
        seed: seed of the random starts (``None``: drawn from torch's global generator).
        schedule: ``"apgd"`` or ``"constant"`` (see above).

    Returns:
        ``x_adv``, detached, same shape, dtype and device as ``x``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> x_adv = pgd(model, x, y, eps=0.5, norm=2, steps=20, seed=0)
        >>> bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all())
        True
    """
    norm = norm_arg(norm)
    steps = positive_int(steps, "steps")
    restarts = positive_int(restarts, "restarts")
    random_start = bool_arg(random_start, "random_start")
    early_stop = bool_arg(early_stop, "early_stop")
    targeted = bool_arg(targeted, "targeted")
    loss = _loss_arg(loss)
    if step_size is not None:
        step_size = positive_float(step_size, "step_size")
    if schedule not in _SCHEDULES:
        raise ValueError(f"Expected schedule to be one of {_SCHEDULES}, but got schedule={schedule!r}")
    gen = torch.Generator().manual_seed(seed_arg(seed))
    with eval_mode(module_arg(model)):
        model, x, y, lo, hi, logits = _validated(model, x, y, domain, targeted)
        eps_t = eps_arg(eps, x.shape[0], x)
        default = eps_t * 2.0 if schedule == "apgd" else eps_t * 2.5 / steps
        alpha = default if step_size is None else torch.full_like(eps_t, step_size)
        return _pgd_core(model, x, y, eps_t, alpha, norm, steps, restarts, random_start,
                         loss, targeted, early_stop, lo, hi, gen, logits, schedule)


def _pgd_core(model, x, y, eps, alpha, norm, steps, restarts, random_start, loss, targeted,
              early_stop, lo, hi, gen, clean_logits, schedule) -> torch.Tensor:
    x = x.detach()
    best = x.clone()
    best_score = _score(clean_logits, y, targeted)

    def keep(idx, xa, score):
        better = score > best_score[idx]
        if bool(better.any()):
            best[idx[better]] = xa[better].detach()
            best_score[idx[better]] = score[better]

    run = _apgd_run if schedule == "apgd" else _constant_run
    for r in range(restarts):
        idx = torch.arange(x.shape[0], device=x.device)
        if early_stop:
            idx = idx[best_score <= 0]
        if idx.numel() == 0:
            break
        random = random_start or r > 0
        start = _random_start(x[idx], eps[idx], norm, gen) if random else torch.zeros_like(x[idx])
        run(model, x, y, eps, alpha, norm, steps, loss, targeted, early_stop, lo, hi, idx, start, keep)
    return best.detach()


def _gradient(model, xa, y, loss, targeted, lo, hi):
    """Margin scores, per-example objective and its input gradient at ``xa``.

    Components that push a coordinate already on the domain's boundary
    further out are zeroed: the clamp would undo them, and for L2 they
    would take a share of the normalised step that no coordinate can use.
    """
    xa = xa.detach().requires_grad_(True)
    logits = logits_of(model, xa)
    obj = _objective(logits, y, loss, targeted)
    (g,) = torch.autograd.grad(obj.sum(), xa)
    xa = xa.detach()
    g = torch.where(((xa <= lo) & (g < 0)) | ((xa >= hi) & (g > 0)), torch.zeros_like(g), g)
    return _score(logits.detach(), y, targeted), obj.detach(), g


def _constant_run(model, x, y, eps, alpha, norm, steps, loss, targeted, early_stop, lo, hi, idx, start, keep):
    """Madry et al.'s PGD: ``steps`` projected steps of the fixed size ``α``."""
    x0, yy, ee, aa = x[idx], y[idx], eps[idx], alpha[idx]
    xa = (x0 + start).clamp(lo, hi)
    for _ in range(steps):
        score, _, g = _gradient(model, xa, yy, loss, targeted, lo, hi)
        keep(idx, xa, score)
        if early_stop:
            live = score <= 0
            if not bool(live.all()):
                idx, x0, yy, ee, aa, xa, g = (t[live] for t in (idx, x0, yy, ee, aa, xa, g))
                if idx.numel() == 0:
                    return
        xa = (x0 + _project(xa + _view(aa, xa) * _ascent(g, norm) - x0, ee, norm)).clamp(lo, hi)
    with torch.no_grad():
        keep(idx, xa, _score(logits_of(model, xa), yy, targeted))


def _apgd_run(model, x, y, eps, alpha, norm, steps, loss, targeted, early_stop, lo, hi, idx, start, keep):
    """PGD with APGD's step-size schedule and momentum (Croce & Hein, 2020).

    Per example, from ``η = α`` (default 2ε): ``z = P(x_k + η·d)``,
    ``x_{k+1} = P(x_k + 0.75(z − x_k) + 0.25(x_k − x_{k−1}))``. At the
    checkpoints (after 22% of the steps, then ever shorter intervals, ≥ 6%)
    an example halves ``η`` and restarts from its highest-objective point
    when its objective rose in fewer than 75% of the steps since the last
    checkpoint, or when it neither halved nor improved at the last one.
    """
    def step_to(base, direction_step):
        return (x0 + _project(base + direction_step - x0, ee, norm)).clamp(lo, hi)

    x0, yy, ee, eta = x[idx], y[idx], eps[idx], alpha[idx].clone()
    xa = (x0 + start).clamp(lo, hi)
    score, obj, g = _gradient(model, xa, yy, loss, targeted, lo, hi)
    keep(idx, xa, score)
    x_prev, x_top, g_top, obj_top = xa, xa.clone(), g.clone(), obj.clone()
    n = x0.shape[0]
    rises = torch.zeros(n, device=x.device)
    top_at_check, halved_at_check = obj_top.clone(), torch.ones(n, dtype=torch.bool, device=x.device)
    interval = max(int(0.22 * steps), 1)
    shrink, shortest, since = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1), 0
    for i in range(steps):
        state = (idx, x0, yy, ee, eta, xa, x_prev, g, obj, x_top, g_top, obj_top, rises, top_at_check,
                 halved_at_check)
        if early_stop:
            live = score <= 0
            if not bool(live.all()):
                state = tuple(t[live] for t in state)
                (idx, x0, yy, ee, eta, xa, x_prev, g, obj, x_top, g_top, obj_top, rises, top_at_check,
                 halved_at_check) = state
                if idx.numel() == 0:
                    return
        with torch.no_grad():
            z = step_to(xa, _view(eta, xa) * _ascent(g, norm))
            a = 0.75 if i > 0 else 1.0
            x_prev, xa = xa, step_to(xa, a * (z - xa) + (1 - a) * (xa - x_prev))
        score, new_obj, g = _gradient(model, xa, yy, loss, targeted, lo, hi)
        keep(idx, xa, score)
        rises += (new_obj > obj).to(rises.dtype)
        obj = new_obj
        up = obj > obj_top
        x_top[up], g_top[up], obj_top[up] = xa[up], g[up], obj[up]
        since += 1
        if since == interval:
            halve = (rises <= 0.75 * interval) | (~halved_at_check & (top_at_check >= obj_top))
            eta = torch.where(halve, eta / 2, eta)
            xa = torch.where(_view(halve, xa), x_top, xa)
            g = torch.where(_view(halve, g), g_top, g)
            halved_at_check, top_at_check = halve, obj_top.clone()
            rises.zero_()
            since, interval = 0, max(interval - shrink, shortest)


def multi_targeted_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    norm: float | str = float("inf"),
    n_targets: int | None = None,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = False,
    domain: tuple[float, float] = (0.0, 1.0),
    seed: int | None = None,
) -> torch.Tensor:
    """Untargeted attack made of targeted margin-PGD runs, one per runner-up class.

    For each of the ``n_targets`` classes with the largest clean logits
    (``y`` excluded), in that order, a targeted PGD ascends
    ``z_t − max_{j≠t} z_j`` on the examples not yet broken. For a linear
    classifier that objective is concave, so each run reaches its optimum and
    the best target gives the exact minimal-distance attack
    ``min_j (z_y − z_j)/‖w_y − w_j‖_*`` (dual norm): the reason
    :func:`robustcompress.evaluate.minimal_eps` can use it as a reference.

    Args:
        model, x, y, eps, norm, steps, step_size, restarts, random_start, domain, seed:
            as in :func:`pgd` (``y`` are the true labels).
        n_targets: how many runner-up classes to try; default all ``C − 1``.

    Returns:
        ``x_adv``: per example the first successful result, else the last target's best.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> x_adv = multi_targeted_pgd(model, x, y, eps=0.2)
        >>> bool(((x_adv - x).abs() <= 0.2 + 1e-6).all())
        True
    """
    norm = norm_arg(norm)
    with eval_mode(module_arg(model)):
        model, x, y, lo, hi, logits = _validated(model, x, y, domain)
        n_classes = logits.shape[1]
        n_targets = n_classes - 1 if n_targets is None else positive_int(n_targets, "n_targets")
        n_targets = min(n_targets, n_classes - 1)
        eps_t = eps_arg(eps, x.shape[0], x)
        ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
        base_seed = seed_arg(seed)
        out = x.detach().clone()
        open_ = _score(logits, y, False) <= 0
        for r in range(n_targets):
            idx = open_.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x_t = pgd(model, x[idx], ranked[idx, r], eps_t[idx], norm, steps, step_size, restarts,
                      random_start, "margin", True, True, (lo, hi), base_seed + r, schedule="constant")
            out[idx] = x_t
            with torch.no_grad():
                broken = _score(logits_of(model, x_t), y[idx], False) > 0
            open_[idx[broken]] = False
        return out


def random_search(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    norm: float | str = float("inf"),
    n_queries: int = 500,
    domain: tuple[float, float] = (0.0, 1.0),
    seed: int | None = 0,
) -> torch.Tensor:
    """A gradient-free (black-box) attack: greedy random search on the ε-sphere.

    L∞: start at a random vertex ``ε·s`` (``s`` random signs); each query
    re-draws the signs of a random fraction ``p`` of coordinates (``p``
    shrinking from 0.3 to ``1/d``), in the spirit of the Square attack. L2:
    each query moves ``δ ← ε·(δ + σ·ε·ξ)/‖…‖₂`` with Gaussian ``ξ`` and
    ``σ`` shrinking. A candidate is kept per example when it raises the
    margin score; an example stops once it succeeds. It reads only logits,
    so it is the reference a gradient-masked model cannot fool.

    Args:
        model, x, y, eps, norm, domain: as in :func:`pgd`.
        n_queries: forward passes per example at most.
        seed: seed of the search.

    Returns:
        ``x_adv``, detached.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> x_adv = random_search(model, x, y, eps=0.2, n_queries=50)
        >>> bool(((x_adv - x).abs() <= 0.2 + 1e-6).all())
        True
    """
    norm = norm_arg(norm)
    n_queries = positive_int(n_queries, "n_queries")
    gen = torch.Generator().manual_seed(seed_arg(seed))
    with eval_mode(module_arg(model)), torch.no_grad():
        model, x, y, lo, hi, logits = _validated(model, x, y, domain)
        eps_t = eps_arg(eps, x.shape[0], x)
        d = x[0].numel()

        def sphere_at(u, e):
            return _project(u / _view(_norms(u, 2.0).clamp_min(1e-12), u) * _view(e, u), e, 2.0)

        def sphere(u):
            return sphere_at(u, eps_t)

        if math.isinf(norm):
            delta = _view(eps_t, x) * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x)
        else:
            delta = sphere(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x))
        # the search walks from its incumbent; the result is the best point seen, clean x included
        cur_score = _score(logits_of(model, (x + delta).clamp(lo, hi)), y, False)
        best = torch.where(_view(cur_score > 0, x), (x + delta).clamp(lo, hi), x.detach())
        best_score = torch.maximum(cur_score, _score(logits, y, False))
        for q in range(n_queries - 1):
            idx = (best_score <= 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            frac = 1.0 - q / n_queries
            if math.isinf(norm):
                p = max(0.3 * frac, 1.0 / d)
                flip = (torch.rand((idx.numel(),) + x.shape[1:], generator=gen) < p).to(x.device)
                signs = (torch.randint(0, 2, flip.shape, generator=gen) * 2 - 1).to(x)
                step = torch.where(flip, _view(eps_t[idx], signs) * signs, delta[idx])
            else:
                xi = torch.randn((idx.numel(),) + x.shape[1:], generator=gen, dtype=torch.float64).to(x)
                step = sphere_at(delta[idx] + max(0.5 * frac, 0.02) * _view(eps_t[idx], xi) * xi / math.sqrt(d),
                                 eps_t[idx])
            cand = (x[idx] + step).clamp(lo, hi)
            s = _score(logits_of(model, cand), y[idx], False)
            better = s > cur_score[idx]
            upd = idx[better]
            delta[upd], cur_score[upd] = step[better], s[better]
            won = better & (s > best_score[idx])
            best[idx[won]], best_score[idx[won]] = cand[won], s[won]
        return best


# --------------------------------------------------------------------------- universal perturbations


def fooling_rate(
    model: nn.Module,
    data: Any,
    delta: torch.Tensor,
    domain: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 256,
) -> float:
    """Fraction of correctly classified examples whose prediction one perturbation changes.

    ``rate = #{i : f(x_i) = y_i and f(clamp(x_i + δ)) ≠ f(x_i)} / #{i : f(x_i) = y_i}``
    (0.0 when no example is classified correctly: there is nothing to fool).

    Args:
        model: classifier; run in eval mode, mode restored.
        data: a Dataset of ``(x, y)``, a DataLoader, or a tuple ``(x, y)`` of tensors.
        delta: one perturbation with the shape of a single input.
        domain: ``(lo, hi)`` the perturbed inputs are clamped to.
        batch_size: batch size for datasets and tuples.

    Returns:
        The fooling rate in ``[0, 1]``.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> fooling_rate(model, (x, y), torch.zeros(4))
        0.0
    """
    model = module_arg(model)
    delta = float_tensor(delta, "delta").detach()
    lo, hi = domain_arg(domain)
    batch_size = positive_int(batch_size, "batch_size")
    correct = fooled = 0
    device = model_device(model, delta.device)
    with eval_mode(model), torch.no_grad():
        for xb, yb in batches(data, batch_size):
            xb, yb = attack_input(to_device(xb, device), (lo, hi), "x of data"), yb.to(device)
            if tuple(delta.shape) != tuple(xb.shape[1:]):
                raise ValueError(
                    f"Expected delta to have the shape of one input {tuple(xb.shape[1:])}, but got {tuple(delta.shape)}"
                )
            clean = logits_of(model, xb)
            yb = labels_arg(yb, xb.shape[0], clean.shape[1], "y of data")
            pred = clean.argmax(1)
            adv = logits_of(model, (xb + delta.to(xb)).clamp(lo, hi)).argmax(1)
            ok = pred == yb
            correct += int(ok.sum())
            fooled += int((ok & (adv != pred)).sum())
    return fooled / correct if correct else 0.0


def universal_perturbation(
    model: nn.Module,
    data: Any,
    eps: float,
    norm: float | str = float("inf"),
    epochs: int = 5,
    step_size: float | None = None,
    domain: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    batch_size: int = 256,
) -> tuple[torch.Tensor, float]:
    """One perturbation ``δ`` for a whole data set (a universal adversarial perturbation).

    Projected stochastic gradient ascent over batches:
    ``δ ← Π_ε(δ + α·d)``, with ``d`` the steepest-ascent direction (sign for
    L∞, normalised for L2) of ``Σ_i m_i · CE(f(clamp(x_i + δ)), y_i)``, where
    the mask ``m_i`` keeps the correctly classified examples that ``δ`` does
    not fool yet (a fooled example's growing loss would otherwise drown the
    rest). After every epoch the fooling rate of ``δ`` over ``data`` is
    measured and the best ``δ`` is kept.

    Args:
        model: classifier; run in eval mode, mode restored.
        data: a Dataset of ``(x, y)``, a DataLoader, or a tuple ``(x, y)`` of tensors.
        eps: budget ``≥ 0`` on ``‖δ‖_p``.
        norm: ``float("inf")`` or ``2``.
        epochs: passes over ``data``.
        step_size: ``α``; default ``max(2.5/T, 0.1)·ε`` for ``T`` steps in all.
        domain: ``(lo, hi)`` the perturbed inputs are clamped to.
        seed: seed of the batch order.
        batch_size: batch size for datasets and tuples (a DataLoader keeps its own).

    Returns:
        ``(δ, fooling rate)``: ``δ`` has the shape of one input, the model's
        device and the data's dtype; the rate is :func:`fooling_rate` of ``δ``.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(32, 4), torch.randint(0, 3, (32,))
        >>> delta, rate = universal_perturbation(model, (x, y), eps=0.1, epochs=1)
        >>> delta.shape, float(delta.abs().max()) <= 0.1 + 1e-6
        (torch.Size([4]), True)
    """
    model = module_arg(model)
    norm = norm_arg(norm)
    eps = nonnegative_float(eps, "eps")
    epochs = positive_int(epochs, "epochs")
    lo, hi = domain_arg(domain)
    batch_size = positive_int(batch_size, "batch_size")
    if step_size is not None:
        step_size = positive_float(step_size, "step_size")
    gen = torch.Generator().manual_seed(nonnegative_int(seed, "seed"))
    n_batches = num_batches(data, batch_size) or 1
    alpha = step_size if step_size is not None else max(2.5 / (epochs * n_batches), 0.1) * eps
    delta: torch.Tensor | None = None
    best: torch.Tensor | None = None
    best_rate = -1.0
    with eval_mode(model):
        for _ in range(epochs):
            for xb, yb in batches(data, batch_size, shuffle=True, generator=gen):
                xb = attack_input(to_device(xb, model_device(model)), (lo, hi), "x of data")
                if delta is None:
                    delta = torch.zeros(xb.shape[1:], device=xb.device, dtype=xb.dtype)
                    best = delta.clone()
                d = delta.detach().requires_grad_(True)
                logits = logits_of(model, (xb + d).clamp(lo, hi))
                yb = labels_arg(yb.to(xb.device), xb.shape[0], logits.shape[1], "y of data")
                with torch.no_grad():
                    pred = logits_of(model, xb).argmax(1)
                mask = (pred == yb) & (logits.detach().argmax(1) == pred)
                obj = (F.cross_entropy(logits, yb, reduction="none") * mask).sum()
                (g,) = torch.autograd.grad(obj, d)
                with torch.no_grad():
                    step = _ascent(g[None], norm)[0]
                    delta = _project((delta + alpha * step)[None], torch.full((1,), eps).to(delta), norm)[0]
            if delta is None:
                raise ValueError("Expected data to hold at least one example")
            rate = fooling_rate(model, data, delta, (lo, hi), batch_size)
            if rate > best_rate:
                best, best_rate = delta.clone(), rate
    return best.detach(), best_rate


# --------------------------------------------------------------------------- sensitive directions


def _first_layer(model: nn.Module) -> tuple[str, nn.Module, MatrixSpec]:
    """The first weight-bearing module: a Linear or Conv1d/2d (by its registry kind), else a clear error."""
    for name, m in model.named_modules():
        kind = layer_kind(m)
        if kind is None:
            if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
                raise ValueError(f"The first layer {name!r} is a {type(m).__name__}, which is not supported; "
                                 "use source='jacobian'")
            continue
        spec = layer_views(m)[0].spec if kind.name in ("linear", "conv") else None
        if spec is not None and (spec.conv is None or spec.conv.dims in (1, 2)):
            return name, m, spec
        raise ValueError(f"The first layer {name!r} is a {type(m).__name__} (layer kind {kind.name!r}), which is "
                         "not supported; use source='jacobian'")
    raise ValueError("Expected the model to contain a Linear, Conv1d or Conv2d layer for source='first_layer'")


def _top_directions(products: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], batch: int, dim: int,
                    k: int, n_iter: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Top-k right singular directions ``(B, dim, k)`` of a batch of operators ``A_b`` given ``V ↦ (A V, AᵀA V)``.

    :func:`robustcompress.spectral.iteration.subspace_iteration` (block power
    iteration with Rayleigh–Ritz, batched over ``b``) from a seeded start, in
    descending order, each direction signed so its largest-magnitude entry is positive.
    """
    v = torch.randn(batch, dim, k, generator=gen, dtype=torch.float64).to(like)
    v = subspace_iteration(products, v, n_iter + 1).v
    pivot = v.abs().argmax(1, keepdim=True)
    return v * torch.where(v.gather(1, pivot) < 0, -1.0, 1.0)


def _representation(model: nn.Module, layer: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if layer is None:
        return model
    if not isinstance(layer, str):
        raise TypeError(f"Expected layer to be a submodule name (str) or None, but got layer={layer!r}")
    try:
        target = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"Expected layer to name a submodule of the model, but got layer={layer!r}") from None

    def rep(u: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = target.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            model(u)
        finally:
            handle.remove()
        if not captured:
            raise ValueError(f"layer {layer!r} was not called in the model's forward pass")
        return captured[-1]

    return rep


def _jacobian_products(fn: Callable, x: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``T (N, D) ↦ ((J_i t_i)_i, (J_iᵀ J_i t_i)_i)`` with ``J_i`` the Jacobian of ``fn`` at example ``x_i``.

    Examples are independent in eval mode, so one batched jvp/vjp serves all.
    """
    _, pull = torch.func.vjp(fn, x)

    def apply(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, jt = torch.func.jvp(fn, (x,), (t.reshape(x.shape),))
        return jt.reshape(x.shape[0], -1), pull(jt)[0].reshape(x.shape[0], -1)

    return apply


def _directions(model, x, k, source, n_iter, layer, seed, per_example):
    """Directions as ``(B, D, k)``: ``B = 1`` (shared) or ``N`` (per example)."""
    gen = torch.Generator().manual_seed(0 if seed is None else seed_arg(seed))
    if source == "first_layer":
        if layer is not None:
            raise ValueError("layer= applies to source='jacobian' only")
        name, m, spec = _first_layer(model)
        if spec.conv is None:
            w = spec.matrix().detach()
            if k > min(w.shape):
                raise ValueError(f"Expected k <= {min(w.shape)} (rank bound of layer {name!r}), but got k={k}")
            vh = torch.linalg.svd(w.double(), full_matrices=False).Vh[:k]
            pivot = vh.abs().argmax(1, keepdim=True)
            vh = vh * torch.where(vh.gather(1, pivot) < 0, -1.0, 1.0)
            return vh.T[None].to(w)
        if x is None:
            raise ValueError(f"The first layer {name!r} is a {type(m).__name__}: pass x so its input size is known")
        shape = x.shape[1:]
        dim = shape.numel()
        if k > dim:
            raise ValueError(f"Expected k <= {dim} (the input dimension), but got k={k}")

        op = operator_for(m, "operator", tuple(shape))  # the layer's linear part at this input size

        def conv_products(v):
            u0 = op.matvec(v[0].to(op.dtype))
            return u0[None].to(v), op.rmatvec(u0)[None].to(v)

        with torch.no_grad():
            return _top_directions(conv_products, 1, dim, k, n_iter, gen, x.double()).to(x)
    if x is None:
        raise ValueError("source='jacobian' needs x, the point(s) the Jacobian is taken at")
    fn = _representation(model, layer)
    n, dim = x.shape[0], x[0].numel()
    if k > dim:
        raise ValueError(f"Expected k <= {dim} (the input dimension), but got k={k}")
    jac = _jacobian_products(fn, x.detach())

    def products(v):
        # Shared directions: the operator is every example's Jacobian stacked, A = [J_1; …; J_N].
        us, ys = [], []
        for j in range(k):
            if per_example:
                u, y = jac(v[:, :, j])
            else:
                u, y = jac(v[0, :, j].expand(n, dim))
                u, y = u.reshape(1, -1), y.sum(0, keepdim=True)
            us.append(u)
            ys.append(y)
        return torch.stack(us, dim=2), torch.stack(ys, dim=2)

    return _top_directions(products, n if per_example else 1, dim, k, n_iter, gen, x)


def sensitive_directions(
    model: nn.Module,
    x: torch.Tensor | None = None,
    k: int = 1,
    source: str = "first_layer",
    n_iter: int = 20,
    layer: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The top-k input-space directions that move the model's representation most.

    * ``source="first_layer"``: the top right singular vectors of the first
      ``Linear`` / ``Conv1d`` / ``Conv2d`` layer (in ``named_modules`` order,
      assumed to read the model's input). A Linear layer uses an exact
      float64 SVD; a convolution is treated as the linear operator at the
      input size of ``x`` (which must be given), via subspace iteration with
      the exact adjoint from ``torch.func.vjp``.
    * ``source="jacobian"``: the top right singular vectors of the
      input→representation Jacobian at ``x`` (representation: the model's
      output, or the output of the submodule named ``layer``). For a batch
      they are the top eigenvectors of ``Σ_i J_iᵀ J_i`` (the stacked
      Jacobian: directions that move every example's representation most in
      total), found by subspace iteration with ``torch.func.jvp`` / ``vjp``;
      for one example, simply those of ``J``.

    Args:
        model: the network; run in eval mode, mode restored.
        x: inputs ``(N, ...)``; needed for ``"jacobian"`` and for a convolutional first layer.
        k: number of directions.
        source: ``"first_layer"`` or ``"jacobian"``.
        n_iter: subspace iterations (not used for a Linear first layer).
        layer: submodule name whose output is the representation (``"jacobian"`` only).
        seed: seed of the starting block.

    Returns:
        ``(k, input_dim)`` orthonormal rows, the strongest first, each signed
        so that its largest-magnitude entry is positive.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> layer = torch.nn.Linear(3, 3)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(w)
        >>> sensitive_directions(torch.nn.Sequential(layer), k=1)
        tensor([[1., 0., 0.]])
    """
    model = module_arg(model)
    k = positive_int(k, "k")
    n_iter = positive_int(n_iter, "n_iter")
    if source not in _SOURCES:
        raise ValueError(f"Expected source to be one of {_SOURCES}, but got source={source!r}")
    if x is not None:
        x = float_tensor(x, "x")
        if x.dim() < 2:
            raise ValueError(f"Expected x to be a batch (N, ...), but got shape {tuple(x.shape)}")
    with eval_mode(model):
        v = _directions(model, x, k, source, n_iter, layer, seed if seed is not None else 0, per_example=False)
    return v[0].T.contiguous().detach()


def sensitive_direction_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    norm: float | str = 2,
    source: str = "first_layer",
    k: int = 1,
    n_iter: int = 20,
    domain: tuple[float, float] = (0.0, 1.0),
    layer: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The cheap attack the analysis predicts: step along the model's most sensitive directions.

    With ``v_1..v_k`` from :func:`sensitive_directions` (for ``"jacobian"``,
    taken per example at each ``x_i``), the candidates are ``±v_j`` and the
    loss gradient projected on ``span(v)``; each is scaled to the budget —
    ``ε·d/‖d‖₂`` for L2, ``ε·sign(d)`` for L∞ (the L∞ vertex that moves
    ``vᵀx`` most, by ``ε‖v‖₁``) — and per example the candidate with the
    highest margin score wins. Cost: ``2k + 1`` forward passes and one
    gradient, plus the directions.

    Args:
        model, x, y, eps, norm, domain: as in :func:`pgd` (``norm`` defaults to 2 here).
        source, k, n_iter, layer, seed: as in :func:`sensitive_directions`.

    Returns:
        ``x_adv``, detached.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> x_adv = sensitive_direction_attack(model, x, y, eps=0.3)
        >>> bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.3 + 1e-6).all())
        True
    """
    norm = norm_arg(norm)
    k = positive_int(k, "k")
    n_iter = positive_int(n_iter, "n_iter")
    if source not in _SOURCES:
        raise ValueError(f"Expected source to be one of {_SOURCES}, but got source={source!r}")
    with eval_mode(module_arg(model)):
        model, x, y, lo, hi, logits = _validated(model, x, y, domain)
        eps_t = eps_arg(eps, x.shape[0], x)
        n, dim = x.shape[0], x[0].numel()
        v = _directions(model, x, k, source, n_iter, layer, seed, per_example=(source == "jacobian"))
        v = v.to(x).expand(n, dim, k)
        xg = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_objective(logits_of(model, xg), y, "ce", False).sum(), xg)
        g_span = (v @ (v.transpose(1, 2) @ g.reshape(n, dim, 1))).squeeze(2)
        candidates = [g_span] + [s * v[:, :, j] for j in range(k) for s in (1.0, -1.0)]
        best, best_score = x.detach().clone(), _score(logits, y, False)
        with torch.no_grad():
            for c in candidates:
                c = c.reshape(x.shape)
                delta = _view(eps_t, x) * _ascent(c, norm)
                cand = (x + _project(delta, eps_t, norm)).clamp(lo, hi)
                s = _score(logits_of(model, cand), y, False)
                better = s > best_score
                best[better], best_score[better] = cand[better], s[better]
        return best


# --------------------------------------------------------------------------- adversarial training


def adversarial_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ratio: float = 0.5,
    eps: float = 0.1,
    norm: float | str = float("inf"),
    steps: int = 10,
    step_size: float | None = None,
    domain: tuple[float, float] = (0.0, 1.0),
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a clean batch into a mixed clean/adversarial batch for adversarial training.

    A random subset of ``round(ratio·N)`` examples is replaced by its PGD
    adversary (random start, ``early_stop=False``: every step, as Madry et
    al. train); the rest stay clean, and labels are unchanged. Plain tensors
    in and out, so it drops into any training loop::

        for x, y in loader:
            x_mix, y_mix = adversarial_batch(model, x, y, ratio=0.5, eps=0.1)
            loss = F.cross_entropy(model(x_mix), y_mix)   # model still in train mode
            opt.zero_grad(); loss.backward(); opt.step()

    Batch-norm running statistics are protected: the attack runs the model in
    eval mode (BN reads, and never updates, its running statistics; dropout is
    off) and restores each submodule's mode afterwards, so only your own
    forward pass on the mixed batch updates them. No gradient reaches the
    parameters during the attack.

    Args:
        model: classifier (typically in train mode; its mode is restored).
        x: clean inputs ``(N, ...)`` inside ``domain``.
        y: labels ``(N,)``.
        ratio: share of the batch made adversarial, in ``[0, 1]``.
        eps, norm, steps, step_size, domain: PGD settings (see :func:`pgd`).
        seed: seed of the subset and of the random starts.

    Returns:
        ``(x_mixed, y)``: ``x_mixed`` detached, same order as ``x``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        >>> x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> x_mix, y_mix = adversarial_batch(model, x, y, ratio=0.5, eps=0.1, seed=0)
        >>> model.training, int((x_mix != x).any(1).sum()) <= 3
        (True, True)
    """
    ratio = fraction(ratio, "ratio", closed_right=True)
    seed = seed_arg(seed)
    with eval_mode(module_arg(model)):
        model, x, y, lo, hi, _ = _validated(model, x, y, domain)
    eps_t = eps_arg(eps, x.shape[0], x)  # a number, or one budget per example of the batch
    n_adv = int(round(ratio * x.shape[0]))
    chosen = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n_adv].to(x.device)
    x_mixed = x.detach().clone()
    if n_adv:
        x_mixed[chosen] = pgd(model, x[chosen], y[chosen], eps_t[chosen], norm, steps, step_size, 1, True, "ce",
                              False, False, (lo, hi), seed + 1, schedule="constant")
    return x_mixed, y
