"""The training loop shared by cifar_resnet.py and cifar_vgg.py.

One script, one GPU or many:

    python examples/cifar_resnet.py --data ./data --epochs 200
    torchrun --nproc_per_node 4 examples/cifar_resnet.py --data ./data --epochs 200

Under torchrun (WORLD_SIZE set) every process trains on its own shard
(DistributedSampler) of a DistributedDataParallel model; rank 0 evaluates,
prints and writes the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import robustcompress as rc

PENALTIES = {"spectral": rc.SpectralNormPenalty, "group-lasso": rc.GroupLassoPenalty, "nuclear": rc.NuclearNormPenalty}
CHECKPOINT = "checkpoint.pt"


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show the defaults, and the description as written."""


def parser(description: str, archs: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=_Help)
    p.add_argument("--data", default="data", help="folder holding cifar-10-batches-py/ (or that folder itself)")
    p.add_argument("--out", default="runs/cifar", help="output folder: checkpoint.pt, log.jsonl, final.json")
    p.add_argument("--arch", default=archs[0], choices=archs)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=0.1, help="for a total batch of 128; scaled linearly with it")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step"],
                   help="cosine to 0, or ×0.1 at 50%% and 75%% of the steps")
    p.add_argument("--no-augment", action="store_true", help="skip random crop (pad 4) and horizontal flip")
    p.add_argument("--penalty", default="none", choices=["none", *PENALTIES])
    p.add_argument("--strength", type=float, default=1e-3, help="penalty strength")
    p.add_argument("--adv-ratio", type=float, default=0.0,
                   help="share of every batch replaced by its PGD adversary (0: plain training)")
    p.add_argument("--eps", type=float, default=8 / 255, help="attack budget, inputs in [0, 1]")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--adv-steps", type=int, default=7, help="PGD steps when training")
    p.add_argument("--eval-steps", type=int, default=20, help="PGD steps when evaluating")
    p.add_argument("--robust-n", type=int, default=1000, help="test images for the final robust accuracy (0: skip)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N train and test images (0: all)")
    p.add_argument("--no-amp", action="store_true", help="no float16 autocast on CUDA (it is never used on CPU)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if it exists")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many epochs in this run (time-limited jobs; continue with --resume)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup_device(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """Join the process group under torchrun; return (device, rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return torch.device(auto if args.device == "auto" else args.device), 0, 1
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def load_data(args: argparse.Namespace) -> tuple[TensorDataset, TensorDataset]:
    try:
        train, test = rc.cifar10(args.data, train=True), rc.cifar10(args.data, train=False)
    except FileNotFoundError as err:  # the message names the expected layout; no traceback needed
        sys.exit(f"error: {err}")
    if args.limit:
        train, test = (TensorDataset(*(t[: args.limit] for t in ds.tensors)) for ds in (train, test))
    return train, test


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32×32 crop of the zero-padded (4 px) image and a random horizontal flip."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx, flip = (torch.randint(0, 9, (n,), generator=generator).to(x.device) for _ in range(3))
    ar = lambda size: torch.arange(size, device=x.device)  # noqa: E731
    rows = (dy[:, None] + ar(h))[:, None, :, None]
    cols = (dx[:, None] + ar(w))[:, None, None, :]
    crop = padded[ar(n)[:, None, None, None], ar(c)[None, :, None, None], rows, cols]
    return torch.where((flip % 2 == 1)[:, None, None, None], crop.flip(3), crop)


def make_optimizer(args: argparse.Namespace, net: nn.Module, steps_per_epoch: int, world: int):
    """SGD (Nesterov), wrapped with the penalty if one is asked for, and its per-step LR schedule."""
    lr = args.lr * args.batch_size * world / 128
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                          nesterov=True)
    if args.penalty != "none":
        # One shared state: the wrapper steps it once per step (and keeps DDP ranks in sync on CUDA).
        state = rc.SpectralState(net, k=8 if args.penalty == "nuclear" else 1)
        opt = rc.wrap(opt, net, penalties=[PENALTIES[args.penalty](state, strength=args.strength)])
    total = args.epochs * steps_per_epoch
    if args.schedule == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    else:
        factor = lambda step: 0.1 ** sum(step >= f * total for f in (0.5, 0.75))  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_epoch(args, epoch, model, net, batches, opt, sched, scaler, device, rank, world) -> float:
    """One pass over this process's shard; returns the mean training loss."""
    batches.sampler.set_epoch(epoch)
    # Every random choice is seeded by (seed, epoch, step, rank), so a resumed run repeats it exactly.
    gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch * world + rank)
    model.train()
    loss_sum, seen = torch.zeros((), device=device), 0
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if not args.no_augment:
            x = augment(x, gen)
        if args.adv_ratio > 0:
            # Attack the unwrapped network: DDP's forward would synchronise buffers mid-attack.
            x, y = rc.adversarial_batch(net, x, y, ratio=args.adv_ratio, eps=args.eps, norm=args.norm,
                                     steps=args.adv_steps, seed=(epoch * len(batches) + i) * world + rank)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16) if scaler.is_enabled() else nullcontext():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)  # unscales first, so the wrapper adds unscaled penalty gradients
        scaler.update()
        sched.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
    return loss_sum.item() / seen


