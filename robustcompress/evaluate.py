"""Robustness evaluation: robust accuracy, ε-sweeps, minimal ε, AutoAttack, gradient-masking checks.

Every function accepts ``data`` as a Dataset of ``(x, y)`` pairs, a
DataLoader (iterated as given), or a tuple ``(x, y)`` of tensors; batches
are moved to the model's device. The model runs in eval mode and every
submodule's mode is restored afterwards; no gradient is left on its
parameters; results are deterministic under ``seed``.

**Robust accuracy** is the fraction of examples classified correctly both
clean and under attack: ``mean_i [f(x_i) = y_i ∧ f(x_adv_i) = y_i]``. Every
adversarial batch is checked against the budget and the domain before it
counts, so a user-supplied attack that cheats raises instead of reporting a
number.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import attacks as _atk
from ._checks import (attack_input, domain_arg, finite_input, fraction, labels_arg, module_arg, nonnegative_float,
                      nonnegative_int, norm_arg, positive_float, positive_int)
from ._utils import batch_size_of, batches, eval_mode, logits_of, model_device, num_batches, read_logits, to_device

__all__ = [
    "accuracy",
    "robust_accuracy",
    "eps_sweep",
    "minimal_eps",
    "autoattack_accuracy",
    "gradient_masking_check",
    "ATTACKS",
    "AUTOATTACK_COMPONENTS",
]

#: Named attacks understood by :func:`robust_accuracy`, :func:`eps_sweep` and :func:`minimal_eps`.
ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "fgsm": _atk.fgsm,
    "pgd": _atk.pgd,
    "pgd-mt": _atk.multi_targeted_pgd,
    "sensitive": _atk.sensitive_direction_attack,
    "random": _atk.random_search,
}
_SEEDED = {"pgd", "pgd-mt", "random", "sensitive"}

#: Components :func:`autoattack_accuracy` can run, with their torchattacks class names.
AUTOATTACK_COMPONENTS = {"apgd-ce": "APGD", "apgd-dlr": "APGD", "apgd-t": "APGDT", "fab": "FAB", "square": "Square"}

_TORCHATTACKS_HINT = (
    "autoattack_accuracy needs torchattacks (pip install torchattacks; it imports without torchvision "
    "when installed with --no-deps)"
)


def _progress(iterable: Iterable, enabled: bool, total: int | None, desc: str) -> Iterable:
    """Wrap in a tqdm bar when asked and tqdm is installed; otherwise iterate silently."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _resolve_attack(attack: Any) -> tuple[str | None, Callable | None]:
    if callable(attack) and not isinstance(attack, str):
        return None, attack
    if isinstance(attack, str) and attack.lower() in ATTACKS:
        name = attack.lower()
        return name, ATTACKS[name]
    raise ValueError(
        f"Expected attack to be one of {sorted(ATTACKS)} or a callable(model, x, y) -> x_adv, but got attack={attack!r}"
    )


def _check_adversarial(x_adv: Any, x: torch.Tensor, eps: torch.Tensor | float, norm: float,
                       domain: tuple[float, float]) -> torch.Tensor:
    """Raise if ``x_adv`` leaves the budget or the domain (the number would be meaningless)."""
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise ValueError(f"Expected the attack to return x_adv of shape {tuple(x.shape)}, but got {got}")
    if not bool(torch.isfinite(x_adv).all()):
        raise ValueError("The attack returned an x_adv holding nan or inf")
    lo, hi = domain
    diff = (x_adv.detach() - x).flatten(1).to(torch.float64)
    size = diff.abs().amax(1) if math.isinf(norm) else diff.norm(dim=1)
    eps_t = torch.as_tensor(eps, dtype=torch.float64, device=x.device)
    limit = eps_t * (1 + 1e-4) + 1e-6 * (hi - lo)
    if bool((size > limit).any()):
        raise ValueError(
            f"The attack returned a perturbation of norm {float(size.max()):.6g} above the budget "
            f"eps={float(eps_t.max()):.6g} (norm={norm})"
        )
    slack = 1e-6 * (hi - lo)
    if float(x_adv.min()) < lo - slack or float(x_adv.max()) > hi + slack:
        raise ValueError(f"The attack returned inputs outside domain=({lo}, {hi})")
    return x_adv.detach()


