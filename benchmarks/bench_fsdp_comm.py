"""Bytes communicated per spectral-state iteration under FSDP2, against the size of the weights.

Two gloo processes on CPU; an MLP whose Linear layers are sharded by
``fully_shard`` on dim 0 (the operator's rows). Every collective issued inside
``SpectralState.step()`` is intercepted at the dispatcher (the same level
``CommDebugMode`` counts at) and its tensor bytes summed::

    python benchmarks/bench_fsdp_comm.py [--widths 512 2048 2048 512] [--k 1 4] [--lora-rank 8]

Goal: ``n·k`` floats per layer and iteration (the replicated block ``Y``, plus
one scalar ``‖W_r‖_F²``), not the ``m·n`` of gathering the weight. Printed per
``k``: the bytes one rank hands to collectives per iteration, the goal
``Σ (n·k + 1)`` floats, the bytes of all the weights, and the ratios
measured / goal (1.00 means nothing but the goal travels) and measured /
weights (what a gathering implementation would at least move is ≥ 1/2 of the
weights per rank on 2 ranks).

With ``--lora-rank r`` (needs peft) every Linear carries a PEFT LoRA adapter of
rank ``r`` whose base and factors are sharded, and each measured iteration is a
training step (the weights change before it). Its goal per layer is
``n·k + 3`` floats (``Z`` and ``‖W₀‖², ‖B‖², ‖A‖²``) plus twice
``2·r·k + r²`` (``A V``, ``Bᵀ W₀ V`` and ``BᵀB`` before the update, for the
new ``V`` after it): three all-reduces per step.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class _CollectiveBytes(TorchDispatchMode):
    """Sums the bytes of the tensors passed to c10d collectives and counts the calls by name."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func.name().split("::")[-1].split(".")[0]
            self.calls[name] = self.calls.get(name, 0) + 1
            flat = list(args) + list(kwargs.values())
            tensors = []
            for a in flat:
                if isinstance(a, torch.Tensor):
                    tensors.append(a)
                elif isinstance(a, (list, tuple)):
                    tensors.extend(t for t in a if isinstance(t, torch.Tensor))
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return func(*args, **kwargs)


def _state_names(model: nn.Module, names: list[str]) -> list[str]:
    """The state's names of the Linear layers ``names`` (prefixed inside a PEFT model)."""
    return [f"base_model.model.{n}" for n in names] if hasattr(model, "base_model") else names


def _worker(rank: int, world: int, init_file: str, widths: list[int], ks: list[int], iters: int,
            lora_rank: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        from robustcompress.spectral import SpectralState

        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        shapes = [tuple(m.weight.shape) for m in model if isinstance(m, nn.Linear)]
        names = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
        if lora_rank:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora_rank, target_modules=names))
            inner = model.base_model.model
        else:
            inner = model
        for name in names:
            fully_shard(inner.get_submodule(name))
        fully_shard(model)
        elt = torch.finfo(torch.float32).bits // 8
        r = lora_rank
        weight_bytes = sum(m * n + r * (m + n) for m, n in shapes) * elt
        rows = []
        for k in ks:
            state = SpectralState(model, k=k, init_iter=1, layers=_state_names(model, names))
            counter = _CollectiveBytes()
            for _ in range(iters):
                if lora_rank:
                    with torch.no_grad():  # a training step changed the weights: A·V is reduced anew
                        for p in model.parameters():
                            p.mul_(1.0)
                with counter:
                    state.step()
            per_iter = counter.bytes / iters
            goal = sum(n * min(k, m, n) + 1 + (2 + 2 * (2 * r * min(k, m, n) + r * r) if r else 0)
                       for m, n in shapes) * elt
            rows.append((k, per_iter, goal, weight_bytes, {c: v // iters for c, v in counter.calls.items()}))
        if rank == 0:
            lora = f", LoRA rank {r} on every layer (one training step per iteration)" if r else ""
            print(f"row-sharded MLP {'-'.join(map(str, widths))} on {world} gloo processes, float32, "
                  f"layers {shapes}{lora}")
            print(f"{'k':>3} {'bytes/iter':>12} {'goal':>12} {'weights':>13} "
                  f"{'measured/goal':>14} {'measured/weights':>17}  collectives/iter")
            for k, per_iter, goal, wb, calls in rows:
                print(f"{k:>3} {per_iter:>12.0f} {goal:>12d} {wb:>13d} {per_iter / goal:>14.2f} "
                      f"{per_iter / wb:>17.5f}  {calls}")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2048, 2048, 512])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=0, help="wrap every Linear in a PEFT LoRA of this rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), args.widths, args.k, args.iters, args.lora_rank),
                 nprocs=2, join=True)


if __name__ == "__main__":
    main()
