"""Our default PGD against torchattacks' PGD / PGDL2 on a trained digits MLP: never the weaker attack.

All 360 test examples; L∞ ε = 0.1 and L2 ε = 0.5 at 10 and 50 steps. The
reference is the *strongest* of torchattacks' runs (seeds 0–2, α = ε/10
and torchattacks' own default α, random start on and off): our default
robust accuracy may exceed it by at most half a point.
"""

import pytest
import torch
from torch import nn

from robustcompress.evaluate import robust_accuracy

INF = float("inf")


class _Images(nn.Module):
    """torchattacks' L2 attack reshapes its step as images (N, C, H, W): view the flat model so."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(u.flatten(1))


def _reference(torchattacks, model, x, y, norm, eps, steps):
    """Robust accuracy of every torchattacks run of the grid, as ``{(alpha, random_start, seed): acc}``."""
    cls, default_alpha = (torchattacks.PGD, 2 / 255) if norm == INF else (torchattacks.PGDL2, 0.2)
    images, xi = _Images(model).eval(), x.reshape(-1, 1, 8, 8)
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    out = {}
    for alpha in (eps / 10, default_alpha):
        for random_start in (True, False):
            for seed in (0, 1, 2) if random_start else (0,):  # without a random start every seed is the same run
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    x_adv = cls(images, eps=eps, alpha=alpha, steps=steps, random_start=random_start)(xi, y)
                with torch.no_grad():
                    ok = clean_ok & (images(x_adv).argmax(1) == y)
                out[(alpha, random_start, seed)] = float(ok.float().mean())
    return out


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("norm, eps", [(INF, 0.1), (2.0, 0.5)])
def test_default_pgd_is_never_weaker_than_torchattacks(trained_digits_mlp, digits_data, norm, eps, steps):
    torchattacks = pytest.importorskip("torchattacks")
    _, test = digits_data
    x, y = test.tensors
    assert len(x) == 360
    model = trained_digits_mlp
    theirs = _reference(torchattacks, model, x, y, norm, eps, steps)
    ours = robust_accuracy(model, (x, y), "pgd", eps=eps, norm=norm, steps=steps)
    strongest = min(theirs.values())
    assert ours <= strongest + 0.005, (ours, theirs)
    # the check has teeth: the attack does real work at these budgets
    assert ours < robust_accuracy(model, (x, y), "fgsm", eps=eps, norm=norm) + 1e-9
