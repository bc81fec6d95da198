"""Product back-ends: the CPU one-read (row-block) products equal the two-product reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robustcompress.layers import MatrixSpec
from robustcompress.spectral.backends import ONE_READ_MIN_BYTES, TorchBackend, _blocked_products
from robustcompress.spectral.views import MatrixView


@given(m=st.integers(513, 1500), n=st.integers(1, 40), k=st.integers(1, 18), scaled=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 1000))
def test_blocked_products_match_two_products(m, n, k, scaled, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g).to(dtype)
    s = torch.rand(m, generator=g) + 0.5
    spec = MatrixSpec(lambda: w, row_scale=(lambda: s) if scaled else None)
    op = MatrixView(spec)
    v = torch.randn(n, k, generator=g, dtype=op.dtype)
    threshold = 1 << 16
    assert TorchBackend(block_rows=64, one_read_min_bytes=threshold)._one_read(op) == (
        m * n * w.element_size() >= threshold)
    u0, y = _blocked_products(op, v)
    ref_m = w.to(op.dtype).double() * (s.double()[:, None] if scaled else 1)
    u_ref = ref_m @ v.double()
    y_ref = ref_m.T @ u_ref
    tol = 1e-10 if op.dtype == torch.float64 else 1e-4
    assert torch.allclose(u0.double(), u_ref, rtol=tol, atol=tol * float(u_ref.abs().max()))
    assert torch.allclose(y.double(), y_ref, rtol=tol, atol=tol * float(y_ref.abs().max()))


def test_large_row_major_matrices_take_the_one_read_path_and_others_do_not():
    w = torch.randn(4096, 2048)  # 32 MiB in fp32: the default threshold
    assert w.numel() * w.element_size() == ONE_READ_MIN_BYTES
    plain = MatrixView(MatrixSpec(lambda: w))
    transposed = MatrixView(MatrixSpec(lambda: w, transpose=True))
    small = MatrixView(MatrixSpec(lambda: torch.randn(2048, 2048)))  # 16 MiB: fits a last-level cache
    backend = TorchBackend()
    assert backend._one_read(plain)
    assert not backend._one_read(transposed)  # rows of Wᵀ are strided: two products
    assert not backend._one_read(small)
    assert not TorchBackend(block_rows=0)._one_read(plain)
    v = torch.randn(2048, 2)
    u0, y = backend.products({"p": plain}, {"p": v})["p"]
    ref = w.double().T @ (w.double() @ v.double())
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("k", [1, 3])
def test_state_estimates_equal_with_and_without_one_read(k):
    from torch import nn

    from robustcompress.spectral import SpectralState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 1200), nn.ReLU(), nn.Linear(1200, 10)).double()
    a = SpectralState(model, k=k, init_iter=0)
    a._torch_backend.one_read_min_bytes = 1 << 16  # the 1200 × 300 float64 layer (2.9 MB) walks row blocks
    assert a._torch_backend._one_read(a.operator("0"))
    a.step(30)
    b = SpectralState(model, k=k, init_iter=0)
    b._torch_backend.block_rows = 0
    b.step(30)
    for name in a.names:
        assert torch.allclose(a.sigmas(name), b.sigmas(name), rtol=1e-10)


@given(m=st.integers(1, 80), n=st.integers(1, 60), k=st.integers(1, 20), transposed=st.booleans(),
       seed=st.integers(0, 1000))
def test_thin_product_is_the_matrix_product(m, n, k, transposed, seed):
    # Both layouts (the transposed product for thin blocks on CPU, a @ b otherwise) give a @ b.
    from robustcompress.spectral.views import thin_product

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, m, generator=g, dtype=torch.float64).T if transposed else \
        torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(n, k, generator=g, dtype=torch.float64)
    torch.testing.assert_close(thin_product(a, b), a @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [2, 8, 16])
def test_matrix_view_products_match_float64_for_thin_blocks(k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(96, 70, generator=g)
    s = torch.rand(96, generator=g) + 0.5
    op = MatrixView(MatrixSpec(lambda: w, row_scale=lambda: s))
    v, u = torch.randn(70, k, generator=g), torch.randn(96, k, generator=g)
    ref = s.double()[:, None] * w.double()
    torch.testing.assert_close(op.matvec(v).double(), ref @ v.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(op.rmatvec(u).double(), ref.T @ u.double(), rtol=1e-4, atol=1e-4)
