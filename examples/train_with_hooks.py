"""Add robustcompress to a training loop you already have: three lines.

    penalty = rc.SpectralNormPenalty(model, strength=3e-3)     # 1. a loss term on the sensitive directions
    opt = rc.wrap(opt, model, penalties=[penalty])             # 2. the optimizer adds its gradient in step()
    tracker = rc.track(model, every=50, sink="track.jsonl")    # 3. compressibility, logged while training

Everything else stays as it was: the same loss, backward and step. Here the
loop trains a digits MLP whose hidden layers are rank 8 (compressible by
construction, and therefore sensitive); run it with --strength 0 to see the
same model without the penalty.

    python examples/train_with_hooks.py
    python examples/train_with_hooks.py --strength 0
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
import torch.nn.functional as F

import robustcompress as rc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--rank", type=int, default=8, help="rank of the hidden layers (0: dense)")
    p.add_argument("--strength", type=float, default=3e-3, help="strength of the σ₁² penalty (0: off)")
    p.add_argument("--every", type=int, default=50, help="track compressibility every N steps")
    p.add_argument("--eps", type=float, default=0.1, help="PGD L∞ budget for the final evaluation")
    p.add_argument("--limit", type=int, default=0, help="use only the first N train and test images (0: all)")
    p.add_argument("--out", default="runs/hooks", help="output folder (track.jsonl)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, test = rc.digits(seed=args.seed)
    if args.limit:
        train, test = (torch.utils.data.TensorDataset(*(t[: args.limit] for t in ds.tensors)) for ds in (train, test))
    model = rc.MLP(64, (256, 256), 10)
    if args.rank:
        model = rc.to_low_rank(model, args.rank, from_weights=False)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    (out / "track.jsonl").unlink(missing_ok=True)  # the tracker appends
    # --- the three lines ----------------------------------------------------------
    penalty = rc.SpectralNormPenalty(model, strength=args.strength)
    opt = rc.wrap(opt, model, penalties=[penalty])
    tracker = rc.track(model, every=args.every, sink=out / "track.jsonl")
    # -------------------------------------------------------------------------------

    for epoch in range(args.epochs):  # the loop you already had
        model.train()
        for x, y in rc.loader(train, batch_size=64, seed=args.seed + epoch):
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  penalty {penalty.value or 0:.4f}")

    tracker.remove()
    records = [json.loads(line) for line in (out / "track.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in records)
    final = {(r["layer"], r["metric"]): r["value"] for r in records if r["step"] == last}
    for layer in dict.fromkeys(layer for layer, _ in final):
        print(f"step {last}, layer {layer}: σ₁ {final[layer, 'sigma_1']:.2f}, "
              f"weight stable rank {final[layer, 'weight_stable_rank']:.2f}, "
              f"output effective rank {final[layer, 'effective_rank']:.1f}")
    robust = rc.robust_accuracy(model, test, "pgd", eps=args.eps, norm="linf", steps=20, seed=0)
    print(f"clean accuracy {rc.accuracy(model, test):.3f}, PGD L∞ ε={args.eps} robust accuracy {robust:.3f}")
    print(f"compressibility log: {out / 'track.jsonl'}")


if __name__ == "__main__":
    main()
