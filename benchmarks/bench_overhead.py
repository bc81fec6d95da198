"""Training-step overhead of penalties and trackers, measured side by side in one run.

CPU (default)::

    python benchmarks/bench_overhead.py

* MLP 784-1024-1024-1024-10, batch 256, synthetic data, SGD: plain vs the
  default penalties (``default_penalties``: σ₁² on hidden layers) + a tracker
  (``every=100``) — goal ratio ≤ 1.10 — and vs the paper-style exact
  nuclear norm (``svdvals`` of every hidden layer, every step) for contrast;
* the digits MLP 64-256-256-10 (batch 128), plain vs default + tracker (reported);
* a BERT-base-shaped encoder (hidden 768, 12 heads, FFN 3072) with 4 layers,
  batch 8 × 128 synthetic tokens, AdamW: plain vs default penalties + tracker
  (σ₁² on every Q/K/V/O projection and FFN layer, found through the layer
  registry) — goal ratio ≤ 1.10. Needs ``transformers``; ``--only transformer``
  runs this row alone.

CUDA (``--device cuda``), timed with CUDA events:

* ResNet-18 on CIFAR-shaped inputs (batch 256, synthetic, bf16 autocast, SGD):
  plain vs default penalties + tracker vs exact ``svdvals`` nuclear norm;
* FCN 3072-2000×4-10 (Adam, batch 100): plain vs nuclear-norm surrogate
  (top-k bound) vs tail energy.

Configurations are interleaved (round robin) and the median step time is
reported, so machine noise hits every configuration alike.

``--before REF`` (CPU) also times the MLP rows' plain and penalised steps with
the package at git revision ``REF`` against the working tree, each in its own
single-thread worker process, in alternation (``_side_by_side.py``): the
overhead ratio of each revision and the after/before ratio of each step (the
plain step, which runs no package code but the model, is the noise control)::

    python benchmarks/bench_overhead.py --only mlp --before 0b68a57
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustcompress.hooks import track
from robustcompress.models import MLP, resnet18
from robustcompress.optim import wrap
from robustcompress.penalties import NuclearNormPenalty, TailEnergyPenalty, default_penalties
from robustcompress.spectral import SpectralState


def make_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              amp: bool) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def timer(device: torch.device) -> Callable[[Callable[[], None], int], float]:
    if device.type == "cuda":
        def run(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000 / n
    else:
        def run(fn, n):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n
    return run


def compare(title: str, configs: dict[str, Callable[[], None]], device: torch.device, steps: int,
            rounds: int, warmup: int = 2) -> dict[str, float]:
    run = timer(device)
    for fn in configs.values():
        run(fn, warmup)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for k, fn in configs.items():
            times[k].append(run(fn, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = next(iter(med.values()))
    print(f"\n{title}")
    for k, t in med.items():
        print(f"  {k:<44s} {t * 1e3:9.2f} ms/step   ratio {t / base:6.3f}")
    return med


def mlp_configs(widths, in_features, batch, device, nuclear: bool, lr=0.01):
    configs = {}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, in_features, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    torch.manual_seed(0)
    plain = MLP(in_features, widths, 10).to(device)
    configs["plain"] = make_step(plain, torch.optim.SGD(plain.parameters(), lr=lr), x, y, False)
    torch.manual_seed(0)
    m = MLP(in_features, widths, 10).to(device)
    opt = wrap(torch.optim.SGD(m.parameters(), lr=lr), m, default_penalties(m))
    track(m, every=100)
    configs["default penalties + tracker(every=100)"] = make_step(m, opt, x, y, False)
    if nuclear:
        torch.manual_seed(0)
        n = MLP(in_features, widths, 10).to(device)
        opt = wrap(torch.optim.SGD(n.parameters(), lr=lr), n, [NuclearNormPenalty(n, 1e-5, method="exact")])
        configs["nuclear norm, exact svdvals every step"] = make_step(n, opt, x, y, False)
    return configs


def mlp_case(config: str, widths: list[int], in_features: int, batch: int):
    """One MLP row's ``"plain"`` or ``"penalised"`` CPU step: a factory for the before/after timing workers."""
    configs = mlp_configs(tuple(widths), in_features, batch, torch.device("cpu"), nuclear=False)
    return configs["plain" if config == "plain" else "default penalties + tracker(every=100)"]


def before_after(args) -> None:
    from _side_by_side import Revisions

    rows = (("MLP 784-1024-1024-1024-10, batch 256", [1024, 1024, 1024], 784, 256, args.steps),
            ("digits MLP 64-256-256-10, batch 128", [256, 256], 64, 128, args.steps * 4))
    print(f"\nBefore/after: the package at {args.before} vs the working tree, one thread per worker, medians of "
          f"{args.rounds * 4} interleaved blocks of steps")
    with Revisions(args.before) as revs:
        for title, widths, n_in, batch, steps in rows:
            med = {}
            for config in ("plain", "penalised"):
                t = revs.interleave("bench_overhead:mlp_case", {"config": config, "widths": widths,
                                                                "in_features": n_in, "batch": batch},
                                    repeats=args.rounds * 4, calls=steps)
                med[config] = {side: statistics.median(v) for side, v in t.items()}
                med[config].update({f"min_{side}": min(v) for side, v in t.items()})
            print(f"  {title}")
            for config, m in med.items():
                print(f"    {config:<10s} before {m['before'] * 1e3:8.2f} ms  after {m['after'] * 1e3:8.2f} ms  "
                      f"after/before {m['after'] / m['before']:6.3f} (of minima {m['min_after'] / m['min_before']:6.3f})")
            for side in ("before", "after"):
                print(f"    overhead ratio (penalised / plain), {side}: {med['penalised'][side] / med['plain'][side]:.3f}")
        print(f"  (before = {revs.sha[:10]})")


