"""Certified bounds: every per-layer bound ≥ the exact norm, every rule attained, soundness on trained nets."""

import copy
import re
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robustcompress.bound import (
    ROUNDING_MARGIN,
    activation_lipschitz,
    certified_radius,
    conv_fourier_bound,
    conv_matrix_bound,
    gram_iteration_bound,
    inf_to_2_bound,
    layer_bound,
    lipschitz_bound,
    matrix_norm_bound,
    operator_frobenius,
    pool_factor,
    power_sigma,
)
from robustcompress.layers import LowRankConv2d, LowRankLinear

UP = 1 + ROUNDING_MARGIN


def _exact_operator(module, input_shape):
    """σ_1 of the layer's Jacobian at its input size: an independent reference (autograd, float64)."""
    m = copy.deepcopy(module).double()
    if getattr(m, "bias", None) is not None:
        m.bias = None
    x0 = torch.zeros(1, *input_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(m, x0).reshape(-1, math.prod(input_shape))
    return float(torch.linalg.svdvals(jac)[0]), jac


# ---------------------------------------------------------------- matrices


@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 10_000), n_iter=st.integers(1, 7),
       log_scale=st.sampled_from([-250.0, 0.0, 250.0]))
def test_gram_iteration_is_an_upper_bound(m, n, seed, n_iter, log_scale):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w * math.exp(log_scale)  # rescaling every step: no overflow / underflow at 1e±108
    exact = float(torch.linalg.svdvals(w)[0])
    b = gram_iteration_bound(w, n_iter)
    assert math.isfinite(b)
    assert b >= exact
    # ‖G_t‖_F ≤ √rank · σ_1(G_t): the bound is within rank^{1/2^{t+1}} of σ_1.
    assert b <= exact * min(m, n) ** (1 / 2 ** (n_iter + 1)) * UP * (1 + 1e-9)


def test_gram_iteration_adversarial_spectra():
    # Flat spectrum: the worst case; nearly equal top two: slow for power iteration, not for Gram.
    eye = torch.eye(64, dtype=torch.float64)
    assert gram_iteration_bound(eye, 6) >= 1.0
    assert gram_iteration_bound(eye, 10) == pytest.approx(1.0, rel=1e-2)
    w = torch.diag(torch.tensor([1.0, 1.0 - 1e-9, 0.5], dtype=torch.float64))
    assert gram_iteration_bound(w) >= 1.0
    assert gram_iteration_bound(torch.zeros(3, 4)) == 0.0
    c = torch.randn(6, 5, dtype=torch.complex128)
    assert gram_iteration_bound(c) >= float(torch.linalg.svdvals(c)[0])
    assert matrix_norm_bound(c, "exact") >= float(torch.linalg.svdvals(c)[0])


# ---------------------------------------------------------------- layers


@given(
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    groups=st.sampled_from([1, 2]),
    size=st.integers(4, 7),
    mode=st.sampled_from(["zeros", "zeros", "reflect", "circular", "replicate"]),
    one_d=st.booleans(),
    kernel=st.sampled_from(["random", "ones", "checker", "onehot", "rank1"]),
    seed=st.integers(0, 1000),
)
def test_conv_bounds_dominate_the_materialised_operator(k, stride, dilation, padding, groups, size, mode, one_d,
                                                        kernel, seed):
    if mode != "zeros" and padding >= size:
        return
    cls = nn.Conv1d if one_d else nn.Conv2d
    conv = cls(2 * groups, 2 * groups, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
               bias=False, padding_mode=mode).double()
    shape = (2 * groups, size) if one_d else (2 * groups, size, size - 1)
    if (size - 1 + 2 * padding - dilation * (k - 1)) < 1:
        return
    g = torch.Generator().manual_seed(seed)
    w = conv.weight.data
    if kernel == "random":
        w.copy_(torch.randn(w.shape, generator=g))
    elif kernel == "ones":  # all energy at frequency 0: where zero padding departs most from circular
        w.fill_(1.0)
    elif kernel == "checker":  # energy at the Nyquist frequency
        idx = torch.arange(w[0, 0].numel()).reshape(w.shape[2:])
        w.copy_(((-1.0) ** idx).expand_as(w))
    elif kernel == "onehot":
        w.zero_()
        w.view(-1)[seed % w.numel()] = 3.0
    else:
        w.copy_(torch.einsum("o,i...->oi...", torch.randn(w.shape[0], generator=g),
                             torch.randn(w.shape[1:], generator=g)))
    exact, jac = _exact_operator(conv, shape)
    assert layer_bound(conv, shape, "auto") >= exact
    assert layer_bound(conv, shape, "exact") >= exact
    assert layer_bound(conv, shape, "exact") <= exact * UP * (1 + 1e-9) + 1e-12
    assert conv_matrix_bound(conv, shape) >= exact
    if mode == "zeros":
        assert conv_fourier_bound(conv, shape) >= exact
        assert layer_bound(conv, shape, "gram") >= exact
    # ∞→2: the exact operator's √(Σ rows ℓ1²) and √n·σ_1 are both upper bounds; ours is their min or looser.
    assert inf_to_2_bound(conv, shape) >= min(float(jac.abs().sum(1).square().sum().sqrt()),
                                              math.sqrt(math.prod(shape)) * exact) * (1 - 1e-9)
    assert operator_frobenius(conv, shape) == pytest.approx(float(jac.norm()), rel=1e-9, abs=1e-12)
    assert power_sigma(conv, shape, n_iter=5) <= exact * (1 + 1e-6)


