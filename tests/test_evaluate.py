"""Tests for robustcompress.evaluate: exact minimal distances, robust accuracy, AutoAttack, masking."""

import copy
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from robustcompress.attacks import pgd
from robustcompress.evaluate import (
    accuracy,
    autoattack_accuracy,
    eps_sweep,
    gradient_masking_check,
    minimal_eps,
    robust_accuracy,
)

INF = float("inf")


def _linear_problem(n=40, dim=10, classes=4, seed=0):
    """A linear classifier and points whose minimal adversarial distance lies well inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(classes, generator=g, dtype=torch.float64)
    model = nn.Linear(dim, classes).double().eval()
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b - w @ torch.full((dim,), 0.5, dtype=torch.float64))
    x = 0.5 + 0.1 * (2 * torch.rand(n, dim, generator=g, dtype=torch.float64) - 1)
    y = model(x).argmax(1)
    return model, x, y, w


def _exact_distance(model, x, y, w, dual_p):
    """``min_j (z_y − z_j)/‖w_y − w_j‖_q`` with ``q`` the dual norm (2 for L2, 1 for L∞)."""
    z = model(x).detach()
    gaps = z.gather(1, y[:, None]) - z
    diffs = (w[y][:, None, :] - w[None]).norm(p=dual_p, dim=2)
    ratio = gaps / diffs
    ratio[torch.arange(len(y)), y] = float("inf")
    return ratio.min(1).values


@pytest.mark.parametrize("norm,dual_p", [(2.0, 2), (INF, 1)])
def test_bisection_recovers_exact_linear_distance(norm, dual_p):
    model, x, y, w = _linear_problem()
    exact = _exact_distance(model, x, y, w, dual_p)
    # the optimal perturbation moves each coordinate by at most the distance: keep it inside [0, 1]
    assert float(exact.max()) < 0.35
    est = minimal_eps(model, x, y, norm=norm, attack="pgd-mt", hi=1.0, tol=1e-5)
    assert torch.allclose(est, exact, rtol=0.02), (est / exact).aminmax()
    # no attack can succeed below the exact distance
    plain = minimal_eps(model, x, y, norm=norm, attack="pgd", hi=1.0, tol=1e-4, steps=20, seed=0)
    assert bool((plain >= exact * (1 - 1e-3)).all())


def test_minimal_eps_special_cases():
    model, x, y, _ = _linear_problem(n=6)
    y_wrong = (y + 1) % 4
    assert torch.equal(minimal_eps(model, x, y_wrong, attack="fgsm"), torch.zeros(6, dtype=torch.float64))
    # an unreachable bracket reports inf
    out = minimal_eps(model, x, y, norm=INF, attack="pgd-mt", hi=1e-4)
    assert bool(torch.isinf(out).all())
    with pytest.raises(ValueError, match="hi > lo"):
        minimal_eps(model, x, y, lo=0.5, hi=0.1)


def test_robust_accuracy_counts_as_defined(trained_digits_mlp, digits_data):
    _, test = digits_data
    model = trained_digits_mlp
    x, y = test.tensors
    assert robust_accuracy(model, test, "pgd", eps=0.0) == pytest.approx(accuracy(model, test))

    def attack(m, xb, yb):
        return pgd(m, xb, yb, 0.1, steps=5, seed=0)

    x_adv = attack(model, x, y)
    manual = float(((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).float().mean())
    loader = DataLoader(test, batch_size=500)  # one batch, so the callable sees exactly x
    assert robust_accuracy(model, loader, attack, eps=0.1) == pytest.approx(manual)
    # the three forms of data agree
    by_tuple = robust_accuracy(model, (x, y), "fgsm", 0.1, batch_size=100)
    assert robust_accuracy(model, test, "fgsm", 0.1, batch_size=100) == by_tuple
    assert robust_accuracy(model, DataLoader(test, batch_size=100), "fgsm", 0.1) == by_tuple

    def cheat(m, xb, yb):
        return (xb + 0.5).clamp(0, 1)

    with pytest.raises(ValueError, match="above the budget"):
        robust_accuracy(model, (x, y), cheat, eps=0.1)


def test_progress_bar_is_optional(trained_digits_mlp, digits_data, monkeypatch):
    _, test = digits_data
    with_bar = robust_accuracy(trained_digits_mlp, test, "fgsm", 0.05, progress=True)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import now raises ImportError
    assert robust_accuracy(trained_digits_mlp, test, "fgsm", 0.05, progress=True) == with_bar


def test_eps_sweep_is_a_monotone_curve_for_an_exact_attack():
    model, x, y, _ = _linear_problem()
    rows = eps_sweep(model, (x, y), [0.0, 0.05, 0.1, 0.2, 0.4], attack="pgd-mt", norm=2)
    assert [r["eps"] for r in rows] == [0.0, 0.05, 0.1, 0.2, 0.4]
    accs = [r["robust_accuracy"] for r in rows]
    assert accs[0] == 1.0 and accs[-1] < accs[0]
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    with pytest.raises(ValueError, match="at least one"):
        eps_sweep(model, (x, y), [])
    with pytest.raises(ValueError, match="eps_values"):
        eps_sweep(model, (x, y), [0.1, -1.0])


def test_autoattack_through_torchattacks(trained_digits_mlp, digits_data):
    pytest.importorskip("torchattacks")
    _, test = digits_data
    model = trained_digits_mlp
    x, y = test.tensors[0][:32], test.tensors[1][:32]
    rng = torch.get_rng_state()
    out = autoattack_accuracy(model, test, 0.1, components=("apgd-ce", "apgd-t"), n_examples=32, steps=10)
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks' global seeding fenced off
    assert out["n_examples"] == 32 and out["skipped"] == {}
    assert out["robust_accuracy"] <= out["after"]["apgd-ce"] <= out["clean_accuracy"]
    # the standard number must not be weaker than plain PGD-10 on the same examples
    ours = robust_accuracy(model, (x, y), "pgd", 0.1, steps=10, seed=0)
    assert out["robust_accuracy"] <= ours + 2 / 32
    # the remaining components import and run without torchvision (tiny budgets)
    cheap = autoattack_accuracy(model, test, 1.0, norm=2, components=("fab", "square"), n_examples=16,
                                steps=5, n_queries=30)
    assert cheap["skipped"] == {} and set(cheap["after"]) == {"fab", "square"}
    assert model.training is False


def test_autoattack_maps_other_domains():
    pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.rand(24, 6)
    y = base(x).argmax(1)

    class FromSymmetric(nn.Module):
        def forward(self, u):
            return base((u + 1) / 2)

    a = autoattack_accuracy(base, (x, y), 0.05, components=("apgd-ce",), steps=10)
    b = autoattack_accuracy(FromSymmetric(), (2 * x - 1, y), 0.1, components=("apgd-ce",), steps=10,
                            domain=(-1.0, 1.0))
    assert abs(a["robust_accuracy"] - b["robust_accuracy"]) <= 1 / 24


def test_autoattack_without_torchattacks_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    model, x, y, _ = _linear_problem(n=4)
    with pytest.raises(ImportError, match="pip install torchattacks"):
        autoattack_accuracy(model, (x, y), 0.1)


def test_gradient_masking_check_flags_a_masked_model(trained_digits_mlp, digits_data):
    _, test = digits_data
    x, y = test.tensors[0][:120], test.tensors[1][:120]
    honest = gradient_masking_check(trained_digits_mlp, (x, y), eps_large=1.0, eps=0.1, n_queries=1000)
    assert honest["passed"], honest["problems"]

    class Quantised(nn.Module):
        """Rounds its input to 4 levels: zero gradient almost everywhere, the textbook masking."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, u):
            return self.inner(torch.round(u * 3) / 3)

    masked = Quantised(copy.deepcopy(trained_digits_mlp))
    report = gradient_masking_check(masked, (x, y), eps_large=1.0, eps=0.3, n_queries=300)
    assert not report["passed"]
    assert len(report["problems"]) == 2
    assert report["white_box_accuracy"] > report["black_box_accuracy"]


