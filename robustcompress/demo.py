"""The main job: ``python -m robustcompress.demo`` (or ``python -m robustcompress demo``).

On scikit-learn digits (pixels scaled to ``[0, 1]``) it trains one small MLP
(64-256-256-10, ReLU) five ways, all with the same optimiser (AdamW, weight
decay) and the same data order:

* ``dense``: the plain model;
* ``low-rank``: hidden layers factorised to rank ``r`` and trained from
  scratch (compression by *architecture*, :func:`robustcompress.layers.to_low_rank`);
* ``group-lasso``: ``λ Σ_i ‖w_i‖_2`` on the hidden rows (compression by a
  *regulariser*, :class:`robustcompress.penalties.GroupLassoPenalty`);
* ``low-rank + penalty`` and ``group-lasso + penalty``: the same, plus the
  sensitive-direction penalty ``μ Σ_l σ₁(W_l)²`` on the hidden layers
  (:func:`robustcompress.penalties.default_penalties`), added through the
  optimizer wrapper :func:`robustcompress.optim.wrap` with no change to the loss.

It then prints one table — clean accuracy, PGD L∞ and L2 robust accuracy,
universal-perturbation fooling rate, prunable fraction (hidden neurons
actually removed by :func:`robustcompress.compress.prune` at ≤ 1 point
accuracy loss), rank for 99 % energy per hidden layer, the largest ``σ₁``,
the certified ``K₂`` and the median certified L2 radius — and writes two
PNG plots (per-layer spectra; robust accuracy against compressibility).

Why these columns: for a chain of layers
``log K₂ = Σ_l log ‖W_l‖_F + ½ Σ_l log c_spec(W_l)`` with
``c_spec = σ₁²/‖W‖_F²``. Compression (low rank, few heavy rows) raises
``c_spec`` at a fixed scale, hence ``K₂``, hence the attacker's leverage; the
penalty pushes ``σ₁`` down without refilling the tail, so the model stays
compressible.

Example:
    >>> from robustcompress.demo import main
    >>> main(["--quick", "--out", "demo-out"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import fraction, nonnegative_float, positive_float, positive_int
from .attacks import fooling_rate, universal_perturbation
from .bound import certified_radius, lipschitz_bound
from .compress import prune
from .compress.exporting import export
from .data import digits
from .evaluate import accuracy, robust_accuracy
from .layers import layer_kind, to_dense, to_low_rank
from .metrics import layer_metrics, singular_values
from .models import MLP
from .optim import wrap
from .penalties import GroupLassoPenalty, default_penalties
from .spectral import SpectralState

__all__ = [
    "DemoConfig",
    "VARIANTS",
    "build_model",
    "make_penalties",
    "train_model",
    "prunable_fraction",
    "measure",
    "write_plots",
    "DemoResult",
    "config_from_args",
    "run_demo",
    "format_table",
    "add_arguments",
    "run_cli",
    "main",
]

#: The five ways the demo trains the model, in table order.
VARIANTS: tuple[str, ...] = (
    "dense",
    "low-rank",
    "low-rank + penalty",
    "group-lasso",
    "group-lasso + penalty",
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo (the table states the ones a reader needs).

    Attributes:
        seed: seed of the split, the initialisation, the batch order and the attacks.
        epochs: training epochs per variant.
        widths: hidden widths of the MLP.
        rank: inner rank of the factorised hidden layers.
        lr, weight_decay, batch_size: AdamW settings shared by every variant.
        group_lasso: strength ``λ`` of ``λ Σ_i ‖w_i‖_2``.
        penalty: strength ``μ`` of ``μ Σ_l σ₁(W_l)²`` (hidden layers).
        eps_linf, eps_l2: PGD budgets in input units (pixels in [0, 1]).
        pgd_steps, pgd_restarts: PGD iterations (the default APGD step-size schedule) and starts (the first at x, the rest random).
        uap_eps, uap_epochs: L∞ budget and passes of the universal perturbation.
        max_loss: accuracy loss allowed when measuring the prunable fraction (0.01 = 1 point).
        eval_examples: test examples used for attacks and radii (0: all).
    """

    seed: int = 0
    epochs: int = 100
    widths: tuple[int, ...] = (256, 256)
    rank: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    group_lasso: float = 1e-3
    penalty: float = 1e-2
    eps_linf: float = 0.1
    eps_l2: float = 0.5
    pgd_steps: int = 40
    pgd_restarts: int = 1
    uap_eps: float = 0.1
    uap_epochs: int = 5
    max_loss: float = 0.01
    eval_examples: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Expected seed to be a non-negative integer, but got seed={self.seed!r}")
        positive_int(self.epochs, "epochs")
        if not isinstance(self.widths, tuple) or not self.widths:
            raise ValueError(f"Expected widths to be a non-empty tuple of hidden widths, but got widths={self.widths!r}")
        for i, w in enumerate(self.widths):
            positive_int(w, f"widths[{i}]")
        positive_int(self.rank, "rank")
        positive_float(self.lr, "lr")
        nonnegative_float(self.weight_decay, "weight_decay")
        positive_int(self.batch_size, "batch_size")
        nonnegative_float(self.group_lasso, "group_lasso")
        nonnegative_float(self.penalty, "penalty")
        positive_float(self.eps_linf, "eps_linf")
        positive_float(self.eps_l2, "eps_l2")
        positive_int(self.pgd_steps, "pgd_steps")
        positive_int(self.pgd_restarts, "pgd_restarts")
        positive_float(self.uap_eps, "uap_eps")
        positive_int(self.uap_epochs, "uap_epochs")
        fraction(self.max_loss, "max_loss")
        if isinstance(self.eval_examples, bool) or not isinstance(self.eval_examples, int) or self.eval_examples < 0:
            raise ValueError(f"Expected eval_examples to be a non-negative integer, but got {self.eval_examples!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """Settings for CI (designed to finish in well under a minute on one CPU core)."""
        base = dict(epochs=12, pgd_steps=10, uap_epochs=2, eval_examples=200)
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------- models and training


def _variant_arg(variant: Any) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"Expected variant to be one of {VARIANTS}, but got variant={variant!r}")
    return variant


def build_model(variant: str, cfg: DemoConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The untrained MLP of one variant; every variant starts from the same seed.

    Args:
        variant: one of :data:`VARIANTS`.
        cfg: the demo settings (``widths``, ``rank``, ``seed``).
        device: where the model lives.

    Returns:
        ``MLP(64, cfg.widths, 10)``, with the hidden layers replaced by freshly
        initialised rank-``cfg.rank`` factorisations for the low-rank variants.

    Example:
        >>> type(build_model("low-rank", DemoConfig())[1]).__name__
        'LowRankLinear'
    """

    variant = _variant_arg(variant)
    # A private RNG stream: the caller's global generator is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = MLP(64, cfg.widths, 10)
        if variant.startswith("low-rank"):
            model = to_low_rank(model, cfg.rank, from_weights=False, inplace=True)
    return model.to(device)


def make_penalties(variant: str, model: nn.Module, cfg: DemoConfig) -> list:
    """The loss terms of one variant (an empty list for ``dense`` and ``low-rank``).

    ``group-lasso`` adds :class:`~robustcompress.penalties.GroupLassoPenalty`
    (``λ Σ_i ‖w_i‖_2`` over the hidden rows); ``+ penalty`` adds
    :func:`~robustcompress.penalties.default_penalties` (``μ Σ_l σ₁(W_l)²``
    over the hidden layers, ``σ₁`` from warm power iteration). All terms read
    one shared :class:`~robustcompress.spectral.SpectralState`, which
    :func:`robustcompress.optim.wrap` finds and steps once per training step.

    Args:
        variant: one of :data:`VARIANTS`.
        model: the model the terms act on.
        cfg: strengths ``group_lasso`` and ``penalty``.

    Returns:
        A list of penalties for :func:`robustcompress.optim.wrap`.

    Example:
        >>> cfg = DemoConfig()
        >>> [type(p).__name__ for p in make_penalties("group-lasso + penalty", build_model("dense", cfg), cfg)]
        ['GroupLassoPenalty', 'SpectralNormPenalty']
    """

    variant = _variant_arg(variant)
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    if variant in ("dense", "low-rank"):
        return []
    state = SpectralState(model, k=1, seed=cfg.seed)
    terms: list = []
    if variant.startswith("group-lasso"):
        terms.append(GroupLassoPenalty(state, strength=cfg.group_lasso))
    if variant.endswith("+ penalty"):
        terms.extend(default_penalties(state, strength=cfg.penalty))
    return terms


def train_model(
    model: nn.Module,
    train: torch.utils.data.TensorDataset,
    cfg: DemoConfig,
    penalties: Sequence = (),
    desc: str = "train",
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place with AdamW (plus ``penalties``), then put it in eval mode.

    ``min_θ  E[CE(f_θ(x), y)] + Σ_terms term(θ)``, minibatches of
    ``cfg.batch_size`` in an order fixed by ``cfg.seed`` (the same for every
    variant). The penalties enter through :func:`robustcompress.optim.wrap`,
    so the loss below is the plain task loss.

    Args:
        model: the network (its parameters' device is used for the data).
        train: ``(x, y)`` tensors.
        cfg: optimiser settings and epochs.
        penalties: loss terms (see :func:`make_penalties`).
        desc: label of the progress bar.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The trained model (the same object), in eval mode.
    """
    from tqdm.auto import tqdm


    device = next(model.parameters()).device
    x, y = (t.to(device) for t in train.tensors)
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if penalties:
        opt = wrap(opt, model, penalties=list(penalties))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(range(cfg.epochs), desc=f"{desc:>22}", disable=not progress, leave=False, file=sys.stderr)
    for _ in bar:
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            idx = idx.to(device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        bar.set_postfix(loss=f"{total / len(x):.3f}")
    bar.close()
    model.eval()
    opt.zero_grad(set_to_none=True)
    return model


# --------------------------------------------------------------------------- measurements


#: The registry kinds the demo's MLPs are made of.
_DENSE_KINDS = ("linear", "lowrank_linear")


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's weight layers (registry kinds Linear and low-rank Linear), input to output."""
    return [(n, m) for n, m in model.named_modules()
            if (kind := layer_kind(m)) is not None and kind.name in _DENSE_KINDS]


def _subset(data: torch.utils.data.TensorDataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The stratified split already shuffled the test set, so its first n examples are a fair sample.
    x, y = data.tensors
    return (x, y) if n <= 0 or n >= len(x) else (x[:n], y[:n])


def _hidden_neurons(model: nn.Module) -> int:
    return sum(m.out_features for _, m in _linear_layers(model)[:-1])


def prunable_fraction(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    max_loss: float = 0.01,
    resolution: float = 0.02,
) -> float:
    """Largest share of hidden neurons that structured pruning actually removes at ≤ ``max_loss`` accuracy loss.

    ``max {removed/total : acc(prune(model, a)) ≥ acc(model) − max_loss}`` over
    amounts ``a`` on a grid of step ``resolution`` (bisection: accuracy falls
    with the amount in practice, and the grid keeps the answer reproducible).
    Pruning is :func:`robustcompress.compress.prune` (rows of smallest norm,
    whole neurons removed together with the next layer's matching columns, no
    fine-tuning); the share counts the neurons the pruned model really lost.
    Factorised layers are pruned as their dense product ``B·A`` (:func:`~robustcompress.layers.to_dense`):
    removing a neuron removes a row of ``B``.

    Args:
        model: a trained model in eval mode (not modified).
        data: ``(x, y)`` on which accuracy is measured.
        max_loss: allowed accuracy drop, in ``[0, 1)``.
        resolution: grid step of the amounts, in ``(0, 0.5]``.

    Returns:
        The prunable fraction in ``[0, 1]``.
    """

    max_loss = fraction(max_loss, "max_loss")
    resolution = positive_float(resolution, "resolution")
    if resolution > 0.5:
        raise ValueError(f"Expected resolution to lie in (0, 0.5], but got resolution={resolution!r}")
    x, y = data
    model = to_dense(model)
    base = accuracy(model, (x, y))
    total = _hidden_neurons(model)

    def removed_if_ok(amount: float) -> float | None:
        pruned = prune(model, amount, example_inputs=x[:1])
        if accuracy(pruned, (x, y)) < base - max_loss - 1e-12:
            return None
        return 1.0 - _hidden_neurons(pruned) / total

    steps = int(math.floor(0.999999 / resolution))
    lo, hi, best = 0, steps + 1, 0.0  # invariant: amount lo·res passes, hi·res fails (or is out of range)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        share = removed_if_ok(mid * resolution)
        if share is None:
            hi = mid
        else:
            lo, best = mid, max(best, share)
    return best


def measure(
    model: nn.Module,
    train: torch.utils.data.TensorDataset,
    test: torch.utils.data.TensorDataset,
    cfg: DemoConfig,
) -> dict[str, Any]:
    """Every column of the demo's table for one trained model.

    * ``clean``: test accuracy;
    * ``pgd_linf`` / ``pgd_l2``: PGD robust accuracy (``cfg.pgd_steps`` steps,
      APGD step-size schedule, first start at x, cross-entropy) at ``cfg.eps_linf`` / ``cfg.eps_l2``;
    * ``uap``: fooling rate on the test set of one L∞ universal perturbation
      (budget ``cfg.uap_eps``) fitted on the training set;
    * ``prunable``: share of hidden neurons :func:`robustcompress.compress.prune`
      removes while the test accuracy drops by at most ``cfg.max_loss``;
    * ``rank99``: per hidden layer, the fewest singular values holding 99 % of ``‖W‖_F²``;
    * ``sigma1``: ``max_l σ₁(W_l)`` (exact float64 SVD);
    * ``k2``: certified upper bound of the network's L2 Lipschitz constant;
    * ``radius``: median over the evaluated test examples of the certified L2
      radius ``M(x)/K'`` (0 where misclassified);
    * ``certified_l2``: share of those examples certified beyond ``cfg.eps_l2``
      (a lower bound of any L2 robust accuracy at that budget);
    * ``spectra``: all singular values of each layer, for the plot.

    Args:
        model: a trained model in eval mode.
        train, test: the digits split.
        cfg: budgets and attack settings.

    Returns:
        A dict with the keys above (``rank99`` and ``spectra`` are lists).
    """

    device = next(model.parameters()).device
    x_eval, y_eval = (t.to(device) for t in _subset(test, cfg.eval_examples))
    xt, yt = (t.to(device) for t in test.tensors)
    row: dict[str, Any] = {}
    row["clean"] = accuracy(model, (xt, yt))
    attack = dict(steps=cfg.pgd_steps, restarts=cfg.pgd_restarts, seed=cfg.seed)
    row["pgd_linf"] = robust_accuracy(model, (x_eval, y_eval), "pgd", eps=cfg.eps_linf, norm=float("inf"), **attack)
    row["pgd_l2"] = robust_accuracy(model, (x_eval, y_eval), "pgd", eps=cfg.eps_l2, norm=2, **attack)
    delta, _ = universal_perturbation(model, tuple(t.to(device) for t in train.tensors), eps=cfg.uap_eps,
                                      norm=float("inf"), epochs=cfg.uap_epochs, seed=cfg.seed)
    row["uap"] = fooling_rate(model, (xt, yt), delta)
    row["prunable"] = prunable_fraction(model, (xt, yt), max_loss=cfg.max_loss)
    layers = _linear_layers(model)
    row["rank99"] = [int(layer_metrics(model, n)["rank_99"].value) for n, _ in layers[:-1]]
    row["spectra"] = [singular_values(m.weight).tolist() for _, m in layers]
    row["sigma1"] = max(s[0] for s in row["spectra"])
    bound = lipschitz_bound(model, (64,), norm=2)
    row["k2"] = float(bound.K2)
    radii = certified_radius(model, x_eval, y_eval, norm=2, bound=bound)
    row["radius"] = float(radii.double().median())
    # Examples whose certificate exceeds the L2 budget: no attack at that budget can flip them.
    row["certified_l2"] = float((radii > cfg.eps_l2).double().mean())
    return row


# --------------------------------------------------------------------------- the table and the plots

#: (key, header, format) of the table's numeric columns.
_COLUMNS = (
    ("clean", "clean", "{:.3f}"),
    ("pgd_linf", "PGD-L∞", "{:.3f}"),
    ("pgd_l2", "PGD-L2", "{:.3f}"),
    ("uap", "UAP fool", "{:.3f}"),
    ("prunable", "prunable", "{:.3f}"),
    ("rank99", "rank99", None),
    ("sigma1", "max σ₁", "{:.2f}"),
    ("k2", "K₂", "{:.1f}"),
    ("radius", "L2 radius", "{:.4f}"),
)


def format_table(rows: dict[str, dict[str, Any]], cfg: DemoConfig, n_train: int, n_test: int) -> str:
    """The demo's table as text: one line per variant, the settings stated above it.

    Args:
        rows: ``{variant: measure(...) dict}`` in table order.
        cfg: the settings (budgets, steps, epochs) written into the header.
        n_train, n_test: sizes of the split.

    Returns:
        The table (no trailing newline). Identical for identical inputs.

    Example:
        >>> row = dict(clean=1.0, pgd_linf=0.5, pgd_l2=0.5, uap=0.1, prunable=0.5, rank99=[8, 8],
        ...            sigma1=2.0, k2=10.0, radius=0.01)
        >>> "dense" in format_table({"dense": row}, DemoConfig(), 1437, 360)
        True
    """
    n_eval = n_test if cfg.eval_examples <= 0 else min(cfg.eval_examples, n_test)
    widths = "-".join(str(w) for w in (64, *cfg.widths, 10))
    header = [
        f"digits ({n_train} train / {n_test} test, pixels in [0, 1]); MLP {widths} ReLU; seed {cfg.seed}; "
        f"{cfg.epochs} epochs AdamW lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, batch {cfg.batch_size}",
        f"low-rank: hidden layers rank {cfg.rank}; group-lasso: λ={cfg.group_lasso:g}·Σ‖w_i‖₂; "
        f"+ penalty: μ={cfg.penalty:g}·Σσ₁² (hidden layers)",
        f"PGD-L∞ ε={cfg.eps_linf:g}, PGD-L2 ε={cfg.eps_l2:g}: {cfg.pgd_steps} steps, APGD step-size schedule, "
        f"{cfg.pgd_restarts} start(s) (the first at x), {n_eval} test examples; UAP: L∞ ε={cfg.uap_eps:g}, "
        f"{cfg.uap_epochs} epochs on train, fooling rate on test",
        f"prunable: share of hidden neurons removed at ≤ {100 * cfg.max_loss:g} point(s) test accuracy loss; "
        "rank99: per hidden layer; K₂: certified L2 Lipschitz bound; L2 radius: median certified radius",
        "",
    ]
    names = ["variant"] + [h for _, h, _ in _COLUMNS]
    cells = []
    for variant, row in rows.items():
        line = [variant]
        for key, _, fmt in _COLUMNS:
            value = row[key]
            line.append("/".join(str(v) for v in value) if fmt is None else fmt.format(value))
        cells.append(line)
    sizes = [max(len(r[i]) for r in [names] + cells) for i in range(len(names))]
    fmt_line = lambda r: "  ".join(c.ljust(sizes[0]) if i == 0 else c.rjust(sizes[i]) for i, c in enumerate(r))
    body = [fmt_line(names), "  ".join("-" * s for s in sizes)] + [fmt_line(r) for r in cells]
    return "\n".join(header + body)


_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)))


def _figure(width: float, height: float):
    # A bare Figure with an Agg canvas: PNGs without touching pyplot's global backend. Constrained layout
    # makes room for a legend placed outside the axes.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


#: singular values below this share of σ₁ are numerical zeros (a rank-r layer has exactly r nonzero ones)
SPECTRUM_FLOOR = 1e-5


def _plot_spectra(rows: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
    n_layers = max(len(r["spectra"]) for r in rows.values())
    fig = _figure(3.6 * n_layers + 1.6, 3.6)
    axes = fig.subplots(1, n_layers, squeeze=False)[0]
    for li, ax in enumerate(axes):
        for vi, (variant, row) in enumerate(rows.items()):
            if li < len(row["spectra"]):
                s = torch.tensor(row["spectra"][li], dtype=torch.float64)
                s = s[s > SPECTRUM_FLOOR * float(s.max())] if len(s) and float(s.max()) > 0 else s[:0]
                ax.semilogy(range(1, len(s) + 1), s.numpy(), label=variant, lw=1.4,
                            ls=_LINESTYLES[vi % len(_LINESTYLES)])
        kind = "head" if li == n_layers - 1 else f"hidden {li + 1}"
        ax.set_xlabel(f"index j — layer {li + 1} ({kind})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("σ_j")
    handles, labels = axes[0].get_legend_handles_labels()
    # Beside the axes (not over the data); bbox_inches="tight" below keeps it in the PNG (matplotlib ≥ 3.6).
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.92), fontsize=7)
    fig.suptitle(f"per-layer singular values (same seed, same optimiser; values below {SPECTRUM_FLOOR:g}·σ₁ "
                 "are numerical zeros and not drawn)", fontsize=9)
    fig.savefig(path, bbox_inches="tight")


def _plot_scatter(rows: dict[str, dict[str, Any]], path: pathlib.Path, cfg: DemoConfig) -> None:
    fig = _figure(10.5, 4.0)
    ax1, ax2 = fig.subplots(1, 2)
    markers = ("o", "s", "^", "D", "v", "P", "X", "*")
    for vi, (variant, row) in enumerate(rows.items()):
        mean_rank = sum(row["rank99"]) / max(len(row["rank99"]), 1)
        for ax, x in ((ax1, row["prunable"]), (ax2, mean_rank)):
            ax.scatter([x], [row["pgd_linf"]], s=40, marker=markers[vi % len(markers)], label=variant)
    ax1.set_xlabel(f"prunable share of hidden neurons (≤ {100 * cfg.max_loss:g} pt loss)\n→ more compressible")
    # Fewer directions is more compressible: the axis runs high → low so both panels read left → right.
    ax2.invert_xaxis()
    ax2.set_xlabel("mean rank99 of hidden layers (axis reversed)\n→ more compressible")
    ax1.set_ylabel(f"PGD L∞ robust accuracy (ε={cfg.eps_linf:g})")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.1)
    handles, labels = ax1.get_legend_handles_labels()
    # Beside the axes (not over the data); bbox_inches="tight" below keeps it in the PNG (matplotlib ≥ 3.6).
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.92), fontsize=7)
    fig.suptitle("robustness against compressibility (up and right is better)", fontsize=10)
    fig.savefig(path, bbox_inches="tight")