def test_conv_bounds_attained():
    # Non-overlapping windows (c = 1): the operator is block diagonal in W_mat, norm = σ_1(W_mat).
    conv = nn.Conv2d(3, 4, 2, stride=2, bias=False).double()
    exact, _ = _exact_operator(conv, (3, 6, 6))
    assert conv_matrix_bound(conv) == pytest.approx(exact, rel=2e-6)
    # 1×1 convolution: the Fourier symbol is constant, bound = norm.
    conv = nn.Conv2d(3, 5, 1, bias=False).double()
    exact, _ = _exact_operator(conv, (3, 4, 4))
    assert conv_fourier_bound(conv, (3, 4, 4)) == pytest.approx(exact, rel=2e-6)
    # A wide input with a constant kernel: zero-padded norm → circular norm (ratio → 1).
    conv = nn.Conv1d(1, 1, 3, padding=1, bias=False).double()
    conv.weight.data.fill_(1.0)
    exact, _ = _exact_operator(conv, (1, 400))
    assert conv_fourier_bound(conv, (1, 400)) == pytest.approx(exact, rel=1e-4)


def test_linear_and_low_rank_bounds():
    torch.manual_seed(0)
    lin = nn.Linear(30, 20)
    ref = float(torch.linalg.svdvals(lin.weight.detach().double())[0])
    assert ref <= layer_bound(lin) <= ref * UP * (1 + 1e-9)
    assert ref <= layer_bound(lin, method="gram") <= ref * 1.01
    lr = LowRankLinear(30, 20, rank=3)
    prod = lr.weight_b.detach().double() @ lr.weight_a.detach().double()
    ref = float(torch.linalg.svdvals(prod)[0])
    assert ref <= layer_bound(lr) <= ref * UP * (1 + 1e-9)
    assert layer_bound(lr) < float(torch.linalg.svdvals(lr.weight_b.detach().double())[0]) * float(
        torch.linalg.svdvals(lr.weight_a.detach().double())[0])
    lrc = LowRankConv2d(3, 6, 3, rank=2, padding=1, stride=2).double()
    exact, _ = _exact_operator(lrc, (3, 7, 7))
    for method in ("auto", "fourier", "matrix", "exact"):
        assert layer_bound(lrc, (3, 7, 7), method) >= exact
    # ∞→2 of a sign-aligned rank-1 layer is attained by δ = sign(v).
    lin = nn.Linear(4, 3, bias=False)
    lin.weight.data = torch.outer(torch.tensor([1.0, 2.0, -1.0]), torch.tensor([1.0, -1.0, 0.5, 2.0]))
    attained = float((lin.weight.detach().double() @ torch.sign(lin.weight[0].detach().double())).norm())
    assert inf_to_2_bound(lin) == pytest.approx(attained, rel=2e-6)


