"""Tests for robustcompress.attacks: budgets, strength, planted vulnerabilities, references."""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robustcompress.attacks import (
    adversarial_batch,
    fgsm,
    fooling_rate,
    multi_targeted_pgd,
    pgd,
    random_search,
    sensitive_direction_attack,
    sensitive_directions,
    universal_perturbation,
)
from robustcompress.evaluate import robust_accuracy

INF = float("inf")


def _linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer


def planted_pair(dim=32, n_classes=10, n=450, heavy=50.0, seed=0):
    """Two classifiers with identical (perfect) clean accuracy on the same data.

    The data lie in ``0.5 + v⊥`` (no variation along the unit vector ``v``);
    ``good`` is the nearest-class-mean linear classifier. ``bad`` adds one
    heavy first-layer row ``heavy·vᵀ`` (a rank-1 spike) feeding logit 0, a
    class no example has: invisible on clean data, fatal along ``+v``.
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    v /= v.norm()
    proj = torch.eye(dim, dtype=torch.float64) - torch.outer(v, v)
    means = 0.12 * torch.randn(n_classes, dim, generator=g, dtype=torch.float64) @ proj
    y = 1 + torch.arange(n) % (n_classes - 1)
    x = 0.5 + means[y] + 0.02 * torch.randn(n, dim, generator=g, dtype=torch.float64) @ proj
    center = torch.full((dim,), 0.5, dtype=torch.float64)
    b1 = -(means @ center) - 0.5 * (means * means).sum(1)
    good = nn.Sequential(nn.Flatten(), _linear(means, b1))
    w_bad = torch.cat([means, heavy * v[None]])
    b_bad = torch.cat([b1, (-heavy * v @ center)[None]])
    eye = torch.eye(n_classes, dtype=torch.float64)
    head = torch.cat([eye, eye[:, :1]], 1)
    bad = nn.Sequential(nn.Flatten(), _linear(w_bad, b_bad), nn.ReLU(), _linear(head, torch.zeros(n_classes)))
    assert 0 < float(x.min()) and float(x.max()) < 1
    return good.eval(), bad.eval(), x.float(), y, v.float()


def _small_mlp(in_features, classes=4, seed=0, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, classes)).eval()


def _sizes(x, x_adv, norm):
    d = (x_adv - x).flatten(1).double()
    return d.abs().amax(1) if math.isinf(norm) else d.norm(dim=1)


# --------------------------------------------------------------------------- budget and domain


@given(
    eps=st.floats(0.0, 1.5),
    n=st.integers(1, 5),
    shape=st.sampled_from([(6,), (2, 3), (1, 2, 3)]),
    norm=st.sampled_from([INF, 2.0]),
    lo=st.sampled_from([0.0, -1.0]),
    seed=st.integers(0, 2**16),
)
def test_every_attack_respects_budget_and_domain(eps, n, shape, norm, lo, seed):
    hi = 1.0
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand((n,) + shape, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    d = math.prod(shape)
    model = _small_mlp(d, seed=seed % 7)
    dom = (lo, hi)
    results = [
        fgsm(model, x, y, eps, norm, domain=dom),
        pgd(model, x, y, eps, norm, steps=3, restarts=2, domain=dom, seed=seed),
        pgd(model, x, y, eps, norm, steps=3, loss="margin", early_stop=False, domain=dom, seed=seed),
        multi_targeted_pgd(model, x, y, eps, norm, n_targets=2, steps=3, domain=dom, seed=seed),
        random_search(model, x, y, eps, norm, n_queries=5, domain=dom, seed=seed),
        sensitive_direction_attack(model, x, y, eps, norm, k=2, domain=dom),
        sensitive_direction_attack(model, x, y, eps, norm, source="jacobian", k=1, n_iter=3, domain=dom),
        adversarial_batch(model, x, y, ratio=0.5, eps=eps, norm=norm, steps=2, domain=dom, seed=seed)[0],
    ]
    for x_adv in results:
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert bool((_sizes(x, x_adv, norm) <= eps * (1 + 1e-5) + 1e-6).all())
        assert float(x_adv.min()) >= lo and float(x_adv.max()) <= hi
    delta, _ = universal_perturbation(model, (x, y), eps, norm, epochs=1, domain=dom, seed=seed)
    size = float(delta.abs().max()) if math.isinf(norm) else float(delta.norm())
    assert delta.shape == shape and size <= eps * (1 + 1e-5) + 1e-6


# --------------------------------------------------------------------------- strength


@pytest.mark.parametrize("norm,eps_values", [(INF, (0.05, 0.1)), (2.0, (0.5, 1.0))])
def test_pgd50_never_weaker_than_fgsm(trained_digits_mlp, digits_data, norm, eps_values):
    _, test = digits_data
    toy = _small_mlp(64, classes=10, seed=3)
    x, y = test.tensors
    y_toy = toy(x).argmax(1)  # a model classifying its own labels perfectly
    for model, labels in ((trained_digits_mlp, y), (toy, y_toy)):
        for eps in eps_values:
            f = robust_accuracy(model, (x, labels), "fgsm", eps, norm)
            # the margin loss: with cross-entropy, the CE-maximising vertex of a nearly linear model
            # can miss an example that FGSM's vertex breaks (seen: 1 of 360 on the toy model)
            p = robust_accuracy(model, (x, labels), "pgd", eps, norm, steps=50, loss="margin", seed=0)
            assert p <= f, (eps, norm, p, f)
    # and PGD must actually hurt the trained model (a broken attack returning x would pass the above)
    assert robust_accuracy(trained_digits_mlp, test, "pgd", 0.1, INF, steps=50) < 0.6


def test_targeted_pgd_reaches_the_target():
    torch.manual_seed(0)
    w = 4 * torch.randn(5, 8)
    model = _linear(w, -w @ torch.full((8,), 0.5)).eval()  # every class region meets the box's centre
    x = torch.rand(20, 8)
    # targets that are reachable: the class of another point of the box (eps = the box's diameter)
    corners = torch.randint(0, 2, (20, 8)).float()
    target = model(corners).argmax(1)
    x_adv = pgd(model, x, target, eps=math.sqrt(8), norm=2, steps=100, targeted=True, loss="margin", seed=0)
    assert bool((model(x_adv).argmax(1) == target).all())
    assert bool((model(x).argmax(1) != target).any())  # not trivially met


def test_misclassified_examples_are_returned_unchanged():
    torch.manual_seed(0)
    model = nn.Linear(6, 3).eval()
    x = torch.rand(30, 6)
    wrong_y = (model(x).argmax(1) + 1) % 3
    assert torch.equal(pgd(model, x, wrong_y, 0.2, seed=0), x)


@pytest.mark.parametrize("norm", [INF, 2.0])
def test_apgd_schedule_finds_the_linear_optimum_that_a_tiny_fixed_step_misses(norm):
    # a linear model: the margin toward the runner-up is maximised on the ball's boundary; APGD's first
    # step (2ε, projected) gets there at once, a fixed step of ε/100 covers a tenth of the way in 10 steps
    torch.manual_seed(3)
    model = nn.Linear(12, 3).eval()
    x = 0.3 + 0.4 * torch.rand(64, 12)
    y = model(x).argmax(1)
    kw = dict(norm=norm, steps=10, loss="margin", early_stop=False)
    apgd = pgd(model, x, y, 0.1, **kw)
    slow = pgd(model, x, y, 0.1, schedule="constant", step_size=0.001, **kw)
    assert torch.allclose(_sizes(x, apgd, norm), torch.full((64,), 0.1, dtype=torch.float64), atol=1e-5)
    assert float(_sizes(x, slow, norm).max()) <= 0.011

    def margin(xa):
        z = model(xa).detach()
        return z.scatter(1, y[:, None], -torch.inf).amax(1) - z.gather(1, y[:, None]).squeeze(1)

    assert bool((margin(apgd) >= margin(slow) - 1e-5).all())


def test_restarts_after_the_first_start_at_random_points():
    model = _small_mlp(10, seed=1)
    x, y = torch.rand(16, 10), torch.randint(0, 4, (16,))
    one = pgd(model, x, y, 0.05, steps=3, early_stop=False)
    a = pgd(model, x, y, 0.05, steps=3, restarts=2, seed=1, early_stop=False)
    b = pgd(model, x, y, 0.05, steps=3, restarts=2, seed=2, early_stop=False)
    assert not torch.equal(a, b)  # the second run's start depends on the seed
    score = lambda xa: _margin_score(model, xa, y)  # noqa: E731
    assert bool((score(a) >= score(one) - 1e-6).all())  # the best iterate over both runs is kept


def _margin_score(model, xa, y):
    z = model(xa).detach()
    return z.scatter(1, y[:, None], -torch.inf).amax(1) - z.gather(1, y[:, None]).squeeze(1)


def test_pgd_is_deterministic_under_a_seed():
    model = _small_mlp(10, seed=1)
    x, y = torch.rand(16, 10), torch.randint(0, 4, (16,))
    a = pgd(model, x, y, 0.05, steps=3, seed=7, early_stop=False, random_start=True)
    b = pgd(model, x, y, 0.05, steps=3, seed=7, early_stop=False, random_start=True)
    c = pgd(model, x, y, 0.05, steps=3, seed=8, early_stop=False, random_start=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # from x (the default) the first run draws nothing, so the seed reaches only later restarts
    assert torch.equal(pgd(model, x, y, 0.05, steps=3, seed=7, early_stop=False),
                       pgd(model, x, y, 0.05, steps=3, seed=8, early_stop=False))


# --------------------------------------------------------------------------- planted vulnerability


@pytest.mark.parametrize("norm,eps", [(INF, 0.02), (2.0, 0.05)])
def test_uap_fools_planted_model_not_well_conditioned_one(norm, eps):
    good, bad, x, y, v = planted_pair()
    assert (good(x).argmax(1) == y).all() and (bad(x).argmax(1) == y).all()  # equal clean accuracy
    delta_bad, rate_bad = universal_perturbation(bad, (x, y), eps, norm, epochs=5, batch_size=128)
    delta_good, rate_good = universal_perturbation(good, (x, y), eps, norm, epochs=5, batch_size=128)
    assert rate_bad > 0.9
    assert rate_good < 0.2
    assert rate_bad == pytest.approx(fooling_rate(bad, (x, y), delta_bad))
    # the perturbation found points along the planted direction
    assert float(delta_bad @ v) > 0


def test_fooling_rate_definition():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.4, 0.6], [0.45, 0.55]])
    y = torch.tensor([0, 0, 1, 0])  # the last one is misclassified and must not count
    delta = torch.tensor([-0.15, 0.15])
    # correct: rows 0, 1, 2; changed among them: row 0 only (0.45 < 0.55)
    assert fooling_rate(model, (x, y), delta) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shape of one input"):
        fooling_rate(model, (x, y), torch.zeros(3))


def test_sensitive_directions_recover_planted_direction():
    _, bad, x, y, v = planted_pair()
    first = sensitive_directions(bad, k=1)
    assert first.shape == (1, 32)
    assert abs(float(first[0] @ v)) >= 0.99
    # the Jacobian of the first layer's output is W1 itself; of the whole model, at points where
    # the heavy ReLU unit is active (shifted slightly along +v), it is dominated by v as well
    by_layer = sensitive_directions(bad, x[:20], source="jacobian", layer="1")
    assert abs(float(by_layer[0] @ v)) >= 0.99
    whole = sensitive_directions(bad, x[:20] + 0.01 * v, source="jacobian")
    assert abs(float(whole[0] @ v)) >= 0.99
    # the attack perturbs along v and breaks every example with one forward pass per candidate
    for source, xs in (("first_layer", x), ("jacobian", x + 0.01 * v)):
        x_adv = sensitive_direction_attack(bad, xs, y, 0.05, norm=2, source=source)
        delta = x_adv - xs
        cos = (delta @ v) / delta.norm(dim=1)
        assert float(cos.abs().min()) >= 0.99
        assert float((bad(x_adv).argmax(1) == y).float().mean()) == 0.0


def test_sensitive_directions_match_svd_references():
    torch.manual_seed(0)
    # Linear first layer: exact float64 SVD of the weight
    mlp = _small_mlp(12, seed=2)
    got = sensitive_directions(mlp, k=3)
    ref = torch.linalg.svd(mlp[1].weight.double()).Vh[:3]
    assert torch.allclose((got.double() * ref).sum(1).abs(), torch.ones(3, dtype=torch.float64), atol=1e-5)
    # Conv first layer: the convolution as a matrix at the input size, built column by column
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    cnn = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).eval()
    x = torch.rand(2, 2, 5, 5)
    eye = torch.eye(50, dtype=torch.float64).reshape(50, 2, 5, 5)
    mat = torch.nn.functional.conv2d(eye, conv.weight.double(), None, 2, 1).reshape(50, -1).T
    svals, ref = torch.linalg.svdvals(mat), torch.linalg.svd(mat).Vh
    assert float(svals[1] / svals[0]) < 0.97 and float(svals[2] / svals[1]) < 0.97  # a gap: directions defined
    got = sensitive_directions(cnn, x, k=2, n_iter=300)
    assert torch.allclose((got.double() * ref[:2]).sum(1).abs(), torch.ones(2, dtype=torch.float64), atol=1e-4)
    # Jacobian at one example: the full Jacobian in float64
    model = _small_mlp(6, classes=5, seed=4).double()
    x1 = torch.rand(1, 6, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda u: model(u), x1).reshape(5, 6)
    ref = torch.linalg.svd(jac).Vh[:2]
    got = sensitive_directions(model, x1, k=2, source="jacobian", n_iter=200)
    assert torch.allclose((got * ref).sum(1).abs(), torch.ones(2, dtype=torch.float64), atol=1e-6)


# --------------------------------------------------------------------------- cross-check with torchattacks


def test_pgd_matches_torchattacks(trained_digits_mlp, digits_data):
    torchattacks = pytest.importorskip("torchattacks")
    _, test = digits_data
    x, y = test.tensors
    x = x.reshape(-1, 1, 8, 8)  # torchattacks' L2 attack assumes image tensors; MLP flattens
    model = trained_digits_mlp
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    for norm, cls, eps_values in ((INF, torchattacks.PGD, (0.05, 0.1)), (2.0, torchattacks.PGDL2, (0.5, 1.0))):
        for eps in eps_values:
            ours = robust_accuracy(model, (x, y), "pgd", eps, norm, steps=10, step_size=eps / 4,
                                   random_start=False, schedule="constant")
            x_ta = cls(model, eps=eps, alpha=eps / 4, steps=10, random_start=False)(x, y)
            theirs = float((model(x_ta).argmax(1) == y).float().mean())
            assert abs(ours - theirs) <= 0.02, (norm, eps, ours, theirs)
    # our attack leaves the parameters' gradients as they were (torchattacks' PGD does too)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


# --------------------------------------------------------------------------- mode, gradients, bad input


def _train_mode_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    model[3].eval()  # a mixed-mode model: each submodule's own flag must come back
    return model


def test_attacks_run_in_eval_mode_and_restore_it():
    model = _train_mode_model()
    modes = [m.training for m in model.modules()]
    stats = copy.deepcopy(model[1].state_dict())
    x, y = torch.rand(10, 8), torch.randint(0, 3, (10,))
    a = pgd(model, x, y, 0.1, steps=3, seed=0)
    b = pgd(model, x, y, 0.1, steps=3, seed=0)
    assert torch.equal(a, b)  # dropout off, batch statistics not used
    fgsm(model, x, y, 0.1)
    sensitive_direction_attack(model, x, y, 0.1, source="jacobian")
    universal_perturbation(model, (x, y), 0.1, epochs=1)
    x_mix, y_mix = adversarial_batch(model, x, y, ratio=0.5, eps=0.1, seed=0)
    assert [m.training for m in model.modules()] == modes
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, stats[key]), key
    assert all(p.grad is None for p in model.parameters())
    # the mixed batch composes with an ordinary training step
    nn.functional.cross_entropy(model(x_mix), y_mix).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_adversarial_batch_mixes_the_requested_share():
    model = _small_mlp(8, seed=0)
    x, y = torch.rand(10, 8), torch.randint(0, 4, (10,))
    x_mix, y_mix = adversarial_batch(model, x, y, ratio=0.3, eps=0.2, steps=5, seed=1)
    changed = (x_mix != x).any(1)
    assert int(changed.sum()) <= 3 and int(changed.sum()) >= 1
    assert torch.equal(y_mix, y)
    assert torch.equal(adversarial_batch(model, x, y, ratio=0.0, eps=0.2)[0], x)
    assert int((adversarial_batch(model, x, y, ratio=1.0, eps=0.2, seed=0)[0] != x).any(1).sum()) >= 8


def test_bad_inputs_raise_clear_errors():
    model = _small_mlp(4, classes=3)
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, -0.1)
    with pytest.raises(ValueError, match="norm"):
        fgsm(model, x, y, 0.1, norm=3)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        pgd(model, x, y[:4], 0.1)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        pgd(model, x, torch.tensor([0, 1, 2, 3, 0]), 0.1)
    with pytest.raises(TypeError, match="integer class indices"):
        pgd(model, x, y.float(), 0.1)
    with pytest.raises(ValueError, match="domain"):
        pgd(model, x + 2.0, y, 0.1)
    with pytest.raises(ValueError, match="loss"):
        pgd(model, x, y, 0.1, loss="hinge")
    with pytest.raises(ValueError, match=r"one of \('apgd', 'constant'\), but got schedule='cosine'"):
        pgd(model, x, y, 0.1, schedule="cosine")
    with pytest.raises(ValueError, match="step_size"):
        pgd(model, x, y, 0.1, step_size=0.0)
    with pytest.raises(ValueError, match="restarts"):
        pgd(model, x, y, 0.1, restarts=0)
    with pytest.raises(ValueError, match="Expected seed to be a non-negative integer or None, but got seed=-1"):
        pgd(model, x, y, 0.1, seed=-1)
    with pytest.raises(ValueError, match=r"Expected a tensor eps to have shape \(5,\), but got \(4,\)"):
        pgd(model, x, y, torch.full((4,), 0.1))
    with pytest.raises(ValueError, match="Expected x to be a batch of shape"):
        fgsm(model, x[0], y[:1], 0.1)
    with pytest.raises(ValueError, match="Expected x to be finite"):
        pgd(model, torch.where(x > 0.5, torch.nan, x), y, 0.1)
    with pytest.raises(TypeError, match="Expected x to be a floating-point tensor, but got dtype=torch.int64"):
        pgd(model, (x * 10).long(), y, 0.1)
    with pytest.raises(TypeError, match="Expected model to be"):
        pgd(lambda t: t, x, y, 0.1)
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="source"):
        sensitive_directions(model, source="hessian")
    with pytest.raises(ValueError, match="pass x"):
        sensitive_directions(nn.Sequential(nn.Conv2d(1, 2, 3)), k=1)
    with pytest.raises(ValueError, match="ratio"):
        adversarial_batch(model, x, y, ratio=1.5)
    with pytest.raises(TypeError, match="data"):
        universal_perturbation(model, [1, 2, 3], 0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        pgd(lambda u: u, x, y, 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_on_cuda_match_cpu():
    model = _small_mlp(8, seed=0)
    x, y = torch.rand(12, 8), torch.randint(0, 4, (12,))
    cpu = pgd(model, x, y, 0.1, steps=5, seed=0)
    gpu = pgd(copy.deepcopy(model).cuda(), x.cuda(), y.cuda(), 0.1, steps=5, seed=0)
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)
    x_adv = sensitive_direction_attack(copy.deepcopy(model).cuda(), x.cuda(), y.cuda(), 0.1, source="jacobian")
    assert float(_sizes(x.cuda(), x_adv, 2.0).max()) <= 0.1 + 1e-6


def test_sensitive_direction_errors_are_clear():
    from robustcompress.attacks import sensitive_direction_attack

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    model = WithUnused()
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    out = sensitive_direction_attack(model, x, y, 0.1, seed=None)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="not called"):
        sensitive_direction_attack(model, x, y, 0.1, source="jacobian", layer="unused")
    with pytest.raises(ValueError, match="seed"):
        sensitive_direction_attack(model, x, y, 0.1, seed=1.5)


def test_adversarial_batch_takes_one_budget_per_example():
    from robustcompress.attacks import adversarial_batch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
    eps = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.2, 0.2])
    x_mix, _ = adversarial_batch(model, x, y, ratio=1.0, eps=eps, seed=0)
    moved = (x_mix - x).abs().amax(1)
    assert torch.all(moved <= eps + 1e-6)
    with pytest.raises(ValueError, match="shape"):
        adversarial_batch(model, x, y, ratio=0.5, eps=torch.ones(3))
