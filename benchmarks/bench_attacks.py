"""PGD-10 throughput on the demo MLP (64-256-256-10), this library beside torchattacks, one run.

Prints images/s for L∞ and L2 PGD-10 (no random start), with the ratio
ours / torchattacks (fixed step ε/4). ``constant, early_stop=False`` is the
like-for-like row (fixed step, every example runs every step, as
torchattacks does); ``constant, early_stop=True`` shows what per-example
early stopping saves; ``apgd (default)`` is what ``pgd`` and
``robust_accuracy`` run by default (APGD's step-size schedule, early stop),
which costs one more gradient per run and some bookkeeping per step.

    python benchmarks/bench_attacks.py [--batch 512] [--repeats 5] [--epochs 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from robustcompress.attacks import pgd
from robustcompress.data import digits
from robustcompress.models import MLP


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def _rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_images / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    train, test = digits(seed=0, image=True)  # N×1×8×8: torchattacks' L2 attack wants images
    model = MLP(64, (256, 256), 10)
    _train(model, train.tensors[0], train.tensors[1], args.epochs)
    x = torch.cat([test.tensors[0]] * (args.batch // len(test) + 1))[: args.batch]
    y = torch.cat([test.tensors[1]] * (args.batch // len(test) + 1))[: args.batch]

    try:
        import torchattacks
    except ImportError:
        torchattacks = None
        print("torchattacks is not installed: showing this library's rows only")

    print(f"PGD-10 on MLP 64-256-256-10, CPU, batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"{'norm':>5} {'eps':>5} {'variant':>28} {'ours img/s':>11} {'torchattacks':>13} {'ratio':>6}")
    for norm, eps, cls_name in ((float("inf"), 0.1, "PGD"), (2.0, 1.0, "PGDL2")):
        theirs = None
        if torchattacks is not None:
            attack = getattr(torchattacks, cls_name)(model, eps=eps, alpha=eps / 4, steps=10, random_start=False)
            theirs = _rate(lambda: attack(x, y), len(x), args.repeats)
        variants = (("constant", False, eps / 4), ("constant", True, eps / 4), ("apgd", True, None))
        for schedule, early, step in variants:
            ours = _rate(lambda: pgd(model, x, y, eps, norm, steps=10, step_size=step, random_start=False,
                                     early_stop=early, schedule=schedule), len(x), args.repeats)
            label = f"{schedule}, early_stop={early}" if schedule == "constant" else "apgd (default)"
            ta = f"{theirs:13.0f}" if theirs else f"{'-':>13}"
            ratio = f"{ours / theirs:6.2f}" if theirs else f"{'-':>6}"
            print(f"{'inf' if norm == float('inf') else 'l2':>5} {eps:5.2f} {label:>28} {ours:11.0f} {ta} {ratio}")


if __name__ == "__main__":
    main()
