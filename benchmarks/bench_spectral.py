"""Time one model-wide warm power/subspace iteration against the alternatives.

Everything is measured side by side in one run and printed as ratios.

CPU (``--device cpu``, one thread): ``SpectralState.step`` (torch back-end)
versus a per-layer loop (two matmuls per layer, as ``spectral_norm`` does, on
the same BN-folded operators ``diag(s)·W`` the state iterates) timed in
alternation, versus ``torch.linalg.svdvals``, for an MLP 784-2000×4-10 and
the CIFAR ResNet-18 (BatchNorm with non-trivial running statistics), with the
loop/state goals. ``--before REF`` also times ``state.step`` of the package at
git revision ``REF`` against the working tree, each in its own worker
process, interleaved (``_side_by_side.py``).

CUDA (``--device cuda``): the fused Triton step (eager and replayed from a
CUDA graph), ``SpectralState.step``, a per-layer torch loop (eager and graph),
``svdvals`` (skipped for the 1.2B set), and the bandwidth floor
``bytes(all weights) / device-to-device copy bandwidth`` measured in the same
run, for ResNet-18-, ResNet-50-, ViT-B/16- and 1.2B-transformer-shaped weight
sets (random weights of the real shapes; bf16 for the 1.2B set). CUDA events,
warm-up, medians.

Usage::

    PYTHONPATH=. python benchmarks/bench_spectral.py --device cpu --k 1 8
    PYTHONPATH=. python benchmarks/bench_spectral.py --device cpu --k 1 8 --before 0b68a57
    PYTHONPATH=. python benchmarks/bench_spectral.py --device cuda --k 1 8 --markdown rows.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from einops import rearrange
from torch import nn

SVDVALS_1B_QUOTE = "~18 s (quoted, not run)"


# ----------------------------------------------------------------------------- weight sets
def resnet50_shapes(num_classes: int = 1000) -> list[tuple[int, int]]:
    """Matrix views (out, in·kh·kw) of the ImageNet ResNet-50 convolutions and head."""
    shapes = [(64, 3 * 7 * 7)]
    c_in = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(width, c_in), (width, width * 9), (width * 4, width)]
            if b == 0:
                shapes.append((width * 4, c_in))  # projection shortcut
            c_in = width * 4
    shapes.append((num_classes, 2048))
    return shapes


def vit_b16_shapes(num_classes: int = 1000) -> list[tuple[int, int]]:
    """ViT-B/16: patch embedding, 12 blocks of qkv / proj / fc1 / fc2, head."""
    d = 768
    shapes = [(d, 3 * 16 * 16)]
    for _ in range(12):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
    shapes.append((num_classes, d))
    return shapes


def transformer_1b_shapes() -> list[tuple[int, int]]:
    """A 1.2B-parameter decoder: d=2048, 24 layers, fused qkv, MLP 4×d (embeddings left out)."""
    d = 2048
    shapes = []
    for _ in range(24):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
    return shapes


def resnet18_shapes() -> list[tuple[int, int]]:
    from robustcompress.models import resnet18

    return [tuple(rearrange(p, "o i ... -> o (i ...)").shape) for n, p in resnet18().named_parameters()
            if p.dim() >= 2]


def linear_stack(shapes, dtype, device, seed=0) -> nn.Module:
    """Bias-free Linear layers holding random weights of the given (out, in) shapes."""
    g = torch.Generator(device=device).manual_seed(seed)
    layers = nn.ModuleList()
    for m, n in shapes:
        lin = nn.Linear(n, m, bias=False, device="meta")
        w = torch.randn(m, n, generator=g, device=device, dtype=torch.float32).div_(n**0.5)
        lin.weight = nn.Parameter(w.to(dtype))
        layers.append(lin)
    return layers


def n_params(shapes) -> int:
    return sum(m * n for m, n in shapes)


# ----------------------------------------------------------------------------- timing
def time_cpu(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_cuda(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def as_graph(fn):
    """Capture ``fn`` (already warmed up) in a CUDA graph; return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 20."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), repeats=20)
    return 2 * (1 << 30) / t


