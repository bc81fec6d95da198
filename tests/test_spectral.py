"""The spectral core against float64 ``torch.linalg.svdvals`` and materialised operators."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from robustcompress.layers import LowRankLinear
from robustcompress.spectral import (
    SpectralState,
    cholesky_qr2,
    conv_operator,
    matrix_view,
)


def linear_with(weight: torch.Tensor) -> nn.Sequential:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


def with_spectrum(m: int, n: int, sigmas, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (u * torch.tensor(sigmas, dtype=torch.float64)) @ v.T


def materialised_conv(conv: nn.Module, input_shape) -> torch.Tensor:
    """The convolution's matrix built column by column from basis inputs (independent of the views)."""
    n = math.prod(input_shape)
    cols = []
    with torch.no_grad():
        for j in range(n):
            e = torch.zeros(n, dtype=torch.float64)
            e[j] = 1
            cols.append(conv._conv_forward(e.reshape(1, *input_shape), conv.weight.double(), None).flatten())
    return torch.stack(cols, dim=1)


SHAPES = [(1, 7), (7, 1), (6, 6), (5, 12), (12, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4))
def test_estimates_never_exceed_true_sigmas(shape, seed, k):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    state = SpectralState(linear_with(w), k=k, init_iter=0, seed=seed)
    exact = torch.linalg.svdvals(w.double())
    for _ in range(3):
        state.step()
        est = state.sigmas("0").double()
        assert est.numel() == min(k, *shape)
        assert torch.all(est <= exact[: est.numel()] * (1 + 1e-5) + 1e-6)
        sigma_grad = state.sigma("0").double()
        assert sigma_grad <= exact[0] * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,k", [((40, 30), 4), ((30, 40), 3), ((25, 25), 1)])
def test_converges_to_svdvals_with_a_one_percent_gap(dtype, shape, k):
    # σ_{k+1}/σ_k = 0.99: the slowest gap the contract covers; 250 iterations.
    m, n = shape
    r = min(m, n)
    head = [10.0 * 0.9 ** j for j in range(k)]
    tail = [head[-1] * 0.99 * 0.97 ** j for j in range(r - k)]
    w = with_spectrum(m, n, head + tail, seed=k).to(dtype)
    exact = torch.linalg.svdvals(w.double())  # of the rounded weight, as the state sees it
    state = SpectralState(linear_with(w), k=k, init_iter=0)
    state.step(250)
    est = state.sigmas("0").double()
    assert torch.all((est - exact[:k]).abs() <= 1e-4 * exact[0]), (est, exact[:k])
    u, v = state.vectors("0")
    assert torch.allclose(v.double().T @ v.double(), torch.eye(k, dtype=torch.float64), atol=1e-5)


def test_rank_deficient_and_zero_matrices():
    w = with_spectrum(10, 8, [3.0, 1.0]).float()  # rank 2, k = 4
    state = SpectralState(linear_with(w), k=4, init_iter=100)
    est = state.sigmas("0")
    assert torch.isfinite(est).all()
    assert est[:2] == pytest.approx([3.0, 1.0], rel=1e-4)
    assert est[2:].abs().max() < 1e-3
    assert torch.isfinite(state.vectors("0")[1]).all()

    for k in (1, 2):
        zero = SpectralState(linear_with(torch.zeros(6, 5)), k=k, init_iter=5)
        assert torch.equal(zero.sigmas("0"), torch.zeros(k))
        for t in zero.vectors("0"):
            assert torch.isfinite(t).all()
        s = zero.sigma("0")
        assert s.item() == 0.0 and torch.isfinite(s)


def test_warm_start_tracks_a_slowly_changing_matrix():
    # Gap σ₂/σ₁ = 0.8, drift 1e-3 of ‖W‖ per step, one iteration per step.
    torch.manual_seed(1)
    w = with_spectrum(30, 20, [5.0, 4.0, 3.0, 2.0, 1.0]).float()
    model = linear_with(w)
    state = SpectralState(model, k=1, init_iter=100)
    worst = 0.0
    for _ in range(200):
        with torch.no_grad():
            d = torch.randn_like(model[0].weight)
            model[0].weight.add_(1e-3 * d / d.norm() * model[0].weight.norm())
        state.step(1)
        exact = torch.linalg.svdvals(model[0].weight.double())[0]
        worst = max(worst, abs(state.sigmas("0").double()[0].item() - exact.item()) / exact.item())
    assert worst <= 1e-3