# ---------------------------------------------------------------- activations and rules


def test_activation_constants_are_sups_and_attained():
    xs = torch.linspace(-12, 12, 200_001, dtype=torch.float64, requires_grad=True)
    for mod, fn in [(nn.GELU(), F.gelu), (nn.SiLU(), F.silu), (nn.Mish(), F.mish), (nn.GELU("tanh"), None),
                    (nn.Tanh(), torch.tanh), (nn.Sigmoid(), torch.sigmoid), (nn.Hardswish(), F.hardswish),
                    (nn.ELU(2.0), None), (nn.LeakyReLU(-3.0), None)]:
        (d,) = torch.autograd.grad(mod(xs).sum(), xs)
        sup = float(d.abs().max())
        lip = activation_lipschitz(mod)
        assert sup <= lip
        assert lip - sup < 1e-4, type(mod).__name__
        if fn is not None:
            assert activation_lipschitz(fn) == lip
    assert activation_lipschitz(nn.GELU()) == pytest.approx(1.1289, abs=1e-4)
    assert activation_lipschitz(nn.SiLU()) == pytest.approx(1.0998, abs=1e-4)
    assert activation_lipschitz(nn.Mish()) == pytest.approx(1.0885, abs=1e-3)
    assert activation_lipschitz(F.leaky_relu, negative_slope=0.2) == 1.0


def _ratio(model, x, d):
    with torch.no_grad():
        return float((model(x + d) - model(x)).flatten(1).norm(dim=1).max() / d.flatten(1).norm(dim=1).max())


def test_gelu_rule_attained_near_sqrt2():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.GELU()).double()
    model[0].weight.data.fill_(1.0)
    k = lipschitz_bound(model, (1,)).K2
    x = torch.full((1, 1), math.sqrt(2), dtype=torch.float64)
    r = _ratio(model, x, torch.full((1, 1), 1e-6, dtype=torch.float64))
    assert 1.12890 < r <= k


def test_maxpool_bump_attains_two():
    pool = nn.MaxPool2d(3, stride=2)
    assert pool_factor(pool, (1, 9, 9)) == (2.0, 1.0)
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), pool)
    model[0].weight.data.fill_(1.0)
    b = lipschitz_bound(model, (1, 9, 9))
    x = torch.zeros(1, 1, 9, 9)
    d = torch.zeros_like(x)
    d[0, 0, 2, 2] = 1e-3  # element (2, 2) lies in 2×2 windows
    assert _ratio(model, x, d) == pytest.approx(2.0, rel=1e-5)
    assert b.K2 == pytest.approx(2.0, rel=1e-5) and b.K2 >= 2.0
    assert pool_factor(nn.MaxPool2d(2), (1, 8, 8))[0] == 1.0
    assert pool_factor(F.max_pool2d, (1, 9, 9), 3, 2)[0] == 2.0


