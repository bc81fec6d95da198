"""FSDP2 (``fully_shard``, DTensor weights): the spectral state iterates local shards, never gathers a weight.

The sharded math is checked in one process against the unsharded state (ranks
simulated by splitting the operator's rows); two gloo processes then check
convergence, communication, refusals, checkpoints and training against an
unsharded run on the same global batches.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from robustcompress.penalties import SpectralNormPenalty, TailEnergyPenalty, default_penalties
from robustcompress.spectral import SpectralState
from robustcompress.spectral.sharded import factor_products, factor_terms, local_products, ritz_update

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# ----------------------------------------------------------------------------- one process
def _split(m: int, parts: int, rng: torch.Generator) -> list[int]:
    """Row counts of ``parts`` ranks summing to m, some of them possibly 0."""
    cuts = sorted(torch.randint(0, m + 1, (parts - 1,), generator=rng).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [m])]


@given(m=st.integers(1, 9), n=st.integers(1, 9), k=st.integers(1, 3), ranks=st.integers(1, 3),
       cols=st.booleans(), seed=st.integers(0, 2**16))
def test_sharded_iteration_is_the_unsharded_iteration(m, n, k, ranks, cols, seed):
    """Row blocks of A (some empty), Z summed over them: the state's own iteration and residuals, to rounding.

    Column-sharded weights iterate Wᵀ: the unsharded state of a layer whose
    weight is Wᵀ, with U and V swapped.
    """
    rng = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=rng, dtype=torch.float64)
    a = w.T if cols else w  # the iterated operator, rows sharded
    layer = nn.Linear(a.shape[1], a.shape[0], bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(a)
    ref = SpectralState(nn.Sequential(layer), k=k, init_iter=0, seed=seed)
    kk = ref.k_of("0")
    b = ref.layers["0"].V.clone()
    c = ref.layers["0"].U.clone()
    s, r = torch.zeros(kk, dtype=torch.float64), torch.zeros(kk, dtype=torch.float64)
    center, radius = torch.zeros(kk, dtype=torch.float64), torch.zeros(kk, dtype=torch.float64)
    sizes = _split(a.shape[0], ranks, rng)
    for _ in range(6):
        ref.step()
        parts = [local_products(a_r, b) for a_r in a.split(sizes)]
        z = sum(p[1] for p in parts)
        f2 = sum(p[2] for p in parts)
        cs = list(c.split(sizes))
        b0 = b.clone()
        for (p, _, _), c_r in zip(parts, cs):
            bb = b0.clone()  # every rank starts from the same replicated block
            assert bool(ritz_update(p, z, bb, c_r, s, r, center, radius))
        b = bb
        c = torch.cat(cs)
    u_ref, v_ref, s_ref = ref.layers["0"].U, ref.layers["0"].V, ref.layers["0"].S
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f2, a.square().sum(), rtol=1e-12, atol=0)
    # The residual intervals, from Z and B only, are the unsharded state's.
    torch.testing.assert_close(center, ref.layers["0"].C, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(radius, ref.layers["0"].R, rtol=1e-6, atol=1e-9)
    # Eigenvector signs are arbitrary for k > 1: compare each direction's u vᵀ.
    live = s_ref > 1e-8 * s_ref[0]
    for j in torch.nonzero(live).flatten().tolist():
        torch.testing.assert_close(torch.outer(c[:, j], b[:, j]), torch.outer(u_ref[:, j], v_ref[:, j]),
                                   rtol=1e-8, atol=1e-10)
        # the cached value c_jᵀ A b_j is the product the unsharded state evaluates
        torch.testing.assert_close(r[j], c[:, j] @ a @ b[:, j], rtol=1e-10, atol=1e-12)


@given(m=st.integers(1, 8), n=st.integers(1, 8), r=st.integers(1, 4), k=st.integers(1, 3),
       ranks=st.integers(1, 3), lora=st.booleans(), seed=st.integers(0, 2**16))
def test_sharded_factor_products_are_the_dense_products(m, n, r, k, ranks, lora, seed):
    """W₀, B split by rows and A by r (independently, some ranks empty): the summed terms give
    M V, Bᵀ M V and MᵀM V of the dense M = W₀ + s·B·A (or B·A)."""
    rng = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=rng, dtype=torch.float64) if lora else None
    a = torch.randn(r, n, generator=rng, dtype=torch.float64)
    b = torch.randn(m, r, generator=rng, dtype=torch.float64)
    scale = 0.7 if lora else 1.0
    dense = (w0 if lora else 0) + scale * b @ a
    v = torch.randn(n, k, generator=rng, dtype=torch.float64)
    rows, chunks = _split(m, ranks, rng), _split(r, ranks, rng)
    starts_m = [sum(rows[:i]) for i in range(ranks)]
    starts_r = [sum(chunks[:i]) for i in range(ranks)]
    local = [(None if w0 is None else w0[lo:lo + mr], b[lo:lo + mr], a[lc:lc + rc], (lc, lc + rc))
             for lo, mr, lc, rc in zip(starts_m, rows, starts_r, chunks)]
    terms = [factor_terms(w, b_r, a_c, v, span, r) for w, b_r, a_c, span in local]
    av, h, g = (sum(t[i] for t in terms) for i in range(3))
    torch.testing.assert_close(av, a @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, b.T @ b, rtol=1e-12, atol=1e-12)
    outs = [factor_products(w, b_r, a_c, v, span, av, h, g, scale) for w, b_r, a_c, span in local]
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), dense @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum(o[1] + o[2] for o in outs), dense.T @ dense @ v, rtol=1e-10, atol=1e-9)
    for o in outs:  # BᵀP is replicated: every rank computes the same numbers
        torch.testing.assert_close(o[3], b.T @ dense @ v, rtol=1e-10, atol=1e-9)
        assert torch.equal(o[3], outs[0][3])


def test_nonfinite_rows_leave_the_block_unchanged():
    a = torch.randn(5, 4, dtype=torch.float64)
    b = torch.linalg.qr(torch.randn(4, 2, dtype=torch.float64))[0]
    c, s, r = torch.zeros(5, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    a[2, 1] = float("nan")
    p, z, _ = local_products(a, b)
    before = (b.clone(), c.clone(), s.clone())
    assert not bool(ritz_update(p, z, b, c, s, r))
    assert all(torch.equal(x, y) for x, y in zip(before, (b, c, s)))


# ----------------------------------------------------------------------------- two processes
def _spectrum_weight(m: int, n: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A weight with σ_j = 3·2^-j: σ₁/σ₂ = σ₂/σ₃ = 2."""
    q1 = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    r = min(m, n)
    s = 3.0 * 2.0 ** -torch.arange(r, dtype=torch.float64)
    return (q1[:, :r] * s) @ q2[:, :r].T


