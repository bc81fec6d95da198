"""Compressibility metrics of a weight: neuron level (rows) and spectral level (σ).

Rows ``w_i`` of a weight are its neurons (Linear) or filters (Conv): a weight of
shape ``(out, in, k…)`` is read as the ``out × (in·k…)`` matrix
``rearrange(w, "o i ... -> o (i ...)")``.

Neuron level (exact, always cheap):

* ``row_norms``            ``‖w_i‖_p``
* ``c_neu``                ``max_i ‖w_i‖² / Σ_i ‖w_i‖²`` ∈ [1/m, 1]
* ``rows_for_energy``      fewest rows holding a fraction (0.99) of ``Σ_i ‖w_i‖²``
* ``best_k_row_error``     ``√(Σ_{i ∉ top κ} ‖w_i‖² / Σ_i ‖w_i‖²)`` ∈ [0, 1]
* ``best_k_entry_error``   per row ``√(Σ_{j ∉ top κ of row i} w_ij² / ‖w_i‖²)``
* ``pq_index``             ``1 − d^{1/q − 1/p} ‖v‖_p / ‖v‖_q`` ∈ [0, 1 − d^{1/q − 1/p}]
* ``dead_row_fraction``    share of rows with ``‖w_i‖ ≤ atol + rtol·max_j ‖w_j‖``
* ``max_row_l1``           ``max_i ‖w_i‖_1`` (per-neuron L∞ sensitivity)

Spectral level, from singular values ``σ_1 ≥ σ_2 ≥ …`` (all of them, or the top
k plus ``‖W‖_F``):

* ``stable_rank``          ``‖W‖_F² / σ_1²`` ∈ [1, rank]
* ``c_spec``               ``σ_1² / ‖W‖_F²`` ∈ [1/rank, 1]
* ``effective_rank``       ``exp(−Σ_j p_j log p_j)``, ``p_j = σ_j / Σ_l σ_l`` ∈ [1, rank]
* ``top_k_energy``         ``Σ_{j≤k} σ_j² / ‖W‖_F²`` ∈ [0, 1]
* ``tail_energy``          ``‖W‖_F² − Σ_{j≤k} σ_j²`` ≥ 0
* ``head_spread``          ``σ_1² / mean_{j≤k} σ_j²`` ∈ [1, k]
* ``rank_for_energy``      fewest σ holding a fraction (0.99) of ``‖W‖_F²``

All-zero weights have no concentration: the ratios are NaN there.

:func:`layer_metrics` computes all of them for one layer of a model, exactly
(float64 ``svdvals``) below a size threshold and from a
:class:`robustcompress.spectral.SpectralState` above it; every value carries
its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from ._checks import float_tensor, fraction, nonnegative_float, positive_int
from .spectral import SpectralState

__all__ = [
    "Metric",
    "as_matrix",
    "row_norms",
    "c_neu",
    "rows_for_energy",
    "best_k_row_error",
    "best_k_entry_error",
    "pq_index",
    "dead_row_fraction",
    "max_row_l1",
    "singular_values",
    "stable_rank",
    "c_spec",
    "effective_rank",
    "top_k_energy",
    "tail_energy",
    "head_spread",
    "rank_for_energy",
    "layer_metrics",
]


# ---------------------------------------------------------------------------
# Neuron level
# ---------------------------------------------------------------------------


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """A weight as its ``out × (in·k…)`` matrix: ``rearrange(w, "o i ... -> o (i ...)")``.

    Args:
        w: a weight with at least 2 dimensions (Linear ``(out, in)``, Conv ``(out, in, k…)``).

    Returns:
        The matrix whose rows are the neurons / filters.

    Example:
        >>> as_matrix(torch.zeros(8, 3, 3, 3)).shape
        torch.Size([8, 27])
    """
    w = float_tensor(w, "w")
    if w.dim() < 2:
        raise ValueError(
            f"Expected w to have at least 2 dimensions (out, in, ...), but got shape {tuple(w.shape)}"
        )
    return w if w.dim() == 2 else rearrange(w, "o i ... -> o (i ...)")


def row_norms(w: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Row (output-unit / filter) norms ``‖w_i‖_p``.

    Args:
        w: a weight (see :func:`as_matrix`).
        p: the norm of each row, ``p ≥ 1`` (``float("inf")`` allowed).

    Returns:
        Tensor of shape ``(out,)``.

    Example:
        >>> row_norms(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([5., 1.])
    """
    m = as_matrix(w)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 1:
        raise ValueError(f"Expected p to be a real number >= 1 (or inf), but got p={p!r}")
    return torch.linalg.vector_norm(m, ord=p, dim=1)


