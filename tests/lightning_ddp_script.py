"""Run by tests/test_lightning.py: the Lightning callback under strategy="ddp" on 2 CPU processes (gloo).

Lightning's DDP launcher re-runs this script for rank 1, so it is a standalone file.
Each rank saves its parameters and spectral state to ``OUT/rank<r>.pt``.
"""

import pathlib
import sys

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from robustcompress.integrations.lightning import PenaltyCallback
from robustcompress.penalties import default_penalties


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Save(L.Callback):
    def __init__(self, out, cb):
        self.out, self.cb = out, cb

    def on_train_end(self, trainer, pl_module):
        state = self.cb.hooks.spectral_state or self.cb.hooks.penalties[0].state
        torch.save({"steps": self.cb.hooks.steps,
                    "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "state": {k: v.clone() for k, v in state.state_dict().items()}},
                   self.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    module = Net()
    cb = PenaltyCallback(default_penalties(module.net, strength=0.5))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, callbacks=[cb, Save(out, cb)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
