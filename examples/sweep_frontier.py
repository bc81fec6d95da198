"""Sweep the compression strength, with and without the σ₁² penalty, and draw the frontier.

Three ways to compress the hidden layers of a digits MLP 64-w-w-10, each at
several strengths: group lasso (neurons), nuclear norm (rank) and explicit
low-rank layers (trained from scratch). Every point is trained twice: plain,
and with rc.SpectralNormPenalty guarding the sensitive directions. For each
model it records clean and PGD L∞ robust accuracy, how compressible it is
(the share of hidden-layer weights kept when each layer is cut to 99 % of its
energy, by rows or by rank, whichever keeps fewer) and K₂ = Π_l σ₁(W_l).

Results go to <out>/results.json and results.csv after every point; a rerun
skips the finished points, so an interrupted sweep resumes where it stopped
and a longer list of strengths only trains the new points.

    python examples/sweep_frontier.py --out runs/frontier
    python examples/sweep_frontier.py --out runs/frontier --ranks 32 16 8 4 2   # adds rank 2 only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import sys
import time

import torch
from torch import nn

import robustcompress as rc
from _digits_common import add_common_flags, device_of, fit, limited, scores
from robustcompress.metrics import rank_for_energy, rows_for_energy

# The settings a finished point depends on; a rerun with other values would mix incomparable points.
SETTINGS = ("epochs", "width", "lr", "eps", "attack_steps", "limit", "seed", "guard_strength")


def kept_fraction(model: nn.Module) -> float:
    """Share of hidden-layer weights kept when each layer keeps 99 % of its energy (rows or rank)."""
    kept = total = 0
    hidden = [m for m in model.modules() if isinstance(m, (nn.Linear, rc.LowRankLinear))][:-1]
    for layer in hidden:
        w = layer.weight.detach()
        m, n = w.shape
        by_rows = rows_for_energy(w, 0.99) * n
        by_rank = rank_for_energy(w, 0.99) * (m + n)
        kept += min(by_rows, by_rank, m * n)
        total += m * n
    return kept / total


def k2(model: nn.Module) -> float:
    """Π_l σ₁(W_l) over every linear layer: the Lipschitz bound K₂ of this ReLU chain (exact σ₁)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, rc.LowRankLinear))]
    return math.prod(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2).item() for m in layers)


def train_point(args: argparse.Namespace, method: str, value: float, guard: bool, train, device) -> nn.Module:
    torch.manual_seed(args.seed)
    model = rc.MLP(64, (args.width, args.width), 10)
    if method == "low-rank":
        model = rc.to_low_rank(model, int(value), from_weights=False)
    model = model.to(device)
    penalties: list[nn.Module] = []
    if method == "group-lasso":
        penalties.append(rc.GroupLassoPenalty(model, strength=value))
    elif method == "nuclear":
        penalties.append(rc.NuclearNormPenalty(model, strength=value))
    if guard:
        penalties.append(rc.SpectralNormPenalty(model, strength=args.guard_strength))
    return fit(model, train, args.epochs, args.lr, args.seed, penalties)


def plot(points: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colors = {"group-lasso": "tab:blue", "nuclear": "tab:orange", "low-rank": "tab:green"}
    for method, color in colors.items():
        for guard, style in ((False, "--o"), (True, "-s")):
            pts = sorted((p for p in points if p["method"] == method and p["guard"] == guard), key=lambda p: p["kept"])
            if not pts:
                continue
            label = f"{method}{' + σ₁² penalty' if guard else ''}"
            for ax, key in zip(axes, ("robust", "clean")):
                ax.plot([p["kept"] for p in pts], [p[key] for p in pts], style, color=color, label=label,
                        mfc=color if guard else "white")
    axes[0].set_ylabel("robust accuracy (PGD L∞)")
    axes[1].set_ylabel("clean accuracy")
    for ax in axes:
        ax.set_xlabel("weights kept at 99 % energy (share of hidden layers)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(out: pathlib.Path, settings: dict, points: list[dict]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"settings": settings, "points": points}, indent=2))
    os.replace(tmp, out / "results.json")  # a crash mid-write never loses the finished points
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p, out="runs/frontier")
    p.add_argument("--methods", nargs="+", default=["group-lasso", "nuclear", "low-rank"],
                   choices=["group-lasso", "nuclear", "low-rank"])
    p.add_argument("--lasso", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3], help="group lasso strengths")
    p.add_argument("--nuclear", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3], help="nuclear norm strengths")
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 32, 16, 8, 4], help="low-rank widths")
    p.add_argument("--guard-strength", type=float, default=3e-3, help="strength of the σ₁² penalty")
    args = p.parse_args()
    device = device_of(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in SETTINGS}

    points: list[dict] = []
    if (out / "results.json").exists():
        saved = json.loads((out / "results.json").read_text())
        if saved["settings"] != settings:
            sys.exit(f"error: {out / 'results.json'} was made with other settings {saved['settings']}; "
                     f"this run has {settings}. Use another --out, or the same settings to resume.")
        points = saved["points"]
    done = {p["key"] for p in points}

    train, test = rc.digits(seed=args.seed)
    train, test = limited(train, args.limit), limited(test, args.limit)
    grid = {"group-lasso": args.lasso, "nuclear": args.nuclear, "low-rank": args.ranks}
    for method in args.methods:
        for value in grid[method]:
            for guard in (False, True):
                key = f"{method}:{value:g}:{'guard' if guard else 'plain'}"
                if key in done:
                    print(f"skip {key} (done)")
                    continue
                t0 = time.time()
                model = train_point(args, method, value, guard, train, device)
                point = {"key": key, "method": method, "value": value, "guard": guard,
                         **scores(model, test, args.eps, args.attack_steps),
                         "kept": round(kept_fraction(model), 4), "k2": float(f"{k2(model):.4g}"),
                         "seconds": round(time.time() - t0, 1)}
                points.append(point)
                save(out, settings, points)
                print(json.dumps(point), flush=True)

    plot(points, out / "frontier.png")
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'} and {out / 'frontier.png'} ({len(points)} points)")


if __name__ == "__main__":
    main()