def test_evaluate_leaves_model_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    model.train()
    stats = copy.deepcopy(model[1].state_dict())
    x, y = torch.rand(20, 8), torch.randint(0, 3, (20,))
    first = robust_accuracy(model, (x, y), "pgd", 0.1, steps=3)
    assert robust_accuracy(model, (x, y), "pgd", 0.1, steps=3) == first  # deterministic, dropout off
    minimal_eps(model, x, y, tol=1e-2, steps=3)
    gradient_masking_check(model, (x, y), 1.0, 0.1, n_queries=20)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, stats[k]) for k, v in model[1].state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments():
    model, x, y, _ = _linear_problem(n=4)
    with pytest.raises(ValueError, match="attack"):
        robust_accuracy(model, (x, y), "deepfool", 0.1)
    with pytest.raises(ValueError, match="eps"):
        robust_accuracy(model, (x, y), "pgd", -1.0)
    with pytest.raises(ValueError, match="norm"):
        robust_accuracy(model, (x, y), "pgd", 0.1, norm=1)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        robust_accuracy(model, (x, y[:, None]), "pgd", 0.1)
    with pytest.raises(ValueError, match="eps_large > eps"):
        gradient_masking_check(model, (x, y), 0.1, 0.2)
    with pytest.raises(ValueError, match="components"):
        autoattack_accuracy(model, (x, y), 0.1, components=("apgd-ce", "cw"))
    with pytest.raises(ValueError, match="Expected seed to be a non-negative integer, but got seed=-1"):
        autoattack_accuracy(model, (x, y), 0.1, seed=-1)
    with pytest.raises(TypeError, match=r"Expected data=\(x, y\) to be a pair of tensors"):
        accuracy(model, [x, y, y])
    with pytest.raises(TypeError, match="Expected data to be a torch Dataset .* but got dict"):
        accuracy(model, {"x": x})
    with pytest.raises(ValueError, match="Expected x and y of data to have the same length, but got 4 and 3"):
        accuracy(model, (x, y[:3]))
    with pytest.raises(ValueError, match=r"Expected y of data to lie in \[0, 3\]"):
        accuracy(model, (x, y + 4))
    with pytest.raises(ValueError, match="Expected batch_size to be"):
        accuracy(model, (x, y), batch_size=0)
    with pytest.raises(ValueError, match="Expected x of data to be finite"):
        accuracy(model, (x.masked_fill(x > 0.5, float("inf")), y))
    with pytest.raises(ValueError, match=r"Expected the attack to return x_adv of shape \(4, 10\)"):
        robust_accuracy(model, (x, y), lambda m, xb, yb: xb[:2], 0.1)
    with pytest.raises(ValueError, match="above the budget"):
        robust_accuracy(model, (x, y), lambda m, xb, yb: (xb + 0.2).clamp(0, 1), 0.1)
    with pytest.raises(FloatingPointError, match="non-finite logits .* for 4 of 4 examples"):
        accuracy(nn.Sequential(model, nn.Hardtanh(float("nan"), float("nan"))), (x, y))


