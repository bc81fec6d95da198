"""Low-rank layers: forward equals the dense product, Eckart–Young initialisation, to_low_rank."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robustcompress.layers import LowRankConv2d, LowRankLinear, best_rank_factors, to_low_rank


@given(m=st.integers(2, 9), n=st.integers(2, 9), r=st.integers(1, 4), seed=st.integers(0, 100))
def test_best_rank_factors_reach_the_eckart_young_error(m, n, r, seed):
    r = min(r, m, n)
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a, b = best_rank_factors(w, r)
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.matrix_norm(w - b @ a) ** 2, (s[r:] ** 2).sum(), rtol=1e-9, atol=1e-12)
    assert torch.linalg.matrix_rank(b @ a) <= r


def test_low_rank_linear_forward_is_the_dense_product():
    layer = LowRankLinear(7, 5, rank=2).double()
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (layer.weight_b @ layer.weight_a).T + layer.bias)
    torch.testing.assert_close(layer.weight, layer.weight_b @ layer.weight_a)


def test_low_rank_conv_forward_is_the_dense_convolution():
    dense = nn.Conv2d(3, 6, 3, stride=2, padding=1).double()
    layer = LowRankConv2d.from_conv(dense, rank=2)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    ref = nn.functional.conv2d(x, layer.weight, layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), ref)
    # rank 2 of a 6×27 matrix view: the product has rank 2
    assert torch.linalg.matrix_rank(layer.weight.reshape(6, -1)) == 2


def test_from_linear_full_rank_reproduces_the_layer():
    dense = nn.Linear(5, 4).double()
    layer = LowRankLinear.from_linear(dense, rank=4)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x))


def test_to_low_rank_keeps_the_head_and_copies():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    out = to_low_rank(model, {"0": 2})
    assert isinstance(out[0], LowRankLinear) and isinstance(out[2], nn.Linear) and isinstance(out[4], nn.Linear)
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    fresh = to_low_rank(model, 3, from_weights=False)
    assert isinstance(fresh[0], LowRankLinear) and fresh[0].rank == 3 and isinstance(fresh[4], nn.Linear)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, rank=0)
    with pytest.raises(ValueError, match="rank <="):
        LowRankLinear.from_linear(nn.Linear(4, 3), rank=4)
    with pytest.raises(ValueError, match="Unknown layer names"):
        to_low_rank(nn.Sequential(nn.Linear(4, 4)), {"x": 2})
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), rank=1)
