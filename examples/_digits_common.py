"""Flags, training loop and scores shared by the digits examples (sweep_frontier.py, transfer_learning.py)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import robustcompress as rc


def add_common_flags(p: argparse.ArgumentParser, out: str) -> argparse.ArgumentParser:
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--width", type=int, default=256, help="hidden width of the MLP 64-w-w-10")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--eps", type=float, default=0.1, help="PGD L∞ budget (pixels in [0, 1])")
    p.add_argument("--attack-steps", type=int, default=20)
    p.add_argument("--limit", type=int, default=0, help="use only the first N train and test images (0: all)")
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    return p


def device_of(flag: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if flag == "auto" else flag)


def limited(ds: TensorDataset, limit: int) -> TensorDataset:
    return TensorDataset(*(t[:limit] for t in ds.tensors)) if limit else ds


def fit(model: nn.Module, train: TensorDataset, epochs: int, lr: float, seed: int,
        penalties: list[nn.Module] = ()) -> nn.Module:
    """Adam on cross-entropy, batches of 64; the penalties are added by the optimizer wrapper."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if penalties:
        opt = rc.wrap(opt, model, penalties=list(penalties))
    device = next(model.parameters()).device
    model.train()
    for epoch in range(epochs):
        for x, y in rc.loader(train, batch_size=64, seed=seed + epoch):
            opt.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
    return model.eval()


def scores(model: nn.Module, test: TensorDataset, eps: float, steps: int) -> dict[str, float]:
    """Clean accuracy and PGD L∞ robust accuracy (the same seeded attack for every model)."""
    return {"clean": round(rc.accuracy(model, test), 4),
            "robust": round(rc.robust_accuracy(model, test, "pgd", eps=eps, norm="linf", steps=steps, seed=0), 4)}