def _energies(w: torch.Tensor) -> torch.Tensor:
    return row_norms(w).square()


def c_neu(w: torch.Tensor) -> torch.Tensor:
    """Neuron concentration ``c_neu = max_i ‖w_i‖² / Σ_i ‖w_i‖²`` ∈ [1/m, 1].

    ``1/m`` for rows of equal norm, ``1`` when one row holds all the energy;
    ``σ_1² ≥ ‖W‖_F² · c_neu`` (a heavy row is a sensitive direction).

    Args:
        w: a weight (see :func:`as_matrix`).

    Returns:
        0-dim tensor (NaN for an all-zero weight).

    Example:
        >>> float(c_neu(torch.eye(4)))
        0.25
    """
    e = _energies(w)
    return e.max() / e.sum()


def rows_for_energy(w: torch.Tensor, energy: float = 0.99) -> int:
    """Fewest rows whose squared norms hold ``energy`` of ``Σ_i ‖w_i‖²``.

    ``min {κ : Σ_{i ≤ κ} ‖w_(i)‖² ≥ energy · Σ_i ‖w_i‖²}`` with rows sorted by
    decreasing norm; 0 for an all-zero weight.

    Args:
        w: a weight (see :func:`as_matrix`).
        energy: the share of energy to keep, in (0, 1].

    Returns:
        An int in ``[1, out]`` (0 for a zero weight).

    Example:
        >>> rows_for_energy(torch.diag(torch.tensor([10.0, 3.0, 0.1])), 0.99)
        2
    """
    f = _fraction_arg(energy)
    e = _energies(w).detach().double()
    return _count_for_share(e, f, e.sum())


def _fraction_arg(f: Any, name: str = "energy") -> float:
    f = fraction(f, name, closed_right=True)
    if f == 0:
        raise ValueError(f"Expected {name} to lie in (0, 1], but got {name}=0")
    return f


def _count_for_share(values_sq: torch.Tensor, f: float, total: torch.Tensor) -> int:
    """Smallest r with Σ_{j≤r} (sorted desc values_sq) ≥ f·total (0 when total is 0).

    Returns ``len(values_sq) + 1`` when the share is not reached (the caller says
    what that means).
    """
    total = float(total)
    if total <= 0:
        return 0
    cum = torch.cumsum(torch.sort(values_sq, descending=True).values, 0)
    # A relative slack of a few ulps so that exactly-attained shares count as reached.
    reached = cum >= f * total * (1 - 1e-12)
    if not bool(reached.any()):
        return values_sq.numel() + 1
    return int(torch.nonzero(reached)[0, 0]) + 1


def best_k_row_error(w: torch.Tensor, kappa: int) -> torch.Tensor:
    """Relative error of the best κ-row approximation (keep the κ heaviest rows).

    ``√(Σ_{i ∉ top κ} ‖w_i‖² / Σ_i ‖w_i‖²)`` ∈ [0, 1]: 0 when at most κ rows
    are non-zero (prunable to κ neurons), close to 1 when energy is spread.

    Args:
        w: a weight (see :func:`as_matrix`).
        kappa: rows kept, ≥ 1.

    Returns:
        0-dim tensor (NaN for an all-zero weight).

    Example:
        >>> float(best_k_row_error(torch.eye(4), 3))
        0.5
    """
    kappa = positive_int(kappa, "kappa")
    e = _energies(w)
    kept = torch.topk(e, min(kappa, e.numel())).values.sum()
    return ((e.sum() - kept).clamp_min(0) / e.sum()).sqrt()


def best_k_entry_error(w: torch.Tensor, kappa: int) -> torch.Tensor:
    """Per-row relative error of the best κ-term approximation over entries.

    Row ``i`` keeps its κ largest ``|w_ij|``: ``√(Σ_{j ∉ top κ} w_ij² / ‖w_i‖²)``
    ∈ [0, 1] (sparsity of each neuron's fan-in).

    Args:
        w: a weight (see :func:`as_matrix`).
        kappa: entries kept per row, ≥ 1.

    Returns:
        Tensor of shape ``(out,)`` (NaN for an all-zero row).

    Example:
        >>> best_k_entry_error(torch.tensor([[3.0, 4.0, 0.0]]), 1)
        tensor([0.6000])
    """
    kappa = positive_int(kappa, "kappa")
    m = as_matrix(w)
    sq = m.square()
    kept = torch.topk(sq, min(kappa, sq.shape[1]), dim=1).values.sum(1)
    total = sq.sum(1)
    return ((total - kept).clamp_min(0) / total).sqrt()


