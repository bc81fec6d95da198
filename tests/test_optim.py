"""The optimizer wrapper: equivalence with loss + penalty, checkpoints, AMP, schedulers, projections."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustcompress.optim import PenalizedOptimizer, RowL1Cap, SpectralNormClip, broadcast_state, wrap
from robustcompress.penalties import (
    GroupLassoPenalty,
    SPECTRAL_MODES,
    HeadSpreadPenalty,
    L1Penalty,
    SpectralNormPenalty,
    TailEnergyPenalty,
)
from robustcompress.spectral import SpectralState


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def terms(state):
    return [SpectralNormPenalty(state, 0.05), TailEnergyPenalty(state, k=3, strength=0.01),
            HeadSpreadPenalty(state, k=3, strength=0.01, every=2)]


def test_wrapper_matches_loss_plus_penalty_backward_step():
    a, b = mlp(), mlp()
    sa, sb = SpectralState(a, k=3), SpectralState(b, k=3)
    pa, pb = terms(sa), terms(sb)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = wrap(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), b, pb)
    for x, y in batches():
        sa.step()
        loss = F.cross_entropy(a(x), y) + sum(p() for p in pa)
        opt_a.zero_grad()
        loss.backward()
        opt_a.step()

        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert int(sb.steps) == 6 and pb[2].calls == 6


def test_penalty_enters_once_per_real_step_under_gradient_accumulation():
    a, b = mlp(), mlp()
    sa, sb = SpectralState(a), SpectralState(b)
    pa, pb = SpectralNormPenalty(sa, 0.1), SpectralNormPenalty(sb, 0.1)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = wrap(torch.optim.SGD(b.parameters(), lr=0.1), b, [pb])
    data = batches(8)
    for i in range(0, 8, 4):
        sa.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
        for x, y in data[i:i + 4]:
            (F.cross_entropy(a(x), y) / 4).backward()
            (F.cross_entropy(b(x), y) / 4).backward()
        pa().backward()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert int(sb.steps) == 2


def _build(model):
    state = SpectralState(model, k=3)
    pens = terms(state) + [GroupLassoPenalty(state, 0.01, proximal=True, every=2)]
    return wrap(torch.optim.Adam(model.parameters(), lr=1e-2), model, pens,
                projections=[RowL1Cap(state, max_l1=3.0, every=3)])


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_state_dict_round_trip_continues_bit_identically():
    data = batches(10)
    model = mlp()
    opt = _build(model)
    _train(model, opt, data[:5])
    model_sd = copy.deepcopy(model.state_dict())
    opt_sd = copy.deepcopy(opt.state_dict())
    _train(model, opt, data[5:])

    fresh = mlp(seed=7)  # different initial weights and warm vectors, overwritten by the checkpoint
    fresh.load_state_dict(model_sd)
    opt2 = _build(fresh)
    opt2.load_state_dict(opt_sd)
    _train(fresh, opt2, data[5:])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for u, v in zip(opt.spectral_state.buffers(), opt2.spectral_state.buffers()):
        assert torch.equal(u, v)
    assert [p.calls for p in opt.penalties] == [p.calls for p in opt2.penalties]
    assert "spectral_state" in opt_sd and "owned_state" not in str(list(opt_sd["penalties"][0]))


def test_bad_checkpoint_changes_nothing():
    model = mlp()
    opt = _build(model)
    _train(model, opt, batches(2))
    before = copy.deepcopy(opt.state_dict())
    m2 = mlp()
    other = wrap(torch.optim.Adam(m2.parameters(), lr=1e-2), m2, [SpectralNormPenalty(m2, 0.1)])
    with pytest.raises(ValueError, match="penalties|SpectralState"):
        opt.load_state_dict(other.state_dict())
    bad = copy.deepcopy(before)
    bad["spectral_state"]["layers.0.V"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="layers.0.V"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(before["spectral_state"].values(), after["spectral_state"].values()))
    assert after["optimizer"]["state"][0]["step"] == before["optimizer"]["state"][0]["step"]


def test_grad_scaler_unscales_first_and_skips_penalty_on_inf():
    a, b = mlp(), mlp()
    pa = SpectralNormPenalty(SpectralState(a), 0.1)
    pb = SpectralNormPenalty(SpectralState(b), 0.1)
    opt_a = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a, [pa])
    opt_b = wrap(torch.optim.SGD(b.parameters(), lr=0.1), b, [pb])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in batches(3):
        opt_a.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt_a.step()
        opt_b.zero_grad()
        scaler.scale(F.cross_entropy(b(x), y)).backward()
        scaler.step(opt_b)
        scaler.update()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    snapshot = [p.detach().clone() for p in b.parameters()]
    steps, calls = int(pb.state.steps), pb.calls
    x, y = batches(1)[0]
    opt_b.zero_grad()
    scaler.scale(F.cross_entropy(b(x), y)).backward()
    b[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt_b)
    scaler.update()
    assert all(torch.equal(p, s) for p, s in zip(b.parameters(), snapshot))
    assert int(pb.state.steps) == steps and pb.calls == calls
    assert scaler.get_scale() < 1024.0


def test_lr_scheduler_drives_the_wrapped_optimizer():
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = wrap(inner, model, [SpectralNormPenalty(model, 0.1)])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, batches(2)[:1])
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra]})
    assert len(inner.param_groups) == 2


def test_cpu_bf16_autocast_training_with_penalties():
    model = mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), model, terms(SpectralState(model, k=3)))
    for x, y in batches(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.last_penalty.dtype == torch.float32 and torch.isfinite(opt.last_penalty)


def test_proximal_group_lasso_zeroes_rows_exactly():
    model = mlp()
    pen = GroupLassoPenalty(model, strength=0.5, proximal=True, layers=["0"])
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, [pen])
    norms0 = model[0].weight.detach().norm(dim=1)
    for _ in range(8):
        opt.step()  # no task gradient: only the prox acts
    norms = model[0].weight.detach().norm(dim=1)
    expected_zero = norms0 <= 8 * 0.1 * 0.5
    assert bool(expected_zero.any()) and bool((norms[expected_zero] == 0).all())
    torch.testing.assert_close(norms[~expected_zero], norms0[~expected_zero] - 0.4)
    assert pen.value == pytest.approx(0.5 * float(norms.sum()), rel=1e-5)


def test_proximal_l1_soft_thresholds():
    model = mlp()
    w0 = model[0].weight.detach().clone()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, [L1Penalty(model, 0.2, proximal=True)])
    opt.step()
    expected = torch.sign(w0) * torch.clamp(w0.abs() - 0.02, min=0)
    torch.testing.assert_close(model[0].weight.detach(), expected)
    assert bool((model[0].weight == 0).any())


def test_spectral_clip_and_row_cap_projections():
    model = mlp()
    state = SpectralState(model)
    state.step(200)
    target = 0.5 * float(torch.linalg.svdvals(model[2].weight.detach())[0])
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), model,
               projections=[SpectralNormClip(state, target=target, layers=["2"]), RowL1Cap(state, max_l1=1.0)])
    for _ in range(40):
        opt.step()
    assert float(torch.linalg.svdvals(model[2].weight.detach())[0]) <= target * 1.02
    for name in ("0", "2"):
        assert float(model.get_submodule(name).weight.detach().abs().sum(1).max()) <= 1.0 + 1e-5


def test_wrap_refuses_mismatched_models_and_states():
    model, other = mlp(), mlp(1)
    with pytest.raises(ValueError, match="different model"):
        wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, [SpectralNormPenalty(SpectralState(other), 0.1)])
    with pytest.raises(ValueError, match="different model"):
        wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, [SpectralNormPenalty(other, 0.1)])
    with pytest.raises(ValueError, match="different shared SpectralStates"):
        wrap(torch.optim.SGD(model.parameters(), lr=0.1), model,
             [SpectralNormPenalty(SpectralState(model), 0.1), SpectralNormPenalty(SpectralState(model), 0.1)])
    with pytest.raises(ValueError, match="does not update"):
        wrap(torch.optim.SGD(model[2].parameters(), lr=0.1), model, [SpectralNormPenalty(model, 0.1)])
    with pytest.raises(TypeError, match="Penalty"):
        wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, ["l1"])
    with pytest.raises(TypeError, match="Optimizer"):
        wrap(model, model, [])


def test_failing_schedule_leaves_model_and_grads_untouched():
    model = mlp()
    pen = SpectralNormPenalty(SpectralState(model), strength=lambda step: 0.1 if step == 0 else -1.0)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, [pen])
    _train(model, opt, batches(1))
    x, y = batches(1)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="strength"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_torch_compile_aot_eager_with_penalties():
    a, b = mlp(), mlp()
    compiled = torch.compile(b, backend="aot_eager")
    opt_a = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a, [SpectralNormPenalty(SpectralState(a), 0.1)])
    opt_b = wrap(torch.optim.SGD(compiled.parameters(), lr=0.1), compiled,
                 [SpectralNormPenalty(SpectralState(b), 0.1)])
    for x, y in batches(3):
        for m, o in ((a, opt_a), (compiled, opt_b)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_adversarial_batch_composes_with_the_wrapper():
    from robustcompress.attacks import adversarial_batch

    model = mlp()
    state = SpectralState(model)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), model, [SpectralNormPenalty(state, 0.1)])
    model.train()
    for i, (x, y) in enumerate(batches(3)):
        x = torch.sigmoid(x)  # inputs in [0, 1]
        x_mix, y_mix = adversarial_batch(model, x, y, ratio=0.5, eps=0.1, steps=3, seed=i)
        assert model.training and not torch.equal(x_mix, x) and torch.equal(y_mix, y)
        opt.zero_grad()
        F.cross_entropy(model(x_mix), y_mix).backward()
        opt.step()
    assert int(state.steps) == 3 and opt.last_penalty is not None
    assert all(p.grad is not None and torch.isfinite(p).all() for p in model.parameters())


def test_broadcast_state_is_a_no_op_without_a_process_group():
    state = SpectralState(mlp())
    before = [b.clone() for b in state.buffers()]
    broadcast_state(state)
    assert all(torch.equal(a, b) for a, b in zip(before, state.buffers()))
    with pytest.raises(TypeError):
        broadcast_state(mlp())
    assert isinstance(wrap(torch.optim.SGD(mlp().parameters(), lr=0.1), mlp()), PenalizedOptimizer)


@pytest.mark.parametrize("mode", sorted(SPECTRAL_MODES))
def test_closed_form_spectral_gradient_equals_autograd(mode):
    # every mode of the table, with a parameter that puts some layers above and some below it
    option = SPECTRAL_MODES[mode].option
    kwargs = {"mode": mode, **({option: 0.2} if option else {})}
    model = mlp().double()
    state = SpectralState(model)
    pen = SpectralNormPenalty(state, 0.3, **kwargs)
    value, updates = pen.closed_form(0.3)
    assert len(updates) == len(pen.names)
    ref = 0.3 * pen.value_now()
    torch.testing.assert_close(value, ref.detach())
    grads = torch.autograd.grad(ref, [model.get_submodule(n).weight for n in pen.names])
    for (p, u, v, alpha), g in zip(updates, grads):
        torch.testing.assert_close(alpha * torch.outer(u, v), g)
    # a BN-folded layer has no closed form here: the wrapper falls back to autograd
    bn_model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    assert SpectralNormPenalty(bn_model, 1.0).closed_form(1.0) is None


def test_scheduler_reaches_the_inner_optimizer_after_load_state_dict():
    from robustcompress.optim import wrap
    from robustcompress.penalties import SpectralNormPenalty

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = wrap(inner, model, [SpectralNormPenalty(model, 1e-3)])
    saved = opt.state_dict()
    opt.load_state_dict(saved)  # torch replaces param_groups/state on the inner optimizer
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)


def test_lbfgs_closure_sees_the_penalty_in_loss_and_gradient():
    from robustcompress.optim import wrap
    from robustcompress.penalties import SpectralNormPenalty

    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    penalty = SpectralNormPenalty(model, strength=0.1)
    opt = wrap(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), model, [penalty])
    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    before = penalty._calls
    loss = opt.step(closure)
    assert len(calls) > 1                      # LBFGS evaluated the closure several times
    assert penalty._calls == before + 1        # … but the term ticked once for the real step
    assert float(loss) == pytest.approx(calls[0] + penalty.value, rel=1e-5)


def test_plain_optimizer_checkpoint_loads_into_the_wrapper():
    from robustcompress.optim import wrap
    from robustcompress.penalties import SpectralNormPenalty

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    plain.step()
    saved = plain.state_dict()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), model, [SpectralNormPenalty(model, 1e-3)])
    with pytest.warns(UserWarning, match="plain optimizer"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.1
    assert len(opt.state) == len(plain.state)


def test_a_failing_schedule_rolls_back_every_counter():
    from robustcompress.optim import wrap
    from robustcompress.penalties import L1Penalty, SpectralNormPenalty

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    good = SpectralNormPenalty(model, 1e-3)
    bad = L1Penalty(model, strength=lambda step: -1.0)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, [good, bad])
    model(torch.randn(2, 4)).sum().backward()
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="strength"):
        opt.step()
    assert good._calls == 0 and bad._calls == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


# ---------------------------------------------------------------------- penalty types, frozen layers, clipping
def test_state_dict_with_other_penalty_types_is_refused_and_changes_nothing():
    from robustcompress.penalties import NuclearNormPenalty

    a, b = mlp(), mlp(1)
    sa, sb = SpectralState(a, k=3), SpectralState(b, k=3)
    opt_a = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a, [SpectralNormPenalty(sa, 0.05)])
    opt_b = wrap(torch.optim.SGD(b.parameters(), lr=0.1), b, [NuclearNormPenalty(sb, 0.05, k=3)])
    for x, y in batches(2):
        F.cross_entropy(a(x), y).backward()
        opt_a.step()
        opt_a.zero_grad()
    before = copy.deepcopy(opt_b.state_dict())
    with pytest.raises(ValueError, match="SpectralNormPenalty.*NuclearNormPenalty|type"):
        opt_b.load_state_dict(opt_a.state_dict())
    after = opt_b.state_dict()
    assert after["steps"] == before["steps"] == 0
    assert all(torch.equal(x, y) for x, y in zip(after["spectral_state"].values(), before["spectral_state"].values()))


def test_state_dict_with_other_mode_or_layers_is_refused():
    a = mlp()
    s = SpectralState(a, k=3)
    saved = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a, [SpectralNormPenalty(s, 0.05)]).state_dict()
    b = mlp()
    sb = SpectralState(b, k=3)
    other_mode = wrap(torch.optim.SGD(b.parameters(), lr=0.1), b, [SpectralNormPenalty(sb, 0.05, mode="hinge", target=1.0)])
    with pytest.raises(ValueError, match="mode"):
        other_mode.load_state_dict(saved)
    c = mlp()
    sc = SpectralState(c, k=3)
    other_layers = wrap(torch.optim.SGD(c.parameters(), lr=0.1), c, [SpectralNormPenalty(sc, 0.05, layers=["0"])])
    with pytest.raises(ValueError, match="layers"):
        other_layers.load_state_dict(saved)


def test_plain_optimizer_state_dict_still_loads_with_a_warning():
    a = mlp()
    plain = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(1):
        F.cross_entropy(a(x), y).backward()
        plain.step()
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a, [SpectralNormPenalty(a, 0.05)])
    with pytest.warns(UserWarning, match="plain optimizer"):
        opt.load_state_dict(plain.state_dict())
    assert torch.equal(opt.state[a[0].weight]["momentum_buffer"], plain.state[a[0].weight]["momentum_buffer"])


def test_frozen_first_layer_is_never_changed_and_gets_no_grad():
    from robustcompress.penalties import default_penalties

    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    terms_ = default_penalties(model, strength=1.0) + [L1Penalty(model, 1e-2, proximal=True)]
    opt = wrap(torch.optim.AdamW(model.parameters(), lr=0.05), model, terms_,
               projections=[SpectralNormClip(model, target=0.05), RowL1Cap(model, max_l1=0.1)])
    w2 = model[2].weight.detach().clone()
    for x, y in batches(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))
    assert all(p.grad is None for p in model[0].parameters())
    assert not torch.equal(model[2].weight, w2)  # the trainable layers did move


def test_penalty_gradient_is_added_after_clipping_and_is_not_clipped():
    """clip_grad_norm_ before step() clips the task gradient only; the penalty's arrives unclipped."""
    a = mlp()
    state = SpectralState(a, k=1)
    pen = SpectralNormPenalty(state, 10.0)  # a penalty gradient far above the clip threshold
    seen = {}
    base = torch.optim.SGD(a.parameters(), lr=0.0)
    opt = wrap(base, a, [pen])
    # A pre-hook on the wrapped optimizer sees the gradient exactly as its update will.
    base.register_step_pre_hook(lambda o, args, kw: seen.update(g=a[0].weight.grad.clone()))
    x, y = batches(1)[0]
    F.cross_entropy(a(x), y).backward()
    torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm=1e-3)
    task = a[0].weight.grad.clone()
    opt.step()
    u, v = state.vectors("0")
    expected = task + 10.0 * 2 * state.sigmas("0")[0] * torch.outer(u[:, 0], v[:, 0])
    torch.testing.assert_close(seen["g"], expected, rtol=1e-5, atol=1e-7)
    assert float(seen["g"].norm()) > 100 * 1e-3  # not scaled down to the clip threshold


