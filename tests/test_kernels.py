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


@pytest.mark.parametrize(
    "addends, exc, match",
    [
        (torch.zeros(3, 2), TypeError, "u_addends to be None or a sequence"),
        ([None, None], ValueError, "one entry of u_addends"),
        (["x"], TypeError, r"u_addends\[0\] to be None or a torch.Tensor"),
        ([torch.zeros(2, 2)], ValueError, r"u_addends\[0\] to be a contiguous float32 \(3, 2\)"),
        ([torch.zeros(3, 2).double()], ValueError, "dtype=torch.float64"),
        ([torch.zeros(2, 3).T], ValueError, "strides"),
    ],
)
def test_invalid_addends_raise(addends, exc, match):
    for fn in (fused_power_step, power_step_reference):
        with pytest.raises(exc, match=match):
            fn([torch.randn(3, 4)], [torch.randn(4, 2)], None, addends)


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


# ---------------------------------------------------------------- strided views of one stored weight


def _view(stored, kind):
    """A strided view of ``stored`` (never a copy) as the registry's descriptors make them."""
    m, n = stored.shape
    if kind == "transposed":  # transformers' Conv1D, LoRA fan_in_fan_out
        return stored.T
    if kind == "cols":  # an attention head's columns of W_O
        return stored[:, n // 3: n // 3 + max(1, n // 2)]
    if kind == "rows_cols":
        return stored[m // 4: m // 4 + max(1, m // 2), n // 3: n // 3 + max(1, n // 2)]
    if kind == "transposed_rows":  # GPT-2's packed c_attn: rows of Wᵀ are a column block of W
        return stored.T[n // 3: n // 3 + max(1, n // 3)]
    if kind == "stepped":  # neither stride is 1: the general-strides launch
        return stored[::2, ::3]
    return stored


VIEW_KINDS = ["transposed", "cols", "rows_cols", "transposed_rows", "stepped"]


def _f64_with_addends(weights, vs, scales, addends):
    us, ys = [], []
    for w, v, s, x in zip(weights, vs, scales, addends):
        a = w.double()
        u = a @ v.double()
        if x is not None:
            u = u + x.double()
        if s is not None:
            u = s.double()[:, None] * u
            ys.append(a.T @ (s.double()[:, None] * u))
        else:
            ys.append(a.T @ u)
        us.append(u)
    return us, ys


@given(
    stored=st.tuples(st.integers(1, 37), st.integers(1, 37)),
    kinds=st.lists(st.sampled_from(VIEW_KINDS), min_size=1, max_size=3),
    k=st.sampled_from([1, 3, 16]),
    dtype=st.sampled_from(DTYPES),
    scaled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_strided_views_read_in_place_match_float64(stored, kinds, k, dtype, scaled, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*stored, generator=g).to(dtype)
    weights = [_view(w, kind) for kind in kinds]
    assert all(x.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for x in weights)
    vs = [torch.randn(x.shape[1], k, generator=g) for x in weights]
    scales = [torch.rand(x.shape[0], generator=g) * 2 - 0.5 if scaled else None for x in weights]
    us, ys = fused_power_step(weights, vs, scales)
    _assert_matches_f64(weights, vs, scales, us, ys)
    ur, yr = power_step_reference(weights, vs, scales)
    for a, b in zip(us + ys, ur + yr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-30)


@pytest.mark.parametrize("k", [1, 3, 16])
def test_strided_edge_shapes_in_one_call(k):
    # 1×n and n×1 as transposed views, a transposed view with 16-byte aligned
    # stored rows (the hinted column-major launch), taller than one tile, and
    # column slices; every dtype, with and without row scales.
    g = torch.Generator().manual_seed(k)
    stored = [torch.randn(37, 1, generator=g), torch.randn(1, 29, generator=g).to(torch.bfloat16),
              torch.randn(80, 67, generator=g).to(torch.float16), torch.randn(33, 48, generator=g),
              torch.randn(9, 40, generator=g).to(torch.bfloat16)]
    weights = [stored[0].T, stored[1].T, stored[2].T, stored[3].T[5:], stored[4][:, 8:24]]
    vs = [torch.randn(x.shape[1], k, generator=g) for x in weights]
    scales = [torch.rand(x.shape[0], generator=g) + 0.5 if i % 2 else None for i, x in enumerate(weights)]
    us, ys = fused_power_step(weights, vs, scales)
    _assert_matches_f64(weights, vs, scales, us, ys)


def test_u_addends_give_the_whole_operator():
    # With X = s·B(A V), U is (W + s·B·A) V and Y + s·Aᵀ(Bᵀ U) is (W + s·B·A)ᵀ U: the LoRA split.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(19, 13, generator=g)
    a, b, sc = torch.randn(2, 19, generator=g), torch.randn(13, 2, generator=g), 0.7
    op = w.T  # a fan_in_fan_out base: the operator is Wᵀ
    v = torch.randn(19, 3, generator=g)
    x = sc * (b @ (a @ v))
    us, ys = fused_power_step([op], [v], None, [x])
    full = op.double() + sc * (b.double() @ a.double())
    u_ref = full @ v.double()
    torch.testing.assert_close(us[0].double(), u_ref, rtol=1e-5, atol=1e-5)
    y = ys[0].double() + sc * (a.double().T @ (b.double().T @ us[0].double()))
    torch.testing.assert_close(y, full.T @ u_ref, rtol=1e-5, atol=1e-4)
    s = torch.rand(13, generator=g) + 0.5
    us, ys = fused_power_step([op], [v], [s], [x])
    ur, yr = _f64_with_addends([op], [v], [s], [x])
    torch.testing.assert_close(us[0].double(), ur[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ys[0].double(), yr[0], rtol=1e-5, atol=1e-4)


def test_strided_views_deterministic_run_to_run():
    w = torch.randn(45, 70).to(torch.bfloat16)
    weights = [w.T, w[:, 10:47], w[::2, ::3]]
    vs = [torch.randn(x.shape[1], 3) for x in weights]
    step = FusedPowerStep()
    a = step(weights, vs)
    b = step(weights, vs)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)


def test_pointer_table_rebuilds_on_stride_shape_or_offset_change():
    step = FusedPowerStep()
    w = torch.randn(12, 12)
    v = torch.randn(12, 2)
    step([w], [v])
    assert step.builds == 1
    # Same address and shape, other strides: Wᵀ must not be read as W.
    us, ys = step([w.T], [v])
    assert step.builds == 2
    _assert_matches_f64([w.T], [v], [None], us, ys)
    # A column slice at another offset (another head) and of another width.
    v4 = torch.randn(4, 2)
    for expected, view in enumerate([w[:, 0:4], w[:, 4:8], w[:, 4:8]], start=3):
        us, ys = step([view], [v4])
        assert step.builds == min(expected, 4)  # the repeated view reuses the table
        _assert_matches_f64([view], [v4], [None], us, ys)
    us, ys = step([w[:, 4:9]], [torch.randn(5, 2)])
    assert step.builds == 5
    x = torch.randn(12, 2)
    step([w.T], [v], None, [x])
    step([w.T], [v], None, [x])
    assert step.builds == 6  # an addend is part of the table; the same one reuses it


# ---------------------------------------------------------------- FusedBackend on every view kind


def _backend_matches(ops, k=2, seed=0, dtype=torch.float32):
    """FusedBackend computes every operator, equal to the torch back-end and to float64 of the dense operator."""
    from robustcompress.spectral.backends import FusedBackend, TorchBackend

    g = torch.Generator().manual_seed(seed)
    vs = {n: torch.randn(op.shape[1], k, generator=g, dtype=dtype) for n, op in ops.items()}
    fused = FusedBackend(strict=True)
    got = fused.products(ops, vs)
    assert set(got) == set(ops), f"left to torch: {set(ops) - set(got)}"
    ref = TorchBackend().products(ops, vs)
    for n, op in ops.items():
        with torch.no_grad():
            a = op.matrix().double()
        u64 = a @ vs[n].double()
        y64 = a.T @ u64
        (u0, y), (ur, yr) = got[n], ref[n]
        assert u0.dtype == y.dtype == vs[n].dtype and u0.shape == ur.shape and y.shape == yr.shape
        for x, r, e in ((u0, ur, u64), (y, yr, y64)):
            scale = float(e.abs().max()) + 1e-30
            assert float((x.double() - e).abs().max()) <= 1e-5 * scale, n
            assert float((x.double() - r.double()).abs().max()) <= 1e-5 * scale, n
    return fused


def test_fused_backend_matrix_views_of_every_layout():
    from torch import nn

    from robustcompress.layers import MatrixSpec
    from robustcompress.spectral.views import MatrixView

    torch.manual_seed(0)
    w = torch.randn(24, 18)
    s = torch.rand(24) + 0.5
    s6 = torch.rand(6) + 0.5
    conv = nn.Conv2d(4, 6, 3, groups=2)
    ops = {
        "plain": MatrixView(MatrixSpec(lambda: w)),
        "transposed": MatrixView(MatrixSpec(lambda: w, transpose=True)),
        "head_cols": MatrixView(MatrixSpec(lambda: w, cols=slice(6, 12))),
        "rows_cols": MatrixView(MatrixSpec(lambda: w, rows=slice(8, 16), cols=slice(6, 12))),
        "transposed_rows": MatrixView(MatrixSpec(lambda: w, transpose=True, rows=slice(6, 12))),
        "scaled": MatrixView(MatrixSpec(lambda: w, row_scale=lambda: s)),
        "grouped": MatrixView(MatrixSpec(lambda: conv.weight, groups=2, row_scale=lambda: s6)),
        "bf16_T": MatrixView(MatrixSpec(lambda: w.to(torch.bfloat16), transpose=True)),
    }
    _backend_matches(ops)
    # What the kernel cannot read is left to the next back-end, even when strict.
    from robustcompress.spectral.backends import FusedBackend
    from robustcompress.spectral.views import LowRankView

    rest = {"f64": MatrixView(MatrixSpec(lambda: w.double())), "lowrank": LowRankView(w[:3], w[:5, :3].T.T),
            "depthwise": MatrixView(MatrixSpec(lambda: nn.Conv2d(32, 32, 3, groups=32).weight, groups=32))}
    vs = {n: torch.randn(op.shape[1], 1, dtype=op.dtype) for n, op in rest.items()}
    assert FusedBackend(strict=True).products({**rest, "plain": ops["plain"]}, {**vs, "plain": torch.randn(18, 1)}
                                              ).keys() == {"plain"}
    assert FusedBackend(strict=False).products(ops, {n: torch.randn(op.shape[1], 1) for n, op in ops.items()}) == {}
    with pytest.raises(RuntimeError, match="no layer is one the kernel runs"):
        FusedBackend(strict=True).products(rest, vs)


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _ops_of(model):
    from robustcompress.layers import find_layers
    from robustcompress.spectral.views import operator_from_spec

    return {layer.name: operator_from_spec(layer.view.spec) for layer in find_layers(model).layers}


def test_fused_backend_gpt2_conv1d_and_packed_c_attn():
    model = _tiny_gpt2()
    ops = _ops_of(model)
    c_attn = model.transformer.h[0].attn.c_attn.weight
    q = ops["transformer.h.0.attn.c_attn.q"]
    # Conv1D stores in × out: the operator's rows are a column block of the stored weight, read in place.
    assert q.spec.matrix().data_ptr() == c_attn.data_ptr() and q.spec.matrix().stride() == (1, c_attn.shape[1])
    assert {"transformer.h.0.attn.c_attn.k", "transformer.h.0.attn.c_attn.v", "transformer.h.0.mlp.c_fc"} <= ops.keys()
    _backend_matches(ops, k=3)


def _tiny_gpt2_lora():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                                              fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # B starts at zero: make the adapter term count
    return model


def test_fused_backend_lora_views_match_torch_and_merged_weight():
    from robustcompress.spectral.views import LoRAView

    model = _tiny_gpt2_lora()
    ops = _ops_of(model)
    lora = [n for n, op in ops.items() if isinstance(op, LoRAView)]
    assert len(lora) >= 4  # c_attn's q, k, v and both c_proj
    _backend_matches(ops, k=2, seed=1)
    # The operator is the merged weight, in the operator's orientation (Conv1D: Wᵀ).
    merged = {n: op.matrix().detach().clone() for n, op in ops.items() if n in lora}
    proj = "base_model.model.transformer.h.0.attn.c_proj"
    assert proj in merged
    dense = model.merge_and_unload().transformer.h[0].attn.c_proj.weight.detach()
    torch.testing.assert_close(merged[proj], dense.T, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:SpectralState leaves out")
@pytest.mark.parametrize("lora", [False, True])
def test_spectral_state_triton_matches_torch_on_gpt2(lora):
    from robustcompress.spectral import SpectralState

    model = _tiny_gpt2_lora() if lora else _tiny_gpt2()
    fused = SpectralState(model, k=2, backend="triton", init_iter=0)
    plain = SpectralState(model, k=2, backend="torch", init_iter=0)
    fused.step(3)
    plain.step(3)
    assert len(plain.names) >= 6
    for name in plain.names:
        torch.testing.assert_close(fused.sigmas(name), plain.sigmas(name), rtol=1e-5, atol=1e-6)
