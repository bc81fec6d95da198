"""Fine-tune a compressed pretrained network on a new task: the vulnerability comes along.

Pretrain an MLP on digits 0–4, compress its hidden layers to low rank
(truncated SVD, then a short recovery on the same task), and fine-tune every
layer, with a fresh head, on digits 5–9. Compare with the dense network
fine-tuned the same way, and see what the σ₁² penalty does when it is added
during fine-tuning only, or during pretraining only.

    python examples/transfer_learning.py --rank 8 --strength 3e-3
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from torch import nn
from torch.utils.data import TensorDataset

import robustcompress as rc
from _digits_common import add_common_flags, device_of, fit, limited, scores


def split_by_label(ds: TensorDataset, labels: range) -> TensorDataset:
    """The examples whose label is in ``labels``, relabelled 0..len(labels)-1."""
    x, y = ds.tensors
    keep = (y >= labels.start) & (y < labels.stop)
    return TensorDataset(x[keep], y[keep] - labels.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p, out="runs/transfer")
    p.add_argument("--rank", type=int, default=8, help="rank of the compressed hidden layers")
    p.add_argument("--strength", type=float, default=3e-3, help="strength of the σ₁² penalty")
    p.add_argument("--finetune-epochs", type=int, default=20)
    args = p.parse_args()
    device = device_of(args.device)
    torch.manual_seed(args.seed)

    train, test = rc.digits(seed=args.seed)
    train, test = limited(train, args.limit), limited(test, args.limit)
    src_train, dst_train = split_by_label(train, range(0, 5)), split_by_label(train, range(5, 10))
    dst_test = split_by_label(test, range(5, 10))

    def with_penalty(model: nn.Module, on: bool) -> list[nn.Module]:
        return [rc.SpectralNormPenalty(model, strength=args.strength)] if on else []

    def pretrain(rank: int | None, penalty: bool) -> nn.Module:
        model = rc.MLP(64, (args.width, args.width), 5).to(device)
        fit(model, src_train, args.epochs, args.lr, args.seed, with_penalty(model, penalty))
        if rank is None:
            return model
        small = rc.to_low_rank(model, rank)  # best rank-r factors of each hidden layer (Eckart–Young)
        return fit(small, src_train, max(1, args.epochs // 4), args.lr, args.seed, with_penalty(small, penalty))

    def finetune(model: nn.Module, penalty: bool) -> nn.Module:
        model.head.reset_parameters()  # a fresh head for the new classes (5 of them here too)
        return fit(model, dst_train, args.finetune_epochs, args.lr, args.seed + 1, with_penalty(model, penalty))

    runs = {
        "dense → fine-tune": (None, False, False),
        f"rank {args.rank} → fine-tune": (args.rank, False, False),
        f"rank {args.rank} → fine-tune with penalty": (args.rank, False, True),
        f"rank {args.rank} with penalty → fine-tune": (args.rank, True, False),
    }
    results = {}
    print(f"{'pretrained on 0–4, fine-tuned on 5–9':44s} clean  robust (PGD L∞ ε={args.eps})")
    for name, (rank, pre_penalty, ft_penalty) in runs.items():
        model = finetune(pretrain(rank, pre_penalty), ft_penalty)
        results[name] = scores(model, dst_test, args.eps, args.attack_steps)
        print(f"{name:44s} {results[name]['clean']:.3f}  {results[name]['robust']:.3f}", flush=True)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out / 'transfer.json'}")


if __name__ == "__main__":
    main()