def test_wrap_and_attach_on_one_optimizer_is_an_error():
    from robustcompress.optim import attach

    a = mlp()
    base = torch.optim.SGD(a.parameters(), lr=0.1)
    opt = wrap(base, a, [SpectralNormPenalty(a, 0.05)])
    with pytest.raises(ValueError, match="wrap"):
        attach(base, a, [SpectralNormPenalty(a, 0.05)])
    with pytest.raises(ValueError, match="wrap"):
        attach(opt, a, [SpectralNormPenalty(a, 0.05)])
    other = torch.optim.SGD(a.parameters(), lr=0.1)
    hooks = attach(other, a, [SpectralNormPenalty(a, 0.05)])
    with pytest.raises(ValueError, match="never both"):
        wrap(other, a, [SpectralNormPenalty(a, 0.05)])
    hooks.detach()
    wrap(other, a, [SpectralNormPenalty(a, 0.05)])  # detached: allowed again
    import gc

    del opt
    gc.collect()
    wrap(base, a, [SpectralNormPenalty(a, 0.05)])  # the first wrapper is gone: its optimizer is free again


def test_attach_matches_wrap_bit_for_bit():
    from robustcompress.optim import attach

    a, b = mlp(), mlp()
    opt_a = wrap(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a, terms(SpectralState(a, k=3)))
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    hooks = attach(opt_b, b, terms(SpectralState(b, k=3)))
    for x, y in batches(4):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert hooks.steps == opt_a.steps == 4


def test_projections_refuse_weights_they_cannot_change_in_place():
    # A parametrized weight is recomputed from other tensors; changing it in place would change nothing.
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 5)), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="'0'.*parametrized"):
        RowL1Cap(model, max_l1=0.5)
    with pytest.raises(ValueError, match="'0'"):
        SpectralNormClip(model, target=0.1)
    # The plain layers alone are accepted, and the cap moves exactly the stored weight.
    cap = RowL1Cap(model, max_l1=0.5, layers=["2"])
    before = model[0].parametrizations.weight.original1.detach().clone()
    cap.apply()
    assert torch.equal(model[0].parametrizations.weight.original1, before)
    assert float(model[2].weight.detach().abs().sum(1).max()) <= 0.5 * (1 + 1e-6)
