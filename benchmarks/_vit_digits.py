"""A small vision transformer for the 8×8 digits, for finding (g). Benchmark code, not part of the package.

Every projection is its own ``nn.Linear`` (``q``, ``k``, ``v``, ``o`` in each
attention block, ``fc1`` / ``fc2`` in each MLP block, plus the patch embedding
and the head), so the library tracks and factorises them as Linear layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention ``o(softmax(q kᵀ/√d) v)`` with separate q/k/v/o projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Expected dim divisible by heads, but got dim={dim}, heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(n, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + fc2(GELU(fc1(LN(x))))``."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViTDigits(nn.Module):
    """ViT on flat 8×8 digits ``(N, 64)`` in ``[0, 1]``: ``patch × patch`` patches, mean-pooled tokens, linear head.

    Example:
        >>> ViTDigits()(torch.rand(3, 64)).shape
        torch.Size([3, 10])
    """

    def __init__(self, patch: int = 2, dim: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128,
                 classes: int = 10) -> None:
        super().__init__()
        if 8 % patch:
            raise ValueError(f"Expected patch to divide 8, but got patch={patch}")
        self.patch = patch
        tokens = (8 // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p = x.shape[0], self.patch
        g = 8 // p
        # (N, 64) → (N, g, p, g, p) → (N, g·g tokens, p·p pixels)
        z = x.reshape(n, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(n, g * g, p * p)
        z = self.embed(z) + self.pos
        for blk in self.blocks:
            z = blk(z)
        return self.head(self.norm(z).mean(1))


#: the projection kinds and the attribute that names them in a module path
KINDS = ("q", "k", "v", "o", "fc1", "fc2")


def kind_of(name: str) -> str | None:
    """The projection kind of a module name (``blocks.0.attn.q`` → ``q``), None for embed / head."""
    last = name.rsplit(".", 1)[-1]
    return last if last in KINDS else None