def fmt(t: float | None) -> str:
    if t is None:
        return "—"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} µs"


# ----------------------------------------------------------------------------- methods
def per_layer_loop(weights, k, device, dtype):
    """The spectral_norm way: for each layer u = W v, v' = Wᵀ u (two matmuls, one launch each)."""
    g = torch.Generator().manual_seed(1)
    vs = [torch.randn(w.shape[1], k, generator=g).to(device=device, dtype=dtype) for w in weights]

    def run():
        for w, v in zip(weights, vs):
            u = w @ v
            v.copy_(w.T @ u)
            v.div_(v.norm())  # keeps the loop from overflowing over repeats

    return run


def svdvals_all(weights, device):
    def run():
        for w in weights:
            torch.linalg.svdvals(w.float())
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def state_step(model, k, backend):
    from robustcompress.spectral import SpectralState

    state = SpectralState(model, k=k, backend=backend, init_iter=1)
    return state.step


def fused_step(weights, k, device):
    from robustcompress.kernels import FusedPowerStep

    step = FusedPowerStep()
    g = torch.Generator().manual_seed(2)
    vs = [torch.randn(w.shape[1], k, generator=g).to(device) for w in weights]
    return lambda: step(weights, vs)


# ----------------------------------------------------------------------------- drivers
CPU_MODELS = ("mlp", "resnet18")
CPU_LABELS = {"mlp": "MLP 784-2000×4-10", "resnet18": "ResNet-18 (CIFAR)"}
#: loop/state goals on CPU (k → goal), one thread: the state must beat the two-product loop on big layers
CPU_GOALS = {("mlp", 1): 1.3, ("mlp", 8): 1.1, ("resnet18", 1): 0.95, ("resnet18", 8): 0.75}


def cpu_model(model: str) -> nn.Module:
    """The CPU benchmark models, built with seed 0 (eval mode: BatchNorm uses its running statistics)."""
    from robustcompress.models import MLP, resnet18

    torch.manual_seed(0)
    net = MLP(784, (2000,) * 4, 10) if model == "mlp" else resnet18()
    if model == "resnet18":
        # Non-trivial running statistics, so the folded scale is not a constant.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def state_case(model: str, k: int):
    """``SpectralState.step`` (torch back-end) of a CPU benchmark model: a factory for timing workers."""
    from robustcompress.spectral import SpectralState

    state = SpectralState(cpu_model(model), k=k, backend="torch", init_iter=1)

    def run():
        with torch.no_grad():
            state.step()

    return run


def folded_loop_case(model: str, k: int, layout: str = "plain"):
    """The two-product per-layer loop on the operators the state iterates: ``diag(s)·W`` where BN folds.

    ``layout="plain"``: ``U = W V``, ``V ← Wᵀ U`` as written; ``"thin"``: the same
    products with the thin block on the left (``(Vᵀ Wᵀ)ᵀ``, ``(Uᵀ W)ᵀ``), which
    CPU BLAS runs much faster for 2 ≤ k < 16 on some CPUs.
    """
    thin = layout == "thin"
    from robustcompress.spectral import SpectralState

    net = cpu_model(model)
    state = SpectralState(net, k=k, backend="torch", init_iter=0)
    g = torch.Generator().manual_seed(1)
    layers = []
    for name in state.names:
        w = net.get_submodule(name).weight.detach()
        w = w.reshape(w.shape[0], -1)
        layers.append((w, state.folded_bn(name), torch.randn(w.shape[1], k, generator=g)))

    def run():
        with torch.no_grad():
            for w, bn, v in layers:
                u = (v.mT @ w.mT).mT if thin else w @ v
                if bn is not None:
                    # The scale is recomputed from the running statistics each step, as the state does.
                    s = bn.weight.abs() * torch.rsqrt(bn.running_var + bn.eps)
                    u = u * s.square()[:, None]  # diag(s)ᵀ diag(s) W v
                v.copy_((u.mT @ w).mT if thin else w.T @ u)
                v.div_(v.norm())  # keeps the loop from overflowing over repeats

    return run


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (order flipped each round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            fns[name]()
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in ts.items()}