def _model(dtype=torch.float64, spectrum: bool = False) -> nn.Sequential:
    # rows 7 → 4 + 3 (uneven); rows 1 → 1 + 0 (an empty shard); 6×4 sharded by columns (Shard(1)).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 1), nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 6))
    if spectrum:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, nn.Linear):
                    layer.weight.copy_(_spectrum_weight(*layer.weight.shape, gen))
    return model.to(dtype)


def _shard(model: nn.Sequential) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    for i in (0, 2, 3):
        fully_shard(model[i])
    fully_shard(model[5], shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    fully_shard(model)
    return model


def _init(rank, world, init_file):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _state_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.tensor import DTensor, Partial, Replicate
        from torch.distributed.tensor.debug import CommDebugMode
        from torch.distributed.tensor.placement_types import _StridedShard

        from robustcompress.layers import MatrixSpec
        from robustcompress.spectral.sharded import ShardedBackend, ShardedView

        model = _shard(_model(spectrum=True))
        state = SpectralState(model, k=2)
        with CommDebugMode() as comm:
            state.step()
        counts = {str(op).rsplit(".", 1)[-1]: c for op, c in comm.get_comm_counts().items()}
        state.step(49)
        out = {"counts": counts, "sides": {n: state.operator(n).side for n in state.names},
               "sigmas": {n: state.sigmas(n) for n in state.names},
               "exact": {n: torch.linalg.svdvals(state.module(n).weight.full_tensor()) for n in state.names},
               "V": {n: _full(state.layers[n].V) for n in state.names},
               "U": {n: _full(state.layers[n].U) for n in state.names},
               "weights": {n: state.module(n).weight.full_tensor() for n in state.names}}

        # The differentiable σ₁: the global value, its gradient on the local shard only.
        w = state.module("0").weight
        sig = state.sigma("0")
        (g,) = torch.autograd.grad(sig, w)
        out["sigma0"] = sig.detach()
        out["grad0"] = g.full_tensor()
        out["grad_placements"] = str(g.placements)
        fro = state.frobenius("0")
        out["fro0"] = fro.detach()
        with torch.no_grad():
            w.mul_(1.0)  # any in-place change of the weight makes the cached reduced values stale
        try:
            state.sigma("0")
            out["stale"] = None
        except RuntimeError as e:
            out["stale"] = str(e)

        # A stored (in × out) weight with uneven Shard(0): its operator's columns are sharded.
        gen = torch.Generator().manual_seed(5)
        full_t = _spectrum_weight(7, 5, gen)  # stored 7 × 5, operator 5 × 7
        dt = nn.Parameter(torch.distributed.tensor.distribute_tensor(full_t, w.device_mesh, [torch.distributed.tensor.Shard(0)]))
        # A packed block (rows 1:4 of the operator, like one of Q/K/V) is sliced locally: its axis is unsharded.
        # A replicated DTensor (every rank holds W) is iterated locally and adds nothing to the all-reduce.
        rep = nn.Parameter(torch.distributed.tensor.distribute_tensor(full_t, w.device_mesh, [Replicate()]))
        views = {"conv1d": ShardedView("conv1d", MatrixSpec(lambda: dt, transpose=True)),
                 "packed": ShardedView("packed", MatrixSpec(lambda: dt, transpose=True, rows=slice(1, 4))),
                 "replicated": ShardedView("replicated", MatrixSpec(lambda: rep)),
                 # columns 2:6 of the operator, sharded 4 + 3: the slice straddles the ranks
                 "straddling": ShardedView("straddling", MatrixSpec(lambda: dt, transpose=True, cols=slice(2, 6)))}
        bufs = {}
        for name, view in views.items():
            m, n = view.shape
            bufs[name] = buf = nn.Module()
            buf.register_buffer("V", torch.linalg.qr(torch.randn(n, 2, generator=gen, dtype=torch.float64))[0])
            buf.register_buffer("U", torch.linalg.qr(torch.randn(m, 2, generator=gen, dtype=torch.float64))[0])
            buf.register_buffer("S", torch.zeros(2, dtype=torch.float64))
            view.shard_buffers(buf)
        backend = ShardedBackend()
        with CommDebugMode() as comm:
            backend.step(views, bufs)
        for _ in range(49):
            backend.step(views, bufs)
        out["transposed"] = (views["conv1d"].side, views["conv1d"].shape, bufs["conv1d"].S.clone(),
                             torch.linalg.svdvals(full_t)[:2], tuple(bufs["conv1d"].V.to_local().shape),
                             sum(comm.get_comm_counts().values()))
        out["packed"] = (bufs["packed"].S.clone(), torch.linalg.svdvals(full_t.T[1:4])[:2])
        out["replicated"] = (views["replicated"].side, bufs["replicated"].S.clone(), torch.linalg.svdvals(full_t)[:2])
        out["straddling"] = (bufs["straddling"].S.clone(), torch.linalg.svdvals(full_t.T[:, 2:6])[:2],
                             tuple(bufs["straddling"].V.to_local().shape))

        # Placements the state cannot iterate without gathering are refused, naming layer and placement.
        refusals = {}
        for label, placement in (("Partial", Partial()), ("_StridedShard", _StridedShard(0, split_factor=2))):
            bad = nn.Sequential(nn.Linear(4, 8).double())
            local = torch.randn(8 if label == "Partial" else 4, 4, dtype=torch.float64)
            bad[0].weight = nn.Parameter(DTensor.from_local(local, w.device_mesh, [placement], run_check=False,
                                                            shape=torch.Size([8, 4]), stride=(4, 1)))
            try:
                SpectralState(bad)
                refusals[label] = None
            except ValueError as e:
                refusals[label] = str(e)
        out["refusals"] = refusals

        # torch.distributed.checkpoint: save on 2 ranks, load into a fresh sharded state.
        ckpt = os.path.join(out_dir, "ckpt")
        dcp.save(state.state_dict(), checkpoint_id=ckpt)
        other = SpectralState(model, k=2, seed=123, init_iter=0)
        sd = other.state_dict()
        dcp.load(sd, checkpoint_id=ckpt)
        other.load_state_dict(sd)
        # broadcast_state (wrap's state sync on CUDA) leaves each rank's shard of U alone
        from robustcompress.optim import broadcast_state

        before = [_full(b).clone() for b in state.buffers()]
        broadcast_state(state)
        out["broadcast_kept"] = all(torch.equal(a, _full(b)) for a, b in zip(before, state.buffers()))
        out["reloaded_equal"] = all(torch.equal(_full(a), _full(b)) for a, b in
                                    zip(state.state_dict().values(), other.state_dict().values()))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_state_converges_communicates_once_refuses_and_checkpoints(tmp_path):
    mp.spawn(_state_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["sides"] == {"0": "rows", "2": "rows", "3": "rows", "5": "cols"}
    for out in (r0, r1):
        # one all-reduce per step for all layers, no all-gather
        assert out["counts"] == {"allreduce_": 1}, out["counts"]
        for name, s in out["sigmas"].items():
            exact = out["exact"][name][: s.numel()]
            torch.testing.assert_close(s, exact, rtol=1e-5, atol=0)
        assert out["stale"] is not None and "state.step()" in out["stale"]
        assert "'0'" in out["refusals"]["Partial"] and "Partial" in out["refusals"]["Partial"]
        assert "'0'" in out["refusals"]["_StridedShard"] and "_StridedShard" in out["refusals"]["_StridedShard"]
        assert out["reloaded_equal"] and out["broadcast_kept"]
        side, shape, s, exact, v_local, collectives = out["transposed"]
        assert side == "cols" and shape == (5, 7) and collectives == 1
        torch.testing.assert_close(s, exact, rtol=1e-5, atol=0)
        torch.testing.assert_close(out["packed"][0], out["packed"][1], rtol=1e-5, atol=0)
        assert out["replicated"][0] == "replicated"
        torch.testing.assert_close(out["replicated"][1], out["replicated"][2], rtol=1e-5, atol=0)
        torch.testing.assert_close(out["straddling"][0], out["straddling"][1], rtol=1e-5, atol=0)
    assert {r0["transposed"][4], r1["transposed"][4]} == {(4, 2), (3, 2)}  # uneven V shards
    # the straddled block's V spans the weight's sharded axis (7 rows), sharded like it
    assert {r0["straddling"][2], r1["straddling"][2]} == {(4, 2), (3, 2)}
    assert torch.equal(r0["straddling"][0], r1["straddling"][0])
    # σ and the replicated blocks are bitwise identical on both ranks
    for name in r0["sigmas"]:
        assert torch.equal(r0["sigmas"][name], r1["sigmas"][name])
        assert torch.equal(r0["V"][name], r1["V"][name]) and torch.equal(r0["U"][name], r1["U"][name])
    assert torch.equal(r0["transposed"][2], r1["transposed"][2])
    # σ₁ = uᵀWv, gradient u vᵀ (on the shard, assembled here), ‖W‖_F: the values of the full weight
    w, u, v = r0["weights"]["0"], r0["U"]["0"][:, 0], r0["V"]["0"][:, 0]
    torch.testing.assert_close(r0["sigma0"], u @ w @ v, rtol=1e-12, atol=0)
    torch.testing.assert_close(r0["grad0"], torch.outer(u, v), rtol=1e-12, atol=1e-15)
    assert r0["grad_placements"] == "(Shard(dim=0),)"
    torch.testing.assert_close(r0["fro0"], torch.linalg.matrix_norm(w), rtol=1e-12, atol=0)

    # The checkpoint saved on 2 ranks loads in one process into an unsharded state.
    import torch.distributed.checkpoint as dcp

    model = _model(spectrum=True)
    with torch.no_grad():
        for name, wt in r0["weights"].items():
            model.get_submodule(name).weight.copy_(wt)
    single = SpectralState(model, k=2, seed=7, init_iter=0)
    sd = single.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path / "ckpt"))
    single.load_state_dict(sd)
    for name in single.names:
        assert torch.equal(single.layers[name].U, r0["U"][name])
        assert torch.equal(single.layers[name].V, r0["V"][name])
        assert torch.equal(single.sigmas(name), r0["sigmas"][name])


