"""Two CPU processes under DistributedDataParallel agree on penalties and parameters."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from robustcompress.optim import broadcast_state, wrap
from robustcompress.penalties import SpectralNormPenalty, TailEnergyPenalty
from robustcompress.spectral import SpectralState


def _worker(rank, world, init_file, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        state = SpectralState(model, k=3)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = wrap(torch.optim.SGD(ddp.parameters(), lr=0.1), ddp,
                   [SpectralNormPenalty(state, 0.05), TailEnergyPenalty(state, k=3, strength=0.01)])
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        values = []
        for _ in range(4):
            x, y = torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            values.append(opt.last_penalty)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        trained_state = [b.clone() for b in state.buffers()]
        # the broadcast path (used on CUDA) makes a diverged state equal to rank 0's
        if rank == 1:
            for b in state.buffers():
                b.add_(1)
        broadcast_state(state)
        torch.save({"values": torch.stack(values), "params": flat,
                    "trained_state": trained_state,
                    "state": [b.clone() for b in state.buffers()]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_rank_ddp_identical_penalties_and_parameters(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["values"], r1["values"]) and bool((r0["values"] > 0).all())
    assert torch.equal(r0["params"], r1["params"])
    assert all(torch.equal(a, b) for a, b in zip(r0["trained_state"], r1["trained_state"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["state"], r1["state"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["state"], r0["trained_state"]))