def bench_cpu(ks, repeats):
    """state vs the BN-folded per-layer loop (interleaved) and svdvals, one thread."""
    torch.set_num_threads(1)
    rows = []
    for model in CPU_MODELS:
        net = cpu_model(model)
        weights = [rearrange(p.detach(), "o i ... -> o (i ...)").contiguous()
                   for p in net.parameters() if p.dim() >= 2]
        params = sum(w.numel() for w in weights)
        t_svd = time_cpu(svdvals_all(weights, torch.device("cpu")), repeats=1, warmup=0)
        for k in ks:
            med = interleaved({"state": state_case(model, k), "loop": folded_loop_case(model, k),
                               "loop_thin": folded_loop_case(model, k, "thin")}, repeats)
            rows.append(dict(set=CPU_LABELS[model], model=model, params=params, k=k, svdvals=t_svd, **med))
    print(f"\nCPU, {torch.get_num_threads()} thread, torch {torch.__version__}; medians of {repeats} interleaved "
          "repeats; both sides iterate the same (BN-folded) operators")
    print("loop: U = W V, V ← Wᵀ U as written; loop thin: the same with the thin block on the left")
    print(f"{'set':22} {'params':>8} {'k':>2} {'state.step':>11} {'loop':>11} {'loop thin':>11} {'svdvals':>10}"
          f" {'loop/state':>10} {'goal':>12} {'thin/state':>10} {'svd/state':>10}")
    for r in rows:
        goal = CPU_GOALS.get((r["model"], r["k"]))
        ratio = r["loop"] / r["state"]
        verdict = "" if goal is None else f"≥{goal:.2f} {'met' if ratio >= goal else 'MISSED'}"
        print(f"{r['set']:22} {r['params'] / 1e6:7.2f}M {r['k']:2d} {fmt(r['state']):>11} {fmt(r['loop']):>11} "
              f"{fmt(r['loop_thin']):>11} {fmt(r['svdvals']):>10} {ratio:10.2f} {verdict:>12} "
              f"{r['loop_thin'] / r['state']:10.2f} {r['svdvals'] / r['state']:10.1f}")
    return rows


def bench_before_after(ref: str, ks, repeats):
    """``state.step`` of the package at git revision ``ref`` against the working tree's, interleaved workers."""
    from _side_by_side import Revisions

    print(f"\nBefore/after: state.step at {ref} vs the working tree, one thread per worker, medians of "
          f"{repeats} interleaved blocks; the loop (same code on both sides) is the noise control")
    print(f"{'set':22} {'k':>2} {'what':>10} {'before':>11} {'after':>11} {'after/before':>12} {'of minima':>10}")
    with Revisions(ref) as revs:
        for model in CPU_MODELS:
            for k in ks:
                for what, factory in (("state", "bench_spectral:state_case"),
                                      ("loop", "bench_spectral:folded_loop_case")):
                    t = revs.interleave(factory, {"model": model, "k": k}, repeats)
                    b, a = statistics.median(t["before"]), statistics.median(t["after"])
                    lo = min(t["after"]) / min(t["before"])  # the least disturbed block of each side
                    print(f"{CPU_LABELS[model]:22} {k:2d} {what:>10} {fmt(b):>11} {fmt(a):>11} {a / b:12.2f} {lo:10.2f}",
                          flush=True)
        print(f"(before = {revs.sha[:10]})")


