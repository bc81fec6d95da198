"""Fused power step (Triton) against plain matmuls and float64.

Runs Triton's CPU interpreter (``TRITON_INTERPRET=1``, set in conftest before
anything imports Triton) on tiny shapes; the CUDA build of the same kernel is
checked by ``benchmarks/gpu_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton", reason="Triton is not installed: the fused kernel cannot be tested")

from robustcompress.kernels import (  # noqa: E402
    MAX_K,
    FusedPowerStep,
    fused_power_step,
    power_step_reference,
    triton_available,
)

pytestmark = pytest.mark.skipif(
    not triton_available("cpu"),
    reason="Triton's interpreter is off: TRITON_INTERPRET=1 must be set before Triton is first imported",
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _f64_products(weights, vs, scales):
    """U = diag(s) W V and Y = Wᵀ diag(s) U in float64, from the exact stored values."""
    us, ys = [], []
    for w, v, s in zip(weights, vs, scales):
        a = w.double()
        if s is not None:
            a = s.double()[:, None] * a
        u = a @ v.double()
        us.append(u)
        ys.append(a.T @ u)
    return us, ys


def _bound(w, v, s):
    """Elementwise float32 rounding scale of U and Y: |A| |V| and |A|ᵀ|A| |V|."""
    a = w.double().abs()
    if s is not None:
        a = s.double().abs()[:, None] * a
    ub = a @ v.double().abs()
    return ub, a.T @ ub


def _assert_matches_f64(weights, vs, scales, us, ys):
    ref_u, ref_y = _f64_products(weights, vs, scales)
    for i, (w, v, s) in enumerate(zip(weights, vs, scales)):
        ub, yb = _bound(w, v, s)
        n_terms = w.shape[0] + w.shape[1]
        tol = 4 * n_terms * torch.finfo(torch.float32).eps
        assert us[i].dtype == ys[i].dtype == torch.float32
        assert us[i].shape == (w.shape[0], v.shape[1]) and ys[i].shape == (w.shape[1], v.shape[1])
        assert ((us[i].double() - ref_u[i]).abs() <= tol * ub + 1e-30).all(), f"U of layer {i}"
        assert ((ys[i].double() - ref_y[i]).abs() <= tol * yb + 1e-30).all(), f"Y of layer {i}"


def _layers(shapes, dtypes, k, scaled, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(m, n, generator=g).to(dt) for (m, n), dt in zip(shapes, dtypes)]
    vs = [torch.randn(n, k, generator=g) for _, n in shapes]
    scales = [torch.rand(m, generator=g) * 2 - 0.5 if sc else None for (m, _), sc in zip(shapes, scaled)]
    return weights, vs, scales


@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=3),
    k=st.sampled_from([1, 3, 16]),
    dtype_idx=st.lists(st.integers(0, 2), min_size=3, max_size=3),
    scaled=st.lists(st.booleans(), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_and_reference(shapes, k, dtype_idx, scaled, seed):
    dtypes = [DTYPES[i] for i in dtype_idx[: len(shapes)]]
    weights, vs, scales = _layers(shapes, dtypes, k, scaled[: len(shapes)], seed)
    us, ys = fused_power_step(weights, vs, scales)
    _assert_matches_f64(weights, vs, scales, us, ys)
    ur, yr = power_step_reference(weights, vs, scales)
    for a, b in zip(us + ys, ur + yr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-30)


@pytest.mark.parametrize("k", [1, 3, 16, MAX_K])
def test_edge_shapes_and_aligned_rows(k):
    # 1×n and n×1, odd sizes, and rows that are a multiple of 16 bytes (the
    # aligned launch with vectorisation hints) in one call; more rows than a tile.
    shapes = [(1, 37), (29, 1), (67, 33), (40, 64), (33, 16), (5, 8)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]
    weights, vs, scales = _layers(shapes, dtypes, k, [True, False, True, True, False, True])
    us, ys = fused_power_step(weights, vs, scales)
    _assert_matches_f64(weights, vs, scales, us, ys)


def test_mixed_k_in_one_call():
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(20, 12, generator=g), torch.randn(9, 30, generator=g), torch.randn(17, 17, generator=g)]
    vs = [torch.randn(12, 1, generator=g), torch.randn(30, 5, generator=g), torch.randn(17, 20, generator=g)]
    us, ys = fused_power_step(weights, vs)
    _assert_matches_f64(weights, vs, [None] * 3, us, ys)


def test_scale_means_diag_s_times_w():
    # Y must be Aᵀ A V for A = diag(s) W, so scaling W's rows by s by hand gives the same result.
    g = torch.Generator().manual_seed(2)
    w, v, s = torch.randn(23, 11, generator=g), torch.randn(11, 3, generator=g), torch.randn(23, generator=g)
    us, ys = fused_power_step([w], [v], [s])
    us2, ys2 = fused_power_step([s[:, None] * w], [v])
    torch.testing.assert_close(us[0], us2[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ys[0], ys2[0], rtol=1e-5, atol=1e-4)


def test_power_iteration_converges_to_top_singular_value():
    # Ten normalised steps on a matrix with known spectrum reach σ_1 = 5.
    g = torch.Generator().manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    sig = torch.linspace(1.0, 0.1, 20)
    sig[0] = 5.0
    w = (q1[:, :20] * sig) @ q2.T
    step = FusedPowerStep()
    v = torch.randn(20, 1, generator=g)
    for _ in range(10):
        u, y = step([w], [v])
        v.copy_(y[0] / y[0].norm())
    u, _ = step([w], [v])
    assert abs(u[0].norm().item() - 5.0) < 1e-4
    assert step.builds == 1  # V updated in place: the table was reused


def test_deterministic_run_to_run():
    weights, vs, scales = _layers([(45, 37), (70, 9)], [torch.bfloat16, torch.float32], 3, [True, False])
    a = fused_power_step(weights, vs, scales)
    b = fused_power_step(weights, vs, scales)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)


def test_pointer_table_cache_rebuilds_on_change():
    step = FusedPowerStep()
    weights, vs, scales = _layers([(12, 7), (9, 5)], [torch.float32, torch.float32], 2, [False, True])
    step(weights, vs, scales)
    step(weights, vs, scales)
    assert step.builds == 1

    # In-place changes keep the table and are seen by the kernel.
    weights[0].mul_(2.0)
    vs[1].add_(1.0)
    us, ys = step(weights, vs, scales)
    assert step.builds == 1
    _assert_matches_f64(weights, vs, scales, us, ys)

    # Replaced by a tensor of another shape, another dtype, or at another address.
    replacements = [
        (0, torch.randn(15, 7)),
        (0, torch.randn(15, 7).to(torch.bfloat16)),
        (1, torch.randn(9, 5) * 3),
    ]
    for expected, (i, new) in enumerate(replacements, start=2):
        weights[i] = new
        us, ys = step(weights, vs, scales)
        assert step.builds == expected
        _assert_matches_f64(weights, vs, scales, us, ys)

    # A new V block or a scale dropped also rebuild.
    vs[0] = torch.randn(7, 2)
    step(weights, vs, scales)
    scales[1] = None
    us, ys = step(weights, vs, scales)
    assert step.builds == len(replacements) + 3
    _assert_matches_f64(weights, vs, scales, us, ys)


def test_reference_closed_form_and_docstring_examples():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    us, ys = power_step_reference([w], [torch.ones(2, 1)])
    assert ys[0].flatten().tolist() == [9.0, 1.0]
    us, ys = fused_power_step([w], [torch.ones(2, 1)])
    assert ys[0].flatten().tolist() == [9.0, 1.0]
    assert us[0].flatten().tolist() == [3.0, 1.0]
    step = FusedPowerStep()
    w, v = torch.eye(3), torch.ones(3, 2)
    for _ in range(2):
        step([w], [v])
    assert step.builds == 1


def test_outputs_do_not_track_gradients():
    w = torch.randn(6, 4, requires_grad=True)
    us, ys = fused_power_step([w], [torch.randn(4, 2)])
    assert not us[0].requires_grad and not ys[0].requires_grad and w.grad is None


@pytest.mark.parametrize(
    "weights, vs, scales, exc, match",
    [
        (torch.randn(3, 3), [torch.randn(3, 1)], None, TypeError, "weights to be a sequence"),
        ([], [], None, ValueError, "at least one"),
        ([torch.randn(3, 3)], [], None, ValueError, "one vector block per weight"),
        ([torch.randn(3)], [torch.randn(3, 1)], None, ValueError, r"weights\[0\] to be a non-empty 2-D"),
        ([torch.randn(3, 3).double()], [torch.randn(3, 1)], None, TypeError, "float32, bfloat16 or float16"),
        ([torch.randn(3, 4).T], [torch.randn(3, 1)], None, ValueError, "contiguous"),
        ([torch.randn(3, 3)], [torch.randn(4, 1)], None, ValueError, r"vs\[0\] of shape \(3, k\)"),
        ([torch.randn(3, 40)], [torch.randn(40, 33)], None, ValueError, "k <= 32"),
        ([torch.randn(3, 3)], [torch.randn(3, 1).double()], None, TypeError, r"vs\[0\] to have dtype float32"),
        ([torch.randn(3, 3)], [torch.randn(6, 2)[::2]], None, ValueError, r"vs\[0\] to be contiguous"),
        ([torch.randn(3, 3)], [torch.randn(3, 1)], [torch.ones(4)], ValueError, r"row_scales\[0\] of shape \(3,\)"),
        ([torch.randn(3, 3)], [torch.randn(3, 1)], [None, None], ValueError, "one row scale"),
    ],
)
def test_invalid_arguments_raise(weights, vs, scales, exc, match):
    for fn in (fused_power_step, power_step_reference):
        with pytest.raises(exc, match=match):
            fn(weights, vs, scales)


def test_constructor_checks_and_device_probe():
    with pytest.raises(ValueError, match="block_rows"):
        FusedPowerStep(block_rows=24)
    with pytest.raises(ValueError, match="num_warps"):
        FusedPowerStep(num_warps=3)
    with pytest.raises(TypeError, match="step to be a FusedPowerStep"):
        fused_power_step([torch.eye(2)], [torch.ones(2, 1)], step="cache")
    with pytest.raises(ValueError, match="device"):
        triton_available("not-a-device")
    assert triton_available("cpu") and triton_available()
    assert not triton_available("meta")


def test_import_does_not_import_triton():
    code = "import sys, robustcompress, robustcompress.kernels; sys.exit('triton' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


@pytest.mark.parametrize("k", [1, 2])
def test_spectral_state_triton_backend_matches_torch_backend(k):
    # fp32 layers (one BN-folded) go through the kernel; the float64 layer falls back to torch.
    from torch import nn

    from robustcompress.spectral import SpectralState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 9), nn.ReLU(),
                          nn.Linear(9, 3).double())
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(-2.0, 2.0)
    model.eval()
    fused = SpectralState(model, k=k, backend="triton", init_iter=0)
    plain = SpectralState(model, k=k, backend="torch", init_iter=0)
    fused.step(20)
    plain.step(20)
    for name in plain.names:
        torch.testing.assert_close(fused.sigmas(name), plain.sigmas(name), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.vectors(name)[1].abs(), plain.vectors(name)[1].abs(), rtol=1e-4, atol=1e-5)
    assert fused.folded_bn("0") is model[1]
