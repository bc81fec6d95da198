"""CUDA correctness checks of the fused power step (run by benchmarks/gpu_check.sh).

Compiled kernel (not the interpreter) against the torch path and float64 on
random shapes: odd sizes, 1×n, n×1, k up to 32, fp32 / bf16 / fp16, row
scales; outputs pre-filled with NaN to prove every element is written; each
call repeated and compared bit for bit to catch races; both the vectorised
(hinted) and plain launches; power iteration against float64 ``svdvals``; and
``SpectralState`` with ``backend="triton"`` against ``backend="torch"``.

Prints one line per check and ``ALL PASS`` / ``FAILURES: n``; exit status 1 on failure.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernel, not the interpreter

import torch  # noqa: E402

from robustcompress.kernels import FusedPowerStep, power_step_reference, triton_available  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
DEV = torch.device("cuda")
FAILS: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def layers(shapes, dtypes, ks, scaled, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    ws = [torch.randn(m, n, generator=g, device=DEV).to(dt) for (m, n), dt in zip(shapes, dtypes)]
    vs = [torch.randn(n, k, generator=g, device=DEV) for (_, n), k in zip(shapes, ks)]
    ss = [torch.rand(m, generator=g, device=DEV) * 2 - 0.5 if sc else None for (m, _), sc in zip(shapes, scaled)]
    return ws, vs, ss


def f64_error(ws, vs, ss, us, ys) -> float:
    """Largest |fused − float64| measured in units of the float32 rounding bound (≤ 1 passes)."""
    worst = 0.0
    eps = torch.finfo(torch.float32).eps
    for w, v, s, u, y in zip(ws, vs, ss, us, ys):
        a = w.double() if s is None else s.double()[:, None] * w.double()
        ru = a @ v.double()
        ry = a.T @ ru
        ub = a.abs() @ v.double().abs()
        yb = a.abs().T @ ub
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


def main() -> int:
    if not torch.cuda.is_available() or not triton_available("cuda"):
        print("FAIL: CUDA or compiled Triton unavailable", flush=True)
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    import triton

    print(f"triton {triton.__version__}", flush=True)
    t0 = time.time()
    seed = 0
    for name, shapes, dtypes in CASES:
        for k in (1, 3, 8, 16, 32):
            for hints in (True, False):
                seed += 1
                scaled = [i % 2 == 0 for i in range(len(shapes))]
                ks = [k] * len(shapes)
                if k == 8:  # different k per layer in one call
                    ks = [1 + (i * 5) % 9 for i in range(len(shapes))]
                ws, vs, ss = layers(shapes, dtypes, ks, scaled, seed)
                step = FusedPowerStep(hints=hints)
                step._debug_fill = float("nan")
                tag = f"{name} k={k}{'(mixed)' if k == 8 else ''} hints={hints}"
                try:
                    us, ys = step(ws, vs, ss)
                    torch.cuda.synchronize()
                    finite = all(bool(torch.isfinite(t).all()) for t in us + ys)
                    err = f64_error(ws, vs, ss, us, ys)
                    ur, yr = power_step_reference(ws, vs, ss)
                    rel = max(float((a - b).abs().max() / (b.abs().max() + 1e-30)) for a, b in zip(us + ys, ur + yr))
                    same = True
                    for _ in range(4):
                        us2, ys2 = step(ws, vs, ss)
                        same &= all(torch.equal(a, b) for a, b in zip(us + ys, us2 + ys2))
                    check(tag, finite and err <= 1.0 and rel < 1e-4 and same and step.builds == 1,
                          f"written={finite} f64_err/bound={err:.3f} rel_vs_torch={rel:.2e} repeatable={same}")
                except Exception:  # noqa: BLE001 - keep checking the other cases
                    traceback.print_exc()
                    check(tag, False, "raised")

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