def bench_cuda(ks, repeats, sets, skip_svd):
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"medians of {repeats}")
    all_sets = {
        "ResNet-18-CIFAR": (resnet18_shapes, torch.float32),
        "ResNet-50": (resnet50_shapes, torch.float32),
        "ViT-B/16": (vit_b16_shapes, torch.float32),
        "1.2B transformer": (transformer_1b_shapes, torch.bfloat16),
    }
    rows = []
    for name in sets:
        shape_fn, dtype = all_sets[name]
        shapes = shape_fn()
        model = linear_stack(shapes, dtype, device)
        weights = [lin.weight.detach() for lin in model]
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        floor = nbytes / bw
        if name == "1.2B transformer" or skip_svd:
            t_svd = None
        else:
            t_svd = time_cuda(svdvals_all(weights, device), repeats=1, warmup=1)
        for k in ks:
            with torch.no_grad():
                fused = fused_step(weights, k, device)
                t_fused = time_cuda(fused, repeats)
                t_fused_graph = time_cuda(as_graph(fused), repeats)
                loop = per_layer_loop(weights, k, device, dtype)
                t_loop = time_cuda(loop, repeats)
                t_loop_graph = time_cuda(as_graph(loop), repeats)
                try:
                    t_state = time_cuda(state_step(model, k, "auto"), repeats)
                except Exception as exc:  # noqa: BLE001 - report, keep the other figures
                    print(f"  SpectralState.step failed on {name}: {exc!r}")
                    t_state = None
            rows.append(dict(set=name, params=n_params(shapes), dtype=str(dtype).removeprefix("torch."), k=k,
                             fused=t_fused, fused_graph=t_fused_graph, state=t_state, loop=t_loop,
                             loop_graph=t_loop_graph, svdvals=t_svd, floor=floor))
            r = rows[-1]
            print(f"{name:17} {r['params'] / 1e6:8.1f}M {r['dtype']:8} k={k}: fused {fmt(t_fused)} "
                  f"(graph {fmt(t_fused_graph)}, {t_fused_graph / floor:.2f}× floor {fmt(floor)}); "
                  f"state.step {fmt(t_state)}; loop {fmt(t_loop)} (graph {fmt(t_loop_graph)}, "
                  f"{t_loop_graph / t_fused_graph:.1f}× fused graph); "
                  f"svdvals {fmt(t_svd) if t_svd is not None else (SVDVALS_1B_QUOTE if '1.2B' in name else '—')}")
        del model, weights
        torch.cuda.empty_cache()
    k1 = {r["set"]: r for r in rows if r["k"] == 1}
    for r in rows:
        if r["k"] != 1 and r["set"] in k1:
            print(f"{r['set']}: k={r['k']} / k=1 fused graph time = {r['fused_graph'] / k1[r['set']]['fused_graph']:.2f}")
    return rows, bw


def markdown_rows(rows, bw) -> str:
    date = datetime.date.today().isoformat()
    card = torch.cuda.get_device_name()
    out = []
    for r in rows:
        svd = fmt(r["svdvals"]) if r["svdvals"] is not None else ("~18 s (quoted)" if "1.2B" in r["set"] else "—")
        out.append(
            f"| {date} | {card} | torch {torch.__version__} | {bw / 1e12:.2f} TB/s | {r['set']} "
            f"({r['params'] / 1e6:.1f}M {r['dtype']}) | {r['k']} | {fmt(r['fused'])} | {fmt(r['fused_graph'])} | "
            f"{fmt(r['state'])} | {fmt(r['loop'])} | {fmt(r['loop_graph'])} | {svd} | {fmt(r['floor'])} | "
            f"{r['fused_graph'] / r['floor']:.2f} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--k", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 30 on CPU, 50 on CUDA)")
    p.add_argument("--before", default=None, metavar="REF",
                   help="CPU: also time state.step of the package at git revision REF against the working tree")
    p.add_argument("--sets", nargs="+", default=["ResNet-18-CIFAR", "ResNet-50", "ViT-B/16", "1.2B transformer"],
                   help="CUDA weight sets to run")
    p.add_argument("--skip-svdvals", action="store_true", help="CUDA: leave out svdvals (slow)")
    p.add_argument("--markdown", default=None, help="CUDA: append result rows (markdown table) to this file")
    args = p.parse_args(argv)
    if any(k < 1 or k > 32 for k in args.k):
        p.error(f"--k values must lie in 1..32, got {args.k}")
    torch.manual_seed(0)
    if args.device == "cpu":
        bench_cpu(args.k, args.repeats or 30)
        if args.before:
            bench_before_after(args.before, args.k, args.repeats or 30)
        return
    if not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    rows, bw = bench_cuda(args.k, args.repeats or 50, args.sets, args.skip_svdvals)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(markdown_rows(rows, bw))


if __name__ == "__main__":
    main()