@pytest.mark.parametrize("pool", [
    nn.AvgPool2d(2), nn.AvgPool2d(3, stride=1, padding=1), nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
    nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False), nn.AvgPool1d(3, stride=1),
    nn.AdaptiveAvgPool2d((3, 2)), nn.AdaptiveAvgPool2d(1), nn.MaxPool2d(3, 1, 1), nn.AdaptiveMaxPool2d((3, 3)),
])
def test_pool_factor_dominates_exact_norm(pool):
    shape = (1, 7) if isinstance(pool, nn.AvgPool1d) else (1, 7, 5)
    f2, finf = pool_factor(pool, shape)
    if isinstance(pool, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
        # Lipschitz via random pairs; max pooling is not linear.
        g = torch.Generator().manual_seed(0)
        for _ in range(50):
            x, d = torch.randn(1, *shape, generator=g), 1e-3 * torch.randn(1, *shape, generator=g)
            assert _ratio(pool, x, d) <= f2 * (1 + 1e-5)
        return
    jac = torch.autograd.functional.jacobian(pool, torch.zeros(1, *shape, dtype=torch.float64)).reshape(-1, math.prod(shape))
    assert f2 >= float(torch.linalg.svdvals(jac)[0])
    assert finf >= float(jac.abs().sum(1).max()) * (1 - 1e-12)
    # The overlapping average with count_include_pad=False exceeds 1: "avg ≤ 1" would be wrong there.
    if isinstance(pool, nn.AvgPool2d) and not pool.count_include_pad:
        assert float(torch.linalg.svdvals(jac)[0]) > 1.0


def test_residual_normalisation_and_bn_rules_attained():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)
            self.register_buffer("mu", torch.tensor([0.1, 0.2, 0.3, 0.4]))
            self.register_buffer("sd", torch.tensor([0.5, 0.25, 1.0, 2.0]))

        def forward(self, x):
            x = (x - self.mu) / self.sd
            return x + self.lin(x)

    m = Res()
    m.lin.weight.data = 2 * torch.eye(4)
    b = lipschitz_bound(m, (4,))
    # f(x) = 3·(x − μ)/σ: exact constant 3 / min σ = 12; identity path + linear path add.
    assert b.K2 == pytest.approx(12.0, rel=1e-5) and b.K2 >= 12.0
    assert b.log_split is None
    # K∞: ℓ∞ ball through the normalisation, then the linear ∞→2 bound; attained by δ = ε·1.
    d = 1e-3 * torch.ones(1, 4)
    with torch.no_grad():
        exact_inf = float((m(d) - m(torch.zeros(1, 4))).norm()) / 1e-3
    assert exact_inf <= b.Kinf * (1 + 1e-6)

    lin_bn = nn.Sequential(nn.Linear(3, 3, bias=False), nn.BatchNorm1d(3)).eval()
    lin_bn[0].weight.data = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    lin_bn[1].running_var.copy_(torch.tensor([16.0, 1.0, 16.0]))
    lin_bn[1].weight.data = torch.tensor([1.0, 3.0, 1.0])
    b = lipschitz_bound(lin_bn, (3,))
    exact = float(torch.linalg.svdvals(torch.autograd.functional.jacobian(lin_bn, torch.zeros(1, 3)).reshape(3, 3))[0])
    assert exact <= b.K2 <= exact * (1 + 1e-5)  # folded: 3, not σ(W)·max s = 4·3
    # Identity path from the input costs √n in K∞.
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(9, 9, bias=False)

        def forward(self, x):
            return x + self.lin(x)

    s = Skip()
    s.lin.weight.data.zero_()
    b = lipschitz_bound(s, (9,), norm="linf")
    assert b.K == pytest.approx(3.0, rel=1e-5) and b.K >= 3.0  # ‖ε·1‖_2 = 3ε


def test_chain_log_split_sums_to_log_k2(trained_digits_mlp):
    b = lipschitz_bound(trained_digits_mlp, (64,))
    assert b.log_split is not None
    assert sum(b.log_split.values()) == pytest.approx(math.log(b.K2), rel=1e-9)
    sig = [f.factor for f in b.factors if f.kind == "linear"]
    fro = [float(m.weight.detach().double().norm()) for m in trained_digits_mlp if isinstance(m, nn.Linear)]
    assert b.log_split["scale"] == pytest.approx(sum(map(math.log, fro)))
    assert b.K2 == pytest.approx(math.prod(sig), rel=1e-9)
    assert b.Kinf <= math.sqrt(64) * b.K2 * (1 + 1e-9)


# ---------------------------------------------------------------- soundness on trained networks


