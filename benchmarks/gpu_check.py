"""CUDA correctness checks of the fused power step (run by benchmarks/gpu_check.sh).

Compiled kernel (not the interpreter) against the torch path and float64 on
random shapes: odd sizes, 1×n, n×1, k up to 32, fp32 / bf16 / fp16, row
scales; outputs pre-filled with NaN to prove every element is written; each
call repeated and compared bit for bit to catch races; both the vectorised
(hinted) and plain launches; power iteration against float64 ``svdvals``; and
``SpectralState`` with ``backend="triton"`` against ``backend="torch"``.
Strided views read in place (transposed ``Conv1D``-style weights, packed
``c_attn`` rows, attention-head column slices, general strides) and the
``U`` addend, both through the kernel and through ``FusedBackend`` with LoRA
views (``W₀ᵀ + s·B·A``) and grouped views, against the torch back-end.

``--dry-run`` runs the same checks on CPU tensors under Triton's interpreter
on shapes cut down (seconds per check), to check the script itself without a GPU.

Prints one line per check and ``ALL PASS`` / ``FAILURES: n``; exit status 1 on failure.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

DRY = "--dry-run" in sys.argv[1:]
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors through the interpreter
else:
    os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernel, not the interpreter

import torch  # noqa: E402

from robustcompress.kernels import FusedPowerStep, power_step_reference, triton_available  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
DEV = torch.device("cpu" if DRY else "cuda")
FAILS: list[str] = []


def size(x: int) -> int:
    """A dimension of a CUDA case; divided by 32 (at least 1) in a dry run."""
    return max(1, x // 32) if DRY else x


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def layers(shapes, dtypes, ks, scaled, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    shapes = [(size(m), size(n)) for m, n in shapes]
    ws = [torch.randn(m, n, generator=g, device=DEV).to(dt) for (m, n), dt in zip(shapes, dtypes)]
    vs = [torch.randn(n, k, generator=g, device=DEV) for (_, n), k in zip(shapes, ks)]
    ss = [torch.rand(m, generator=g, device=DEV) * 2 - 0.5 if sc else None for (m, _), sc in zip(shapes, scaled)]
    return ws, vs, ss


def f64_error(ws, vs, ss, us, ys, xs=None) -> float:
    """Largest |fused − float64| measured in units of the float32 rounding bound (≤ 1 passes)."""
    worst = 0.0
    eps = torch.finfo(torch.float32).eps
    for i, (w, v, s, u, y) in enumerate(zip(ws, vs, ss, us, ys)):
        x = None if xs is None else xs[i]
        w64 = w.double()
        s64 = torch.ones(w.shape[0], dtype=torch.float64, device=w.device) if s is None else s.double()
        ru = w64 @ v.double() + (0 if x is None else x.double())
        ru = s64[:, None] * ru
        ry = w64.T @ (s64[:, None] * ru)
        ub = s64.abs()[:, None] * (w64.abs() @ v.double().abs() + (0 if x is None else x.double().abs()))
        yb = w64.abs().T @ (s64.abs()[:, None] * ub)
        tol = 4 * (w.shape[0] + w.shape[1]) * eps
        worst = max(worst, float(((u.double() - ru).abs() / (tol * ub + 1e-30)).max()),
                    float(((y.double() - ry).abs() / (tol * yb + 1e-30)).max()))
    return worst


CASES = [
    ("odd fp32", [(333, 517), (1, 513), (777, 1), (65, 129)], [torch.float32] * 4),
    ("bf16 mixed", [(1024, 4608), (513, 77), (1, 2048), (2048, 1)], [torch.bfloat16] * 4),
    ("fp16 + fp32 + bf16", [(4096, 1000), (100, 4096), (257, 259)], [torch.float16, torch.float32, torch.bfloat16]),
    ("aligned rows", [(3072, 768), (768, 3072), (64, 64), (2304, 768)], [torch.float32, torch.bfloat16] * 2),
]


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def run_case(tag, step, ws, vs, ss, xs=None) -> None:
    """NaN-filled outputs, float64 error bound, torch reference, four bit-identical repeats, one table build."""
    step._debug_fill = float("nan")
    try:
        us, ys = step(ws, vs, ss, xs)
        sync()
        finite = all(bool(torch.isfinite(t).all()) for t in us + ys)
        err = f64_error(ws, vs, ss, us, ys, xs)
        ur, yr = power_step_reference(ws, vs, ss, xs)
        rel = max(float((a - b).abs().max() / (b.abs().max() + 1e-30)) for a, b in zip(us + ys, ur + yr))
        same = True
        for _ in range(2 if DRY else 4):
            us2, ys2 = step(ws, vs, ss, xs)
            same &= all(torch.equal(a, b) for a, b in zip(us + ys, us2 + ys2))
        check(tag, finite and err <= 1.0 and rel < 1e-4 and same and step.builds == 1,
              f"written={finite} f64_err/bound={err:.3f} rel_vs_torch={rel:.2e} repeatable={same}")
    except Exception:  # noqa: BLE001 - keep checking the other cases
        traceback.print_exc()
        check(tag, False, "raised")


def _conv1d_like(g, dtype):
    # transformers' Conv1D stores in × out: the operator is Wᵀ (column-major), aligned and odd, 1×n and n×1.
    stored = [(768, 3072), (517, 333), (1, 513), (777, 1)]
    return [torch.randn(size(a), size(b), generator=g, device=DEV).to(dtype).T for a, b in stored]


def _packed_c_attn(g, dtype):
    # GPT-2's c_attn (in × 3d): Q, K, V are row blocks of Wᵀ, i.e. column blocks of the stored weight.
    d = size(768)
    w = torch.randn(d, 3 * d, generator=g, device=DEV).to(dtype)
    return [w.T[0:d], w.T[d:2 * d], w.T[2 * d:3 * d]]


def _head_columns(g, dtype):
    # Attention-head column slices of W_O (row-major, offset base), with and without a row slice.
    d, h = size(768), size(64)
    w = torch.randn(d, d, generator=g, device=DEV).to(dtype)
    odd = torch.randn(size(333), size(517), generator=g, device=DEV).to(dtype)
    return [w[:, h:2 * h], w[:, 0:h], w[size(100):size(400), h:3 * h], odd[:, 1:max(2, size(200))]]


def _general_strides(g, dtype):
    # Neither stride 1: the general launch.
    a = torch.randn(size(1024), size(999), generator=g, device=DEV).to(dtype)
    b = torch.randn(size(500), size(300), generator=g, device=DEV).to(dtype)
    return [a[::2, ::3], b.T[::3]]


STRIDED_CASES = [("Conv1D^T", _conv1d_like), ("packed c_attn", _packed_c_attn), ("head columns", _head_columns),
                 ("general strides", _general_strides)]


def backend_checks() -> None:
    """FusedBackend computes transposed, sliced, grouped and LoRA views, equal to the torch back-end and float64."""
    from torch import nn

    from robustcompress.layers import LoRASpec, MatrixSpec
    from robustcompress.spectral.backends import FusedBackend, TorchBackend
    from robustcompress.spectral.views import LoRAView, MatrixView

    tag = "FusedBackend strided + grouped + LoRA views vs torch vs float64"
    try:
        torch.manual_seed(0)
        d, r = size(768), 8
        c_attn = torch.randn(d, 3 * d, device=DEV) * 0.05  # stored in × out
        c_proj = (torch.randn(d, d, device=DEV) * 0.05).to(torch.bfloat16)
        a_attn, b_attn = torch.randn(r, d, device=DEV) * 0.05, torch.randn(3 * d, r, device=DEV) * 0.05
        a_proj, b_proj = torch.randn(r, d, device=DEV) * 0.05, torch.randn(d, r, device=DEV) * 0.05
        conv = nn.Conv2d(size(256), size(512), 3, groups=4 if not DRY else 2).to(DEV)
        bn_scale = torch.rand(conv.out_channels, device=DEV) + 0.5

        def lora(base, a, b):
            return LoRAView(LoRASpec(base, MatrixSpec(lambda: a), MatrixSpec(lambda: b), 0.5))

        ops = {
            "c_attn.q": MatrixView(MatrixSpec(lambda: c_attn, transpose=True, rows=slice(0, d))),
            "c_proj": MatrixView(MatrixSpec(lambda: c_proj, transpose=True)),
            "o_head": MatrixView(MatrixSpec(lambda: c_proj, cols=slice(0, max(1, d // 12)))),
            "grouped_bn": MatrixView(MatrixSpec(lambda: conv.weight, groups=conv.groups, row_scale=lambda: bn_scale)),
            "lora.c_attn.v": lora(MatrixSpec(lambda: c_attn, transpose=True, rows=slice(2 * d, 3 * d)),
                                  a_attn, b_attn[2 * d:]),
            "lora.c_proj": lora(MatrixSpec(lambda: c_proj, transpose=True), a_proj, b_proj),
        }
        worst = worst_ref = 0.0
        fused = FusedBackend(strict=True)
        vs = {n: torch.randn(op.shape[1], 4, device=DEV) for n, op in ops.items()}
        for it in range(2):
            # V updated in place, as the state does: the second call must reuse the pointer table.
            for v in vs.values():
                v.copy_(torch.randn_like(v))
            with torch.no_grad():
                got = fused.products(ops, vs)
                ref = TorchBackend().products(ops, vs)
            sync()
            assert set(got) == set(ops), f"left to torch: {set(ops) - set(got)}"
            for n, op in ops.items():
                a = op.matrix().detach().double()
                u64 = a @ vs[n].double()
                for x, rr, e in ((got[n][0], ref[n][0], u64), (got[n][1], ref[n][1], a.T @ u64)):
                    scale = float(e.abs().max()) + 1e-30
                    worst = max(worst, float((x.double() - e).abs().max()) / scale)
                    worst_ref = max(worst_ref, float((x.double() - rr.double()).abs().max()) / scale)
        check(tag, worst < 1e-5 and worst_ref < 1e-5 and fused._kernel.builds == 1,
              f"rel_err_f64={worst:.2e} rel_vs_torch={worst_ref:.2e} table_builds={fused._kernel.builds}")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        check(tag, False, "raised")

    tag = "SpectralState triton vs torch on GPT-2 (Conv1D) with LoRA"
    try:
        import peft
        import transformers
    except ImportError:
        print(f"SKIP {tag}: transformers / peft not installed", flush=True)
        return
    try:
        import warnings

        warnings.filterwarnings("ignore", "SpectralState leaves out")
        from robustcompress.spectral import SpectralState

        torch.manual_seed(0)
        n_embd = 32 if DRY else 256
        cfg = transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=4, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                           fan_in_fan_out=True)).to(DEV)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.05)
        a = SpectralState(model, k=2, backend="triton", init_iter=0)
        b = SpectralState(model, k=2, backend="torch", init_iter=0)
        a.step(3 if DRY else 20)
        b.step(3 if DRY else 20)
        diff = max(float(((a.sigmas(n) - b.sigmas(n)).abs() / b.sigmas(n)[0]).max()) for n in b.names)
        check(tag, diff < 1e-4, f"{len(b.names)} layers, max rel diff {diff:.2e}")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        check(tag, False, "raised")


def main() -> int:
    if DRY:
        if not triton_available("cpu"):
            print("FAIL: Triton's interpreter is unavailable", flush=True)
            return 1
        print(f"dry run: CPU tensors under Triton's interpreter, shapes cut down; torch {torch.__version__}",
              flush=True)
    elif not torch.cuda.is_available() or not triton_available("cuda"):
        print("FAIL: CUDA or compiled Triton unavailable", flush=True)
        return 1
    else:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    import triton

    print(f"triton {triton.__version__}", flush=True)
    t0 = time.time()
    seed = 0
    for name, shapes, dtypes in CASES:
        for k in (1, 16) if DRY else (1, 3, 8, 16, 32):
            for hints in (True,) if DRY else (True, False):
                seed += 1
                scaled = [i % 2 == 0 for i in range(len(shapes))]
                ks = [k] * len(shapes)
                if k == 8:  # different k per layer in one call
                    ks = [1 + (i * 5) % 9 for i in range(len(shapes))]
                ws, vs, ss = layers(shapes, dtypes, ks, scaled, seed)
                tag = f"{name} k={k}{'(mixed)' if k == 8 else ''} hints={hints}"
                run_case(tag, FusedPowerStep(hints=hints), ws, vs, ss)

    # Strided views of one stored weight, read in place, and the U addend (LoRA's s·B(A V)).
    for name, make in STRIDED_CASES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for k in (1, 16) if DRY else (1, 3, 16, 32):
                for hints in (True,) if DRY else (True, False):
                    seed += 1
                    g = torch.Generator(device=DEV).manual_seed(seed)
                    ws = make(g, dtype)
                    vs = [torch.randn(w.shape[1], k, generator=g, device=DEV) for w in ws]
                    ss = [torch.rand(w.shape[0], generator=g, device=DEV) + 0.5 if i % 2 else None
                          for i, w in enumerate(ws)]
                    xs = [torch.randn(w.shape[0], k, generator=g, device=DEV) if i % 3 == 1 else None
                          for i, w in enumerate(ws)]
                    run_case(f"strided {name} {str(dtype)[6:]} k={k} hints={hints}", FusedPowerStep(hints=hints),
                             ws, vs, ss, xs)

    backend_checks()
    if DRY:
        print(f"checks took {time.time() - t0:.1f} s", flush=True)
        print("ALL PASS" if not FAILS else f"FAILURES: {len(FAILS)}: {FAILS}", flush=True)
        return 1 if FAILS else 0

    # Warm power iteration reaches σ_1 of float64 svdvals (spectrum with a gap).
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=DEV).manual_seed(7)
        q1, _ = torch.linalg.qr(torch.randn(1500, 1500, generator=g, device=DEV, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(700, 700, generator=g, device=DEV, dtype=torch.float64))
        sig = torch.linspace(1.0, 0.01, 700, device=DEV, dtype=torch.float64)
        sig[0] = 3.0
        w = ((q1[:, :700] * sig) @ q2.T).to(dtype).contiguous()
        true = float(torch.linalg.svdvals(w.double())[0])
        step = FusedPowerStep()
        v = torch.randn(700, 1, generator=g, device=DEV)
        for _ in range(30):
            _, y = step([w], [v])
            v.copy_(y[0] / y[0].norm())
        u, _ = step([w], [v])
        est = float(u[0].norm())
        check(f"power iteration sigma_1 {dtype}", abs(est - true) <= 1e-5 * true and step.builds == 1,
              f"est={est:.7f} svdvals_f64={true:.7f}")

    # SpectralState through the kernel versus the torch path.
    try:
        from torch import nn

        from robustcompress.spectral import SpectralState

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(300, 517), nn.ReLU(), nn.Linear(517, 129), nn.ReLU(), nn.Linear(129, 10)).to(DEV)
        a = SpectralState(model, k=4, backend="triton")
        b = SpectralState(model, k=4, backend="torch")
        a.step(40)
        b.step(40)
        diff = top = 0.0
        lower = True
        for name in a.names:
            ref = torch.linalg.svdvals(model.get_submodule(name).weight.detach().double())[:4]
            sa = a.sigmas(name).double()
            diff = max(diff, float(((sa - b.sigmas(name).double()).abs() / ref[0]).max()))
            top = max(top, float((sa[0] - ref[0]).abs() / ref[0]))
            lower &= bool((sa <= ref * (1 + 1e-5)).all())  # Ritz values are lower bounds
        check("SpectralState triton vs torch vs svdvals", diff < 1e-3 and top < 2e-2 and lower,
              f"triton-vs-torch {diff:.2e}, sigma_1 vs svdvals {top:.2e}, lower bounds {lower}")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        check("SpectralState triton vs torch vs svdvals", False, "raised")

    print(f"checks took {time.time() - t0:.1f} s", flush=True)
    print("ALL PASS" if not FAILS else f"FAILURES: {len(FAILS)}: {FAILS}", flush=True)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
