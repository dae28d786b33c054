"""Train a CIFAR ResNet baseline to prune: SGD (momentum 0.9, Nesterov, weight decay 5e-4), cosine
learning rate per step, the standard crop + flip augmentation, deterministic for a given seed (and,
on a CPU, thread count). Writes the shared checkpoint format after every epoch (fxprune.training.cifar_resnet).

    python examples/train_cifar_resnet.py --depth 20 --epochs 160 --out resnet20.pt
    python examples/train_cifar_resnet.py --epochs 1 --subset 2000 --test-subset 1000 --out /tmp/r20.pt

160 epochs of ResNet-20 reach about 91-92% on a GPU in well under an hour; on a 2-core CPU one full
epoch takes minutes, so use --subset there. The data is found as fxprune.training.data.find_cifar10 says
(--data, else $FXPRUNE_DATA, else ../shared/data beside the repository); nothing is downloaded."""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from fxprune.training.cifar_resnet import cifar_resnet, save_cifar_resnet
from fxprune.training.data import CIFAR10Loader
import os
os.environ.setdefault("FXPRUNE_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))  # this repository's data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="6n+2: 20, 32, 44, 56, 110 (default 20)")
    p.add_argument("--epochs", type=int, default=160)
    p.add_argument("--out", required=True, help="checkpoint to write (rewritten after every epoch)")
    p.add_argument("--data", default=None, help="cifar10_jpeg.npz, a directory holding it, or cifar-10-batches-py")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate, annealed to 0 by a cosine")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="5e-4 (common), or 1e-4 as He et al.")
    p.add_argument("--seed", type=int, default=0, help="initialisation, order and augmentation")
    p.add_argument("--subset", type=int, default=None, help="train on a class-balanced subset of N images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on a class-balanced subset of N test images")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and always after the last)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a CPU busy with other jobs 1 can be much faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model: nn.Module, loader: CIFAR10Loader, device: torch.device) -> float:
    """Top-1 accuracy (fraction) in eval mode."""
    model.eval()
    correct = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / loader.num_samples


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # reproducible convolutions on the GPU too, at a small cost in speed
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.manual_seed(args.seed)  # initial weights; the loaders take their own seed

    train = CIFAR10Loader("train", args.batch_size, shuffle=True, augment=True, seed=args.seed,
                          subset=args.subset, path=args.data)
    test = CIFAR10Loader("test", 500, subset=args.test_subset, path=args.data)
    model = cifar_resnet(args.depth).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                                weight_decay=args.weight_decay)
    total_steps = args.epochs * len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    loss_fn = nn.CrossEntropyLoss()
    print(f"ResNet-{args.depth}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params; "
          f"{train.num_samples} train images ({len(train)} batches of {args.batch_size}), "
          f"{test.num_samples} test images; {args.epochs} epochs on {device}"
          + (f" with {torch.get_num_threads()} threads" if device.type == "cpu" else ""), flush=True)

    test_acc = float("nan")
    for epoch in range(args.epochs):
        start = time.perf_counter()
        train.set_epoch(epoch)  # a new order and augmentation every epoch, reproducibly
        model.train()
        loss_sum, correct = 0.0, 0
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
        last = epoch + 1 == args.epochs
        if last or (epoch + 1) % args.eval_every == 0:
            test_acc = evaluate(model, test, device)
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss_sum / train.num_samples:.4f}  "
              f"train {correct / train.num_samples:6.2%}  test {test_acc:6.2%}  "
              f"lr {schedule.get_last_lr()[0]:.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
        if not math.isnan(test_acc):
            save_cifar_resnet(model, args.out, args.depth, test_acc, epochs=epoch + 1, total_epochs=args.epochs,
                              seed=args.seed, lr=args.lr, batch_size=args.batch_size,
                              weight_decay=args.weight_decay, train_subset=args.subset,
                              test_subset=args.test_subset, recipe="SGD nesterov, cosine per step, crop+flip")
    print(f"saved {args.out}: test accuracy {test_acc:.2%}")


if __name__ == "__main__":
    main()
