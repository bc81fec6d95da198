"""Fine-tune and measure a compressed model: parameters, MACs, clean / robust accuracy, UAP, curves.

Example:
    >>> count_macs(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.zeros(1, 4))
    18
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import fraction, module_arg, nonnegative_float, nonnegative_int, positive_float, positive_int
from .._utils import batches, eval_mode
from ..attacks import adversarial_batch, universal_perturbation
from ..evaluate import accuracy, robust_accuracy
from ..layers import LowRankConv2d, LowRankLinear
from ._common import example_from, first_param, mask_hooks
from ._kinds import LOW_RANK
from .pruning import prune
from .truncation import truncate

__all__ = ["count_parameters", "count_macs", "finetune", "measure", "compression_curve"]


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor once; a masked parameter counts its unmasked entries.

    Example:
        >>> count_parameters(nn.Linear(4, 3))
        15
    """
    model = module_arg(model)
    masked = {}
    for module in model.modules():
        for _, hook in mask_hooks(module):
            for pname, mask in hook.masks.items():
                masked[id(module.get_parameter(pname))] = int(mask.count_nonzero())
    seen = {id(p): p for p in model.parameters()}
    return sum(masked.get(i, p.numel()) for i, p in seen.items())


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on one example, over Linear, Conv and low-rank layers.

    Counted with forward hooks on ``example_input[:1]`` (per output element):
    Linear ``n``; Conv ``(c_in/groups)·Π kernel``; LowRankLinear
    ``r·(n + m)`` per output vector; LowRankConv2d ``r·(c_in·kh·kw + c_out)``
    per output position. Masked layers count as dense.

    Args:
        model: the network (run in eval mode, mode restored).
        example_input: a batch; only its first example is used.

    Returns:
        The number of multiply-accumulates.

    Example:
        >>> count_macs(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.zeros(1, 4))
        18
    """
    model = module_arg(model)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError("Expected example_input to be a non-empty batch tensor (N, ...)")
    total = [0]

    def hook(module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        if isinstance(module, LowRankLinear):
            total[0] += out.numel() // module.out_features * module.rank * (module.in_features + module.out_features)
        elif isinstance(module, LowRankConv2d):
            kh, kw = module.kernel_size
            positions = out.numel() // module.out_channels
            total[0] += positions * module.rank * (module.in_channels * kh * kw + module.out_channels)
        elif isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features
        else:
            total[0] += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + LOW_RANK
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    x = example_input[:1]
    first = first_param(model)
    if first is not None:
        x = x.to(first.device)
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


# --------------------------------------------------------------------------- fine-tuning and measuring


def _penalties_arg(penalties: Any, model: nn.Module) -> list[nn.Module]:
    if penalties is None:
        return []
    if callable(penalties) and not isinstance(penalties, nn.Module):
        penalties = penalties(model)
    if isinstance(penalties, nn.Module):
        penalties = [penalties]
    out = list(penalties)
    for p in out:
        if not isinstance(p, nn.Module):
            raise TypeError(f"Expected penalties to be nn.Modules whose forward() returns a scalar, "
                            f"but got {type(p).__name__}")
        if hasattr(p, "check_model"):
            p.check_model(model)  # a penalty built on the uncompressed model reads the wrong weights
    return out


def finetune(
    model: nn.Module,
    data: Any,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    penalties: Sequence[nn.Module] | Callable[[nn.Module], Sequence[nn.Module]] | None = None,
    adversarial: Mapping[str, Any] | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Briefly retrain a compressed model in place: Adam on ``CE + Σ penalties``.

    ``loss = CE(f(x̃), y) + Σ_p p()`` per batch, where ``x̃`` is the clean batch
    or, with ``adversarial``, the mixed batch of
    :func:`robustcompress.attacks.adversarial_batch` (a share of PGD
    examples). Pruning masks stay in force (their entries get no gradient).
    The model's train/eval mode is restored and no gradient is left on its
    parameters.

    Args:
        model: the model to fine-tune (modified in place and returned).
        data: training data: a Dataset of ``(x, y)``, a DataLoader or a tuple ``(x, y)``.
        epochs: passes over ``data`` (0 returns the model unchanged).
        lr: Adam learning rate.
        batch_size: batch size (a DataLoader keeps its own).
        penalties: nn.Modules whose ``forward()`` returns a scalar loss term
            (e.g. :class:`robustcompress.penalties.SpectralNormPenalty` built on
            *this* model), or a callable ``model -> penalties`` (handy after
            compression, which creates new layers). A penalty that shares a
            ``SpectralState`` it does not own gets that state stepped once per step.
        adversarial: None, or keyword arguments of ``adversarial_batch``
            (``ratio``, ``eps``, ``norm``, ``steps``, ...).
        weight_decay: Adam weight decay.
        seed: seed of the batch order and the attacks.

    Returns:
        ``model``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = (torch.rand(32, 4), torch.randint(0, 2, (32,)))
        >>> finetune(model, data, epochs=1) is model
        True
    """
    model = module_arg(model)
    epochs = nonnegative_int(epochs, "epochs")
    lr = positive_float(lr, "lr")
    batch_size = positive_int(batch_size, "batch_size")
    weight_decay = nonnegative_float(weight_decay, "weight_decay")
    seed = nonnegative_int(seed, "seed")
    terms = _penalties_arg(penalties, model)
    if adversarial is not None and not isinstance(adversarial, Mapping):
        raise TypeError(f"Expected adversarial to be None or a mapping of adversarial_batch arguments, "
                        f"but got {type(adversarial).__name__}")
    adv = dict(adversarial or {})
    if epochs == 0:
        return model
    shared_states = {}
    for p in terms:
        if getattr(p, "owns_state", True) is False and hasattr(p, "state"):
            shared_states[id(p.state)] = p.state
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("Expected the model to have parameters that require gradients")
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    step = 0
    try:
        for epoch in range(epochs):
            for xb, yb in batches(data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed + epoch)):
                dev = first_param(model)
                xb, yb = xb.to(dev.device), yb.to(dev.device)
                if adv:
                    xb, yb = adversarial_batch(model, xb, yb, **{"seed": seed * 1_000_003 + step, **adv})
                for state in shared_states.values():
                    state.step()
                loss = F.cross_entropy(model(xb), yb)
                for p in terms:
                    loss = loss + p()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    finally:
        for m, t in modes:
            m.training = t
        opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = None
    return model