def pq_index(v: torch.Tensor, p: float = 1.0, q: float = 2.0) -> torch.Tensor:
    """PQ-index of a vector (Diao et al., 2023): ``1 − d^{1/q − 1/p} ‖v‖_p / ‖v‖_q``.

    With ``0 < p < q`` it lies in ``[0, 1 − d^{1/q − 1/p}]``: 0 for a vector of
    equal magnitudes, the maximum for a 1-sparse vector; larger = more
    compressible. For the neuron-level index pass ``row_norms(w)``.

    Args:
        v: any tensor (flattened to ``d`` entries).
        p: the smaller exponent, ``0 < p``.
        q: the larger exponent, ``q > p``.

    Returns:
        0-dim tensor (NaN for an all-zero vector).

    Example:
        >>> round(float(pq_index(torch.tensor([1.0, 0.0, 0.0, 0.0]))), 4)
        0.5
    """
    v = float_tensor(v, "v").reshape(-1)
    p = nonnegative_float(p, "p")
    q = nonnegative_float(q, "q")
    if not 0 < p < q:
        raise ValueError(f"Expected 0 < p < q, but got p={p!r}, q={q!r}")
    d = v.numel()
    a = v.abs()
    # ‖v‖_p for p < 1 is not a norm; compute the expression directly.
    norm_p = a.pow(p).sum().pow(1 / p)
    norm_q = a.pow(q).sum().pow(1 / q)
    return 1 - d ** (1 / q - 1 / p) * norm_p / norm_q


def dead_row_fraction(w: torch.Tensor, rtol: float = 1e-3, atol: float = 0.0) -> float:
    """Share of dead rows: ``‖w_i‖_2 ≤ atol + rtol · max_j ‖w_j‖_2``.

    Args:
        w: a weight (see :func:`as_matrix`).
        rtol: tolerance relative to the largest row norm, ≥ 0.
        atol: absolute tolerance, ≥ 0.

    Returns:
        A float in [0, 1] (1 for an all-zero weight).

    Example:
        >>> dead_row_fraction(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        0.5
    """
    rtol = nonnegative_float(rtol, "rtol")
    atol = nonnegative_float(atol, "atol")
    n = row_norms(w).detach()
    tol = atol + rtol * float(n.max())
    return float((n <= tol).double().mean())


def max_row_l1(w: torch.Tensor) -> torch.Tensor:
    """Per-neuron L∞ sensitivity ``max_i ‖w_i‖_1``.

    Under ``δ = ε · sign(w_i)`` neuron ``i`` moves by ``ε ‖w_i‖_1``; it is the
    ∞→∞ norm of the layer and a lower bound of its ∞→2 norm.

    Args:
        w: a weight (see :func:`as_matrix`).

    Returns:
        0-dim tensor.

    Example:
        >>> float(max_row_l1(torch.tensor([[1.0, -2.0], [0.5, 0.5]])))
        3.0
    """
    return row_norms(w, p=1).max()


