"""robustcompress in a Lightning run: one callback adds the σ₁² penalty, tracks and checkpoints it.

    callback = PenaltyCallback(rc.default_penalties(module.net), track_every=50)
    trainer = L.Trainer(callbacks=[callback], precision="bf16-mixed", accumulate_grad_batches=2)

The penalty gradients are added once per optimizer step, after Lightning's
unscaling and gradient clipping (they are never clipped); the callback's
state (penalty counters, warm spectral vectors, tracker) travels in
Lightning's checkpoints, so ``fit(ckpt_path=...)`` resumes exactly. Run with
``--strength 0`` to see the same model without the penalty.

    python examples/lightning_digits.py
    python examples/lightning_digits.py --strength 0
"""

from __future__ import annotations

import argparse
import json
import pathlib

import lightning as L
import torch
import torch.nn.functional as F

import robustcompress as rc
from robustcompress.integrations.lightning import PenaltyCallback


class DigitsMLP(L.LightningModule):
    def __init__(self, rank: int, lr: float) -> None:
        super().__init__()
        net = rc.MLP(64, (256, 256), 10)
        self.net = rc.to_low_rank(net, rank, from_weights=False) if rank else net
        self.lr = lr

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.net(x).float(), y)
        self.log("loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--rank", type=int, default=8, help="rank of the hidden layers (0: dense)")
    p.add_argument("--strength", type=float, default=3e-3, help="strength of the σ₁² penalty (0: no callback)")
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision (32-true, bf16-mixed, 16-mixed)")
    p.add_argument("--accumulate", type=int, default=2, help="accumulate_grad_batches")
    p.add_argument("--every", type=int, default=50, help="track compressibility every N steps")
    p.add_argument("--eps", type=float, default=0.1, help="PGD L∞ budget for the final evaluation")
    p.add_argument("--limit", type=int, default=0, help="use only the first N train and test images (0: all)")
    p.add_argument("--out", default="runs/lightning", help="output folder (checkpoint, CSV logs, summary.json)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    accelerator = ("gpu" if torch.cuda.is_available() else "cpu") if args.device == "auto" else \
        ("gpu" if args.device == "cuda" else "cpu")
    L.seed_everything(args.seed, verbose=False)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, test = rc.digits(seed=args.seed)
    if args.limit:
        train, test = (torch.utils.data.TensorDataset(*(t[: args.limit] for t in ds.tensors)) for ds in (train, test))
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    module = DigitsMLP(args.rank, lr=1e-3)
    callbacks = []
    if args.strength > 0:
        # --- the one line -------------------------------------------------------
        callbacks.append(PenaltyCallback(rc.default_penalties(module.net, strength=args.strength),
                                         track_every=args.every))
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=accelerator, devices=1, precision=args.precision,
                        accumulate_grad_batches=args.accumulate, callbacks=callbacks,
                        logger=L.pytorch.loggers.CSVLogger(out, name="logs"), enable_checkpointing=False, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(module, loader)
    trainer.save_checkpoint(out / "last.ckpt")  # holds the callback's state: resume with fit(ckpt_path=...)

    model = module.net.eval().cpu()
    sigmas = {name: round(float(rc.SpectralState(model, k=1, layers=[name], init_iter=200).sigmas(name)[0]), 4)
              for name in rc.SpectralState(model).names}
    summary = {"strength": args.strength, "clean": rc.accuracy(model, test),
               "robust": rc.robust_accuracy(model, test, eps=args.eps, steps=10), "sigma_1": sigmas}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"clean accuracy {summary['clean']:.3f}, robust accuracy (PGD L∞ ε={args.eps}) {summary['robust']:.3f}")
    print("σ₁ per layer:", sigmas)


if __name__ == "__main__":
    main()
