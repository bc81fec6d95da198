"""robustcompress in a Hugging Face ``Trainer`` run: one callback adds the σ₁² penalty, logs and checkpoints it.

    callback = PenaltyCallback(rc.default_penalties(model), track_every=20)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()

The model is a small BERT built from its config (random weights, nothing
downloaded) learning a synthetic task: is token 1 more frequent than token 2
in the sequence? The penalty gradients are added once per optimizer step
after the Trainer's gradient clipping (never clipped); ``checkpoint-N/``
holds the callback's state (``robustcompress.pt``), so
``train(resume_from_checkpoint=...)`` resumes exactly. ``--strength 0``
trains without the callback.

    python examples/hf_tiny_bert.py
    python examples/hf_tiny_bert.py --resume
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from transformers import BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import robustcompress as rc
from robustcompress.integrations.hf import PenaltyCallback


def synthetic(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ((ids == 1).sum(1) > (ids == 2).sum(1)).long()
    return [{"input_ids": i, "labels": int(y)} for i, y in zip(ids, labels)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--strength", type=float, default=1e-2, help="strength of the σ₁² penalty (0: no callback)")
    p.add_argument("--hidden", type=int, default=64, help="BERT hidden size")
    p.add_argument("--every", type=int, default=20, help="track compressibility every N steps")
    p.add_argument("--log-steps", type=int, default=10, help="log every N steps")
    p.add_argument("--save-steps", type=int, default=50, help="write checkpoint-N/ every N steps")
    p.add_argument("--limit", type=int, default=0, help="use only N training sequences (0: 2000)")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    p.add_argument("--out", default="runs/hf", help="output folder (checkpoints, summary.json)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    out = pathlib.Path(args.out)
    vocab, length = 16, 16
    train = synthetic(args.limit or 2000, length, vocab, args.seed)
    config = BertConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * args.hidden, max_position_embeddings=length, num_labels=2)
    model = BertForSequenceClassification(config)

    callbacks = []
    if args.strength > 0:
        # --- the one line -------------------------------------------------------
        callbacks.append(PenaltyCallback(rc.default_penalties(model, strength=args.strength), track_every=args.every))
    targs = TrainingArguments(output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=32,
                              learning_rate=1e-3, logging_steps=args.log_steps, save_strategy="steps", save_steps=args.save_steps,
                              report_to=[], use_cpu=args.device == "cpu" or not torch.cuda.is_available(),
                              seed=args.seed, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    resume = get_last_checkpoint(str(out)) if args.resume and out.is_dir() else None
    trainer.train(resume_from_checkpoint=resume)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    state = rc.SpectralState(model, k=1, init_iter=200)
    summary = {"strength": args.strength, "steps": trainer.state.global_step, "resumed_from": resume,
               "final_loss": logs[-1]["loss"] if logs else None,
               "penalty": logs[-1].get("robustcompress/penalty") if logs else None,
               "max_sigma_1": round(max(float(state.sigmas(n)[0]) for n in state.names), 4)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