def measure(
    model: nn.Module,
    data: Any,
    eps_linf: float | None = 0.1,
    eps_l2: float | None = None,
    uap_eps: float | None = None,
    uap_norm: float | str = float("inf"),
    pgd_steps: int = 10,
    example_input: torch.Tensor | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float | int]:
    """Clean accuracy, PGD robust accuracy (L∞ and L2), UAP fooling rate, parameters and MACs.

    Accuracies come from :mod:`robustcompress.evaluate` (robust accuracy counts
    an example when it is classified correctly both clean and under a seeded
    PGD attack), the fooling rate from
    :func:`robustcompress.attacks.universal_perturbation`.

    Args:
        model: the classifier (run in eval mode, mode restored).
        data: test data: a Dataset of ``(x, y)``, a DataLoader or a tuple ``(x, y)``, inputs in [0, 1].
        eps_linf: PGD L∞ budget (None skips it).
        eps_l2: PGD L2 budget (None skips it).
        uap_eps: budget of a universal perturbation (None skips it).
        uap_norm: its norm.
        pgd_steps: PGD steps.
        example_input: input for :func:`count_macs` (default: the first example of ``data``).
        batch_size: evaluation batch size.
        seed: seed of the attacks.

    Returns:
        ``{"clean_acc", "robust_acc_linf"?, "robust_acc_l2"?, "uap_fooling_rate"?, "params", "macs"}``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> sorted(measure(model, (torch.rand(8, 4), torch.randint(0, 3, (8,))), eps_linf=None))
        ['clean_acc', 'macs', 'params']
    """
    model = module_arg(model)
    pgd_steps = positive_int(pgd_steps, "pgd_steps")
    batch_size = positive_int(batch_size, "batch_size")
    seed = nonnegative_int(seed, "seed")
    budgets = {}
    for key, eps in (("robust_acc_linf", eps_linf), ("robust_acc_l2", eps_l2)):
        if eps is not None:
            budgets[key] = nonnegative_float(eps, key.replace("robust_acc_", "eps_"))
    if uap_eps is not None:
        uap_eps = nonnegative_float(uap_eps, "uap_eps")
    example = example_input if example_input is not None else example_from(data)
    out: dict[str, float | int] = {"clean_acc": accuracy(model, data, batch_size=batch_size)}
    for key, eps in budgets.items():
        norm = float("inf") if key.endswith("linf") else 2
        out[key] = robust_accuracy(model, data, "pgd", eps=eps, norm=norm, steps=pgd_steps, seed=seed,
                                   batch_size=batch_size)
    if uap_eps is not None:
        _, rate = universal_perturbation(model, data, uap_eps, norm=uap_norm, seed=seed, batch_size=batch_size)
        out["uap_fooling_rate"] = rate
    out["params"] = count_parameters(model)
    out["macs"] = count_macs(model, example)
    return out


