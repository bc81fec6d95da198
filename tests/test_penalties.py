"""Penalties: values against float64 references, gradients against autograd through svdvals."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robustcompress.layers import LowRankLinear
from robustcompress.penalties import (
    SPECTRAL_MODES,
    GroupLassoPenalty,
    HeadSpreadPenalty,
    L1Penalty,
    NuclearNormPenalty,
    PenaltySum,
    RowL1Penalty,
    SpectralNormPenalty,
    TailEnergyPenalty,
    default_penalties,
)
from robustcompress.spectral import SpectralState, conv_operator


def designed(m, n, spectrum, seed=0):
    """An m×n float64 matrix with the given (well separated) singular values."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    s = torch.as_tensor(spectrum, dtype=torch.float64)
    s = torch.cat([s, torch.zeros(r - len(s), dtype=torch.float64)])
    return u[:, :r] @ torch.diag(s) @ v[:, :r].T


SPECTRUM = [5.0, 3.0, 2.2, 1.6, 1.1, 0.7, 0.4, 0.2]


def small_model(m=10, n=12, seed=0):
    model = nn.Sequential(nn.Linear(n, m), nn.ReLU(), nn.Linear(m, 3)).double()
    with torch.no_grad():
        model[0].weight.copy_(designed(m, n, SPECTRUM, seed))
        model[2].weight.copy_(designed(3, m, [2.0, 1.0, 0.5], seed + 1))
    return model


def converged_state(model, k):
    state = SpectralState(model, k=k)
    state.step(300)
    return state


def grad_of(fn, w):
    w = w.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(w), w)
    return g


def penalty_grad(penalty, param):
    param.grad = None
    penalty().backward()
    g = param.grad.clone()
    param.grad = None
    return g


# (penalty factory, reference on the weight matrix) — each on layer "0" only.
def _cases():
    k = 3
    return {
        "square": (lambda s: SpectralNormPenalty(s, 1.0), lambda w: torch.linalg.svdvals(w)[0] ** 2),
        "hinge": (lambda s: SpectralNormPenalty(s, 1.0, mode="hinge", target=4.0),
                  lambda w: torch.relu(torch.linalg.svdvals(w)[0] - 4.0) ** 2),
        "log": (lambda s: SpectralNormPenalty(s, 1.0, mode="log_k2", layers=["0"]),
                lambda w: torch.log(torch.linalg.svdvals(w)[0])),
        "head_spread": (lambda s: HeadSpreadPenalty(s, k=k),
                        lambda w: (lambda sv: sv[0] ** 2 / (sv[:k] ** 2).mean() - 1)(torch.linalg.svdvals(w))),
        "tail": (lambda s: TailEnergyPenalty(s, k=k), lambda w: (torch.linalg.svdvals(w)[k:] ** 2).sum()),
        "nuclear_exact": (lambda s: NuclearNormPenalty(s, method="exact"), lambda w: torch.linalg.svdvals(w).sum()),
        "nuclear_upper": (lambda s: NuclearNormPenalty(s, k=k, method="bound"),
                          lambda w: (lambda sv: sv[:k].sum() + math.sqrt(len(sv) - k) * sv[k:].norm())(
                              torch.linalg.svdvals(w))),
        "nuclear_lower": (lambda s: NuclearNormPenalty(s, k=k, method="bound", bound="lower"),
                          lambda w: (lambda sv: sv[:k].sum() + sv[k:].norm())(torch.linalg.svdvals(w))),
        "l1": (lambda s: L1Penalty(s), lambda w: w.abs().sum()),
        "group_lasso": (lambda s: GroupLassoPenalty(s), lambda w: torch.linalg.vector_norm(w, dim=1).sum()),
        "rowl1_balance": (lambda s: RowL1Penalty(s, mode="balance", k=k),
                          lambda w: (lambda r: r[0] ** 2 / (r[:k] ** 2).mean() - 1)(
                              torch.sort(w.abs().sum(1), descending=True).values)),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_value_and_gradient_match_float64_reference(case):
    make, ref = _cases()[case]
    model = small_model()
    penalty = make(converged_state(model, k=4))
    w = model[0].weight
    assert penalty.names == ["0"]
    torch.testing.assert_close(penalty().detach(), ref(w.detach()), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(penalty_grad(penalty, w), grad_of(ref, w), rtol=1e-6, atol=1e-8)


def test_smoothmax_row_l1_brackets_the_max_and_matches_its_formula():
    model = small_model()
    p = RowL1Penalty(SpectralState(model), 1.0, temperature=0.1)
    w = model[0].weight.detach()
    r = w.abs().sum(1)
    t = 0.1 * r.mean()
    value = p().detach()
    torch.testing.assert_close(value, t * torch.log(torch.exp(r / t).sum()))
    assert r.max() <= value <= r.max() + t * math.log(len(r)) + 1e-12


def test_strength_and_layer_weights_scale_the_sum():
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    state = converged_state(model, 1)
    p = SpectralNormPenalty(state, strength=0.5, weights={"2": 3.0})
    s0 = torch.linalg.svdvals(model[0].weight.detach())[0]
    s2 = torch.linalg.svdvals(model[2].weight.detach())[0]
    torch.testing.assert_close(p().detach(), 0.5 * (s0 ** 2 + 3 * s2 ** 2), rtol=1e-6, atol=0)
    assert p.value == pytest.approx(float(0.5 * (s0 ** 2 + 3 * s2 ** 2)), rel=1e-6)


def test_bn_folded_weight_is_penalised():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3)).double()
    with torch.no_grad():
        model[1].running_var.uniform_(0.2, 3.0)
        model[1].weight.uniform_(-2.0, 2.0)
    model.eval()
    state = converged_state(model, 1)
    p = SpectralNormPenalty(state, 1.0)
    bn = model[1]
    folded = lambda w: (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None] * w  # noqa: E731
    ref = torch.linalg.svdvals(folded(model[0].weight.detach()))[0] ** 2
    torch.testing.assert_close(p().detach(), ref, rtol=1e-6, atol=0)
    # the gradient reaches both the weight and γ (the folded scale)
    p().backward()
    assert model[1].weight.grad is not None and model[0].weight.grad is not None