def _batches(dtype, steps=20):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 9, generator=g, dtype=dtype), torch.randn(8, 6, generator=g, dtype=dtype))
            for _ in range(steps)]


def _train_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    try:
        from robustcompress.optim import wrap

        out = {}
        for dtype in (torch.float64, torch.float32):
            batches = _batches(dtype)
            runs = {}
            for how in ("sharded", "plain"):
                model = _model(dtype)
                if how == "sharded":
                    _shard(model)
                opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model,
                           default_penalties(model, strength=0.1))
                for x, y in batches:
                    if how == "sharded":  # each rank its half of the global batch (FSDP averages gradients)
                        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
                    opt.zero_grad()
                    F.mse_loss(model(x), y).backward()
                    opt.step()
                state = opt.penalties[0].state
                runs[how] = ({n: _full(p.detach()) for n, p in model.named_parameters()},
                             {n: state.sigmas(n) for n in state.names}, float(opt.last_penalty))
            out[str(dtype)] = runs

        # loss + penalty() under fully_shard: a penalty owning its state, stepped in forward.
        runs = {}
        batches = _batches(torch.float64, steps=5)
        for how in ("sharded", "plain"):
            model = _model()
            if how == "sharded":
                _shard(model)
            penalty = SpectralNormPenalty(model, 0.1) + TailEnergyPenalty(model, k=1, strength=0.05)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            for x, y in batches:
                if how == "sharded":
                    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
                opt.zero_grad()
                (F.mse_loss(model(x), y) + penalty()).backward()
                opt.step()
            runs[how] = {n: _full(p.detach()) for n, p in model.named_parameters()}
        out["loss_plus_penalty"] = runs

        # The README's FSDP2 snippet, as written.
        import pathlib
        import re

        import robustcompress as rc

        readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
        block = next(b for b in re.findall(r"```python\n(.*?)\n```", readme, flags=re.S) if "fully_shard(model)" in b)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        g = torch.Generator().manual_seed(10 + rank)
        loader = [(torch.randn(4, 9, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
        scope = {"model": model, "loader": loader, "nn": nn, "F": F, "torch": torch, "rc": rc}
        exec(block, scope)  # noqa: S102 - the README's code
        out["readme"] = (float(scope["opt"].last_penalty), int(scope["opt"].penalties[0].state.steps))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_training_with_default_penalties_matches_unsharded_run(tmp_path):
    mp.spawn(_train_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    readme = []
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            (p_sh, s_sh, pen_sh), (p_pl, s_pl, pen_pl) = out[str(dtype)]["sharded"], out[str(dtype)]["plain"]
            assert p_sh.keys() == p_pl.keys()
            for name in p_pl:
                torch.testing.assert_close(p_sh[name], p_pl[name], rtol=rtol, atol=rtol * 1e-2)
            for name in s_pl:
                torch.testing.assert_close(s_sh[name], s_pl[name], rtol=rtol, atol=0)
            assert pen_sh == pytest.approx(pen_pl, rel=rtol) and pen_pl > 0
        lp = out["loss_plus_penalty"]
        for name in lp["plain"]:
            torch.testing.assert_close(lp["sharded"][name], lp["plain"][name], rtol=1e-10, atol=1e-12)
        readme.append(out["readme"])
    # the README snippet trained on both ranks with the same (replicated) penalty value
    assert readme[0] == readme[1] and readme[0][0] > 0 and readme[0][1] == 3


def test_docstring_examples_run():
    import doctest

    import robustcompress.spectral.sharded as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 6