class _ResCNN(nn.Module):
    """BN, an identity residual block, a 1×1 projection block, overlapping max-pool, GELU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.act = nn.GELU()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, stride=2, bias=False)
        self.proj = nn.Conv2d(8, 12, 1, stride=2, bias=False)
        self.bnp = nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.head = nn.Linear(12 * 2 * 2, 10)

    def forward(self, x):
        x = self.act(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn1(self.c1(x)))
        x = F.relu(self.c2(x) + self.bnp(self.proj(x)))
        x = self.pool(x)
        return self.head(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def trained_cnn(digits_data):
    train, _ = digits_data
    x, y = train.tensors
    x = x.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = _ResCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _check_soundness(model, x, y, norm):
    from robustcompress.attacks import pgd

    b = lipschitz_bound(model, tuple(x.shape[1:]), norm)
    k = b.K
    g = torch.Generator().manual_seed(1)
    # Random directions, several scales.
    for scale in (1e-3, 1e-1, 1.0):
        d = torch.randn(x.shape, generator=g) * scale
        if norm != 2:
            d = d.sign() * scale
        with torch.no_grad():
            num = (model(x + d) - model(x)).norm(dim=1)
        den = d.flatten(1).norm(dim=1) if norm == 2 else d.flatten(1).abs().max(1).values
        assert bool((num / den <= k).all())
    # Adversarial directions: gradient ascent on the local ratio.
    d = (1e-2 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([d], lr=1e-2)
    worst = 0.0
    for _ in range(40):
        den = d.flatten(1).norm(dim=1) if norm == 2 else d.flatten(1).abs().max(1).values
        ratio = (model(x + d) - model(x)).norm(dim=1) / den
        worst = max(worst, float(ratio.detach().max()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    assert worst <= k
    # A strong PGD inside the certified ball never flips a prediction.
    r = certified_radius(model, x, y, norm, bound=b)
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert bool((r[pred != y] == 0).all())
    ok = r > 0
    assert int(ok.sum()) > 0
    eps = (r[ok] * 0.999).float()
    x_adv = pgd(model, x[ok], y[ok], eps, norm=norm, steps=60, restarts=3, early_stop=True, seed=0)
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1) == y[ok]).all())
    dist = (x_adv - x[ok]).flatten(1)
    dist = dist.norm(dim=1) if norm == 2 else dist.abs().max(1).values
    assert bool((dist <= r[ok] * (1 + 1e-4)).all())
    return b, r


def _assert_bound_leaves_model_alone(model, x, y, norm):
    """The bound and the radius change no weight, buffer, gradient or mode of the model."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    b = lipschitz_bound(model, tuple(x.shape[1:]), norm)
    certified_radius(model, x, y, norm, bound=b)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for g, p in zip(grads, model.parameters()):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("norm", [2, float("inf")])
def test_soundness_trained_mlp(trained_digits_mlp, digits_data, norm):
    model = copy.deepcopy(trained_digits_mlp)
    _, test = digits_data
    x, y = test.tensors[0][:64], test.tensors[1][:64]
    _assert_bound_leaves_model_alone(model, x, y, norm)
    _check_soundness(model, x, y, norm)


@pytest.mark.parametrize("norm", [2, float("inf")])
def test_soundness_trained_resnet_like_cnn(trained_cnn, digits_data, norm):
    _, test = digits_data
    x, y = test.tensors[0][:48].reshape(-1, 1, 8, 8), test.tensors[1][:48]
    model = copy.deepcopy(trained_cnn)
    # Gradients present before (as in a training loop) must come through the bound untouched.
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    _assert_bound_leaves_model_alone(model, x, y, norm)
    b, _ = _check_soundness(model, x, y, norm)
    kinds = {f.kind for f in b.factors}
    assert {"linear", "add", "pool", "activation", "bn"} <= kinds
    assert [f.note for f in b.factors if f.target == "bnp"] == ["folded into proj"]
    assert model.training is False


def test_certified_radius_exact_for_a_linear_classifier():
    model = nn.Sequential(nn.Linear(2, 3))
    model[0].weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    model[0].bias.data.zero_()
    x = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    r = certified_radius(model, x, y)
    # Distance to the boundary f_0 = f_1 is (2 − 0.5)/√2; the second example is misclassified.
    assert float(r[0]) == pytest.approx(1.5 / math.sqrt(2), rel=1e-5)
    assert float(r[0]) <= 1.5 / math.sqrt(2)
    assert float(r[1]) == 0.0
    # ℓ∞: the margin (w_0 − w_1)ᵀx moves by ‖w_0 − w_1‖_1·ε.
    r_inf = certified_radius(model, x, y, norm="linf")
    assert float(r_inf[0]) == pytest.approx(1.5 / 2, rel=1e-5)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="training mode"):
        lipschitz_bound(bn, (3,))
    with pytest.raises(ValueError, match="LayerNorm"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), (3,))
    with pytest.raises(ValueError, match="no eligible layer"):
        lipschitz_bound(nn.Sequential(nn.ReLU()), (3,))
    with pytest.raises(ValueError, match="input_shape"):
        layer_bound(nn.Conv2d(1, 1, 3))
    with pytest.raises(ValueError, match="channels"):
        layer_bound(nn.Conv2d(2, 1, 3), (1, 5, 5))
    with pytest.raises(ValueError, match="zero padding"):
        conv_fourier_bound(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), (1, 5, 5))
    with pytest.raises(ValueError, match="norm"):
        lipschitz_bound(nn.Linear(2, 2), (2,), norm=1)
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_bound(nn.Linear(2, 2), 2)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            return self.att(x, x, x)[0]

    with pytest.raises(ValueError, match="att"):
        lipschitz_bound(Attn(), (2, 4))

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) * x

    with pytest.raises(ValueError, match="two input-dependent"):
        lipschitz_bound(Square(), (2,))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="trace"):
        lipschitz_bound(Branchy(), (2,))


