"""SCOP on the shared CIFAR-10 ResNet-20: knockoff-controlled scores, uniform per-layer pruning to half
the FLOPs, BN recalibration, fine-tuning.

    python examples/scop_cifar.py                     # ~10 min on one CPU core
    python examples/scop_cifar.py --knockoff gaussian --steps 400
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
parser.add_argument("--knockoff", default="shuffle", help="shuffle | gaussian | noise")
parser.add_argument("--steps", type=int, default=100, help="factor-training steps (batches of 128 + 128 knockoffs)")
parser.add_argument("--finetune-epochs", type=float, default=1.0)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")

model, info = load_cifar_resnet(args.checkpoint)
train = CIFAR10Loader("train", batch_size=128, shuffle=True, augment=False, seed=0, drop_last=True)
test = CIFAR10Loader("test", batch_size=500)
config = fxprune.SCOP(knockoff=args.knockoff, steps=args.steps)
pruned = fxprune.compile(model, args.budget, example_inputs=(torch.randn(1, 3, 32, 32),), importance=config,
                         data=train, round_to=1, allocation="uniform")
print(f"FLOPs kept {pruned.meta['fxprune']['flops']['ratio']:.1%}, top-1 before fine-tuning "
      f"{fxprune.evaluate(pruned, test)['top1']:.2%}")
fxprune.recalibrate_bn(pruned, train, n_batches=50)
print(f"after BN recalibration: {fxprune.evaluate(pruned, test)['top1']:.2%}")
fxprune.finetune(pruned, CIFAR10Loader("train", batch_size=128, shuffle=True, augment=True, seed=1),
                 fxprune.FinetuneConfig(epochs=args.finetune_epochs, lr=0.01))
print(f"after fine-tuning: {fxprune.evaluate(pruned, test)['top1']:.2%} (dense {info['test_acc']:.2%})")