def save_checkpoint(path: pathlib.Path, **state) -> None:
    # Write, then rename: an interrupted save never leaves a broken checkpoint.
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def run(description: str, build: dict[str, Callable[[], nn.Module]], argv: list[str] | None = None) -> None:
    """Parse the flags, train ``build[args.arch]()`` on CIFAR-10, checkpoint every epoch, evaluate."""
    args = parser(description, list(build)).parse_args(argv)
    device, rank, world = setup_device(args)
    main_process = rank == 0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train, test = load_data(args)

    net = build[args.arch]().to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    # One shuffle per epoch from (seed, epoch), the same for one process or many.
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    batches = DataLoader(train, batch_size=args.batch_size, sampler=sampler, pin_memory=device.type == "cuda")
    opt, sched = make_optimizer(args, net, len(batches), world)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not args.no_amp)

    start, history, ckpt_path = 0, [], out / CHECKPOINT
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if (ckpt["arch"], ckpt["penalty"]) != (args.arch, args.penalty):
            sys.exit(f"error: {ckpt_path} holds arch={ckpt['arch']}, penalty={ckpt['penalty']}; "
                     f"this run asks for arch={args.arch}, penalty={args.penalty}")
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start, history = ckpt["epoch"], ckpt["history"]
        if main_process:
            print(f"resumed from {ckpt_path} at epoch {start}")
    elif main_process:
        (out / "log.jsonl").unlink(missing_ok=True)

    if main_process:
        print(f"{args.arch}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train)} train / {len(test)} test images, device {device} × {world}, "
              f"amp {scaler.is_enabled()}, penalty {args.penalty}, adversarial share {args.adv_ratio}")
    stop = min(args.epochs, start + args.stop_after) if args.stop_after else args.epochs
    for epoch in range(start, stop):
        t0 = time.time()
        loss = train_epoch(args, epoch, model, net, batches, opt, sched, scaler, device, rank, world)
        if main_process:
            record = {"epoch": epoch + 1, "train_loss": round(loss, 4), "test_acc": round(rc.accuracy(net, test), 4),
                      "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1)}
            history.append(record)
            print(json.dumps(record), flush=True)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt_path, epoch=epoch + 1, arch=args.arch, penalty=args.penalty, args=vars(args),
                            model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                            scaler=scaler.state_dict(), history=history)
        if world > 1:
            dist.barrier()

    if main_process and args.robust_n > 0 and stop == args.epochs:
        subset = TensorDataset(*(t[: args.robust_n] for t in test.tensors))
        robust = rc.robust_accuracy(net, subset, "pgd", eps=args.eps, norm=args.norm, steps=args.eval_steps, seed=0)
        summary = {"clean_acc": round(rc.accuracy(net, subset), 4), "robust_acc": round(robust, 4),
                   "eps": args.eps, "norm": args.norm, "steps": args.eval_steps, "n": len(subset)}
        print(json.dumps(summary))
        (out / "final.json").write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.destroy_process_group()