def accuracy(model: nn.Module, data: Any, batch_size: int = 256) -> float:
    """Clean accuracy ``mean_i [argmax f(x_i) = y_i]``.

    Args:
        model: classifier; run in eval mode, mode restored.
        data: a Dataset of ``(x, y)``, a DataLoader, or a tuple ``(x, y)`` of tensors.
        batch_size: batch size for datasets and tuples.

    Returns:
        The accuracy in ``[0, 1]``.

    Example:
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> accuracy(model, (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])))
        0.5
    """
    model = module_arg(model)
    batch_size = positive_int(batch_size, "batch_size")
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for xb, yb in batches(data, batch_size):
            xb = finite_input(to_device(xb, model_device(model)), "x of data")
            logits = logits_of(model, xb)
            n = batch_size_of(xb)
            yb = labels_arg(yb.to(logits.device), n, logits.shape[1], "y of data")
            correct += int((logits.argmax(1) == yb).sum())
            total += n
    if total == 0:
        raise ValueError("Expected data to hold at least one example")
    return correct / total


def robust_accuracy(
    model: nn.Module,
    data: Any,
    attack: str | Callable[..., torch.Tensor] = "pgd",
    eps: float = 0.1,
    norm: float | str = float("inf"),
    progress: bool = False,
    batch_size: int = 256,
    domain: tuple[float, float] = (0.0, 1.0),
    **attack_kwargs: Any,
) -> float:
    """Accuracy under attack: ``mean_i [f(x_i) = y_i ∧ f(A(x_i)) = y_i]`` with ``‖A(x_i) − x_i‖_p ≤ ε``.

    Args:
        model: classifier; run in eval mode, mode restored.
        data: a Dataset of ``(x, y)``, a DataLoader, or a tuple ``(x, y)`` of tensors.
        attack: ``"fgsm"``, ``"pgd"`` (by default with APGD's step-size schedule), ``"pgd-mt"`` (multi-targeted PGD),
            ``"sensitive"``, ``"random"`` (black-box random search), or a
            callable ``(model, x, y) -> x_adv`` that already holds its budget
            (``eps`` and ``norm`` are then used to verify it).
        eps: budget ``≥ 0`` in data units.
        norm: ``float("inf")`` or ``2``.
        progress: show a tqdm bar (silently none when tqdm is missing).
        batch_size: batch size for datasets and tuples.
        domain: ``(lo, hi)`` of the inputs.
        **attack_kwargs: forwarded to a named attack (``steps``, ``restarts``, ``loss``, ``seed`` …);
            a named attack's ``seed`` (default 0) is offset by the batch index.

    Returns:
        Robust accuracy in ``[0, 1]``.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(16, 4), torch.randint(0, 3, (16,))
        >>> robust_accuracy(model, (x, y), "pgd", eps=0.0) == accuracy(model, (x, y))
        True
    """
    model = module_arg(model)
    eps = nonnegative_float(eps, "eps")
    norm = norm_arg(norm)
    batch_size = positive_int(batch_size, "batch_size")
    domain = domain_arg(domain)
    name, fn = _resolve_attack(attack)
    base_seed = attack_kwargs.pop("seed", 0) if name in _SEEDED else None
    robust = total = 0
    batch_iter = _progress(batches(data, batch_size), progress, num_batches(data, batch_size),
                           f"{name or 'attack'} eps={eps:g}")
    with eval_mode(model):
        for i, (xb, yb) in enumerate(batch_iter):
            xb = attack_input(to_device(xb, model_device(model)), domain, "x of data")
            with torch.no_grad():
                clean = logits_of(model, xb)
            yb = labels_arg(yb.to(xb.device), xb.shape[0], clean.shape[1], "y of data")
            if name is None:
                x_adv = fn(model, xb, yb)
            else:
                kw = dict(attack_kwargs)
                if base_seed is not None:
                    kw["seed"] = base_seed + i
                x_adv = fn(model, xb, yb, eps, norm=norm, domain=domain, **kw)
            x_adv = _check_adversarial(x_adv, xb, eps, norm, domain)
            with torch.no_grad():
                adv = logits_of(model, x_adv)
            robust += int(((clean.argmax(1) == yb) & (adv.argmax(1) == yb)).sum())
            total += xb.shape[0]
    if total == 0:
        raise ValueError("Expected data to hold at least one example")
    return robust / total


