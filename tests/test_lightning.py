"""The Lightning callback: σ₁ lowered under bf16 + accumulation, the fp16 GradScaler path, clipping, resume, DDP."""

import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from robustcompress.integrations.lightning import PenaltyCallback  # noqa: E402
from robustcompress.optim import wrap  # noqa: E402
from robustcompress.penalties import SpectralNormPenalty, default_penalties  # noqa: E402
from robustcompress.spectral import SpectralState  # noqa: E402

warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|GPU available|TPU available).*")
ROOT = pathlib.Path(__file__).resolve().parents[1]


class Net(L.LightningModule):
    def __init__(self, task: bool = True, lr: float = 0.05, optimizer: str = "sgd"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        self.task, self.lr, self.optimizer_name = task, lr, optimizer

    def training_step(self, batch, _):
        x, y = batch
        out = self.net(x)
        return F.cross_entropy(out.float(), y) if self.task else (out * 0).float().sum()

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class EpochSampler(torch.utils.data.Sampler):
    """A seeded shuffle that depends on the epoch only (Lightning calls set_epoch), so resuming replays it."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def loader(n=32, batch=8):
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch, sampler=EpochSampler(n))


def trainer(tmp_path=None, **kw):
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, deterministic=True, default_root_dir=tmp_path)
    opts.update(kw)
    return L.Trainer(**opts)


def sigma1(module):
    return torch.linalg.svdvals(module.net[0].weight.detach().double())[0].item()


def test_bf16_mixed_with_accumulation_lowers_sigma_and_steps_once_per_optimizer_step():
    sig = {}
    for with_cb in (False, True):
        module = Net(lr=0.05)
        cbs = [PenaltyCallback(default_penalties(module.net, strength=0.5))] if with_cb else []
        trainer(precision="bf16-mixed", accumulate_grad_batches=2, max_epochs=3, callbacks=cbs).fit(module, loader())
        sig[with_cb] = sigma1(module)
        if with_cb:
            assert cbs[0].hooks.steps == 3 * 4 // 2  # 4 batches per epoch, one step per 2 batches
            assert cbs[0].hooks.penalties[0].calls == 6
    assert sig[True] < 0.8 * sig[False]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_penalty_gradient_comes_after_clipping_and_unscaling(precision):
    """No task gradient, a clip threshold 1e-6: the update is exactly -lr · (unclipped, unscaled) penalty gradient."""
    module = Net(task=False, lr=0.1)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    state = SpectralState(module.net, k=1)
    cb = PenaltyCallback([SpectralNormPenalty(state, 1.0, layers=["0"])])
    seen = {}

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["w"] = pl_module.net[0].weight.detach().clone()

    plugin = (dict(plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))])
              if precision == "fp16" else dict(precision="bf16-mixed"))
    trainer(max_steps=1, callbacks=[Spy(), cb], gradient_clip_val=1e-6, **plugin).fit(module, loader())
    u, v = state.vectors("0")
    expected = 0.1 * 2 * state.sigmas("0")[0] * torch.outer(u[:, 0], v[:, 0])
    torch.testing.assert_close(seen["w"] - module.net[0].weight.detach(), expected, rtol=1e-4, atol=1e-6)
    assert float(expected.norm()) > 1e-3  # far above the clip threshold: not clipped
    assert cb.hooks.steps == 1


def test_fp16_gradscaler_lowers_sigma():
    sig = {}
    for with_cb in (False, True):
        module = Net(lr=0.05)
        cbs = [PenaltyCallback(default_penalties(module.net, strength=0.5))] if with_cb else []
        plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
        trainer(plugins=[plugin], max_epochs=2, callbacks=cbs).fit(module, loader())
        sig[with_cb] = sigma1(module)
    assert sig[True] < 0.8 * sig[False]


def test_fused_optimizer_under_gradscaler_gets_scaled_penalty_gradients():
    """Lightning does not unscale a fused optimizer; the penalty gradient is scaled so the fused unscale undoes it."""
    ref, fused = Net(task=False, lr=0.01, optimizer="adamw"), Net(task=False, lr=0.01, optimizer="adamw")
    fused.configure_optimizers = lambda: torch.optim.AdamW(fused.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for module, precision in ((ref, dict(precision="32-true")),
                              (fused, dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler)]))):
        cb = PenaltyCallback(default_penalties(module.net, strength=0.5))
        trainer(max_steps=3, callbacks=[cb], **precision).fit(module, loader())
        assert cb.hooks.steps == 3
    assert scaler.get_scale() == 2.0 ** 8  # no step was skipped
    for p, q in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ref.net[0].weight, Net().net[0].weight)


def test_fused_step_skipped_by_gradscaler_skips_the_penalties():
    module = Net(optimizer="adamw")
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters(), lr=0.01, fused=True)

    class Poison(L.Callback):  # an inf gradient on the first step: GradScaler makes the fused step skip
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                pl_module.net[2].bias.grad[0] = float("inf")

    cb = PenaltyCallback(default_penalties(module.net, strength=0.5))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer(max_steps=3, callbacks=[Poison(), cb], plugins=[MixedPrecision("16-mixed", "cpu", scaler)]).fit(
        module, loader())
    assert scaler.get_scale() == 2.0 ** 7  # one skipped step
    assert cb.hooks.steps == 2 and cb.hooks.penalties[0].calls == 2


def test_tracker_metrics_are_logged_through_the_module():
    module = Net()
    cb = PenaltyCallback(default_penalties(module.net), track_every=1)
    t = trainer(max_steps=2, callbacks=[cb])
    t.fit(module, loader())
    keys = set(t.callback_metrics)
    assert {"robustcompress/penalty", "robustcompress/0/sigma_1", "robustcompress/0/stable_rank"} <= keys
    assert cb.state_dict()["tracker"]["steps"] == 2


def test_callback_and_wrap_on_one_optimizer_is_an_error():
    module = Net()
    module.configure_optimizers = lambda: wrap(torch.optim.SGD(module.parameters(), lr=0.1), module.net,
                                               default_penalties(module.net))
    with pytest.raises(ValueError, match="never both"):
        trainer(max_steps=1, callbacks=[PenaltyCallback(default_penalties(module.net))]).fit(module, loader())


def test_penalties_of_another_model_are_refused():
    other = Net()
    with pytest.raises(ValueError, match="LightningModule"):
        trainer(max_steps=1, callbacks=[PenaltyCallback(default_penalties(other.net))]).fit(Net(), loader())


@pytest.mark.parametrize("with_cb", [True, False])
def test_resume_from_end_of_epoch_checkpoint_is_exact(tmp_path, with_cb):
    def run(epochs, ckpt=None, save=None):
        module = Net(optimizer="adamw", lr=0.02)
        state = SpectralState(module.net, k=2)
        cbs = [PenaltyCallback(default_penalties(state, strength=0.2), track_every=3)] if with_cb else []
        t = trainer(tmp_path, max_epochs=epochs, callbacks=cbs)
        t.fit(module, loader(), ckpt_path=ckpt)
        if save:
            t.save_checkpoint(save)
        return module, t, cbs

    straight, t_straight, cb_straight = run(2)
    run(1, save=tmp_path / "epoch1.ckpt")
    resumed, t_resumed, cb_resumed = run(2, ckpt=str(tmp_path / "epoch1.ckpt"))
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    sa, sb = t_straight.optimizers[0].state_dict()["state"], t_resumed.optimizers[0].state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    if with_cb:
        ca, cbb = cb_straight[0].state_dict(), cb_resumed[0].state_dict()
        assert ca["penalties"]["steps"] == cbb["penalties"]["steps"] == 8
        assert ca["tracker"]["steps"] == cbb["tracker"]["steps"] == 8
        assert all(torch.equal(x, y) for x, y in zip(ca["penalties"]["spectral_state"].values(),
                                                     cbb["penalties"]["spectral_state"].values()))
        assert ca["penalties"]["penalties"][0]["_extra_state"] == cbb["penalties"]["penalties"][0]["_extra_state"]


def test_manual_optimisation_adds_penalties_on_each_step():
    class Manual(Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, _):
            opt = self.optimizers()
            opt.zero_grad()
            x, y = batch
            self.manual_backward(F.cross_entropy(self.net(x), y))
            opt.step()

    module = Manual()
    cb = PenaltyCallback(default_penalties(module.net))
    trainer(max_steps=3, callbacks=[cb]).fit(module, loader())
    assert cb.hooks.steps == 3


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_bit_for_bit(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_ddp_script.py"), str(out)], check=True, env=env,
                   timeout=300, cwd=tmp_path)
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0["steps"] == r1["steps"] == 4
    for key in ("params", "state"):
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key])


@pytest.mark.slow
def test_example_script_tiny_run(tmp_path):
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_digits.py"), "--epochs", "2", "--limit", "128",
                    "--every", "1", "--device", "cpu", "--out", str(tmp_path)], check=True, env=env, timeout=300,
                   capture_output=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["robust"] <= summary["clean"] <= 1 and set(summary["sigma_1"]) == {"1", "3", "5"}
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "PenaltyCallback" in k)
    assert state["penalties"]["steps"] == 2 * 2 // 2  # 128 images, batches of 64, accumulate 2
    metrics = next((tmp_path / "logs").glob("version_*/metrics.csv")).read_text()
    assert "robustcompress/penalty" in metrics and "robustcompress/1/sigma_1" in metrics


def test_readme_snippet_runs(tmp_path, monkeypatch):
    import re

    readme = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)\n```", readme, flags=re.S)
                if "integrations.lightning import" in b)
    monkeypatch.chdir(tmp_path)
    code = code.replace("L.Trainer(", "L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, "
                                      "accelerator='cpu', max_steps=2, ")
    scope = {"MyLightningModule": Net, "train_loader": loader()}
    exec(code, scope)  # noqa: S102 - the README's code
    assert scope["callback"].hooks.steps == 2  # max_steps counts optimizer steps
    assert "robustcompress/penalty" in scope["trainer"].callback_metrics
