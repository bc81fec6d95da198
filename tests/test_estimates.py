"""Estimates that know their error: residual intervals, σ₁ bounds, the refinement budget, one iteration core."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robustcompress.spectral import SpectralState
from robustcompress.spectral.iteration import gram_upper_bound, power_step, ritz_step, subspace_iteration


def _planted(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(r, dtype=torch.float64) * (1 + torch.rand(1, generator=g, dtype=torch.float64))
    return (u * s) @ v.T


@given(m=st.integers(1, 24), n=st.integers(1, 24), k=st.integers(1, 4), seed=st.integers(0, 10_000),
       iters=st.integers(0, 6))
def test_bounds_and_intervals_hold_for_any_matrix(m, n, k, seed, iters):
    """σ̂₁ ≤ σ₁ ≤ upper, and every residual interval contains some svdvals entry, converged or not.

    The dilation of a rectangular W also has |m − n| zero eigenvalues, so there 0 counts too.
    """
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64))
    state = SpectralState(nn.Sequential(layer), k=k, init_iter=iters + 1, seed=seed)
    true = torch.linalg.svdvals(layer.weight.detach())
    candidates = torch.cat([true, torch.zeros(1, dtype=true.dtype)]) if m != n else true
    lo, hi = state.sigma1_bounds("0")
    tol = 1e-9 * float(true[0])
    assert lo <= float(true[0]) + tol
    assert float(true[0]) <= hi + tol
    assert float(state.sigmas("0")[0]) <= float(true[0]) + tol
    for left, right in state.residual_interval("0").tolist():
        if math.isinf(right):
            continue
        assert bool(((candidates >= left - tol) & (candidates <= right + tol)).any()), (left, right, true)


def test_intervals_shrink_to_the_singular_values():
    w = _planted(30, 20, 0.7, seed=1)
    layer = nn.Linear(20, 30, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    state = SpectralState(nn.Sequential(layer), k=3, init_iter=200)
    true = torch.linalg.svdvals(w)[:3]
    iv = state.residual_interval("0")
    assert torch.allclose(iv.mean(-1), true, rtol=1e-10)
    assert float((iv[:, 1] - iv[:, 0]).max()) < 1e-8 * float(true[0])
    assert state.relative_residual("0") < 1e-9


def test_upper_bound_uses_ritz_values_and_gram_iteration():
    w = _planted(40, 25, 0.5, seed=2)
    layer = nn.Linear(25, 40, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    s = torch.linalg.svdvals(w)
    one = SpectralState(nn.Sequential(layer), k=1, init_iter=100)
    four = SpectralState(nn.Sequential(layer), k=4, init_iter=100)
    _, hi1 = one.sigma1_bounds("0")
    _, hi4 = four.sigma1_bounds("0")
    assert hi1 == pytest.approx(float(torch.linalg.matrix_norm(w)), rel=1e-12)
    # Subtracting σ̂₂..σ̂₄ leaves √(σ₁² + Σ_{j>4} σ_j²).
    assert hi4 == pytest.approx(math.sqrt(float(s[0] ** 2 + (s[4:] ** 2).sum())), rel=1e-8)
    lo, hig = four.sigma1_bounds("0", gram_iter=6)
    assert lo <= float(s[0]) * (1 + 1e-12) and float(s[0]) <= hig * (1 + 1e-12)  # lo: the converged Ritz value, equal to σ₁ up to rounding
    assert hig < hi4 and hig == pytest.approx(float(s[0]), rel=1e-6)


def test_a_swapped_top_direction_shows_with_k_two():
    """A converged pair on σ₂ has a tiny residual (k = 1 cannot tell); k = 2 finds σ₁ above it."""
    w = torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    v = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)
    s, yn, radius, ok = power_step([w @ v], [w.T @ (w @ v)], [v])
    assert float(s[0]) == 3.0 and float(radius[0]) == 0.0  # the interval holds σ₂, not σ₁
    v2 = torch.tensor([[0.0, 0.6], [1.0, 0.0], [0.0, 0.8]], dtype=torch.float64)
    res = ritz_step(w @ v2, w.T @ (w @ v2), v2)
    assert float(res.sigma[0]) > 3.0  # the second direction exposes a larger singular value


def test_power_step_radius_matches_the_explicit_residual():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(m, n, generator=g, dtype=torch.float64) for m, n in [(5, 3), (2, 7), (9, 9)]]
    vs = [torch.nn.functional.normalize(torch.randn(w.shape[1], 1, generator=g, dtype=torch.float64), dim=0) for w in ws]
    s, yn, radius, ok = power_step([w @ v for w, v in zip(ws, vs)], [w.T @ (w @ v) for w, v in zip(ws, vs)], vs)
    for i, (w, v) in enumerate(zip(ws, vs)):
        sig = (w @ v).norm()
        u = w @ v / sig
        r = torch.cat([w @ v - sig * u, w.T @ u - sig * v])
        assert float(radius[i]) == pytest.approx(float(r.norm()) / math.sqrt(2), rel=1e-12)
        assert float(yn[i] / s[i]) <= float(torch.linalg.svdvals(w)[0]) * (1 + 1e-12)


def test_subspace_iteration_batches_operators_of_one_shape():
    w = torch.stack([_planted(12, 8, 0.6, seed=i) for i in range(3)])
    res = subspace_iteration(lambda v: (w @ v, w.mT @ (w @ v)), torch.randn(3, 8, 2, dtype=torch.float64), 150)
    assert torch.allclose(res.sigma, torch.linalg.svdvals(w)[:, :2], rtol=1e-10)
    assert bool((res.radius < 1e-8).all())
    with pytest.raises(ValueError, match="n_iter"):
        subspace_iteration(lambda v: (w @ v, w.mT @ (w @ v)), torch.randn(3, 8, 2, dtype=torch.float64), 0)


def test_gram_upper_bound_is_above_and_tight():
    w = torch.randn(4, 30, 20, dtype=torch.float64)
    b = gram_upper_bound(w, 6)
    s = torch.linalg.svdvals(w)[:, 0]
    assert bool((b >= s * (1 - 1e-12)).all())
    assert bool((b <= s * 1.02).all())
    huge = gram_upper_bound(torch.diag(torch.tensor([1e200, 1.0], dtype=torch.float64)), 8)
    assert float(huge) == pytest.approx(1e200, rel=1e-9)


def _drifting_model(seed: int) -> nn.Sequential:
    layers = []
    for i in range(6):
        layer = nn.Linear(40, 40, bias=False).double()
        with torch.no_grad():
            layer.weight.copy_(_planted(40, 40, 0.93, seed=seed * 10 + i))
        layers.append(layer)
    return nn.Sequential(*layers)


def _drift(model: nn.Module, step: int) -> None:
    """Half the layers drift (as under a large learning rate), half stay put."""
    with torch.no_grad():
        for i, layer in enumerate(model):
            g = torch.Generator().manual_seed(1000 * step + i)
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64), alpha=0.03 * (i % 2))


def test_refinement_spends_at_most_its_budget_on_the_worst_layers():
    model = _drifting_model(0)
    plain = SpectralState(model, refine_budget=0.0)
    refined = SpectralState(model, refine_budget=0.5, refine_tol=1e-4)
    err_plain, err_refined = [], []
    for t in range(30):
        _drift(model, t)
        plain.step()
        refined.step()
        true = [float(torch.linalg.svdvals(layer.weight.detach().double())[0]) for layer in model]
        err_plain.append(max(1 - float(plain.sigmas(str(i))[0]) / s for i, s in enumerate(true)))
        err_refined.append(max(1 - float(refined.sigmas(str(i))[0]) / s for i, s in enumerate(true)))
    assert plain.layer_iterations == 30 * 6
    assert 30 * 6 < refined.layer_iterations <= 30 * 6 + 30 * 3
    assert sum(err_refined[5:]) < 0.8 * sum(err_plain[5:])


def test_refinement_arguments_are_checked():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="refine_budget"):
        SpectralState(model, refine_budget=-1.0)
    with pytest.raises(TypeError, match="refine_tol"):
        SpectralState(model, refine_tol="small")
    with pytest.raises(ValueError, match="gram_iter"):
        SpectralState(model).sigma1_bounds("0", gram_iter=-1)


def test_a_zero_layer_takes_no_refinement_budget():
    model = nn.Sequential(*[nn.Linear(20, 20) for _ in range(4)])
    with torch.no_grad():
        model[3].weight.zero_()
    state = SpectralState(model, refine_budget=0.5, refine_tol=0.0)
    for _ in range(3):
        state.step()
        assert "3" not in state._last_plan