def test_autoattack_skips_the_targeted_component_below_four_classes():
    pytest.importorskip("torchattacks")
    from robustcompress.evaluate import autoattack_accuracy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    x = torch.rand(8, 6)
    y = model(x).argmax(1)
    out = autoattack_accuracy(model, (x, y), eps=0.05, components=("apgd-ce", "apgd-t"), steps=3)
    assert "apgd-t" in out["skipped"] and "4 classes" in out["skipped"]["apgd-t"]


def test_gradient_masking_check_binds_eps_for_a_callable_attack(trained_digits_mlp, digits_data):
    x, y = digits_data[1].tensors
    seen = []

    def attack(model, xb, yb, eps):
        seen.append(eps)
        return pgd(model, xb, yb, eps, steps=10, seed=0)

    report = gradient_masking_check(trained_digits_mlp, (x[:48], y[:48]), eps_large=1.0, eps=0.1, attack=attack,
                                    n_queries=50)
    assert set(seen) == {1.0, 0.1}
    assert report["large_eps_accuracy"] <= report["white_box_accuracy"]


def test_evaluation_leaves_the_global_rng_alone(trained_digits_mlp, digits_data):
    subset = torch.utils.data.Subset(digits_data[1], list(range(40)))
    before = torch.random.get_rng_state()
    accuracy(trained_digits_mlp, subset)
    assert torch.equal(before, torch.random.get_rng_state())
