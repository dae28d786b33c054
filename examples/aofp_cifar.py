"""AOFP on the shared CIFAR-10 ResNet-20: prune to half the FLOPs while training, then fine-tune.

    python examples/aofp_cifar.py                     # CPU settings (theta 0.02, H 80, FLOPs-aware): ~50 min, one core
    python examples/aofp_cifar.py --paper-thresholds --theta 0.01 --half 1000 --warmup 500 --finetune-epochs 100
                                                      # the official test and schedule (a GPU's worth of steps)
The CPU settings were the best of those measured on this model (README, AOFP section): 82.41 +- 0.06 after the
benchmark's 1-epoch fine-tune (81.98 with --half 40, in half the time), against 81.09 with the paper's
FLOPs-blind thresholds at H 20.
"""
import argparse
import logging

import torch

import fxprune
from fxprune.training.cifar_resnet import load_cifar_resnet
from fxprune.training.data import CIFAR10Loader
import os
os.environ.setdefault("FXPRUNE_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))  # this repository's data

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", default="../shared/models/cifar_resnet20.pt")
parser.add_argument("--budget", type=float, default=0.5)
parser.add_argument("--theta", type=float, default=0.02, help="damage threshold (official: 0.01)")
parser.add_argument("--half", type=int, default=80, help="iterations per half (official: 1000)")
parser.add_argument("--warmup", type=int, default=100, help="warm-up iterations (official: 500)")
parser.add_argument("--paper-thresholds", action="store_true", help="one theta for every group (the paper's test)")
parser.add_argument("--finetune-epochs", type=float, default=1.0)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")

model, info = load_cifar_resnet(args.checkpoint)
train = CIFAR10Loader("train", batch_size=64, shuffle=True, augment=True, seed=0, drop_last=True)
test = CIFAR10Loader("test", batch_size=500)
config = fxprune.AOFP(theta=args.theta, iters_per_half=args.half, warmup_iters=args.warmup,
                      flops_aware=not args.paper_thresholds)
pruned = fxprune.compile(model, args.budget, example_inputs=(torch.randn(1, 3, 32, 32),), importance=config,
                         data=train, round_to=1)
run = pruned.meta["fxprune"]["importance"]  # AOFP's steps, epochs and search history
moves = [e for e in run["history"] if e["kind"] == "move"]
print(f"AOFP: {len(moves)} moves in {run['steps']} steps, FLOPs kept "
      f"{pruned.meta['fxprune']['flops']['ratio']:.1%}, top-1 before fine-tuning {fxprune.evaluate(pruned, test)['top1']:.2%}")
fxprune.finetune(pruned, CIFAR10Loader("train", batch_size=128, shuffle=True, augment=True, seed=1),
                 fxprune.FinetuneConfig(epochs=args.finetune_epochs, lr=0.01))
print(f"after fine-tuning: {fxprune.evaluate(pruned, test)['top1']:.2%} (dense {info['test_acc']:.2%})")
