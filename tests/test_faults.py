"""The fault matrix: bad inputs and broken states, each met by the exact error or the exactly right result.

Every case asserts the exception type and a message fragment that names the
argument, layer or buffer at fault — or compares the result with a trusted
reference (float64 ``svdvals``). Nothing here may pass by printing a traceback.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import robustcompress as rc
from robustcompress.layers import LayerKind, register_layer_kind, unregister_layer_kind

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def planted(scale: float, dtype: torch.dtype, m: int = 16, n: int = 12) -> nn.Sequential:
    """A layer with singular values ``scale · 2^-j`` (gaps of 2: a few iterations converge), and a head."""
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    w = q1 @ torch.diag(2.0 ** -torch.arange(n, dtype=torch.float64)) @ q2.T
    model = nn.Sequential(nn.Linear(n, m), nn.ReLU(), nn.Linear(m, 4)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_((w * scale).to(dtype))
    return model


def top_svd(w: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().double().flatten(1))[:k]


def snapshot(state: rc.SpectralState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.state_dict().items()}


def unchanged(state: rc.SpectralState, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in state.state_dict().items())


# ---------------------------------------------------------------------- weights of any finite magnitude
# Scales are powers of two: scaling a matrix by 2^e is exact, so the reference
# singular values are those of the unscaled matrix times 2^e.
MAGNITUDES = [
    pytest.param(2.0 ** 100, 1, torch.float32, 1e-4, id="1e30-k1-fp32"),
    pytest.param(2.0 ** 100, 3, torch.float32, 1e-4, id="1e30-k3-fp32"),
    pytest.param(2.0 ** -66, 1, torch.float32, 1e-4, id="1e-20-k1-fp32"),
    pytest.param(2.0 ** -66, 3, torch.float32, 1e-4, id="1e-20-k3-fp32"),
    pytest.param(2.0 ** -120, 1, torch.float32, 1e-4, id="1e-36-k1-fp32"),
    pytest.param(2.0 ** 660, 1, torch.float64, 1e-8, id="1e200-k1-fp64"),
    pytest.param(2.0 ** -660, 2, torch.float64, 1e-8, id="1e-200-k2-fp64"),
    pytest.param(2.0 ** 10, 1, torch.float16, 2e-2, id="1e3-k1-fp16"),
    pytest.param(2.0 ** -10, 2, torch.float16, 2e-2, id="1e-3-k2-fp16"),
    pytest.param(2.0 ** 100, 2, torch.bfloat16, 2e-2, id="1e30-k2-bf16"),
    pytest.param(2.0 ** -66, 1, torch.bfloat16, 2e-2, id="1e-20-k1-bf16"),
]


@pytest.mark.parametrize("scale, k, dtype, rtol", MAGNITUDES)
def test_finite_weights_of_any_magnitude_give_the_right_sigmas(scale, k, dtype, rtol):
    model = planted(scale, dtype)
    state = rc.SpectralState(model, k=k, init_iter=40)
    exact = top_svd(model[0].weight, k)
    assert torch.isfinite(exact).all() and exact[0] > 0
    assert torch.allclose(state.sigmas("0").double(), exact, rtol=rtol, atol=0)
    u, v = state.vectors("0")
    assert torch.isfinite(u).all() and torch.isfinite(v).all()


def test_layers_of_different_dtypes_and_magnitudes_in_one_state():
    model = planted(2.0 ** 100, torch.float32)
    model[2].half()
    state = rc.SpectralState(model, k=1, init_iter=40)
    for name in ("0", "2"):
        exact = float(top_svd(model.get_submodule(name).weight, 1)[0])
        assert float(state.sigmas(name)[0]) == pytest.approx(exact, rel=1e-2 if name == "2" else 1e-4)


def test_tiny_weights_move_the_vectors_every_step():
    # Order 1e-20: Y = WᵀWV is 1e-40, subnormal in float32, which stalled the
    # k = 1 update. The first step finds σ₁ far from 1 and reruns scaled.
    model = planted(2.0 ** -66, torch.float32)
    state = rc.SpectralState(model, k=1, init_iter=0)
    exact = float(top_svd(model[0].weight, 1)[0])
    for _ in range(3):
        _, v0 = state.vectors("0")
        state.step()
        assert not torch.equal(v0, state.vectors("0")[1])
        assert 0 < float(state.sigmas("0")[0]) <= exact * (1 + 1e-5)
    state.step(30)
    assert float(state.sigmas("0")[0]) == pytest.approx(exact, rel=1e-4)


def test_weights_that_grow_by_1e30_between_steps_are_not_called_non_finite():
    model = planted(1.0, torch.float32)
    state = rc.SpectralState(model, k=1, init_iter=40)
    with torch.no_grad():
        model[0].weight.mul_(2.0 ** 100)
    state.step(10)
    assert float(state.sigmas("0")[0]) == pytest.approx(float(top_svd(model[0].weight, 1)[0]), rel=1e-4)


def test_weights_beyond_the_representable_range_get_a_clear_error():
    model = mlp()
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite in float32, but W v is not
    with pytest.raises(ValueError, match=r"layer\(s\) \['0'\] are finite but out of the range .* torch.float32"):
        rc.SpectralState(model)


@pytest.mark.parametrize("make, layer, bad", [
    pytest.param(mlp, "2", float("nan"), id="nan-linear"),
    pytest.param(mlp, "0", float("inf"), id="inf-linear"),
    pytest.param(cnn, "0", float("nan"), id="nan-conv"),
    pytest.param(cnn, "3", -float("inf"), id="neginf-linear-after-conv"),
])
def test_non_finite_weights_name_the_layer_and_leave_the_state_unchanged(make, layer, bad):
    model = make()
    state = rc.SpectralState(model, k=2)
    before = snapshot(state)
    with torch.no_grad():
        model.get_submodule(layer).weight.view(-1)[0] = bad
    with pytest.raises(ValueError, match=rf"Non-finite values \(NaN/Inf\) in the weights of layer\(s\) \['{layer}'\]"):
        state.step()
    # The other layer iterated; the bad one kept its vectors and estimates.
    after = state.state_dict()
    assert all(torch.equal(after[key], before[key]) for key in before if key.startswith(f"layers.{layer}."))


def test_non_finite_weights_with_skip_warn_and_keep_the_vectors():
    model = mlp()
    state = rc.SpectralState(model, on_nonfinite="skip")
    _, v = state.vectors("2")
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) \['2'\]"):
        state.step()
    assert torch.equal(state.vectors("2")[1], v)


@pytest.mark.parametrize("entry", ["penalty", "tracker", "wrapper"])
def test_non_finite_weights_are_named_by_every_entry_point(entry):
    model = mlp()
    with torch.no_grad():
        model[0].weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"weights of layer\(s\) \['0'\]"):
        if entry == "penalty":
            rc.SpectralNormPenalty(model)()
        elif entry == "tracker":
            rc.track(model, every=1)
        else:
            rc.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, penalties=[rc.SpectralNormPenalty(model)])


# ---------------------------------------------------------------------- state loaded from a checkpoint
def _corrupt(key: str, how: str):
    def apply(sd: dict) -> None:
        t = sd[key]
        if how == "nan":
            t.view(-1)[0] = float("nan")
        elif how == "inf":
            t.view(-1)[-1] = float("inf")
        elif how == "neg":
            t.view(-1)[0] = -1.0
        elif how == "zero":
            t.zero_()
        elif how == "scaled":
            t.mul_(3.0)
    return apply


@pytest.mark.parametrize("key, how, fragment", [
    pytest.param("layers.0.V", "nan", r"buffer 'layers.0.V' of layer '0' holds non-finite", id="nan-V"),
    pytest.param("layers.2.U", "inf", r"buffer 'layers.2.U' of layer '2' holds non-finite", id="inf-U"),
    pytest.param("layers.0.S", "nan", r"buffer 'layers.0.S' of layer '0' holds non-finite", id="nan-S"),
    pytest.param("layers.2.S", "neg", r"buffer 'layers.2.S' of layer '2' holds negative", id="negative-S"),
    pytest.param("layers.0.V", "zero", r"buffer 'layers.0.V' of layer '0' does not hold orthonormal", id="zero-V"),
    pytest.param("layers.2.V", "scaled", r"buffer 'layers.2.V' of layer '2' does not hold orthonormal", id="scaled-V"),
    pytest.param("steps", "neg", r"buffer steps must be a non-negative integer", id="negative-steps"),
])
def test_a_corrupt_state_dict_is_refused_before_anything_is_loaded(key, how, fragment):
    model = mlp()
    state = rc.SpectralState(model, k=2)
    state.step(3)
    sd = copy.deepcopy(state.state_dict())
    _corrupt(key, how)(sd)
    fresh = rc.SpectralState(model, k=2, seed=1)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=fragment):
        fresh.load_state_dict(sd)
    assert unchanged(fresh, before)
    fresh.step()  # the state still works, and its weights are not blamed


def test_a_corrupt_state_inside_a_penalty_names_the_nested_buffer():
    model = mlp()
    penalty = rc.SpectralNormPenalty(model)
    sd = copy.deepcopy(penalty.state_dict())
    sd["owned_state.layers.0.V"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"buffer 'owned_state.layers.0.V' of layer '0' holds non-finite"):
        penalty.load_state_dict(sd)


def test_a_state_dict_of_another_shape_is_refused_by_torch_naming_the_buffer():
    state = rc.SpectralState(mlp(), k=2)
    other = rc.SpectralState(nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 4)), k=2)
    with pytest.raises(RuntimeError, match=r"size mismatch for layers.0.U"):
        state.load_state_dict(other.state_dict())


def test_a_valid_state_dict_round_trips_bit_exactly():
    model = mlp()
    state = rc.SpectralState(model, k=2)
    state.step(2)
    fresh = rc.SpectralState(model, k=2, seed=5)
    fresh.load_state_dict(state.state_dict())
    assert unchanged(fresh, snapshot(state))


# ---------------------------------------------------------------------- layers resized, replaced or removed
def _resize(model):
    model[0].weight.data = torch.randn(20, 12)


def _replace(model):
    model[2] = nn.Identity()


def _remove(model):
    del model[2]


@pytest.mark.parametrize("edit, use, fragment", [
    pytest.param(_resize, "step", r"Layer '0' changed shape since the SpectralState was built: operator was 16×12, now 20×12",
                 id="resized-step"),
    pytest.param(_resize, "sigma", r"Layer '0' changed shape .* now 20×12", id="resized-sigma"),
    pytest.param(_resize, "top_sigmas", r"Layer '0' changed shape", id="resized-top-sigmas"),
    pytest.param(_resize, "penalty", r"Layer '0' changed shape", id="resized-penalty"),
    pytest.param(_resize, "wrapper", r"Layer '0' changed shape", id="resized-wrapper"),
    pytest.param(_replace, "step", r"Layer '2' was replaced by a Identity", id="replaced-step"),
    pytest.param(_replace, "penalty", r"Layer '2' was replaced by a Identity", id="replaced-penalty"),
    pytest.param(_remove, "step", r"Layer '2' is no longer in the model", id="removed-step"),
    pytest.param(_remove, "sigma", r"Layer '2' is no longer in the model", id="removed-sigma"),
    pytest.param(_remove, "penalty", r"Layer '2' is no longer in the model", id="removed-penalty"),
])
def test_a_layer_edited_after_the_state_was_built_is_named(edit, use, fragment):
    model = mlp()
    state = rc.SpectralState(model, k=2)
    # log_k2 selects the head too, so both layers are in the penalty.
    penalty = rc.SpectralNormPenalty(state, mode="log_k2")
    opt = rc.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, penalties=[penalty])
    edit(model)
    layer = "0" if edit is _resize else "2"
    with pytest.raises(ValueError, match=fragment):
        if use == "step":
            state.step()
        elif use == "sigma":
            state.sigma(layer)
        elif use == "top_sigmas":
            state.top_sigmas(layer)
        elif use == "penalty":
            penalty()
        else:
            opt.step()


@pytest.mark.parametrize("layers, fragment", [
    pytest.param(None, None, id="left-out-by-default"),
    pytest.param(["0"], r"Layer '0' \(Linear\) cannot be tracked: its weight is empty", id="named-explicitly"),
])
def test_an_empty_layer_is_listed_or_refused(layers, fragment):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 8), nn.ReLU(), nn.Linear(8, 3))
    if fragment is None:
        with pytest.warns(UserWarning, match="0: its weight is empty"):
            state = rc.SpectralState(model)
        assert state.names == ["2"] and state.skipped == {"0": "its weight is empty"}
    else:
        with pytest.raises(ValueError, match=fragment):
            rc.SpectralState(model, layers=layers)


# ---------------------------------------------------------------------- log-mode gradients
@pytest.mark.parametrize("path", ["closed-form", "autograd"])
def test_log_k2_leaves_an_all_zero_layer_at_zero(path):
    model = mlp()
    with torch.no_grad():
        model[0].weight.zero_()
    penalty = rc.SpectralNormPenalty(model, strength=1e-3, mode="log_k2")
    if path == "closed-form":
        opt = rc.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, penalties=[penalty])
        opt.zero_grad()
        opt.step()
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        penalty().backward()
        opt.step()
    assert torch.equal(model[0].weight, torch.zeros_like(model[0].weight))
    assert torch.isfinite(model[2].weight).all()


@pytest.mark.parametrize("path", ["closed-form", "autograd"])
def test_log_k2_gradient_is_clamped_at_one_over_the_floor(path):
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(1e-3 / float(top_svd(model[0].weight, 1)[0]))  # σ₁ = 1e-3, just above a floor 1e-4·…
    floor = 5e-4
    state = rc.SpectralState(model, init_iter=200)
    penalty = rc.SpectralNormPenalty(state, strength=1.0, mode="log_k2", log_floor=floor, layers=["0"])
    if path == "closed-form":
        _, updates = penalty.closed_form(1.0)
        ((_, u, v, alpha),) = updates
        grad = alpha * torch.outer(u, v)
    else:
        penalty().backward()
        grad = model[0].weight.grad
    sigma = float(state.sigmas("0")[0])
    assert torch.linalg.matrix_norm(grad, ord=2) == pytest.approx(1 / sigma, rel=1e-3)
    assert 1 / sigma <= 1 / floor
    with torch.no_grad():
        model[0].weight.mul_(0.1)  # σ₁ = 1e-4 < floor: flat
    state.step(5)
    model.zero_grad()
    if path == "closed-form":
        _, updates = penalty.closed_form(1.0)
        assert all(float(a) == 0 for *_, a in updates)
    else:
        penalty().backward()
        assert torch.count_nonzero(model[0].weight.grad) == 0


# ---------------------------------------------------------------------- wrapper checkpoints
def test_wrapper_state_dict_with_other_penalty_types_is_refused():
    a, b = mlp(), mlp(1)
    opt_a = rc.wrap(torch.optim.SGD(a.parameters(), lr=0.1), a, [rc.SpectralNormPenalty(rc.SpectralState(a), 0.05)])
    opt_b = rc.wrap(torch.optim.SGD(b.parameters(), lr=0.1), b, [rc.TailEnergyPenalty(rc.SpectralState(b), k=1)])
    with pytest.raises(ValueError, match="SpectralNormPenalty"):
        opt_b.load_state_dict(opt_a.state_dict())


# ---------------------------------------------------------------------- bad arguments of public functions
M = mlp()
X = torch.rand(5, 12)
Y = torch.tensor([0, 1, 2, 3, 0])


def _opt():
    return torch.optim.SGD(M.parameters(), lr=0.1)


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))


BAD_ARGUMENTS = [
    # SpectralState
    ("state-k-zero", lambda: rc.SpectralState(M, k=0), ValueError, "k=0"),
    ("state-k-float", lambda: rc.SpectralState(M, k=1.5), ValueError, "k=1.5"),
    ("state-view", lambda: rc.SpectralState(M, view="dense"), ValueError, "view='dense'"),
    ("state-layers-string", lambda: rc.SpectralState(M, layers="0"), TypeError, "single string"),
    ("state-layers-unknown", lambda: rc.SpectralState(M, layers=["9"]), ValueError, "Unknown layer names ['9']"),
    ("state-layers-no-weight", lambda: rc.SpectralState(M, layers=["1"]), ValueError, "Layer '1' (ReLU) cannot be tracked"),
    ("state-model-not-module", lambda: rc.SpectralState("model"), TypeError, "model to be an nn.Module"),
    ("state-on-nonfinite", lambda: rc.SpectralState(M, on_nonfinite="ignore"), ValueError, "on_nonfinite='ignore'"),
    ("state-backend", lambda: rc.SpectralState(M, backend="cuda"), ValueError, "backend='cuda'"),
    ("state-init-iter", lambda: rc.SpectralState(M, init_iter=-1), ValueError, "init_iter=-1"),
    ("state-step-zero", lambda: rc.SpectralState(M).step(0), ValueError, "n_iter=0"),
    ("state-stack-negative", lambda: rc.SpectralState(M, stack_max_numel=-1), ValueError, "stack_max_numel=-1"),
    ("state-untracked-name", lambda: rc.SpectralState(M).sigma("7"), KeyError, "Layer '7' is not tracked"),
    ("state-no-layers", lambda: rc.SpectralState(nn.ReLU()), ValueError, "no layer the spectral state can track"),
    ("state-unregistered-kind", lambda: rc.SpectralState(nn.Sequential(_Odd(), nn.Linear(2, 2)), layers=["0"]),
     ValueError, "Layer '0' (_Odd) cannot be tracked: no registered layer kind"),
    # penalties
    ("snp-mode", lambda: rc.SpectralNormPenalty(M, mode="cube"), ValueError, "mode='cube'"),
    ("snp-hinge-without-target", lambda: rc.SpectralNormPenalty(M, mode="hinge"), ValueError, "needs target"),
    ("snp-target-without-hinge", lambda: rc.SpectralNormPenalty(M, target=1.0), ValueError, "target=1.0"),
    ("snp-log-floor-zero", lambda: rc.SpectralNormPenalty(M, mode="log_k2", log_floor=0), ValueError, "log_floor=0"),
    ("snp-log-floor-nan", lambda: rc.SpectralNormPenalty(M, mode="log_k2", log_floor=float("nan")), ValueError,
     "log_floor=nan"),
    ("snp-log-floor-without-log", lambda: rc.SpectralNormPenalty(M, log_floor=1e-3), ValueError,
     "log_floor is only used with mode='log_k2'"),
    ("penalty-strength-negative", lambda: rc.SpectralNormPenalty(M, strength=-1), ValueError, "strength=-1"),
    ("penalty-strength-nan", lambda: rc.SpectralNormPenalty(M, strength=float("nan")), ValueError, "strength=nan"),
    ("penalty-strength-string", lambda: rc.SpectralNormPenalty(M, strength="a"), TypeError, "strength='a'"),
    ("penalty-schedule-negative", lambda: rc.SpectralNormPenalty(M, strength=lambda s: -1.0)(), ValueError,
     "strength(0) returned -1.0"),
    ("penalty-every-zero", lambda: rc.SpectralNormPenalty(M, every=0), ValueError, "every=0"),
    ("penalty-layers-unknown", lambda: rc.SpectralNormPenalty(M, layers=["x"]), ValueError, "Unknown layer names ['x']"),
    ("headspread-k-one", lambda: rc.HeadSpreadPenalty(M, k=1), ValueError, "k=1"),
    ("headspread-proximal", lambda: rc.HeadSpreadPenalty(M, proximal=True), ValueError, "HeadSpreadPenalty has no proximal"),
    ("rowl1-mode", lambda: rc.RowL1Penalty(M, mode="max"), ValueError, "mode='max'"),
    ("rowl1-temperature", lambda: rc.RowL1Penalty(M, temperature=0), ValueError, "temperature=0"),
    ("nuclear-method", lambda: rc.NuclearNormPenalty(M, method="svd"), ValueError, "method='svd'"),
    ("nuclear-bound", lambda: rc.NuclearNormPenalty(M, bound="tight"), ValueError, "bound='tight'"),
    ("tail-k-zero", lambda: rc.TailEnergyPenalty(M, k=0), ValueError, "k=0"),
    # wrap / track
    ("wrap-not-optimizer", lambda: rc.wrap("sgd", M), TypeError, "optimizer to be a torch.optim.Optimizer"),
    ("wrap-model-not-module", lambda: rc.wrap(_opt(), "model"), TypeError, "model to be an nn.Module"),
    ("wrap-penalty-not-penalty", lambda: rc.wrap(_opt(), M, penalties=[3]), TypeError, "but got int"),
    ("wrap-penalty-other-model", lambda: rc.wrap(_opt(), M, penalties=[rc.SpectralNormPenalty(mlp(1))]), ValueError,
     "built for a different model"),
    ("track-every-zero", lambda: rc.track(M, every=0), ValueError, "every=0"),
    ("track-model-not-module", lambda: rc.track("model"), TypeError, "model to be an nn.Module"),
    # metrics, bound
    ("metrics-untracked-name", lambda: rc.layer_metrics(M, "1"), (KeyError, ValueError), "'1'"),
    ("certified-radius-norm", lambda: rc.certified_radius(M, X, Y, norm=3), ValueError, "norm=3"),
    ("certified-radius-y-shape", lambda: rc.certified_radius(M, X, Y[:2]), ValueError, "(5, 12) and (2,)"),
    ("certified-radius-labels", lambda: rc.certified_radius(M, X, Y + 5), ValueError, "labels in [0, 4)"),
    ("lipschitz-norm", lambda: rc.lipschitz_bound(M, (12,), norm="l3"), ValueError, "norm='l3'"),
    # layer registry, low rank
    ("to-low-rank-rank-zero", lambda: rc.to_low_rank(M, 0), ValueError, "rank=0"),
    ("to-dense-not-module", lambda: rc.to_dense("model"), TypeError, "model to be an nn.Module"),
    ("register-not-a-kind", lambda: register_layer_kind(nn.Linear), TypeError, "Expected a LayerKind"),
    ("register-linear-twice", lambda: register_layer_kind(LayerKind("linear2", (nn.Linear,), lambda m, o: [])),
     ValueError, "Linear is already registered as layer kind 'linear'"),
    ("layer-kind-types-not-tuple", lambda: LayerKind("odd", nn.Linear, lambda m, o: []), TypeError,
     "types to be a non-empty tuple"),
    ("layer-kind-prune-rule", lambda: LayerKind("odd", (_Odd,), lambda m, o: [], prune="sideways"), ValueError,
     "prune to be one of"),
    ("unregister-unknown", lambda: unregister_layer_kind("nope"), KeyError, "No layer kind called 'nope'"),
    # evaluation, attacks
    ("robust-accuracy-eps", lambda: rc.robust_accuracy(M, (X, Y), eps=-0.1), ValueError, "eps=-0.1"),
    ("robust-accuracy-norm", lambda: rc.robust_accuracy(M, (X, Y), eps=0.1, norm=3), ValueError, "norm=3"),
    ("robust-accuracy-attack", lambda: rc.robust_accuracy(M, (X, Y), attack="cw", eps=0.1), ValueError, "attack='cw'"),
    ("pgd-steps-zero", lambda: rc.pgd(M, X, Y, eps=0.1, steps=0), ValueError, "steps=0"),
    ("pgd-eps-nan", lambda: rc.pgd(M, X, Y, eps=float("nan")), ValueError, "eps=nan"),
    ("pgd-norm", lambda: rc.pgd(M, X, Y, eps=0.1, norm="l1"), ValueError, "norm='l1'"),
    ("pgd-x-not-tensor", lambda: rc.pgd(M, "x", Y, eps=0.1), TypeError, "x to be a torch.Tensor"),
    ("pgd-y-float", lambda: rc.pgd(M, X, Y.float(), eps=0.1), TypeError, "y to hold integer class indices"),
]


@pytest.mark.parametrize("call, exc, fragment", [pytest.param(c, e, f, id=i) for i, c, e, f in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_naming_the_argument(call, exc, fragment):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as info:
            call()
    assert fragment in str(info.value)