def test_operator_view_of_a_convolution():
    conv_model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 25, 2)).double()
    p = SpectralNormPenalty(conv_model, 1.0, view="operator", input_shape=(2, 5, 5))
    p.state.step(300)
    dense = conv_operator(conv_model[0], (2, 5, 5)).matrix()
    ref = torch.linalg.svdvals(dense.detach())[0] ** 2
    torch.testing.assert_close(p.value_now().detach(), ref, rtol=1e-6, atol=0)
    matrix = SpectralNormPenalty(conv_model, 1.0)
    matrix.state.step(300)
    assert float(matrix.value_now().detach()) < float(ref)  # the matrix view is below the operator's norm here


def test_low_rank_layer_is_one_operator():
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(12, 10, rank=3), nn.ReLU(), nn.Linear(10, 3)).double()
    state = converged_state(model, 3)
    w = (model[0].weight_b @ model[0].weight_a).detach()
    torch.testing.assert_close(SpectralNormPenalty(state, 1.0)().detach(), torch.linalg.svdvals(w)[0] ** 2,
                               rtol=1e-6, atol=0)
    nuc = NuclearNormPenalty(state, k=3, method="bound")
    # rank ≤ 3 = k, so the tail is empty and the bound is the exact nuclear norm
    torch.testing.assert_close(nuc().detach(), torch.linalg.svdvals(w).sum(), rtol=1e-6, atol=1e-9)


@given(m=st.integers(4, 9), n=st.integers(4, 9), k=st.integers(1, 3), seed=st.integers(0, 50))
def test_nuclear_bounds_bracket_the_exact_norm(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m), nn.ReLU(), nn.Linear(m, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64))
    state = SpectralState(model, k=k, init_iter=0)
    state.step(200)
    exact = float(torch.linalg.svdvals(model[0].weight.detach()).sum())
    lower = float(NuclearNormPenalty(state, k=k, method="bound", bound="lower")().detach())
    upper = float(NuclearNormPenalty(state, k=k, method="bound")().detach())
    assert lower <= exact * (1 + 1e-6) and exact <= upper * (1 + 1e-6)