def _at_eps(attack: str | Callable[..., torch.Tensor], eps: float) -> str | Callable[..., torch.Tensor]:
    """A named attack as it is; a callable ``(model, x, y, eps)`` bound to one budget."""
    if isinstance(attack, str) or not callable(attack):
        return attack

    def bound(model, x, y):
        return attack(model, x, y, eps)

    return bound


def eps_sweep(
    model: nn.Module,
    data: Any,
    eps_values: Sequence[float],
    attack: str | Callable[..., torch.Tensor] = "pgd",
    norm: float | str = float("inf"),
    **kw: Any,
) -> list[dict[str, float]]:
    """Robust accuracy at each budget: the robustness curve ``ε ↦ acc_ε``.

    Args:
        model, data, attack, norm: as in :func:`robust_accuracy` (a callable
            attack here takes ``(model, x, y, eps)``, since ε changes along the curve).
        eps_values: budgets ``≥ 0``, evaluated in the given order.
        **kw: forwarded to :func:`robust_accuracy`.

    Returns:
        ``[{"eps": ε, "robust_accuracy": acc}, …]``, one row per budget.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(16, 4), torch.randint(0, 3, (16,))
        >>> rows = eps_sweep(model, (x, y), [0.0, 0.1], steps=5)
        >>> [r["eps"] for r in rows], rows[0]["robust_accuracy"] >= rows[1]["robust_accuracy"]
        ([0.0, 0.1], True)
    """
    if isinstance(eps_values, (str, bytes)) or not isinstance(eps_values, Iterable):
        raise TypeError(f"Expected eps_values to be a sequence of budgets, but got {eps_values!r}")
    values = [nonnegative_float(e, f"eps_values[{i}]") for i, e in enumerate(eps_values)]
    if not values:
        raise ValueError("Expected eps_values to hold at least one budget")
    rows = []
    for e in values:
        acc = robust_accuracy(model, data, _at_eps(attack, e), e, norm, **kw)
        rows.append({"eps": e, "robust_accuracy": acc})
    return rows