def test_linear_on_a_sequence_is_not_folded_with_batchnorm_over_the_sequence_axis():
    # Linear acts on the last axis of (N, L, F); BatchNorm1d scales axis 1 (L).
    # Folding diag(s)·W would give σ₁(diag(s)·W) = 100 here; the operator's norm is max(s)·σ₁(W) = 1000.
    from robustcompress.bound import lipschitz_bound

    lin = nn.Linear(4, 4, bias=False)
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([10.0, 1.0, 1.0, 1.0])))
        bn.running_var.copy_(torch.tensor([1.0, 1.0, 1.0, 1e-4]) - bn.eps)
    model = nn.Sequential(lin, bn).eval()
    jac = torch.autograd.functional.jacobian(lambda z: model(z.reshape(1, 4, 4)).flatten(),
                                             torch.zeros(16)).double()
    true = torch.linalg.svdvals(jac)[0].item()
    assert true == pytest.approx(1000.0, rel=1e-3)
    assert lipschitz_bound(model, (4, 4)).K2 >= true * (1 - 1e-6)


# ---------------------------------------------------------------- faults: non-finite values name where they are


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["linear", "conv", "lowrank"])
def test_nonfinite_weights_name_the_layer(bad, where):
    if where == "linear":
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        weight, shape, name = model[2].weight, (4,), "'2' (Linear)"
    elif where == "conv":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2))
        weight, shape, name = model[0].weight, (1, 5, 5), "'0' (Conv2d)"
    else:
        model = nn.Sequential(nn.Linear(4, 4), LowRankLinear(4, 3, rank=2))
        weight, shape, name = model[1].weight_a, (4,), "'1' (LowRankLinear)"
    with torch.no_grad():
        weight.view(-1)[1] = bad
    with pytest.raises(ValueError, match=rf"layer {re.escape(name)} has non-finite weights \(NaN or Inf\)"):
        lipschitz_bound(model, shape)
    with pytest.raises(ValueError, match="non-finite weights"):
        layer_bound(model[0] if where == "conv" else model[-1], shape if where == "conv" else None)


def test_nonfinite_batchnorm_and_constants_name_the_module():
    for folded in (True, False):
        model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)) if folded else nn.Sequential(
            nn.Linear(3, 3), nn.ReLU(), nn.BatchNorm1d(3))
        model.eval()
        with torch.no_grad():
            model[-1].running_var[0] = float("nan")
        with pytest.raises(ValueError, match=rf"BatchNorm '{len(model) - 1}' \(BatchNorm1d\) has a non-finite scale"):
            lipschitz_bound(model, (3,))

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("sd", torch.tensor([1.0, float("nan")]))
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x / self.sd)

    with pytest.raises(ValueError, match="truediv.*constant operand with NaN or Inf"):
        lipschitz_bound(Norm(), (2,))


def test_certified_radius_refuses_nonfinite_rows():
    model = nn.Sequential(nn.Linear(2, 3))
    x = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, float("inf")]])
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"x has NaN or Inf entries in rows \[1, 2\]"):
        certified_radius(model, x, y)
    # Finite inputs whose logits overflow: the radius would be nan, so it is an error too.
    big = nn.Sequential(nn.Linear(2, 3))
    with torch.no_grad():
        big[0].weight.fill_(3e38)
    with pytest.raises(ValueError, match=r"logits are NaN or Inf for rows \[0\]"):
        certified_radius(big, torch.tensor([[10.0, 10.0]]), torch.tensor([0]))
    # The finite rows alone get finite radii.
    r = certified_radius(model, x[:1], y[:1])
    assert bool(torch.isfinite(r).all())