def _minimise(penalty, params, steps=60, lr=0.05, state=None):
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        if state is not None:
            state.step()
        opt.zero_grad()
        penalty().backward()
        opt.step()


def test_spectral_norm_penalty_alone_lowers_sigma_1():
    model = small_model()
    before = torch.linalg.svdvals(model[0].weight.detach())[0]
    state = converged_state(model, 1)
    _minimise(SpectralNormPenalty(state, 1.0), [model[0].weight], state=state)
    after = torch.linalg.svdvals(model[0].weight.detach())[0]
    assert after < 0.6 * before


def test_head_spread_flattens_the_head_and_tail_energy_shrinks_the_tail():
    k = 4
    model = small_model()
    s0 = torch.linalg.svdvals(model[0].weight.detach())
    state = converged_state(model, k)
    _minimise(HeadSpreadPenalty(state, k=k), [model[0].weight], steps=150, lr=0.5, state=state)
    s1 = torch.linalg.svdvals(model[0].weight.detach())
    spread = lambda s: float(s[0] ** 2 / (s[:k] ** 2).mean() - 1)  # noqa: E731
    assert spread(s1) < 0.5 * spread(s0)

    model = small_model()
    state = converged_state(model, k)
    _minimise(TailEnergyPenalty(state, k=k), [model[0].weight], steps=60, lr=0.1, state=state)
    s2 = torch.linalg.svdvals(model[0].weight.detach())
    assert float((s2[k:] ** 2).sum()) < 0.1 * float((s0[k:] ** 2).sum())
    torch.testing.assert_close(s2[:k], s0[:k], rtol=0.05, atol=0)  # the head is left alone


@pytest.mark.parametrize("make,measure", [
    (lambda m: L1Penalty(m, 1.0), lambda w: w.abs().sum()),
    (lambda m: GroupLassoPenalty(m, 1.0), lambda w: w.norm(dim=1).sum()),
    (lambda m: NuclearNormPenalty(m, 1.0, method="exact"), lambda w: torch.linalg.svdvals(w).sum()),
    (lambda m: RowL1Penalty(m, 1.0), lambda w: w.abs().sum(1).max()),
])
def test_each_tail_and_row_term_lowers_its_target(make, measure):
    model = small_model()
    before = measure(model[0].weight.detach())
    _minimise(make(model), [model[0].weight], steps=30, lr=0.01)
    assert measure(model[0].weight.detach()) < 0.9 * before


def test_every_and_strength_schedule():
    model = small_model()
    seen = []
    p = SpectralNormPenalty(converged_state(model, 1), strength=lambda step: seen.append(step) or 1.0, every=3)
    values = [float(p().detach()) for _ in range(7)]
    assert [v != 0 for v in values] == [True, False, False, True, False, False, True]
    assert seen == [0, 3, 6]
    assert p.calls == 7


def test_owned_state_is_stepped_by_the_penalty_and_shared_state_is_not():
    model = small_model()
    shared = SpectralState(model)
    p = SpectralNormPenalty(shared, 1.0)
    p()
    assert int(shared.steps) == 0
    own = SpectralNormPenalty(model, 1.0)
    assert own.owns_state
    own()
    own()
    assert int(own.state.steps) == 2
    assert "owned_state.steps" in own.state_dict()
    assert not any(k.startswith("owned_state") for k in p.state_dict())


def test_sum_of_penalties():
    model = small_model()
    state = converged_state(model, 4)
    a, b = SpectralNormPenalty(state, 1.0), TailEnergyPenalty(state, k=4, strength=2.0)
    total = a + b
    assert isinstance(total, PenaltySum) and len((total + a).terms) == 3
    va = a.value_now().detach()
    vb = 2.0 * b.value_now().detach()
    torch.testing.assert_close(total().detach(), va + vb)
    torch.testing.assert_close(total.last_value, va + vb)
    assert isinstance(sum([a, b]), PenaltySum)