def _levels_arg(levels: Any, method: str) -> list[float]:
    if levels is None:
        return [0.0, 0.25, 0.5, 0.75, 0.9] if method == "prune" else [1.0, 0.5, 0.25, 0.1, 0.05]
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise TypeError(f"Expected levels to be a non-empty sequence of numbers, but got levels={levels!r}")
    if method == "prune":
        return [fraction(v, "levels[i] (pruning amount)") for v in levels]
    out = []
    for v in levels:
        v = fraction(v, "levels[i] (parameter budget)", closed_right=True)
        if v == 0:
            raise ValueError("Expected parameter budgets in (0, 1], but got 0")
        out.append(v)
    return out


def compression_curve(
    model: nn.Module,
    data: Any,
    levels: Sequence[float] | None = None,
    method: str = "prune",
    *,
    train_data: Any = None,
    example_inputs: torch.Tensor | None = None,
    importance: str | Callable = "l2",
    finetune_epochs: int = 0,
    finetune_kwargs: Mapping[str, Any] | None = None,
    eps_linf: float | None = 0.1,
    eps_l2: float | None = None,
    uap_eps: float | None = None,
    pgd_steps: int = 10,
    plot: str | os.PathLike | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Accuracy and robust accuracy against the fraction of parameters kept, one row per compression level.

    ``method="prune"``: each level is a pruning amount (fraction of units
    removed per layer, :func:`prune`); ``method="truncate"``: each level is a
    parameter budget (fraction of parameters kept, :func:`truncate`). Every
    level starts again from ``model`` (left unchanged), is optionally
    fine-tuned on ``train_data``, and is measured with :func:`measure` on ``data``.

    Args:
        model: the trained network.
        data: test data for :func:`measure`.
        levels: the compression levels (defaults: amounts 0, .25, .5, .75, .9 or budgets 1, .5, .25, .1, .05).
        method: ``"prune"`` or ``"truncate"``.
        train_data: data for fine-tuning (needed when ``finetune_epochs > 0``).
        example_inputs: for tracing / counting (default: the first example of ``data``).
        importance: pruning importance (see :func:`prune`).
        finetune_epochs: epochs of :func:`finetune` after compressing.
        finetune_kwargs: more arguments of :func:`finetune` (``lr``, ``penalties``, ``adversarial``, ...).
        eps_linf, eps_l2, uap_eps: budgets of :func:`measure` (None skips one).
        pgd_steps: PGD steps of :func:`measure`.
        plot: a path: save a matplotlib figure of the curve there.
        seed: seed of fine-tuning and attacks.

    Returns:
        A list of dicts with ``method, level, params, params_kept, macs, macs_kept, clean_acc``,
        and ``robust_acc_linf`` / ``robust_acc_l2`` / ``uap_fooling_rate`` when measured.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = (torch.rand(16, 4), torch.randint(0, 3, (16,)))
        >>> rows = compression_curve(model, data, levels=[0.0, 0.5], eps_linf=None)
        >>> [r["params"] for r in rows]
        [67, 35]
    """
    model = module_arg(model)
    if method not in ("prune", "truncate"):
        raise ValueError(f"Expected method to be 'prune' or 'truncate', but got method={method!r}")
    levels = _levels_arg(levels, method)
    finetune_epochs = nonnegative_int(finetune_epochs, "finetune_epochs")
    if finetune_epochs and train_data is None:
        raise ValueError("finetune_epochs > 0 needs train_data")
    kwargs = dict(finetune_kwargs or {})
    example = example_inputs if example_inputs is not None else example_from(data)
    dev = first_param(model)
    if dev is not None:
        example = example.to(dev.device)
    base_params = count_parameters(model)
    base_macs = count_macs(model, example)
    rows = []
    for level in levels:
        if method == "prune":
            small = prune(model, level, example_inputs=example, importance=importance)
        else:
            small = truncate(model, budget=level)
        if finetune_epochs:
            finetune(small, train_data, epochs=finetune_epochs, seed=seed, **kwargs)
        stats = measure(small, data, eps_linf=eps_linf, eps_l2=eps_l2, uap_eps=uap_eps, pgd_steps=pgd_steps,
                        example_input=example, seed=seed)
        rows.append({"method": method, "level": level, "params": stats["params"],
                     "params_kept": stats["params"] / base_params, "macs": stats["macs"],
                     "macs_kept": stats["macs"] / base_macs if base_macs else float("nan"),
                     **{k: v for k, v in stats.items() if k not in ("params", "macs")}})
    if plot is not None:
        _plot_curve(rows, plot)
    return rows


def _plot_curve(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure  # a Figure, not pyplot: no global figure state

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    x = [r["params_kept"] for r in rows]
    labels = {"clean_acc": "clean", "robust_acc_linf": "PGD L∞", "robust_acc_l2": "PGD L2",
              "uap_fooling_rate": "UAP fooling rate"}
    for key, label in labels.items():
        if key in rows[0]:
            ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("fraction of parameters kept")
    ax.set_ylabel("accuracy / rate")
    ax.set_title(f"compression curve ({rows[0]['method']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)

