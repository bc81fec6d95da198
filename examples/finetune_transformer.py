"""Fine-tune a small transformers model with the plugin: full fine-tuning and LoRA, with and without the σ₁² penalty.

A BERT-shaped classifier (built from a config, random weights: no download)
learns a synthetic token task (is the majority of tokens in the lower half of
the vocabulary?). Each run trains with AdamW; with the penalty,
``rc.wrap(optimizer, model, rc.default_penalties(model))`` adds σ₁² of every
layer the penalty selects. Full fine-tuning trains every weight; LoRA
(``peft``, adapters on the attention query/value projections, base frozen)
penalises the effective weight ``W₀ + s·B·A`` through the adapters, and the
frozen base stays bit-identical. One JSON line per run: accuracy, the largest
tracked σ₁, and whether the frozen weights were left alone.

    python examples/finetune_transformer.py                  # both modes
    python examples/finetune_transformer.py --mode lora --strength 1e-2
    python examples/finetune_transformer.py --tiny           # the CI configuration
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import robustcompress as rc


def make_data(n: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences; label 1 when most tokens lie in the lower half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    y = ((x < vocab // 2).sum(1) * 2 > length).long()
    return x, y


def build_model(args: argparse.Namespace, mode: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(args.seed)
    cfg = transformers.BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                                  intermediate_size=2 * args.hidden, vocab_size=args.vocab,
                                  max_position_embeddings=args.length, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    if mode == "lora":
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
        model = peft.get_peft_model(model, config)
    return model


def run(args: argparse.Namespace, mode: str, strength: float) -> dict:
    model = build_model(args, mode)
    x, y = make_data(args.n_train, args.length, args.vocab, args.seed)
    xt, yt = make_data(args.n_test, args.length, args.vocab, args.seed + 1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    with warnings.catch_warnings():
        # The state warns once about the embeddings it leaves out (see README, coverage).
        warnings.simplefilter("ignore", UserWarning)
        # Built at strength 0 too, so both runs report σ₁ over the same layers.
        penalties = rc.default_penalties(model, strength=strength)
    if strength > 0:
        opt = rc.wrap(opt, model, penalties)
    model.train()
    for _ in range(args.epochs):
        for i in range(0, len(x), args.batch):
            opt.zero_grad()
            loss = model(input_ids=x[i:i + args.batch], labels=y[i:i + args.batch]).loss
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(input_ids=xt).logits.argmax(1) == yt).float().mean())
    state = penalties[0].state
    state.step(50)
    names = penalties[0].names
    sigma = max(float(state.sigmas(n)[0]) for n in names)
    untouched = all(torch.equal(p, frozen[n]) and p.grad is None
                    for n, p in model.named_parameters() if n in frozen)
    return {"mode": mode, "strength": strength, "test_accuracy": round(acc, 4), "max_sigma1": round(sigma, 4),
            "layers": len(names), "frozen_tensors": len(frozen), "frozen_untouched": untouched}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("full", "lora", "both"), default="both")
    p.add_argument("--strength", type=float, default=1e-2, help="strength of the σ₁² penalty (0: only the baseline)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--vocab", type=int, default=100)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a seconds-long configuration (CI)")
    args = p.parse_args()
    if args.tiny:
        args.epochs, args.n_train, args.n_test, args.length, args.hidden, args.layers = 1, 64, 32, 12, 32, 1
    torch.set_num_threads(1)
    modes = ("full", "lora") if args.mode == "both" else (args.mode,)
    for mode in modes:
        for strength in sorted({0.0, args.strength}):
            print(json.dumps(run(args, mode, strength)), flush=True)


if __name__ == "__main__":
    main()
