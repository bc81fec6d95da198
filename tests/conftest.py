"""Fixtures shared by the tests (the settings shared with the package's doctests are in the root conftest.py)."""

import pytest
import torch


@pytest.fixture(scope="session")
def digits_data():
    """Digits scaled to [0, 1], the fixed stratified split: (train, test) TensorDatasets."""
    from robustcompress.data import digits

    return digits(seed=0)


@pytest.fixture(scope="session")
def trained_digits_mlp(digits_data):
    """A small digits MLP (64-64-64-10, ReLU) trained once for every test that needs one.

    Returns the model in eval mode; tests must not modify it (deepcopy first).
    """
    from robustcompress.models import MLP

    train, _ = digits_data
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP(64, (64, 64), 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train.tensors
    for _ in range(40):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model
