"""FSDP2: packed blocks whose slice straddles ranks, sharded LoRA / low-rank factors, and the residual bounds.

Two gloo processes (one spawn for every check, to pay the imports of peft and
transformers once). The reference is always the gathered operator (float64
``svdvals``) or an unsharded twin of the model with the same weights.
"""

import copy
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from robustcompress.layers import LowRankLinear
from robustcompress.penalties import default_penalties
from robustcompress.spectral import SpectralState

# Looked up, not imported: the spawned processes import this module again, and peft takes seconds.
pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.skipif(importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers")
                                 is None, reason="needs peft and transformers")]


def _spectrum(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """σ_j = 3·2^-j: σ₁/σ₂ = 2."""
    q1 = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    r = min(m, n)
    return (q1[:, :r] * (3.0 * 2.0 ** -torch.arange(r, dtype=torch.float64))) @ q2[:, :r].T


class _Blocks(nn.Module):
    """Packed blocks and low-rank factors: MultiheadAttention (in_proj 15 × 5 on 2 ranks: 8 + 7 rows, so Q
    has no rows on rank 1, V none on rank 0 and K straddles), two GPT-2 attentions (c_attn stored 6 × 18,
    sharded on dim 0 = the operator's columns, and on dim 1 = its rows: K straddles), a LowRankLinear
    (A 3 × 6 sharded 2 + 1 along r, B 7 × 3 sharded 4 + 3)."""

    def __init__(self):
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.mha = nn.MultiheadAttention(5, 1, bias=False, batch_first=True)
        cfg = GPT2Config(n_embd=6, n_head=2, n_layer=1, vocab_size=10)
        self.g0, self.g1 = GPT2Attention(cfg, layer_idx=0), GPT2Attention(cfg, layer_idx=0)
        self.low = LowRankLinear(6, 7, rank=3, bias=False)
        self.double()
        with torch.no_grad():
            for i in range(3):
                self.mha.in_proj_weight[5 * i:5 * (i + 1)] = _spectrum(5, 5, gen)
                for g in (self.g0, self.g1):
                    g.c_attn.weight[:, 6 * i:6 * (i + 1)] = _spectrum(6, 6, gen).T
            self.mha.out_proj.weight.copy_(_spectrum(5, 5, gen))
            for g in (self.g0, self.g1):
                g.c_proj.weight.copy_(_spectrum(6, 6, gen))
            m = _spectrum(7, 6, gen)
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            self.low.weight_b.copy_(u[:, :3])
            self.low.weight_a.copy_(s[:3, None] * vh[:3])

    def shard(self):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        fully_shard(self.mha)
        fully_shard(self.g0)
        fully_shard(self.g1, shard_placement_fn=lambda p: Shard(1) if p.shape == (6, 18) else Shard(0))
        fully_shard(self.low)
        fully_shard(self)
        return self


def _lora_model(spectrum: bool):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(2)
    if spectrum:
        with torch.no_grad():
            base[0].weight.copy_(_spectrum(7, 6, gen))
            base[2].weight.copy_(_spectrum(5, 7, gen))
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B is zero at peft's init: give the product B·A a value
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def _shard_lora(model):
    from torch.distributed.fsdp import fully_shard

    for i in (0, 2):
        fully_shard(model.base_model.model[i])  # W0 7 × 6 → 4 + 3 rows, A 3 × 6 → 2 + 1, B 7 × 3 → 4 + 3
    fully_shard(model)
    return model


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(5, 1, bias=False, batch_first=True)
        self.head = nn.Linear(5, 3)
        self.double()

    def forward(self, x):
        y, _ = self.mha(x, x, x, need_weights=False)
        return self.head(y.mean(1))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank, world, init_file, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.debug import CommDebugMode

        from robustcompress.optim import wrap

        def counts(fn):
            with CommDebugMode() as comm:
                fn()
            return {str(op).rsplit(".", 1)[-1]: c for op, c in comm.get_comm_counts().items()}

        out = {}
        # σ after 50 iterations vs the gathered operator; residual intervals after 3 against an unsharded twin.
        for label, make, shard in (("blocks", _Blocks, lambda m: m.shard()), ("lora", lambda: _lora_model(True),
                                                                                  _shard_lora)):
            twin = make()
            model = shard(copy.deepcopy(twin))
            # (the LoRA model's head is a plain random Linear: left out, it has no spectral gap)
            layers = ["base_model.model.0", "base_model.model.2"] if label == "lora" else None
            state = SpectralState(model, k=2, init_iter=0, layers=layers)
            ref = SpectralState(twin, k=2, init_iter=0, layers=layers)
            state.step(3)
            ref.step(3)
            early = {n: (state.residual_interval(n), ref.residual_interval(n), state.relative_residual(n),
                         state.sigma1_bounds(n)) for n in state.names}
            state.step(47)
            exact = {n: torch.linalg.svdvals(ref.operator(n).matrix().detach()) for n in state.names}
            out[label] = {"names": state.names, "early": early, "exact": exact,
                          "sides": {n: state.operator(n).side for n in state.names},
                          "sigmas": {n: state.sigmas(n) for n in state.names},
                          "V": {n: _full(state.layers[n.replace(".", "-")].V) for n in state.names},
                          "U_local": {n: state.layers[n.replace(".", "-")].U.to_local().clone()
                                      for n in state.names if state.operator(n).side == "rows"},
                          "bounds": {n: state.sigma1_bounds(n) for n in state.names},
                          "late": {n: state.residual_interval(n) for n in state.names}}
            if label == "lora":
                # The differentiable σ₁ of a LoRA layer: gradients on the local shards of W₀ (made trainable
                # here), A and B, assembled in the test only.
                lin = model.base_model.model[0]
                params = [lin.base_layer.weight, lin.lora_A.default.weight, lin.lora_B.default.weight]
                params[0].requires_grad_(True)
                sig = state.sigma(state.names[0])
                grads = torch.autograd.grad(sig, params)
                params[0].requires_grad_(False)
                buf = state.layers[state.names[0].replace(".", "-")]
                out["lora_grads"] = (sig.detach(), [g.full_tensor() for g in grads],
                                     [p.detach().full_tensor() for p in params], _full(buf.U)[:, 0], buf.V[:, 0].clone(),
                                     [g.placements for g in grads])
            ckpt = os.path.join(out_dir, f"ckpt-{label}")
            dcp.save(state.state_dict(), checkpoint_id=ckpt)
            other = SpectralState(model, k=2, seed=9, init_iter=0, layers=layers)
            sd = other.state_dict()
            dcp.load(sd, checkpoint_id=ckpt)
            other.load_state_dict(sd)
            out[label]["reloaded"] = all(torch.equal(_full(a), _full(b)) for a, b in
                                         zip(state.state_dict().values(), other.state_dict().values()))
            if label == "lora":
                out["comm_lora_changed"] = counts(lambda: (model.base_model.model[0].base_layer.weight.mul_(1.0),
                                                           state.step()))
                out["comm_lora_same"] = counts(state.step)
                refusals = {}

                def refused(label, fn):
                    try:
                        fn()
                        refusals[label] = None
                    except (RuntimeError, ValueError) as e:
                        refusals[label] = str(e)

                refused("frobenius", lambda: state.frobenius(state.names[0]))
                refused("gram_iter", lambda: state.sigma1_bounds(state.names[0], gram_iter=2))
                # A base stored in × out (fan_in_fan_out) sharded on dim 0 has its *columns* sharded, unlike B;
                # A sharded along its input axis would need a gather.
                from torch.distributed.tensor import Shard, distribute_tensor

                from robustcompress.layers import LoRASpec, MatrixSpec
                from robustcompress.spectral.sharded import ShardedFactorView

                mesh = model.base_model.model[0].base_layer.weight.device_mesh
                gen = torch.Generator().manual_seed(4)
                w0t = distribute_tensor(torch.randn(6, 7, generator=gen), mesh, [Shard(0)])
                a0, a1 = (distribute_tensor(torch.randn(3, 6, generator=gen), mesh, [Shard(d)]) for d in (0, 1))
                b0 = distribute_tensor(torch.randn(7, 3, generator=gen), mesh, [Shard(0)])
                w0 = distribute_tensor(torch.randn(7, 6, generator=gen), mesh, [Shard(0)])
                refused("fan_in_fan_out", lambda: ShardedFactorView("t", LoRASpec(
                    MatrixSpec(lambda: w0t, transpose=True), MatrixSpec(lambda: a0), MatrixSpec(lambda: b0), 1.0)))
                refused("a_cols", lambda: ShardedFactorView("a", LoRASpec(
                    MatrixSpec(lambda: w0), MatrixSpec(lambda: a1), MatrixSpec(lambda: b0), 1.0)))
                # ... while a base stored in × out sharded on its output axis (Shard(1)) has B's row chunks.
                from robustcompress.spectral.sharded import ShardedBackend

                w0t1 = distribute_tensor(_spectrum(6, 7, gen), mesh, [Shard(1)])
                a0d, b0d = (distribute_tensor(0.1 * torch.randn(*shape, generator=gen, dtype=torch.float64), mesh,
                                              [Shard(0)]) for shape in ((3, 6), (7, 3)))
                view = ShardedFactorView("t1", LoRASpec(MatrixSpec(lambda: w0t1, transpose=True),
                                                        MatrixSpec(lambda: a0d), MatrixSpec(lambda: b0d), 0.5))
                buf = nn.Module()
                buf.register_buffer("V", torch.linalg.qr(torch.randn(6, 2, generator=gen, dtype=torch.float64))[0])
                buf.register_buffer("U", torch.randn(7, 2, generator=gen, dtype=torch.float64))
                buf.register_buffer("S", torch.zeros(2, dtype=torch.float64))
                view.shard_buffers(buf)
                for _ in range(50):
                    ShardedBackend().step({"t1": view}, {"t1": buf})
                dense = w0t1.full_tensor().T + 0.5 * b0d.full_tensor() @ a0d.full_tensor()
                out["fan_in_fan_out_rows"] = (buf.S.clone(), torch.linalg.svdvals(dense)[:2])
                with torch.no_grad():
                    model.base_model.model[2].lora_B.default.weight.mul_(1.0)
                refused("stale", lambda: state.sigma1_bounds(state.names[1]))
                out["lora_refusals"] = refusals
            else:
                matrix_only = SpectralState(model, k=2, layers=["mha", "g0", "g1"])
                out["comm_matrix"] = counts(matrix_only.step)
                out["comm_mixed"] = counts(state.step)

        # Penalised training steps: sharded (each rank its half of every global batch) vs unsharded.
        g = torch.Generator().manual_seed(3)
        batches = {"attn": [(torch.randn(8, 4, 5, generator=g, dtype=torch.float64),
                             torch.randn(8, 3, generator=g, dtype=torch.float64)) for _ in range(4)],
                   "lora": [(torch.randn(8, 6, generator=g, dtype=torch.float64),
                             torch.randn(8, 3, generator=g, dtype=torch.float64)) for _ in range(4)]}
        for label in ("attn", "lora"):
            runs = {}
            for how in ("sharded", "plain"):
                model = _Attn() if label == "attn" else _lora_model(False)
                if how == "sharded":
                    if label == "attn":
                        fully_shard(model.mha)
                        fully_shard(model)
                    else:
                        _shard_lora(model)
                opt = wrap(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                                           momentum=0.9), model, default_penalties(model, strength=0.1))
                for x, y in batches[label]:
                    if how == "sharded":
                        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
                    opt.zero_grad()
                    F.mse_loss(model(x), y).backward()
                    opt.step()
                state = opt.penalties[0].state
                runs[how] = ({n: _full(p.detach()) for n, p in model.named_parameters()},
                             {n: state.sigmas(n) for n in state.names}, float(opt.last_penalty))
            out[f"train-{label}"] = runs
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_straddling_slices_lora_factors_and_bounds(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    blocks, lora = r0["blocks"], r0["lora"]
    assert blocks["sides"] == {"mha.q": "rows", "mha.k": "rows", "mha.v": "rows", "mha.out_proj": "rows",
                               "g0.c_attn.q": "cols", "g0.c_attn.k": "cols", "g0.c_attn.v": "cols",
                               "g0.c_proj": "cols", "g1.c_attn.q": "rows", "g1.c_attn.k": "rows",
                               "g1.c_attn.v": "rows", "g1.c_proj": "cols", "low": "rows"}
    assert len(lora["names"]) == 2 and set(lora["sides"].values()) == {"rows"}
    # The sharded U of a straddled block spans in_proj's 15 rows, sharded like it (8 + 7), zero outside K.
    assert r0["blocks"]["U_local"]["mha.k"].shape == (8, 2) and r1["blocks"]["U_local"]["mha.k"].shape == (7, 2)
    assert not r0["blocks"]["U_local"]["mha.k"][:5].any() and not r1["blocks"]["U_local"]["mha.k"][2:].any()
    assert not r1["blocks"]["U_local"]["mha.q"].any() and not r0["blocks"]["U_local"]["mha.v"].any()
    for out in (r0, r1):
        for label in ("blocks", "lora"):
            res = out[label]
            assert res["reloaded"], label
            for n in res["names"]:
                exact = res["exact"][n]
                torch.testing.assert_close(res["sigmas"][n], exact[:2], rtol=1e-5, atol=0, msg=n)
                # After 3 iterations: each interval holds a singular value; the top one holds σ₁.
                interval, ref_interval, rel, (lo, hi) = res["early"][n]
                for (a, b) in interval.tolist():
                    assert ((exact >= a - 1e-12) & (exact <= b + 1e-12)).any(), (n, a, b, exact)
                assert interval[0, 0] - 1e-12 <= exact[0] <= interval[0, 1] + 1e-12, n
                assert 0 < rel < float("inf") and lo <= exact[0] * (1 + 1e-12) and exact[0] <= hi * (1 + 1e-12)
                if res["sides"][n] == "rows":
                    # Row-sharded layers run the unsharded iteration: the same intervals.
                    torch.testing.assert_close(interval, ref_interval, rtol=1e-8, atol=1e-12, msg=n)
                lo, hi = res["bounds"][n]
                assert lo <= exact[0] * (1 + 1e-12) and exact[0] <= hi * (1 + 1e-12), n
                late = res["late"][n]
                assert late[0, 0] - 1e-10 <= exact[0] <= late[0, 1] + 1e-10, n
        # One all-reduce per step for matrix layers, straddling or not; factorised layers: a batched A·V
        # reduction before (when the weights changed) and after the update. Never an all-gather.
        assert out["comm_matrix"] == {"allreduce_": 1}, out["comm_matrix"]
        assert out["comm_mixed"] == {"allreduce_": 3}, out["comm_mixed"]
        assert out["comm_lora_changed"] == {"allreduce_": 3}, out["comm_lora_changed"]
        assert out["comm_lora_same"] == {"allreduce_": 3}, out["comm_lora_same"]  # the same collectives every step
        sig, (g_w0, g_a, g_b), (w0, a, b), u, v, placements = out["lora_grads"]
        s = 6 / 3  # lora_alpha / r
        torch.testing.assert_close(sig, u @ (w0 + s * b @ a) @ v, rtol=1e-12, atol=0)
        torch.testing.assert_close(g_w0, torch.outer(u, v), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(g_b, s * torch.outer(u, a @ v), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(g_a, s * torch.outer(b.T @ u, v), rtol=1e-10, atol=1e-14)
        assert all(str(p) == "(Shard(dim=0),)" for p in placements)
        ref = out["lora_refusals"]
        assert "whole factor A" in ref["frobenius"] and "gram_iter" in ref["gram_iter"]
        assert "'t'" in ref["fan_in_fan_out"] and "W0 is sharded on dim 0" in ref["fan_in_fan_out"]
        assert "'a'" in ref["a_cols"] and "Shard(dim=1)" in ref["a_cols"]
        assert "state.step()" in ref["stale"]
        torch.testing.assert_close(*out["fan_in_fan_out_rows"], rtol=1e-5, atol=0)
    # Everything replicated is bitwise identical on both ranks, bounds and intervals included.
    for label in ("blocks", "lora"):
        a, b = r0[label], r1[label]
        for n in a["names"]:
            assert torch.equal(a["sigmas"][n], b["sigmas"][n]) and torch.equal(a["V"][n], b["V"][n])
            assert a["bounds"][n] == b["bounds"][n] and torch.equal(a["late"][n], b["late"][n])
            assert torch.equal(a["early"][n][0], b["early"][n][0]) and a["early"][n][2:] == b["early"][n][2:]
    for out in (r0, r1):
        for label in ("attn", "lora"):
            (p_sh, s_sh, pen_sh), (p_pl, s_pl, pen_pl) = out[f"train-{label}"]["sharded"], out[f"train-{label}"]["plain"]
            assert p_sh.keys() == p_pl.keys() and len(s_pl) >= 2
            for name in p_pl:
                torch.testing.assert_close(p_sh[name], p_pl[name], rtol=1e-10, atol=1e-12, msg=name)
            for name in s_pl:
                torch.testing.assert_close(s_sh[name], s_pl[name], rtol=1e-10, atol=0)
            assert pen_sh == pytest.approx(pen_pl, rel=1e-10) and pen_pl > 0
