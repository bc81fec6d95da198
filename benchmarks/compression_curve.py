"""Compression curves of the digits MLP, trained with and without a head penalty.

Run (not part of CI; about a minute on one CPU core)::

    python benchmarks/compression_curve.py
    python benchmarks/compression_curve.py --finetune-epochs 3 --plot-dir figures

Trains the MLP 64-256-256-10 (ReLU, Adam lr 1e-3, batch 64) twice on
scikit-learn digits, the same data order both times: plainly, and with the
head penalty ``λ Σ_l σ₁(W_l)²`` on the hidden layers
(:class:`robustcompress.penalties.SpectralNormPenalty`). Then, for each model,
:func:`robustcompress.compress.compression_curve` sweeps

* structured pruning (fraction of neurons removed per hidden layer), ranked by
  row norm (``l2``) and by the sensitivity-aware score (``sensitivity``);
* rank truncation under a global parameter budget (fraction of parameters kept),

optionally fine-tunes each compressed model (with the same penalty rebuilt on
the compressed model), and prints one markdown table: parameters kept, clean
accuracy and PGD L∞ (ε = 0.1 by default) robust accuracy on the test split.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from robustcompress.compress import compression_curve  # noqa: E402
from robustcompress.data import digits, loader  # noqa: E402
from robustcompress.models import MLP  # noqa: E402
from robustcompress.penalties import SpectralNormPenalty  # noqa: E402


def train(penalty_strength: float, epochs: int, seed: int, data) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MLP(64, (256, 256), 10)
    penalties = [SpectralNormPenalty(model, strength=penalty_strength)] if penalty_strength else []
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        for x, y in loader(data, batch_size=64, seed=seed + epoch):
            loss = F.cross_entropy(model(x), y) + sum(p() for p in penalties)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--strength", type=float, default=3e-3, help="σ₁² penalty strength of the penalised model")
    p.add_argument("--eps", type=float, default=0.1, help="PGD L∞ budget")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-dir", default=None, help="save one PNG per curve there")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train_ds, test_ds = digits(seed=0)
    sweeps = [("prune", "l2", [0.0, 0.25, 0.5, 0.75, 0.9]),
              ("prune", "sensitivity", [0.25, 0.5, 0.75, 0.9]),
              ("truncate", None, [1.0, 0.5, 0.25, 0.1, 0.05])]
    print(f"| training | method | level | params kept | clean | PGD L∞ ε={args.eps} |")
    print("|---|---|---|---|---|---|")
    for label, strength in (("plain", 0.0), (f"σ₁² penalty {args.strength:g}", args.strength)):
        start = time.perf_counter()
        model = train(strength, args.epochs, args.seed, train_ds)
        ft = {}
        if args.finetune_epochs and strength:
            ft = {"penalties": lambda m, s=strength: [SpectralNormPenalty(m, strength=s)]}
        for method, importance, levels in sweeps:
            plot = None
            if args.plot_dir:
                pathlib.Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
                tag = "plain" if not strength else "penalty"
                plot = pathlib.Path(args.plot_dir) / f"curve_{tag}_{method}_{importance or 'budget'}.png"
            rows = compression_curve(
                model, test_ds, levels=levels, method=method, importance=importance or "l2",
                train_data=train_ds, finetune_epochs=args.finetune_epochs, finetune_kwargs=ft,
                eps_linf=args.eps, pgd_steps=args.pgd_steps, plot=plot, seed=args.seed)
            name = f"prune ({importance})" if method == "prune" else "truncate (budget)"
            for r in rows:
                print(f"| {label} | {name} | {r['level']:g} | {r['params_kept']:.3f} | {r['clean_acc']:.3f} | "
                      f"{r['robust_acc_linf']:.3f} |")
        print(f"<!-- {label}: {time.perf_counter() - start:.1f} s -->")


if __name__ == "__main__":
    main()
