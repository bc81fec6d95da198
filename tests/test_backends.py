"""Product back-ends: the CPU one-read (row-block) products equal the two-product reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robustcompress.layers import MatrixSpec
from robustcompress.spectral.backends import ONE_READ_MIN_NUMEL, TorchBackend, _blocked_products
from robustcompress.spectral.views import MatrixView


@given(m=st.integers(513, 1500), n=st.integers(1, 40), k=st.integers(1, 4), scaled=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 1000))
def test_blocked_products_match_two_products(m, n, k, scaled, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g).to(dtype)
    s = torch.rand(m, generator=g) + 0.5
    spec = MatrixSpec(lambda: w, row_scale=(lambda: s) if scaled else None)
    op = MatrixView(spec)
    v = torch.randn(n, k, generator=g, dtype=op.dtype)
    assert TorchBackend(block_rows=64)._one_read(op) == (m * n >= ONE_READ_MIN_NUMEL)
    u0, y = _blocked_products(op, v)
    ref_m = w.to(op.dtype).double() * (s.double()[:, None] if scaled else 1)
    u_ref = ref_m @ v.double()
    y_ref = ref_m.T @ u_ref
    tol = 1e-10 if op.dtype == torch.float64 else 1e-4
    assert torch.allclose(u0.double(), u_ref, rtol=tol, atol=tol * float(u_ref.abs().max()))
    assert torch.allclose(y.double(), y_ref, rtol=tol, atol=tol * float(y_ref.abs().max()))


def test_large_row_major_matrices_take_the_one_read_path_and_others_do_not():
    w = torch.randn(1024, 512)
    plain = MatrixView(MatrixSpec(lambda: w))
    transposed = MatrixView(MatrixSpec(lambda: w, transpose=True))
    small = MatrixView(MatrixSpec(lambda: torch.randn(64, 64)))
    backend = TorchBackend()
    assert backend._one_read(plain)
    assert not backend._one_read(transposed)  # rows of Wᵀ are strided: two products
    assert not backend._one_read(small)
    assert not TorchBackend(block_rows=0)._one_read(plain)
    v = torch.randn(512, 2)
    u0, y = backend.products({"p": plain}, {"p": v})["p"]
    assert torch.allclose(y, w.T @ (w @ v), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k", [1, 3])
def test_state_estimates_equal_with_and_without_one_read(k):
    from torch import nn

    from robustcompress.spectral import SpectralState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 1200), nn.ReLU(), nn.Linear(1200, 10)).double()
    a = SpectralState(model, k=k, init_iter=30)
    b = SpectralState(model, k=k, init_iter=0)
    b._torch_backend.block_rows = 0
    b.step(30)
    for name in a.names:
        assert torch.allclose(a.sigmas(name), b.sigmas(name), rtol=1e-10)
