"""Shared pieces of the findings scripts (f), (g) and the default sweep: training, measuring, statistics.

Only the package-root API (``import robustcompress as rc``) is used, so the
scripts keep working while the package's modules move. Not a public module.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import robustcompress as rc
from robustcompress.demo import prunable_fraction

EPS_LINF = (0.05, 0.1)
EPS_L2 = 0.5
UAP_EPS = 0.1


# ----------------------------------------------------------------------------- layers


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and LowRankLinear layers in module order (the head is the last one)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, rc.LowRankLinear))]


def spectrum(w: torch.Tensor) -> torch.Tensor:
    """All singular values of ``w`` in float64, descending."""
    return torch.linalg.svdvals(w.detach().double())


def spectral_stats(w: torch.Tensor) -> dict[str, float]:
    """σ₁, ‖W‖_F, stable rank ‖W‖_F²/σ₁², c_spec = σ₁²/‖W‖_F², rank99, c_neu = max_i‖w_i‖²/‖W‖_F²."""
    s = spectrum(w)
    e = s.square()
    total = float(e.sum())
    rank99 = int(torch.searchsorted(torch.cumsum(e, 0) / total, torch.tensor(0.99, dtype=e.dtype)).item()) + 1
    rows = w.detach().double().square().sum(1)
    return {"sigma1": float(s[0]), "frob": math.sqrt(total), "stable_rank": total / float(e[0]),
            "c_spec": float(e[0]) / total, "rank99": min(rank99, s.numel()), "c_neu": float(rows.max()) / total}


# ----------------------------------------------------------------------------- training


def train(model: nn.Module, data: TensorDataset, *, epochs: int, batch_size: int = 64, seed: int = 0,
          optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 1e-2, momentum: float = 0.9,
          penalties: Callable[[nn.Module], list] | None = None,
          input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """Minibatch training of ``CE(model(x), y)`` in a data order fixed by ``seed``; penalties through ``rc.wrap``.

    ``optimizer``: ``"adamw"`` (decoupled weight decay) or ``"sgd"`` (momentum, L2 weight decay in the gradient).
    """
    x, y = data.tensors
    if input_fn is not None:
        x = input_fn(x)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"Expected optimizer 'adamw' or 'sgd', but got {optimizer!r}")
    terms = penalties(model) if penalties is not None else []
    if terms:
        opt = rc.wrap(opt, model, penalties=terms)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged (loss {float(loss)})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    opt.zero_grad(set_to_none=True)
    return model


# ----------------------------------------------------------------------------- measuring


def normalised_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Median over correctly classified examples of ``(f_y − max_{j≠y} f_j) / Π_l ‖W_l‖_F`` (scale-free margin)."""
    with torch.no_grad():
        logits = model(x).double()
    fy = logits.gather(1, y[:, None]).squeeze(1)
    margin = fy - logits.scatter(1, y[:, None], float("-inf")).max(1).values
    ok = margin > 0
    prod = 1.0
    for _, m in weight_layers(model):
        prod *= float(m.weight.detach().double().norm())
    return float((margin[ok] / prod).median()) if bool(ok.any()) else 0.0