CONV_CASES = [
    dict(cls=nn.Conv2d, args=(2, 3, 3), kw=dict(stride=2, padding=1), shape=(2, 7, 7)),
    dict(cls=nn.Conv2d, args=(2, 4, 3), kw=dict(dilation=2, padding=2), shape=(2, 6, 6)),
    dict(cls=nn.Conv2d, args=(4, 4, 3), kw=dict(groups=2, padding=1), shape=(4, 5, 5)),
    dict(cls=nn.Conv2d, args=(2, 3, 3), kw=dict(padding=1, padding_mode="circular"), shape=(2, 5, 5)),
    dict(cls=nn.Conv2d, args=(2, 3, 3), kw=dict(padding=1, padding_mode="reflect"), shape=(2, 5, 5)),
    dict(cls=nn.Conv1d, args=(2, 3, 4), kw=dict(stride=3, padding=2), shape=(2, 11)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: str(c["kw"]))
def test_conv_operator_matches_materialised_matrix(case):
    torch.manual_seed(3)
    conv = case["cls"](*case["args"], **case["kw"]).double()
    op = conv_operator(conv, case["shape"])
    dense = materialised_conv(conv, case["shape"])
    assert op.shape == tuple(dense.shape)
    assert torch.allclose(op.matrix().detach(), dense, atol=1e-12)
    # Adjoint: <Wx, y> = <x, Wᵀy>.
    x = torch.randn(op.shape[1], 3, dtype=torch.float64)
    y = torch.randn(op.shape[0], 3, dtype=torch.float64)
    assert torch.allclose((op.matvec(x) * y).sum(0), (x * op.rmatvec(y)).sum(0), rtol=1e-10)
    assert op.frobenius().item() == pytest.approx(dense.norm().item(), rel=1e-10)
    state = SpectralState(nn.Sequential(conv), k=1, view="operator", input_shape=case["shape"], init_iter=300)
    assert state.sigmas("0")[0].item() == pytest.approx(torch.linalg.svdvals(dense)[0].item(), rel=1e-6)


def test_grouped_matrix_view_is_the_union_of_group_spectra():
    conv = nn.Conv2d(6, 4, 3, groups=2).double()
    op = matrix_view(conv)
    blocks = [conv.weight[:2].reshape(2, -1), conv.weight[2:].reshape(2, -1)]
    union = torch.cat([torch.linalg.svdvals(b) for b in blocks]).sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(op.matrix()), union)
    state = SpectralState(nn.Sequential(conv), k=2, init_iter=100)
    assert torch.allclose(state.sigmas("0"), union[:2], rtol=1e-6)


def test_gradient_of_sigma_is_u_v_transpose():
    w = with_spectrum(9, 7, [4.0, 2.0, 1.0, 0.5])
    model = linear_with(w)
    state = SpectralState(model, k=1, init_iter=200)
    state.sigma("0").backward()
    ours = model[0].weight.grad.clone()
    ref_w = w.clone().requires_grad_(True)
    torch.linalg.svdvals(ref_w)[0].backward()
    assert torch.allclose(ours, ref_w.grad, atol=1e-8)


@pytest.mark.parametrize("stack", [0, 1 << 18])
@pytest.mark.parametrize("k", [1, 3])
def test_batched_and_per_layer_paths_agree(k, stack):
    # k = 1 takes the power-iteration fast path, k = 3 the batched Rayleigh–Ritz
    # path; stack > 0 stacks the same-shape layers into one bmm (CUDA's default).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
                          nn.Conv1d(16, 16, 1))
    state = SpectralState(model, k=k, init_iter=0, stack_max_numel=stack)
    ref = copy.deepcopy(state)
    state.step(5)
    # Per layer, by hand, from the same starting vectors.
    for name in ref.names:
        op = ref.operator(name)
        v = ref.layers[name.replace(".", "-")].V.clone()
        for _ in range(5):
            u0 = op.matvec(v).detach()
            lam, q = torch.linalg.eigh(u0.T @ u0)
            v = cholesky_qr2(op.rmatvec(u0).detach() @ q.flip(-1))
            s = lam.flip(-1).clamp_min(0).sqrt()
            if k == 1:  # the fast path reports uᵀ W v_new = ‖WᵀW v‖ / ‖W v‖
                s = (op.rmatvec(u0).norm() / u0.norm()).reshape(1).detach()
        assert torch.allclose(state.sigmas(name), s, rtol=1e-5), name
        if k == 1:
            assert torch.allclose(state.sigma(name).detach(), state.sigmas(name)[0], rtol=1e-5), name
        assert torch.allclose(state.vectors(name)[1].abs(), v.abs(), atol=1e-4), name