# ---------------------------------------------------------------------------
# Spectral level
# ---------------------------------------------------------------------------


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All singular values of the matrix view, in float64, descending.

    Args:
        w: a weight (see :func:`as_matrix`).

    Returns:
        Tensor of shape ``(min(m, n),)``, float64.

    Example:
        >>> singular_values(torch.diag(torch.tensor([1.0, 3.0])))
        tensor([3., 1.], dtype=torch.float64)
    """
    return torch.linalg.svdvals(as_matrix(w).detach().double())


def _sigmas(sigmas_or_w: torch.Tensor, name: str = "sigmas_or_w") -> torch.Tensor:
    t = float_tensor(sigmas_or_w, name)
    if t.dim() >= 2:
        return singular_values(t)
    if t.dim() == 0:
        t = t.reshape(1)
    if bool((t < 0).any()):
        raise ValueError(f"Expected singular values in {name} to be >= 0, but got min={float(t.min())}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"Expected finite singular values in {name}")
    return torch.sort(t, descending=True).values


def _frob_sq(s: torch.Tensor, frobenius: Any) -> torch.Tensor:
    """‖W‖_F² from the full spectrum, or from the given Frobenius norm."""
    if frobenius is None:
        return s.square().sum()
    if isinstance(frobenius, torch.Tensor):
        f = frobenius.to(s.dtype)
    else:
        f = torch.tensor(nonnegative_float(frobenius, "frobenius"), dtype=s.dtype, device=s.device)
    head = s.square().sum()
    # The given σ are the top few (or lower bounds of them); they cannot hold more
    # energy than the whole matrix, up to rounding.
    if float(head) > float(f.square()) * (1 + 1e-6) + 1e-30:
        raise ValueError(
            f"Expected frobenius >= sqrt(sum of the given sigma^2) = {float(head.sqrt()):.6g}, "
            f"but got frobenius={float(f):.6g}"
        )
    return f.square()


def stable_rank(sigmas_or_w: torch.Tensor, frobenius: Any = None) -> torch.Tensor:
    """Stable rank ``‖W‖_F² / σ_1²`` ∈ [1, rank] (= 1 / c_spec).

    Args:
        sigmas_or_w: a weight (≥ 2-D, exact float64 svdvals are taken), or
            singular values (1-D; all of them, or the top few with ``frobenius``).
        frobenius: ``‖W‖_F`` when only the top singular values are given. With
            Ritz values (lower bounds of σ_1) the result is an upper estimate.

    Returns:
        0-dim tensor (NaN for a zero weight).

    Example:
        >>> float(stable_rank(torch.eye(3)))
        3.0
    """
    s = _sigmas(sigmas_or_w)
    return _frob_sq(s, frobenius) / s[0].square()


def c_spec(sigmas_or_w: torch.Tensor, frobenius: Any = None) -> torch.Tensor:
    """Spectral concentration ``c_spec = σ_1² / ‖W‖_F²`` ∈ [1/rank, 1].

    ``σ_1² = ‖W‖_F² · c_spec``: the scale × concentration split of the L2 sensitivity.

    Args:
        sigmas_or_w: see :func:`stable_rank`.
        frobenius: see :func:`stable_rank`.

    Returns:
        0-dim tensor (NaN for a zero weight).

    Example:
        >>> float(c_spec(torch.tensor([2.0, 1.0, 1.0])))
        0.6666666865348816
    """
    s = _sigmas(sigmas_or_w)
    return s[0].square() / _frob_sq(s, frobenius)


def effective_rank(sigmas_or_w: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007): ``exp(−Σ_j p_j log p_j)``, ``p_j = σ_j / Σ_l σ_l``.

    Lies in [1, rank]: ``k`` for ``k`` equal non-zero singular values. Needs the
    whole spectrum (it is not determined by the top few and ``‖W‖_F``).

    Args:
        sigmas_or_w: a weight, or all of its singular values.

    Returns:
        0-dim tensor (NaN for a zero weight).

    Example:
        >>> round(float(effective_rank(torch.tensor([1.0, 1.0, 0.0]))), 6)
        2.0
    """
    s = _sigmas(sigmas_or_w)
    p = s / s.sum()
    # 0·log 0 = 0.
    h = -(torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))).sum()
    return torch.exp(h)


def _k_arg(k: Any) -> int:
    return positive_int(k, "k")


def top_k_energy(sigmas_or_w: torch.Tensor, k: int, frobenius: Any = None) -> torch.Tensor:
    """Top-k energy share ``Σ_{j≤k} σ_j² / ‖W‖_F²`` ∈ [0, 1].

    Args:
        sigmas_or_w: see :func:`stable_rank`.
        k: number of leading directions, ≥ 1.
        frobenius: see :func:`stable_rank`.

    Returns:
        0-dim tensor (NaN for a zero weight).

    Example:
        >>> float(top_k_energy(torch.tensor([3.0, 1.0]), 1))
        0.8999999761581421
    """
    k = _k_arg(k)
    s = _sigmas(sigmas_or_w)
    return s[:k].square().sum() / _frob_sq(s, frobenius)


def tail_energy(sigmas_or_w: torch.Tensor, k: int, frobenius: Any = None) -> torch.Tensor:
    """Tail energy ``‖W‖_F² − Σ_{j≤k} σ_j²`` ≥ 0 (what a rank-k truncation drops, squared).

    Args:
        sigmas_or_w: see :func:`stable_rank`.
        k: rank kept, ≥ 1.
        frobenius: see :func:`stable_rank`.

    Returns:
        0-dim tensor.

    Example:
        >>> float(tail_energy(torch.tensor([3.0, 1.0]), 1))
        1.0
    """
    k = _k_arg(k)
    s = _sigmas(sigmas_or_w)
    return (_frob_sq(s, frobenius) - s[:k].square().sum()).clamp_min(0)