def write_plots(rows: dict[str, dict[str, Any]], out_dir: pathlib.Path, cfg: DemoConfig) -> list[pathlib.Path]:
    """Write ``spectra.png`` (per-layer singular values) and ``robust_vs_compressibility.png``.

    One title per figure, legends outside the axes; singular values below
    ``SPECTRUM_FLOOR · σ₁`` (numerical zeros, e.g. beyond a factorised layer's
    rank) are not drawn; both scatter panels put "more compressible" on the right.

    Args:
        rows: ``{variant: measure(...) dict}``.
        out_dir: an existing folder.
        cfg: budgets for the axis labels.

    Returns:
        The two paths written.
    """
    spectra, scatter = out_dir / "spectra.png", out_dir / "robust_vs_compressibility.png"
    _plot_spectra(rows, spectra)
    _plot_scatter(rows, scatter, cfg)
    return [spectra, scatter]


# --------------------------------------------------------------------------- the job


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        rows: ``{variant: measurements}`` in table order (see :func:`measure`).
        table: the printed table.
        files: the files written (table, JSON results, plots).
        seconds: wall time of the whole run.
    """

    rows: dict[str, dict[str, Any]]
    table: str
    files: list[pathlib.Path]
    seconds: float


def run_demo(
    cfg: DemoConfig,
    out_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    progress: bool = True,
    variants: Sequence[str] = VARIANTS,
    save_models: str | os.PathLike | None = None,
) -> DemoResult:
    """Train every variant, measure it, write the table, the JSON results and the plots.

    Args:
        cfg: the settings.
        out_dir: folder for ``table.txt``, ``results.json``, ``spectra.png`` and
            ``robust_vs_compressibility.png`` (created if missing).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, … (must be available).
        progress: show a tqdm bar per variant.
        variants: which rows to run, a subset of :data:`VARIANTS` in any order.
        save_models: a folder (created if missing) to save each trained model
            to, as ``VARIANT.pt`` written by :func:`robustcompress.compress.export`
            (the low-rank layers' shapes included), so ``python -m robustcompress
            report`` / ``compress`` read every variant with ``--model
            robustcompress.models:MLP --model-kwargs '{"widths": [...]}'``.

    Returns:
        A :class:`DemoResult`.

    Example:
        >>> result = run_demo(DemoConfig.quick(), "demo-out", progress=False)  # doctest: +SKIP
        >>> sorted(result.rows) == sorted(VARIANTS)  # doctest: +SKIP
        True
    """

    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"Expected cfg to be a DemoConfig, but got {type(cfg).__name__}")
    device = _device_arg(device)
    if isinstance(variants, str) or not variants:
        raise ValueError(f"Expected variants to be a non-empty sequence of {VARIANTS}, but got {variants!r}")
    variants = [_variant_arg(v) for v in variants]
    for arg, value in (("out_dir", out_dir), ("save_models", save_models)):
        if not isinstance(value, (str, os.PathLike)) and not (arg == "save_models" and value is None):
            raise TypeError(f"Expected {arg} to be a str or os.PathLike, but got {type(value).__name__}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models_dir = pathlib.Path(save_models) if save_models is not None else None
    if models_dir is not None:
        models_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    train, test = digits(seed=cfg.seed)
    rows: dict[str, dict[str, Any]] = {}
    for variant in variants:
        model = build_model(variant, cfg, device)
        train_model(model, train, cfg, make_penalties(variant, model, cfg), desc=variant, progress=progress)
        rows[variant] = measure(model, train, test, cfg)
        if models_dir is not None:
            export(model, models_dir / f"{variant}.pt",
                   info={"variant": variant, "model": "robustcompress.models:MLP",
                         "model_kwargs": {"in_features": 64, "widths": list(cfg.widths), "num_classes": 10}})
    table = format_table(rows, cfg, len(train), len(test))
    files = [out / "table.txt", out / "results.json"]
    files[0].write_text(table + "\n", encoding="utf-8")
    payload = {"config": dataclasses.asdict(cfg), "device": str(device), "rows": rows}
    files[1].write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    files += write_plots(rows, out, cfg)
    return DemoResult(rows, table, files, time.perf_counter() - start)


def _device_arg(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"Expected device to be a torch device such as 'cpu' or 'cuda', but got device={device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested, but CUDA is not available here; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Expected device to be 'cpu' or 'cuda[:index]', but got device={device!r}")
    return dev


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's flags to ``parser`` (used by ``python -m robustcompress demo``).

    Example:
        >>> p = add_arguments(argparse.ArgumentParser())
        >>> p.parse_args(["--quick", "--seed", "3"]).seed
        3
    """
    defaults = DemoConfig()
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init, batch order and attacks (default 0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs per variant (default {defaults.epochs}; "
                             f"{DemoConfig.quick().epochs} with --quick)")
    parser.add_argument("--out", default="robustcompress-demo",
                        help="output folder for table.txt, results.json and the PNG plots (default ./robustcompress-demo)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="CI settings: fewer epochs, PGD steps and UAP passes, 200 evaluation examples")
    parser.add_argument("--rank", type=int, default=defaults.rank,
                        help=f"rank of the factorised hidden layers (default {defaults.rank})")
    parser.add_argument("--penalty", type=float, default=defaults.penalty,
                        help=f"strength μ of the σ₁² penalty (default {defaults.penalty:g})")
    parser.add_argument("--group-lasso", type=float, default=defaults.group_lasso,
                        help=f"strength λ of the group lasso (default {defaults.group_lasso:g})")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress bars (they are hidden anyway when stderr is not a terminal)")
    parser.add_argument("--save-models", default=None, metavar="DIR",
                        help="save each trained model to DIR/VARIANT.pt (an export file: report and compress read it)")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The :class:`DemoConfig` the parsed flags describe."""
    overrides: dict[str, Any] = dict(seed=args.seed, rank=args.rank, penalty=args.penalty,
                                     group_lasso=args.group_lasso)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    return DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)


def run_cli(args: argparse.Namespace) -> int:
    """Run the demo for parsed flags, print the table; returns the exit status."""
    try:
        cfg = config_from_args(args)
        device = _device_arg(args.device)
    except (TypeError, ValueError) as err:
        print(f"robustcompress demo: error: {err}", file=sys.stderr)
        return 2
    # A progress bar redraws itself with carriage returns: only useful on a terminal, spam in a log file.
    progress = not args.no_progress and sys.stderr.isatty()
    result = run_demo(cfg, args.out, device=device, progress=progress, save_models=args.save_models)
    print(result.table)
    print()
    print(f"wrote {', '.join(str(f) for f in result.files)} ({result.seconds:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m robustcompress.demo [flags]``; returns the exit status.

    Example:
        >>> main(["--quick", "--out", "demo-out", "--no-progress"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(
        prog="python -m robustcompress.demo",
        description="Train a digits MLP dense, low-rank and group-lasso, each with and without the "
                    "sensitive-direction penalty; print robustness and compressibility side by side.",
    )
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