# ---------------------------------------------------------------- the rule tables


def test_a_rule_is_one_table_entry_and_unknown_nodes_are_named():
    from robustcompress.bound import NoLipschitzRuleError, rules

    class Clip(nn.Module):  # x ↦ clamp(2x, −1, 1): 2-Lipschitz, and torch.clamp has no rule of its own
        def forward(self, x):
            return torch.clamp(2 * x, -1, 1)

    model = nn.Sequential(nn.Linear(3, 3, bias=False), Clip())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
    with pytest.raises(NoLipschitzRuleError, match="No Lipschitz rule for function 'clamp'") as info:
        lipschitz_bound(model, (3,))
    assert info.value.target == "clamp" and info.value.module_type is None
    rules.MODULE_RULES[Clip] = lambda walk, node: walk.elementwise(node, 2.0, "activation", "activation")
    try:
        b = lipschitz_bound(model, (3,))
    finally:
        del rules.MODULE_RULES[Clip]
    assert b.K2 == pytest.approx(2.0, rel=1e-5) and b.K2 >= 2.0
    assert [f.kind for f in b.factors] == ["input", "linear", "activation"]
    with pytest.raises(NoLipschitzRuleError) as info:
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), (3,))
    assert (info.value.node, info.value.target, info.value.module_type) == ("_1", "1", "LayerNorm")
    # A subclass of an activation with its own forward is traced through, not given the parent's constant 1.
    class Doubled(nn.ReLU):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(3, 3, bias=False), Doubled())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
    assert lipschitz_bound(model, (3,)).K2 == pytest.approx(2.0, rel=1e-5)


def test_a_bound_that_overflows_float64_is_an_error_naming_the_node():
    # Each layer is finite (σ = 1e200), their product is not: never an inf or nan bound (inf·0 = nan).
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model.double()
    with torch.no_grad():
        model[0].weight.copy_(1e200 * torch.eye(2, dtype=torch.float64))
        model[1].weight.copy_(1e200 * torch.eye(2, dtype=torch.float64))
        model[2].weight.zero_()
    with pytest.raises(ValueError, match=r"overflows float64 at module '1' \(Linear\)"):
        lipschitz_bound(model, (2,))


def test_layer_facts_come_from_the_registry():
    from robustcompress.bound import layer_facts as lf
    from robustcompress.bound import NoLipschitzRuleError
    from robustcompress.layers import batchnorm_scale

    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-2.0, 0.5, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    # One BatchNorm-scale computation: the bound's is the registry's, in float64 on the host.
    assert torch.equal(lf.bn_scale(bn), batchnorm_scale(bn, torch.float64).detach())
    assert lf.bn_scale(bn).dtype == torch.float64
    kinds = {type(m).__name__: lf.bound_kind(m) for m in (
        nn.Linear(2, 2), nn.Conv1d(1, 1, 1), nn.Conv2d(1, 1, 1), nn.Conv3d(1, 1, 1), LowRankLinear(4, 3, rank=2),
        LowRankConv2d(2, 3, 3, rank=1), nn.Embedding(3, 2), nn.ReLU())}
    assert kinds == {"Linear": "linear", "Conv1d": "conv", "Conv2d": "conv", "Conv3d": None,
                     "LowRankLinear": "linear", "LowRankConv2d": "conv", "Embedding": None, "ReLU": None}
    low = LowRankLinear(4, 3, rank=2)
    torch.testing.assert_close(lf.head_matrix(low), (low.weight_b @ low.weight_a).double().detach())
    assert lf.weight_shape(low) == [3, 4, "r2"] and lf.operator_shape(low) == (3, 4)
    # A Conv3d has no bound rule yet: a clear error naming it, never a silent factor.
    with pytest.raises(NoLipschitzRuleError, match="Conv3d"):
        lipschitz_bound(nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten()), (1, 4, 4, 4))