def transformer_configs(device, batch=8, length=128, layers=4, lr=1e-4):
    import warnings

    import transformers

    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                                  intermediate_size=3072, vocab_size=30522, max_position_embeddings=512, num_labels=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, length), generator=g).to(device)
    y = torch.randint(0, 2, (batch,), generator=g).to(device)

    def step_of(model, opt):
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            model(input_ids=x, labels=y).loss.backward()
            opt.step()
        return step

    configs = {}
    torch.manual_seed(0)
    plain = transformers.BertForSequenceClassification(cfg).to(device)
    configs["plain"] = step_of(plain, torch.optim.AdamW(plain.parameters(), lr=lr))
    torch.manual_seed(0)
    m = transformers.BertForSequenceClassification(cfg).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the embeddings left out, listed once
        opt = wrap(torch.optim.AdamW(m.parameters(), lr=lr), m, default_penalties(m))
        track(m, every=100)
    configs["default penalties + tracker(every=100)"] = step_of(m, opt)
    return configs


def transformer_row(args) -> None:
    dev = torch.device("cpu")
    med = compare("BERT-base-shaped encoder, 4 layers, batch 8 x 128 tokens, AdamW (CPU)",
                  transformer_configs(dev), dev, max(1, args.steps // 5), args.rounds, warmup=1)
    ratio = med["default penalties + tracker(every=100)"] / med["plain"]
    print(f"  -> default penalties + tracker overhead ratio {ratio:.3f} (goal <= 1.10)")


def cpu(args) -> None:
    if args.only == "transformer":
        transformer_row(args)
        return
    dev = torch.device("cpu")
    med = compare("MLP 784-1024-1024-1024-10, batch 256, SGD (CPU)",
                  mlp_configs((1024, 1024, 1024), 784, 256, dev, nuclear=True), dev, args.steps, args.rounds)
    ratio = med["default penalties + tracker(every=100)"] / med["plain"]
    print(f"  -> default penalties + tracker overhead ratio {ratio:.3f} (goal <= 1.10)")
    compare("digits MLP 64-256-256-10, batch 128, SGD (CPU)",
            mlp_configs((256, 256), 64, 128, dev, nuclear=False), dev, args.steps * 4, args.rounds)
    if args.only != "mlp":
        transformer_row(args)


def cuda(args) -> None:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (256,), generator=g).to(dev)
    configs = {}
    torch.manual_seed(0)
    m = resnet18().to(dev)
    configs["plain"] = make_step(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), x, y, True)
    torch.manual_seed(0)
    m = resnet18().to(dev)
    opt = wrap(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), m, default_penalties(m))
    track(m, every=100)
    configs["default penalties + tracker(every=100)"] = make_step(m, opt, x, y, True)
    torch.manual_seed(0)
    m = resnet18().to(dev)
    opt = wrap(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), m,
               [NuclearNormPenalty(m, 1e-5, method="exact")])
    configs["nuclear norm, exact svdvals every step"] = make_step(m, opt, x, y, True)
    compare("ResNet-18, CIFAR-shaped, batch 256, bf16 autocast, SGD (CUDA)", configs, dev, args.steps, args.rounds)

    x = torch.rand(100, 3072, generator=g).to(dev)
    y = torch.randint(0, 10, (100,), generator=g).to(dev)
    configs = {}
    widths = (2000,) * 4
    torch.manual_seed(0)
    m = MLP(3072, widths, 10).to(dev)
    configs["plain"] = make_step(m, torch.optim.Adam(m.parameters(), lr=1e-3), x, y, False)
    for label, make in (("nuclear norm, top-k bound (k=8)", lambda s: NuclearNormPenalty(s, 1e-5, k=8, method="bound")),
                        ("tail energy (k=8)", lambda s: TailEnergyPenalty(s, k=8, strength=1e-5)),
                        ("nuclear norm, exact svdvals every step", lambda s: NuclearNormPenalty(s, 1e-5, method="exact"))):
        torch.manual_seed(0)
        m = MLP(3072, widths, 10).to(dev)
        state = SpectralState(m, k=8)
        opt = wrap(torch.optim.Adam(m.parameters(), lr=1e-3), m, [make(state)])
        configs[label] = make_step(m, opt, x, y, False)
    compare("FCN 3072-2000x4-10, batch 100, Adam (CUDA)", configs, dev, args.steps, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing block")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing blocks per configuration")
    parser.add_argument("--only", choices=("all", "mlp", "transformer"), default="all",
                        help="CPU: run only the MLP rows or only the transformer row")
    parser.add_argument("--before", default=None, metavar="REF",
                        help="CPU: also time the MLP rows with the package at git revision REF (see above)")
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        cuda(args)
    else:
        cpu(args)
        if args.before:
            before_after(args)


if __name__ == "__main__":
    main()