def jacobian_sensitivity(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Local sensitivity from the input–logit Jacobian ``J(x) = ∂f(x)/∂x`` (exact, per example).

    Returns the mean and median over ``x`` of ``‖J(x)‖₂`` (the local L2 gain, a lower bound of any
    Lipschitz constant) and the mean of ``‖J(x)‖_{∞→2}``'s lower bound ``max_i ‖J(x)_i‖₁`` (the
    L∞ gain of the most sensitive logit).
    """
    from torch.func import jacrev, vmap

    was = model.training
    model.eval()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def f(xi):
        return torch.func.functional_call(model, (params, buffers), (xi[None],))[0]

    with torch.no_grad():
        jac = vmap(jacrev(f))(x)  # (N, classes, d)
    jac = jac.reshape(jac.shape[0], jac.shape[1], -1).double()
    s1 = torch.linalg.matrix_norm(jac, ord=2)
    l1 = jac.abs().sum(-1).max(-1).values
    model.train(was)
    return {"jac_l2_mean": float(s1.mean()), "jac_l2_median": float(s1.median()), "jac_linf_mean": float(l1.mean())}


def measure(model: nn.Module, train_set: TensorDataset, test_set: TensorDataset, seed: int, *,
            pgd_steps: int = 40, uap_epochs: int = 5, parts: Iterable[str] = ("attacks", "uap", "bound", "prune",
                                                                               "spectra", "margin"),
            input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
            layers: list[tuple[str, nn.Module]] | None = None) -> dict[str, Any]:
    """Robustness and compressibility of a trained model.

    Keys: ``clean``; ``pgd_linf`` (ε=0.1), ``pgd_linf_005``, ``pgd_l2`` (ε=0.5) with PGD of ``pgd_steps``
    steps (the default APGD step-size schedule, one random start); ``uap`` (fooling rate of one L∞ ε=0.1 universal perturbation);
    ``k2`` and ``log_scale`` / ``log_concentration`` (certified bound, when the model has a rule);
    ``prunable``; per measured layer ``layers`` → ``{name: spectral_stats}``; ``norm_margin``.
    ``layers`` defaults to the hidden weight layers (all but the head).
    """
    parts = set(parts)
    x, y = test_set.tensors
    xt, yt = train_set.tensors
    if input_fn is not None:
        x, xt = input_fn(x), input_fn(xt)
    row: dict[str, Any] = {"clean": rc.accuracy(model, (x, y))}
    atk = dict(steps=pgd_steps, seed=seed)
    if "attacks" in parts or "linf" in parts:
        row["pgd_linf"] = rc.robust_accuracy(model, (x, y), "pgd", eps=EPS_LINF[1], norm=float("inf"), **atk)
    if "attacks" in parts:
        row["pgd_linf_005"] = rc.robust_accuracy(model, (x, y), "pgd", eps=EPS_LINF[0], norm=float("inf"), **atk)
        row["pgd_l2"] = rc.robust_accuracy(model, (x, y), "pgd", eps=EPS_L2, norm=2, **atk)
    if "uap" in parts:
        delta, _ = rc.universal_perturbation(model, (xt, yt), eps=UAP_EPS, norm=float("inf"), epochs=uap_epochs,
                                             seed=seed)
        row["uap"] = rc.fooling_rate(model, (x, y), delta)
    if "bound" in parts:
        bound = rc.lipschitz_bound(model, tuple(x.shape[1:]), norm=2)
        row["k2"] = float(bound.K2)
        split = bound.log_split or {}
        row["log_scale"], row["log_concentration"] = split.get("scale"), split.get("concentration")
    if "prune" in parts:
        row["prunable"] = prunable_fraction(model, (x, y))  # the demo's measure: bisection over rc.prune amounts
    if "spectra" in parts:
        chosen = layers if layers is not None else weight_layers(model)[:-1]
        row["layers"] = {n: spectral_stats(m.weight) for n, m in chosen}
    if "margin" in parts:
        row["norm_margin"] = normalised_margin(model, x, y)
    if "jacobian" in parts:
        row.update(jacobian_sensitivity(model, x))
    return row


def layer_mean(row: dict, key: str) -> float:
    """Mean of a per-layer statistic over the measured layers of one run."""
    return statistics.fmean(v[key] for v in row["layers"].values())


# ----------------------------------------------------------------------------- statistics and storage


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = [float(a) for a in values if a is not None and math.isfinite(float(a))]
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation with average ranks for ties."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


def margin_agreement(models: list[tuple]) -> tuple[int, int]:
    """Among pairs of models at equal normalised margin, how often the more robust one is the less concentrated.

    ``models``: tuples ``(name, normalised margin, concentration ½Σ log c_spec, robust accuracy, …)``.
    A pair counts when the margins lie within ±15 % of each other and the robust
    accuracies differ by more than 2 points. Returns ``(agree, pairs)``.
    """
    agree = total = 0
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            if abs(a[1] / b[1] - 1) <= 0.15 and abs(a[3] - b[3]) > 0.02:
                total += 1
                agree += (a[3] - b[3]) * (a[2] - b[2]) < 0
    return agree, total


def load(path: pathlib.Path, fresh: bool) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not fresh else {}


def load_matching(path: pathlib.Path, fresh: bool, settings: dict) -> dict | None:
    """Stored results made with ``settings`` (recorded under ``"_meta"``); None, with a message, if they were not."""
    results = load(path, fresh)
    if results.get("_meta", settings) != settings:
        print(f"stored results use {results['_meta']}, not {settings}: pass --fresh or the same flags", file=sys.stderr)
        return None
    results["_meta"] = settings
    return results


def save(path: pathlib.Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def yes(flag: bool) -> str:
    return "**held**" if flag else "**did not hold**"


def replace_section(markdown: pathlib.Path, key: str, text: str) -> None:
    """Put ``text`` between ``<!-- begin KEY -->`` / ``<!-- end KEY -->`` in ``markdown`` (appended if absent).

    ``paper_findings.py`` keeps these blocks when it rewrites the file.
    """
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = markdown.read_text(encoding="utf-8") if markdown.is_file() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    markdown.write_text(new, encoding="utf-8")