def minimal_eps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: float | str = float("inf"),
    attack: str | Callable[..., torch.Tensor] = "pgd",
    lo: float = 0.0,
    hi: float | None = None,
    tol: float = 1e-3,
    domain: tuple[float, float] = (0.0, 1.0),
    **kw: Any,
) -> torch.Tensor:
    """Per-example smallest budget at which the attack succeeds, by bisection.

    For each example keep a bracket ``[a_i, b_i]`` (attack fails at ``a_i``,
    succeeds at ``b_i``) and halve it with per-example budgets until
    ``b_i − a_i ≤ tol``; return ``b_i``. This assumes success is monotone in
    ε (true for a strong attack; a weak one can only make the estimate
    larger). With the multi-targeted attack ``"pgd-mt"`` and a linear model it
    recovers the exact distance ``min_j (z_y − z_j)/‖w_y − w_j‖_*``.

    Args:
        model: classifier; run in eval mode, mode restored.
        x: inputs ``(N, ...)`` inside ``domain``.
        y: labels ``(N,)``.
        norm: ``float("inf")`` or ``2``.
        attack: ``"fgsm"``, ``"pgd"``, ``"pgd-mt"``, ``"random"``, or a callable
            ``(model, x, y, eps) -> x_adv`` with ``eps`` a tensor ``(N,)``.
        lo: lower end of the bracket (``≥ 0``).
        hi: upper end; default the domain's diameter (``hi − lo`` of the domain
            for L∞, ``(hi − lo)·√d`` for L2), which every attack can reach.
        tol: bracket width at which bisection stops.
        domain: ``(lo, hi)`` of the inputs.
        **kw: forwarded to a named attack.

    Returns:
        ``(N,)`` float64 tensor on ``x``'s device: 0 for examples already
        misclassified, ``inf`` where the attack fails even at ``hi``.

    Example:
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> x, y = torch.tensor([[0.7, 0.3]]), torch.tensor([0])
        >>> round(float(minimal_eps(model, x, y, norm=float("inf"), attack="pgd-mt", tol=1e-4)[0]), 3)
        0.2
    """
    model = module_arg(model)
    norm = norm_arg(norm)
    domain = domain_arg(domain)
    lo = nonnegative_float(lo, "lo")
    tol = positive_float(tol, "tol")
    name, fn = _resolve_attack(attack)
    with eval_mode(model):
        x = attack_input(x, domain)
        with torch.no_grad():
            logits = logits_of(model, x)
        y = labels_arg(y, x.shape[0], logits.shape[1])
        width = domain[1] - domain[0]
        hi = (width if math.isinf(norm) else width * math.sqrt(x[0].numel())) if hi is None else nonnegative_float(hi, "hi")
        if hi <= lo:
            raise ValueError(f"Expected hi > lo, but got lo={lo!r}, hi={hi!r}")
        n = x.shape[0]

        def succeeds(idx: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            xs, ys = x[idx], y[idx]
            eps_x = eps.to(x.dtype)
            if name is None:
                x_adv = fn(model, xs, ys, eps_x)
            else:
                x_adv = fn(model, xs, ys, eps_x, norm=norm, domain=domain, **kw)
            x_adv = _check_adversarial(x_adv, xs, eps_x, norm, domain)
            with torch.no_grad():
                return logits_of(model, x_adv).argmax(1) != ys

        a = torch.full((n,), lo, dtype=torch.float64, device=x.device)
        b = torch.full((n,), hi, dtype=torch.float64, device=x.device)
        result = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
        wrong = logits.argmax(1) != y
        result[wrong] = 0.0
        open_idx = (~wrong).nonzero().squeeze(1)
        if open_idx.numel():
            reach = succeeds(open_idx, b[open_idx])
            open_idx = open_idx[reach]
            if lo > 0 and open_idx.numel():
                # an example already broken at lo has its estimate at lo
                at_lo = succeeds(open_idx, a[open_idx])
                result[open_idx[at_lo]] = lo
                open_idx = open_idx[~at_lo]
            for _ in range(max(0, math.ceil(math.log2((hi - lo) / tol)))):
                if open_idx.numel() == 0:
                    break
                mid = (a[open_idx] + b[open_idx]) / 2
                ok = succeeds(open_idx, mid)
                b[open_idx[ok]] = mid[ok]
                a[open_idx[~ok]] = mid[~ok]
            keep = open_idx
            result[keep] = b[keep]
    return result


class _UnitBoxImages(nn.Module):
    """The user's model seen as torchattacks expects it: images ``(N, C, H, W)`` in ``[0, 1]``.

    ``u ↦ f(lo + (hi − lo)·u)`` reshaped back to the model's input shape, with
    the parameters detached, so attacks that call ``.backward()`` (FAB) leave
    no gradient on them.
    """

    def __init__(self, model: nn.Module, lo: float, hi: float, input_shape: torch.Size) -> None:
        super().__init__()
        self.model = model
        self.lo, self.hi = lo, hi
        self.input_shape = tuple(input_shape)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = (self.lo + (self.hi - self.lo) * u).reshape(u.shape[0], *self.input_shape)
        params = {k: p.detach() for k, p in self.model.named_parameters()}
        return read_logits(torch.func.functional_call(self.model, params, (x,)), x.shape[0])


def _image_shape(shape: torch.Size) -> tuple[int, ...]:
    if len(shape) == 3:
        return tuple(shape)
    d = shape.numel()
    h = max(i for i in range(1, int(math.isqrt(d)) + 1) if d % i == 0)
    return (1, h, d // h)


def _collect(data: Any, n_examples: int | None, batch_size: int, device: torch.device,
             domain: tuple[float, float]):
    xs, ys, count = [], [], 0
    for xb, yb in batches(data, batch_size):
        xs.append(attack_input(to_device(xb, device), domain, "x of data"))
        ys.append(yb.to(device))
        count += xb.shape[0]
        if n_examples is not None and count >= n_examples:
            break
    if not xs:
        raise ValueError("Expected data to hold at least one example")
    x, y = torch.cat(xs), torch.cat(ys)
    if n_examples is not None:
        x, y = x[:n_examples], y[:n_examples]
    return x, y


@contextlib.contextmanager
def _rng_fork(device: torch.device):
    """Keep torchattacks' global ``manual_seed`` calls from leaking out."""
    # torchattacks reseeds through torch.manual_seed, which reseeds every CUDA device.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _torchattacks_attack(name: str, wrapped: nn.Module, norm: float, eps: float, steps: int,
                         n_queries: int, seed: int, n_classes: int):
    import torchattacks  # noqa: F401  (the caller reported a missing package already)

    ta_norm = "Linf" if math.isinf(norm) else "L2"
    cls = getattr(__import__("torchattacks", fromlist=[AUTOATTACK_COMPONENTS[name]]), AUTOATTACK_COMPONENTS[name])
    if name == "apgd-ce":
        return cls(wrapped, norm=ta_norm, eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce")
    if name == "apgd-dlr":
        return cls(wrapped, norm=ta_norm, eps=eps, steps=steps, n_restarts=1, seed=seed, loss="dlr")
    if name == "apgd-t":
        return cls(wrapped, norm=ta_norm, eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=n_classes)
    if name == "fab":
        return cls(wrapped, norm=ta_norm, eps=eps, steps=steps, n_restarts=1, seed=seed,
                   multi_targeted=True, n_classes=n_classes)
    return cls(wrapped, norm=ta_norm, eps=eps, n_queries=n_queries, n_restarts=1, seed=seed, loss="margin")


def autoattack_accuracy(
    model: nn.Module,
    data: Any,
    eps: float,
    norm: float | str = float("inf"),
    components: Sequence[str] = ("apgd-ce", "apgd-t", "fab", "square"),
    n_examples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    domain: tuple[float, float] = (0.0, 1.0),
    steps: int = 100,
    n_queries: int = 5000,
) -> dict[str, Any]:
    """AutoAttack-style robust accuracy through torchattacks: the standard number to report.

    Components run in order, each on the examples still robust after the
    previous ones (worst case over attacks, as AutoAttack does): APGD-CE,
    APGD-T (targeted DLR over the top classes), FAB-T, Square (5000 queries
    by default); ``"apgd-dlr"`` is also available. Inputs in ``domain=(lo,
    hi)`` are mapped to ``[0, 1]`` and ``ε`` scaled by ``1/(hi − lo)``; flat
    inputs are viewed as one-channel images, as torchattacks expects. Each
    adversarial batch is verified against budget and domain. torchattacks'
    global seeding is fenced off with ``torch.random.fork_rng``.

    Args:
        model: classifier; run in eval mode, mode restored.
        data: a Dataset of ``(x, y)``, a DataLoader, or a tuple ``(x, y)`` of tensors.
        eps: budget ``≥ 0`` in data units.
        norm: ``float("inf")`` or ``2``.
        components: names from :data:`AUTOATTACK_COMPONENTS`, run in this order.
        n_examples: evaluate the first ``n_examples`` only (``None``: all).
        seed: seed given to every component.
        batch_size: batch size of the evaluation.
        domain: ``(lo, hi)`` of the inputs.
        steps: iterations of APGD / FAB (AutoAttack's standard: 100).
        n_queries: Square's query budget.

    Returns:
        ``{"clean_accuracy", "robust_accuracy", "n_examples", "after": {component: robust
        accuracy after it}, "skipped": {component: reason}}``.

    Raises:
        ImportError: torchattacks is not installed.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> out = autoattack_accuracy(model, (x, y), eps=0.05, components=("apgd-ce",), steps=5)
        >>> out["robust_accuracy"] <= out["clean_accuracy"]
        True
    """
    try:
        import torchattacks  # noqa: F401
    except ImportError as err:
        raise ImportError(_TORCHATTACKS_HINT) from err
    model = module_arg(model)
    eps = nonnegative_float(eps, "eps")
    norm = norm_arg(norm)
    lo, hi = domain_arg(domain)
    batch_size = positive_int(batch_size, "batch_size")
    steps = positive_int(steps, "steps")
    n_queries = positive_int(n_queries, "n_queries")
    if n_examples is not None:
        n_examples = positive_int(n_examples, "n_examples")
    seed = nonnegative_int(seed, "seed")
    if isinstance(components, str) or not isinstance(components, Sequence) or not components:
        raise ValueError(f"Expected components to be a non-empty sequence of names, but got {components!r}")
    for c in components:
        if c not in AUTOATTACK_COMPONENTS:
            raise ValueError(f"Expected every entry of components to be one of {sorted(AUTOATTACK_COMPONENTS)}, but got {c!r}")

    with eval_mode(model):
        device = model_device(model, torch.device("cpu"))
        x, y = _collect(data, n_examples, batch_size, device, (lo, hi))
        x = attack_input(x, (lo, hi), "x of data")
        with torch.no_grad():
            logits = logits_of(model, x)
        y = labels_arg(y, x.shape[0], logits.shape[1], "y of data")
        n, n_classes = x.shape[0], logits.shape[1]
        robust = logits.argmax(1) == y
        clean_acc = float(robust.float().mean())
        image = _image_shape(x.shape[1:])
        wrapped = _UnitBoxImages(model, lo, hi, x.shape[1:]).eval()
        eps_unit = eps / (hi - lo)
        after: dict[str, float] = {}
        skipped: dict[str, str] = {}
        for name in components:
            if name == "apgd-dlr" and n_classes < 3:
                skipped[name] = "the DLR loss needs at least 3 classes"
                continue
            if name == "apgd-t" and n_classes < 4:
                skipped[name] = "the targeted DLR loss needs at least 4 classes"
                continue
            try:
                attack = _torchattacks_attack(name, wrapped, norm, eps_unit, steps, n_queries, seed, n_classes)
            except (ImportError, AttributeError) as err:
                skipped[name] = f"torchattacks.{AUTOATTACK_COMPONENTS[name]} could not be imported: {err}"
                continue
            idx = robust.nonzero().squeeze(1)
            for chunk in idx.split(batch_size):
                if chunk.numel() == 0:
                    continue
                u = ((x[chunk] - lo) / (hi - lo)).reshape(chunk.numel(), *image)
                with _rng_fork(device):
                    u_adv = attack(u, y[chunk])
                x_adv = (lo + (hi - lo) * u_adv.detach()).reshape(x[chunk].shape).to(x.dtype).clamp(lo, hi)
                x_adv = _check_adversarial(x_adv, x[chunk], eps, norm, (lo, hi))
                with torch.no_grad():
                    still = logits_of(model, x_adv).argmax(1) == y[chunk]
                robust[chunk] = robust[chunk] & still
            after[name] = float(robust.float().mean())
    return {
        "clean_accuracy": clean_acc,
        "robust_accuracy": float(robust.float().mean()),
        "n_examples": n,
        "after": after,
        "skipped": skipped,
    }


def gradient_masking_check(
    model: nn.Module,
    data: Any,
    eps_large: float,
    eps: float,
    norm: float | str = float("inf"),
    attack: str | Callable[..., torch.Tensor] = "pgd",
    black_box: str = "random",
    n_queries: int = 1000,
    max_large_eps_accuracy: float = 0.05,
    tol: float = 0.01,
    batch_size: int = 256,
    domain: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    **attack_kwargs: Any,
) -> dict[str, Any]:
    """Sanity checks that a white-box robust accuracy is not an artefact of masked gradients.

    Two symptoms (Athalye et al., Carlini et al.) are tested:

    1. at a large budget ``eps_large`` the white-box robust accuracy must fall
       to about 0 (``≤ max_large_eps_accuracy``): an unbounded attack must win;
    2. at ``eps`` the white-box attack must be at least as strong as a
       black-box one that reads only logits: ``acc_white ≤ acc_black + tol``.
       The black box is this library's :func:`~robustcompress.attacks.random_search`
       (``"random"``) or torchattacks' Square (``"square"``).

    Args:
        model, data, norm, batch_size, domain: as in :func:`robust_accuracy`.
        eps_large: a budget large enough to break every example.
        eps: the budget under test.
        attack: the white-box attack: a name, or a callable ``(model, x, y, eps)``
            (ε differs between the two checks, as in :func:`eps_sweep`).
        black_box: ``"random"`` or ``"square"``.
        n_queries: the black box's query budget.
        max_large_eps_accuracy: largest robust accuracy accepted at ``eps_large``.
        tol: slack allowed between white-box and black-box accuracy.
        seed: seed of both attacks.
        **attack_kwargs: forwarded to a named white-box attack.

    Returns:
        ``{"passed", "problems": [str], "clean_accuracy", "large_eps_accuracy",
        "white_box_accuracy", "black_box_accuracy"}``.

    Example:
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> x = torch.rand(16, 2)
        >>> y = model(x).argmax(1)
        >>> gradient_masking_check(model, (x, y), eps_large=1.0, eps=0.05, n_queries=50)["passed"]
        True
    """
    eps_large = nonnegative_float(eps_large, "eps_large")
    eps = nonnegative_float(eps, "eps")
    if eps_large <= eps:
        raise ValueError(f"Expected eps_large > eps, but got eps_large={eps_large!r}, eps={eps!r}")
    max_large_eps_accuracy = fraction(max_large_eps_accuracy, "max_large_eps_accuracy", closed_right=True)
    tol = fraction(tol, "tol", closed_right=True)
    n_queries = positive_int(n_queries, "n_queries")
    if black_box not in ("random", "square"):
        raise ValueError(f"Expected black_box to be 'random' or 'square', but got black_box={black_box!r}")
    norm = norm_arg(norm)
    common = dict(norm=norm, batch_size=batch_size, domain=domain)
    white_kw = dict(attack_kwargs)
    if isinstance(attack, str):
        white_kw.setdefault("seed", seed)
    clean = accuracy(model, data, batch_size)
    large = robust_accuracy(model, data, _at_eps(attack, eps_large), eps_large, **common, **white_kw)
    white = robust_accuracy(model, data, _at_eps(attack, eps), eps, **common, **white_kw)
    if black_box == "random":
        black = robust_accuracy(model, data, "random", eps, n_queries=n_queries, seed=seed, **common)
    else:
        black = autoattack_accuracy(model, data, eps, norm, components=("square",), seed=seed,
                                    batch_size=batch_size, domain=domain, n_queries=n_queries)["robust_accuracy"]
    problems = []
    if large > max_large_eps_accuracy:
        problems.append(
            f"robust accuracy {large:.3f} at eps_large={eps_large:g} is above {max_large_eps_accuracy:g}: "
            "the attack cannot win even with a huge budget (masked or obfuscated gradients?)"
        )
    if white > black + tol:
        problems.append(
            f"white-box robust accuracy {white:.3f} exceeds the black-box one {black:.3f} at eps={eps:g}: "
            "gradients mislead the white-box attack"
        )
    return {
        "passed": not problems,
        "problems": problems,
        "clean_accuracy": clean,
        "large_eps_accuracy": large,
        "white_box_accuracy": white,
        "black_box_accuracy": black,
    }