def test_bn_folding_and_low_rank_product():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), LowRankLinear(5, 4, rank=2))
    model.train()
    model(torch.randn(32, 6))
    model.eval()
    state = SpectralState(model, k=2, init_iter=200)
    bn = model[1]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = (s[:, None] * model[0].weight).double()
    assert state.folded_bn("0") is bn
    assert torch.allclose(state.sigmas("0").double(), torch.linalg.svdvals(folded)[:2], rtol=1e-5)
    product = (model[3].weight_b @ model[3].weight_a).double()
    assert torch.allclose(state.sigmas("3").double(), torch.linalg.svdvals(product)[:2], rtol=1e-5)
    unfolded = SpectralState(model, k=1, fold_bn=False, init_iter=200)
    assert unfolded.sigmas("0").item() == pytest.approx(
        torch.linalg.svdvals(model[0].weight.double())[0].item(), rel=1e-5)


def test_state_dict_round_trip_and_model_untouched():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    keys = set(model.state_dict())
    state = SpectralState(model, k=2)
    assert set(model.state_dict()) == keys
    state.step(3)
    saved = copy.deepcopy(state.state_dict())
    other = SpectralState(model, k=2, seed=123)
    other.load_state_dict(saved)
    for name in state.names:
        assert torch.equal(other.vectors(name)[1], state.vectors(name)[1])
        assert torch.equal(other.sigmas(name), state.sigmas(name))
    state.step(2)
    other.step(2)
    for name in state.names:
        assert torch.equal(other.sigmas(name), state.sigmas(name))
    moved = state.to(torch.float64)
    assert moved.layers["0"].V.dtype == torch.float64


def test_tied_weights_counted_once():
    a = nn.Linear(5, 5)
    model = nn.Sequential(a, nn.ReLU(), a)
    state = SpectralState(model)
    assert state.names == ["0"]
    assert state.aliases == {"2": "0"}
    assert torch.equal(state.sigmas("2"), state.sigmas("0"))


@pytest.mark.parametrize("k", [1, 2])
def test_nonfinite_weights_raise_or_skip_without_poisoning_the_state(k):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    state = SpectralState(model, k=k)
    before = state.vectors("2")[1].clone()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2'"):
        state.step()
    skipping = SpectralState(model, k=k, on_nonfinite="skip", init_iter=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipping.step()
    assert any("'2'" in str(w.message) for w in caught)
    for name in skipping.names:
        for t in (*skipping.vectors(name), skipping.sigmas(name)):
            assert torch.isfinite(t).all()
    assert torch.isfinite(state.vectors("2")[1]).all()
    assert torch.equal(state.vectors("2")[1], before)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_bad_inputs_are_rejected_clearly():
    with pytest.raises(ValueError, match="no layer"):
        SpectralState(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="Unknown layer"):
        SpectralState(nn.Sequential(nn.Linear(2, 2)), layers=["nope"])
    with pytest.raises(ValueError, match="k"):
        SpectralState(nn.Sequential(nn.Linear(2, 2)), k=0)
    with pytest.raises(ValueError, match="no layer.*lookup table"):
        SpectralState(nn.Sequential(nn.Embedding(3, 2)))
    # An Embedding is left out by default (one warning, with the reason) and tracked when named.
    with pytest.warns(UserWarning, match="lookup table") as caught:
        emb = SpectralState(nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 2)))
    assert len(caught) == 1
    assert "0" in emb.skipped and emb.names == ["1"]
    assert SpectralState(nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 2)), layers=["0"]).names == ["0"]
    with pytest.raises(ValueError, match="no registered layer kind"):
        SpectralState(nn.Sequential(nn.Bilinear(2, 2, 2), nn.Linear(2, 2)), layers=["0"])
    int_layer = nn.Linear(2, 2)
    int_layer.weight = nn.Parameter(torch.ones(2, 2, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match="floating-point"):
        SpectralState(nn.Sequential(int_layer), layers=["0"])
    with pytest.raises(ValueError, match="empty"):
        SpectralState(nn.Sequential(nn.Linear(0, 2)), layers=["0"])
    with pytest.raises(ValueError, match="input"):
        SpectralState(nn.Sequential(nn.Conv2d(1, 1, 3)), view="operator")
    # A layer whose shape changed since the state was built.
    model = nn.Sequential(nn.Linear(4, 4))
    state = SpectralState(model)
    model[0] = nn.Linear(4, 6)
    with pytest.raises(ValueError, match="changed shape"):
        state.step()


def test_parametrized_modules_are_tracked_through_the_parametrization():
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(6, 5))
    state = SpectralState(nn.Sequential(layer), init_iter=200)
    exact = torch.linalg.svdvals(layer.weight.detach().double())[0]
    assert float(state.sigmas("0")[0]) == pytest.approx(float(exact), rel=1e-5)
    state.sigma("0").backward()
    originals = list(layer.parametrizations.weight.parameters())
    assert all(p.grad is not None for p in originals)