def head_spread(sigmas_or_w: torch.Tensor, k: int) -> torch.Tensor:
    """Head spread ``σ_1² / mean_{j≤k} σ_j²`` ∈ [1, k] (1: a flat head).

    With fewer than k singular values the mean runs over those there are.

    Args:
        sigmas_or_w: a weight or (top) singular values.
        k: size of the head, ≥ 1.

    Returns:
        0-dim tensor (NaN for a zero weight).

    Example:
        >>> float(head_spread(torch.tensor([2.0, 0.0]), 2))
        2.0
    """
    k = _k_arg(k)
    s = _sigmas(sigmas_or_w)[:k]
    return s[0].square() / s.square().mean()


def rank_for_energy(
    sigmas_or_w: torch.Tensor, energy: float = 0.99, frobenius: Any = None
) -> int | None:
    """Fewest singular values holding ``energy`` of ``‖W‖_F²``.

    ``min {r : Σ_{j≤r} σ_j² ≥ energy · ‖W‖_F²}``.

    Args:
        sigmas_or_w: see :func:`stable_rank`.
        energy: share of energy, in (0, 1].
        frobenius: ``‖W‖_F`` when only the top k σ are given.

    Returns:
        The rank, 0 for a zero weight, or ``None`` when the given top-k σ do not
        reach the share (the rank is then "> k": not guessed).

    Example:
        >>> rank_for_energy(torch.tensor([10.0, 3.0, 0.1]), 0.99)
        2
        >>> rank_for_energy(torch.tensor([1.0]), 0.99, frobenius=2.0) is None
        True
    """
    f = _fraction_arg(energy)
    s = _sigmas(sigmas_or_w).detach().double()
    total = _frob_sq(s, None if frobenius is None else (
        frobenius.detach().double() if isinstance(frobenius, torch.Tensor) else frobenius))
    r = _count_for_share(s.square(), f, total)
    return None if r > s.numel() else r