def test_layer_selection_forms():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Conv1d(1, 2, 3), nn.Linear(8, 3))
    state = SpectralState(model)
    assert SpectralNormPenalty(state).names == ["0", "2"]  # head "3" excluded
    assert SpectralNormPenalty(state, layers=nn.Linear).names == ["0"]
    assert SpectralNormPenalty(state, layers=lambda name, mod: isinstance(mod, nn.Conv1d)).names == ["2"]
    assert SpectralNormPenalty(state, layers=["3"]).names == ["3"]


def test_default_penalties_are_sigma_squared_on_hidden_layers():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    (p,) = default_penalties(model)
    assert isinstance(p, SpectralNormPenalty) and p.mode == "square" and p.names == ["0", "2"]
    assert p.strength == 1e-2


def test_bad_inputs_raise_clear_errors():
    model = small_model()
    state = SpectralState(model)
    with pytest.raises(ValueError, match="Unknown layer names"):
        SpectralNormPenalty(state, layers=["nope"])
    with pytest.raises(TypeError, match="single string"):
        SpectralNormPenalty(state, layers="0")
    with pytest.raises(ValueError, match="strength"):
        SpectralNormPenalty(state, strength=-1.0)
    with pytest.raises(ValueError, match="larger than min"):
        TailEnergyPenalty(model, k=11)
    with pytest.raises(ValueError, match="tracks 1"):
        HeadSpreadPenalty(state, k=3)
    with pytest.raises(ValueError, match="target"):
        SpectralNormPenalty(state, mode="hinge")
    with pytest.raises(ValueError, match="view"):
        SpectralNormPenalty(state, view="operator")
    with pytest.raises(ValueError, match="not selected"):
        SpectralNormPenalty(state, weights={"2": 1.0})
    with pytest.raises(ValueError, match="no proximal form"):
        SpectralNormPenalty(state, proximal=True)
    with pytest.raises(TypeError, match="SpectralState or an nn.Module"):
        SpectralNormPenalty(torch.zeros(3))
    p = SpectralNormPenalty(state, strength=lambda step: -1.0)
    with pytest.raises(ValueError, match="finite real >= 0"):
        p()
    other = small_model(seed=3)
    with pytest.raises(ValueError, match="different model"):
        SpectralNormPenalty(state).check_model(other)


def test_nuclear_norm_auto_accepts_small_layers_it_computes_exactly():
    from robustcompress.penalties import NuclearNormPenalty

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    p = NuclearNormPenalty(model, strength=1.0)  # k=8 > min(6, 4): exact svdvals is used there
    expected = torch.linalg.svdvals(model[0].weight.double()).sum()
    assert float(p()) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="k=8"):
        NuclearNormPenalty(model, strength=1.0, method="bound")


@given(st.floats(1e-6, 50.0), st.floats(1e-3, 10.0))
def test_every_spectral_mode_slope_is_the_derivative_of_its_value(sigma, parameter):
    # The closed-form update f′(σ)·u vᵀ and autograd through f(σ) must agree for
    # every entry of the table (a new mode with a wrong slope fails here).
    for name, entry in SPECTRAL_MODES.items():
        c = parameter if entry.option is not None else None
        if c is not None and abs(sigma - c) < 1e-6:
            continue  # the kink of hinge / log floor: autograd picks one side
        s = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(entry.value(s, c), s)
        torch.testing.assert_close(entry.slope(s.detach(), c), g, rtol=1e-12, atol=0, msg=name)


def test_spectral_mode_options_are_checked_against_the_table():
    model = small_model()
    with pytest.raises(ValueError, match="mode='hinge' needs target"):
        SpectralNormPenalty(model, mode="hinge")
    with pytest.raises(ValueError, match="log_floor is only used with mode='log_k2'"):
        SpectralNormPenalty(model, mode="hinge", target=1.0, log_floor=0.1)
    with pytest.raises(ValueError, match="target is only used with mode='hinge'"):
        SpectralNormPenalty(model, target=1.0)
    with pytest.raises(ValueError, match="Expected mode to be one of"):
        SpectralNormPenalty(model, mode="cube")
    with pytest.raises(ValueError, match="target"):
        SpectralNormPenalty(model, mode="hinge", target=-1.0)
    p = SpectralNormPenalty(model, mode="log_k2")
    assert p.log_floor == p.parameter > 0 and p.target is None and "2" in p.names  # the head is included