def test_cholesky_qr2_survives_ill_conditioning():
    y = torch.randn(50, 6) * torch.tensor([1e4, 1e3, 1.0, 1e-2, 1e-3, 1e-4])
    y[:, 5] = y[:, 4] + 1e-9 * torch.randn(50)  # nearly dependent columns
    q = cholesky_qr2(y)
    assert torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)
    assert F.cosine_similarity(q[:, 0], y[:, 0], dim=0) > 0.999999


def test_warm_vectors_follow_the_model_dtype():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    state = SpectralState(model, k=2, init_iter=50)
    before = state.sigmas("0").double()
    model.double()
    state.step()
    assert state.layers["0"].V.dtype == torch.float64
    assert torch.allclose(state.sigmas("0"), before, rtol=1e-4)
    assert state.sigma("0").dtype == torch.float64


def test_linear_on_sequences_is_not_folded_with_a_batchnorm_over_the_sequence_axis():
    # (N, L, F) -> Linear(F, F) -> BatchNorm1d(L): BN scales L, not the Linear's outputs.
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    assert SpectralState(model, input_shape=(4, 4)).folded_bn("0") is None
    mismatched = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(4)).eval()  # (N, 4, 4) -> (N, 4, 6)
    assert SpectralState(mismatched).folded_bn("0") is None
    flat = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval()
    assert SpectralState(flat, input_shape=(4,)).folded_bn("0") is flat[1]


def test_record_input_shapes_rejects_unknown_names_and_leaves_no_hooks():
    from robustcompress.spectral import record_input_shapes

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with pytest.raises(ValueError, match="nope"):
        record_input_shapes(model, torch.zeros(1, 1, 6, 6), ["0", "nope"])
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert record_input_shapes(model, torch.zeros(2, 1, 6, 6)) == {"0": (1, 6, 6), "3": (32,)}


def test_layer_checks_still_catch_changes_after_a_checked_step():
    # The per-step layer check skips work when nothing it reads changed; every change must still be seen.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    state = SpectralState(model, k=2)
    state.step()
    state.step()  # the fast path now applies
    model.double()  # dtype change: the warm vectors follow
    state.step()
    assert state.vectors("0")[1].dtype == torch.float64
    with torch.no_grad():
        model[0].weight.data = torch.randn(9, 6, dtype=torch.float64)  # resized in place
    with pytest.raises(ValueError, match="changed shape"):
        state.step()
    model[0].weight = nn.Parameter(torch.randn(8, 6, dtype=torch.float64))  # a new parameter, old shape
    state.step()
    state.sigma("0").backward()  # σ is read from the new parameter
    assert model[0].weight.grad is not None
    model[2] = nn.Identity()
    with pytest.raises(ValueError, match="was replaced"):
        state.step()