# ---------------------------------------------------------------------------
# One layer of a model
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One metric value with its provenance.

    Attributes:
        value: the number, or ``None`` when it is not determined.
        source: ``"exact"`` (float64 svdvals / row norms) or ``"estimate"``
            (top-k Ritz values of a :class:`~robustcompress.spectral.SpectralState`,
            which are lower bounds of the true σ_j).
        greater_than: set when only a lower limit is known (e.g. the rank for 99 %
            energy needs more than the k tracked directions): the value is "> k".
        note: why a value is missing or partial.
    """

    value: float | int | None
    source: str
    greater_than: int | None = None
    note: str = ""

    def to_json(self) -> float | int | str | None:
        """The value as JSON: a number, ``"> k"``, or ``None``."""
        if self.greater_than is not None:
            return f"> {self.greater_than}"
        if isinstance(self.value, float) and not math.isfinite(self.value):
            return None
        return self.value

    def __str__(self) -> str:
        if self.greater_than is not None:
            return f"> {self.greater_than}"
        if self.value is None:
            return "n/a"
        if isinstance(self.value, int):
            return str(self.value)
        return f"{self.value:.4g}"


def layer_metrics(
    state_or_model: nn.Module,
    name: str,
    exact_threshold: int = 1 << 20,
    k: int = 8,
    energy: float = 0.99,
    dead_rtol: float = 1e-3,
) -> dict[str, Metric]:
    """Every metric of one layer, each tagged ``"exact"`` or ``"estimate"``.

    Layers whose matrix view has at most ``exact_threshold`` entries get exact
    float64 ``svdvals``; larger ones read the top-k Ritz values of the
    :class:`~robustcompress.spectral.SpectralState` (given, or one built with
    ``k`` directions and 30 warm steps) together with the exact ``‖W‖_F``.
    Neuron-level metrics are always exact. Metrics use the matrix view (a
    convolution's kernel reshaped to ``out × (in·kh·kw)``; grouped convolutions
    are block diagonal: spectrum = union over groups), folded with a following
    eval-mode BatchNorm when the state folds it.

    Estimates: ``σ̂_j ≤ σ_j`` so ``stable_rank`` is an over-estimate and
    ``c_spec`` an under-estimate; ``rank_99`` is reported as "> k" when the
    tracked directions do not reach 99 %; ``effective_rank`` needs the whole
    spectrum and is ``None`` then.

    Args:
        state_or_model: a ``SpectralState`` or the model itself.
        name: the layer's qualified name (``state.names``).
        exact_threshold: most matrix entries for exact svdvals, ≥ 0.
        k: head size for top-k metrics (and for a state built here), ≥ 1.
        energy: energy share for ``rows_99`` / ``rank_99``, in (0, 1].
        dead_rtol: relative tolerance of :func:`dead_row_fraction`.

    Returns:
        ``{metric name: Metric}`` with keys ``frobenius, sigma_1, stable_rank,
        effective_rank, c_spec, top_k_energy, tail_energy, head_spread,
        rank_99, c_neu, rows_99, best_k_row_error, pq_index, dead_rows,
        max_row_l1``.

    Example:
        >>> from robustcompress.models import MLP
        >>> m = layer_metrics(MLP(4, (3,), 2), "1")
        >>> m["stable_rank"].source
        'exact'
    """
    if isinstance(exact_threshold, bool) or not isinstance(exact_threshold, int) or exact_threshold < 0:
        raise ValueError(
            f"Expected exact_threshold to be a non-negative integer, but got exact_threshold={exact_threshold!r}"
        )
    k = _k_arg(k)
    f = _fraction_arg(energy, "energy")
    if not isinstance(name, str):
        raise TypeError(f"Expected name to be a layer name (str), but got {type(name).__name__}")
    if isinstance(state_or_model, SpectralState):
        state = state_or_model
        if name not in state.names:
            raise ValueError(f"Expected name to be one of the state's layers {state.names}, but got name={name!r}")
        fresh = False
    elif isinstance(state_or_model, nn.Module):
        modules = dict(state_or_model.named_modules())
        if name not in modules:
            raise ValueError(f"Expected name to be a module of the model, but got name={name!r}")
        # A one-layer state finds the BatchNorm to fold and the operator; no iteration yet.
        state = SpectralState(state_or_model, k=k, layers=[name], init_iter=0)
        fresh = True
    else:
        raise TypeError(
            f"Expected state_or_model to be a SpectralState or an nn.Module, but got {type(state_or_model).__name__}"
        )
    op = state.operator(name)
    with torch.no_grad():
        # Neurons are the rows of the (BN-folded) matrix view in every view.
        rows = torch.cat([b.detach() for b in state.matrix_operator(name).blocks()], 0).double()
        frob = state.frobenius(name).detach().double().reshape(())
        m_op, n_op = op.shape
        exact = m_op * n_op <= exact_threshold
        if exact:
            s = torch.sort(torch.cat([torch.linalg.svdvals(b.detach().double()) for b in op.blocks()]),
                           descending=True).values
            frob = s.square().sum().sqrt()
            src = "exact"
        else:
            if fresh:
                state.step(30)
            s = state.sigmas(name).detach().double()
            src = "estimate"
    out: dict[str, Metric] = {}
    out["frobenius"] = Metric(float(frob), "exact")
    s_k = s[: max(1, min(k, s.numel()))]
    fr = None if exact else frob
    zero = float(frob) == 0.0
    nan = float("nan")
    out["sigma_1"] = Metric(float(s[0]), src)
    out["stable_rank"] = Metric(nan if zero else float(stable_rank(s, fr)), src)
    out["c_spec"] = Metric(nan if zero else float(c_spec(s, fr)), src)
    if exact:
        out["effective_rank"] = Metric(nan if zero else float(effective_rank(s)), src)
    else:
        out["effective_rank"] = Metric(None, src, note="needs the whole spectrum (layer above exact_threshold)")
    out["top_k_energy"] = Metric(nan if zero else float(top_k_energy(s_k, k, frob)), src)
    out["tail_energy"] = Metric(float(tail_energy(s_k, k, frob)), src)
    out["head_spread"] = Metric(nan if zero else float(head_spread(s_k, k)), src)
    r = rank_for_energy(s, f, fr)
    if r is None:
        out["rank_99"] = Metric(None, src, greater_than=int(s.numel()))
    else:
        out["rank_99"] = Metric(r, src)
    out["c_neu"] = Metric(nan if zero else float(c_neu(rows)), "exact")
    out["rows_99"] = Metric(rows_for_energy(rows, f), "exact")
    out["best_k_row_error"] = Metric(nan if zero else float(best_k_row_error(rows, k)), "exact")
    out["pq_index"] = Metric(nan if zero else float(pq_index(row_norms(rows))), "exact")
    out["dead_rows"] = Metric(dead_row_fraction(rows, rtol=dead_rtol), "exact")
    out["max_row_l1"] = Metric(float(max_row_l1(rows)), "exact")
    return out
