"""Compressibility metrics: closed forms, invariances, ranges, exact vs estimate."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robustcompress.metrics import (
    Metric,
    as_matrix,
    best_k_entry_error,
    best_k_row_error,
    c_neu,
    c_spec,
    dead_row_fraction,
    effective_rank,
    head_spread,
    layer_metrics,
    max_row_l1,
    pq_index,
    rank_for_energy,
    row_norms,
    rows_for_energy,
    singular_values,
    stable_rank,
    tail_energy,
    top_k_energy,
)


def _orth(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _with_sigmas(sig, m, n, seed=0):
    """A matrix m × n with the given singular values and random singular vectors."""
    u, v = _orth(m, seed)[:, : len(sig)], _orth(n, seed + 1)[:, : len(sig)]
    return u @ torch.diag(torch.as_tensor(sig, dtype=torch.float64)) @ v.T


# ---------------------------------------------------------------- closed forms


def test_identity_closed_forms():
    n = 6
    w = torch.eye(n, dtype=torch.float64)
    assert float(c_spec(w)) == pytest.approx(1 / n)
    assert float(stable_rank(w)) == pytest.approx(n)
    assert float(effective_rank(w)) == pytest.approx(n)
    assert float(c_neu(w)) == pytest.approx(1 / n)
    assert rows_for_energy(w, 0.99) == n
    assert rank_for_energy(w, 0.99) == n
    assert rank_for_energy(w, 0.5) == 3
    assert float(head_spread(w, 4)) == pytest.approx(1.0)
    assert float(top_k_energy(w, 2)) == pytest.approx(2 / n)
    assert float(tail_energy(w, 2)) == pytest.approx(n - 2)
    assert float(pq_index(row_norms(w))) == pytest.approx(0.0, abs=1e-12)
    assert float(best_k_row_error(w, 2)) == pytest.approx(math.sqrt((n - 2) / n))
    assert dead_row_fraction(w) == 0.0
    assert float(max_row_l1(w)) == 1.0
    assert torch.allclose(best_k_entry_error(w, 1), torch.zeros(n, dtype=torch.float64))


def test_rank_one_closed_forms():
    u = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    v = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    w = torch.outer(u, v)
    assert float(stable_rank(w)) == pytest.approx(1.0)
    assert float(c_spec(w)) == pytest.approx(1.0)
    assert float(effective_rank(w)) == pytest.approx(1.0, abs=1e-6)
    assert rank_for_energy(w) == 1
    assert float(top_k_energy(w, 1)) == pytest.approx(1.0)
    assert float(tail_energy(w, 1)) == pytest.approx(0.0, abs=1e-9)
    assert float(head_spread(w, 3)) == pytest.approx(3.0, rel=1e-9)  # σ = (s, ~0, ~0)
    assert float(c_neu(w)) == pytest.approx(16 / 25)
    assert dead_row_fraction(w) == pytest.approx(1 / 3)
    assert float(max_row_l1(w)) == pytest.approx(4 * 4.5)
    assert float(singular_values(w)[0]) == pytest.approx(5 * float(v.norm()))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_k_equal_singular_values(k):
    w = _with_sigmas([2.0] * k, 7, 9, seed=k)
    assert float(stable_rank(w)) == pytest.approx(k)
    assert float(effective_rank(w)) == pytest.approx(k, rel=1e-6)
    assert float(c_spec(w)) == pytest.approx(1 / k)
    assert rank_for_energy(w) == k
    assert float(head_spread(w, k)) == pytest.approx(1.0)
    assert float(top_k_energy(w, k)) == pytest.approx(1.0)
    # σ_1 = ‖W‖_F/√k: compressible to rank k and flat in the head (DESIGN §2).
    assert float(singular_values(w)[0]) == pytest.approx(float(w.norm()) / math.sqrt(k))


def test_one_heavy_row():
    w = torch.diag(torch.tensor([10.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert float(c_neu(w)) == pytest.approx(100 / 103)
    assert rows_for_energy(w, 0.99) == 3  # 100/103 < 0.99 ≤ 102/103
    assert rows_for_energy(w, 0.97) == 1
    assert float(best_k_row_error(w, 1)) == pytest.approx(math.sqrt(3 / 103))
    # PQ-index (p=1, q=2) of the row norms, by its formula.
    d = 4
    expected = 1 - d ** (0.5 - 1) * 13 / math.sqrt(103)
    assert float(pq_index(row_norms(w))) == pytest.approx(expected)
    assert float(best_k_entry_error(torch.tensor([[3.0, 4.0, 0.0]]), 1)[0]) == pytest.approx(0.6)


def test_geometric_decay_against_numpy():
    r, n = 0.7, 12
    sig = np.array([r**j for j in range(n)])
    w = _with_sigmas(sig.tolist(), n, n + 3, seed=3)
    e = sig**2
    assert float(stable_rank(w)) == pytest.approx(e.sum() / e[0], rel=1e-9)
    p = sig / sig.sum()
    assert float(effective_rank(w)) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    share = np.cumsum(e) / e.sum()
    assert rank_for_energy(w, 0.99) == int(np.argmax(share >= 0.99)) + 1
    assert float(top_k_energy(w, 3)) == pytest.approx(share[2], rel=1e-9)
    assert float(head_spread(w, 4)) == pytest.approx(e[0] / e[:4].mean(), rel=1e-9)


def test_top_k_with_frobenius_and_not_reached():
    s = torch.tensor([3.0, 2.0], dtype=torch.float64)
    assert float(stable_rank(s, frobenius=5.0)) == pytest.approx(25 / 9)
    assert float(c_spec(s, frobenius=5.0)) == pytest.approx(9 / 25)
    assert float(tail_energy(s, 2, frobenius=5.0)) == pytest.approx(12.0)
    assert rank_for_energy(s, 0.99, frobenius=5.0) is None  # "> 2", not guessed
    assert rank_for_energy(s, 0.5, frobenius=5.0) == 2
    with pytest.raises(ValueError, match="frobenius"):
        stable_rank(s, frobenius=1.0)


# ---------------------------------------------------------------- invariances

shapes = st.tuples(st.integers(2, 9), st.integers(2, 9))


@given(shape=shapes, seed=st.integers(0, 10_000), c=st.floats(-50, 50).filter(lambda x: abs(x) > 1e-2))
def test_scaling_invariance(shape, seed, c):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cw = c * w
    assert float(singular_values(cw)[0]) == pytest.approx(abs(c) * float(singular_values(w)[0]), rel=1e-9)
    for f in (c_spec, stable_rank, effective_rank, c_neu):
        assert float(f(cw)) == pytest.approx(float(f(w)), rel=1e-8)
    assert float(pq_index(row_norms(cw))) == pytest.approx(float(pq_index(row_norms(w))), abs=1e-9)
    assert rank_for_energy(cw) == rank_for_energy(w)
    assert rows_for_energy(cw) == rows_for_energy(w)


@given(shape=shapes, seed=st.integers(0, 10_000))
def test_orthogonal_invariance_of_spectral_metrics(shape, seed):
    m, n = shape
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    qw = _orth(m, seed) @ w @ _orth(n, seed + 7)
    for f in (c_spec, stable_rank, effective_rank):
        assert float(f(qw)) == pytest.approx(float(f(w)), rel=1e-8)
    k = min(m, n, 3)
    assert float(head_spread(qw, k)) == pytest.approx(float(head_spread(w, k)), rel=1e-8)
    assert float(top_k_energy(qw, k)) == pytest.approx(float(top_k_energy(w, k)), rel=1e-8)


@given(shape=shapes, seed=st.integers(0, 10_000))
def test_row_permutation_invariance_of_neuron_metrics(shape, seed):
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    pw = w[torch.randperm(m, generator=g)]
    assert float(c_neu(pw)) == pytest.approx(float(c_neu(w)))
    assert rows_for_energy(pw) == rows_for_energy(w)
    assert float(best_k_row_error(pw, 2)) == pytest.approx(float(best_k_row_error(w, 2)))
    assert float(pq_index(row_norms(pw))) == pytest.approx(float(pq_index(row_norms(w))), abs=1e-12)
    assert float(max_row_l1(pw)) == pytest.approx(float(max_row_l1(w)))
    assert dead_row_fraction(pw) == dead_row_fraction(w)


# ---------------------------------------------------------------- ranges


@given(
    shape=shapes,
    seed=st.integers(0, 10_000),
    decay=st.floats(0.0, 6.0),
    k=st.integers(1, 6),
    sparse=st.booleans(),
)
def test_every_concentration_within_its_range(shape, seed, decay, k, sparse):
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    w = w * torch.exp(-decay * torch.arange(m, dtype=torch.float64))[:, None]  # heavy first rows
    if sparse:
        w = w * (torch.rand(m, n, generator=g) < 0.3)
        w[0, 0] = 1.0
    r = int(torch.linalg.matrix_rank(w))
    eps = 1e-9
    assert 1 / m - eps <= float(c_neu(w)) <= 1 + eps
    assert 1 / r - eps <= float(c_spec(w)) <= 1 + eps
    assert 1 - eps <= float(stable_rank(w)) <= r + 1e-6
    assert 1 - eps <= float(effective_rank(w)) <= min(m, n) + 1e-6
    assert -eps <= float(top_k_energy(w, k)) <= 1 + eps
    # Tail energy against float64 svdvals: Σ_{j>k} σ_j² (the function clamps at 0, so test the value itself).
    s = torch.linalg.svdvals(w)
    assert float(tail_energy(w, k)) == pytest.approx(float(s[k:].square().sum()), rel=1e-9, abs=1e-9 * float(s.square().sum()))
    assert 1 - eps <= float(head_spread(w, k)) <= k + eps
    d = m
    assert -eps <= float(pq_index(row_norms(w))) <= 1 - d ** (0.5 - 1) + eps
    assert -eps <= float(best_k_row_error(w, k)) <= 1 + eps
    e = best_k_entry_error(w, k)
    ok = ~torch.isnan(e)
    assert bool(((e[ok] >= -eps) & (e[ok] <= 1 + eps)).all())
    assert 0 <= dead_row_fraction(w) <= 1
    assert 1 <= rows_for_energy(w) <= m
    assert 1 <= rank_for_energy(w) <= r
    # max_i ‖w_i‖_1 ≤ √n · max_i ‖w_i‖_2 (DESIGN §1.1)
    assert float(max_row_l1(w)) <= math.sqrt(n) * float(row_norms(w).max()) + eps


# ---------------------------------------------------------------- one layer


def test_layer_metrics_exact_matches_svdvals():
    model = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))
    met = layer_metrics(model, "0", exact_threshold=10_000, k=3)
    s = torch.linalg.svdvals(model[0].weight.detach().double())
    assert met["sigma_1"].source == "exact"
    assert met["sigma_1"].value == pytest.approx(float(s[0]), rel=1e-9)
    assert met["stable_rank"].value == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-9)
    assert met["effective_rank"].value == pytest.approx(float(effective_rank(s)), rel=1e-9)
    assert met["c_neu"].value == pytest.approx(float(c_neu(model[0].weight.detach().double())), rel=1e-9)
    assert met["max_row_l1"].source == "exact"


def test_layer_metrics_estimate_reports_rank_beyond_k():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 50))
    met = layer_metrics(model, "0", exact_threshold=0, k=4)
    exact = torch.linalg.svdvals(model[0].weight.detach().double())
    assert met["sigma_1"].source == "estimate"
    # Ritz values are lower bounds of σ_1; stable rank therefore an over-estimate.
    assert met["sigma_1"].value <= float(exact[0]) * (1 + 1e-5)
    assert met["sigma_1"].value == pytest.approx(float(exact[0]), rel=1e-2)
    assert met["rank_99"].value is None and met["rank_99"].greater_than == 4
    assert str(met["rank_99"]) == "> 4" and met["rank_99"].to_json() == "> 4"
    assert met["effective_rank"].value is None
    assert met["c_neu"].source == "exact"


def test_layer_metrics_folds_batchnorm():
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        model[1].running_var.fill_(1.0)
    met = layer_metrics(model, "0")
    s = model[1].weight.double() / math.sqrt(1 + model[1].eps)
    folded = s[:, None] * model[0].weight.double()
    assert met["sigma_1"].value == pytest.approx(float(torch.linalg.svdvals(folded.detach())[0]), rel=1e-6)


def test_metric_formatting():
    assert str(Metric(3, "exact")) == "3"
    assert str(Metric(None, "estimate")) == "n/a"
    assert Metric(float("nan"), "exact").to_json() is None


# ---------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        row_norms(torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        c_neu(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="energy"):
        rows_for_energy(torch.eye(2), 0.0)
    with pytest.raises(ValueError, match="kappa"):
        best_k_row_error(torch.eye(2), 0)
    with pytest.raises(ValueError, match="p < q"):
        pq_index(torch.ones(3), p=2, q=1)
    with pytest.raises(ValueError, match=">= 0"):
        stable_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="name"):
        layer_metrics(nn.Sequential(nn.Linear(2, 2)), "nope")
    with pytest.raises(TypeError, match="SpectralState or an nn.Module"):
        layer_metrics(torch.eye(2), "0")
    assert as_matrix(torch.zeros(4, 2, 3, 3)).shape == (4, 18)


def test_layer_metrics_on_a_multi_view_layer():
    # Attention Q/K/V are three operators of one module: each view's metrics read that view's matrix.
    from robustcompress.spectral import SpectralState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    state = SpectralState(model, k=2, init_iter=0)
    names = [n for n in state.names if n.endswith((".q", ".k", ".v"))]
    assert len(names) == 3
    w = model[1].self_attn.in_proj_weight.detach().double()
    for name, rows in zip(sorted(names, key=lambda n: "qkv".index(n[-1])), w.chunk(3, 0)):
        met = layer_metrics(state, name)
        s = torch.linalg.svdvals(rows)
        assert met["sigma_1"].value == pytest.approx(float(s[0]), rel=1e-6)
        assert met["stable_rank"].value == pytest.approx(float(s.square().sum() / s[0] ** 2), rel=1e-6)
        # Neuron metrics read this view's rows only (not the packed Q/K/V weight).
        assert met["max_row_l1"].value == pytest.approx(float(rows.abs().sum(1).max()), rel=1e-6)
        assert met["dead_rows"].value == pytest.approx(0.0)
