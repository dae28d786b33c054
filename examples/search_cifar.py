"""Network pruning space search on the shared CIFAR-10 ResNet-20: sample subnetworks at about half the
FLOPs, score each with a cheap proxy, refine the space to the best FLOPs-to-parameter ratio, keep the
best subnetwork, fine-tune it.

    python examples/search_cifar.py                         # 8 + 8 samples, ~6 min on 2 CPU cores
    python examples/search_cifar.py --samples 32 --proxy-steps 100 --workers 4
"""
import argparse
import logging

import torch

import fxprune
from fxprune.training.cifar_resnet import load_cifar_resnet
from fxprune.training.data import CIFAR10Loader
from fxprune.search.proxy_eval import cifar10_proxy_evaluator
import os
os.environ.setdefault("FXPRUNE_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))  # this repository's data

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", default="../shared/models/cifar_resnet20.pt")
parser.add_argument("--budget", type=float, default=0.5)
parser.add_argument("--samples", type=int, default=8, help="per space (initial and refined)")
parser.add_argument("--proxy-steps", type=int, default=10, help="fine-tune steps per sample")
parser.add_argument("--workers", type=int, default=2, help="evaluation processes")
parser.add_argument("--finetune-epochs", type=float, default=1.0)
parser.add_argument("--out", default="search-cifar")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")

model, info = load_cifar_resnet(args.checkpoint)
# the proxy: BN recalibration + a few SGD steps, error on 2,000 held-out *training* images
evaluator = cifar10_proxy_evaluator(val=2000, steps=args.proxy_steps)
search = fxprune.SpaceSearch(evaluator=evaluator, n_samples=args.samples, n_buckets=4, workers=args.workers,
                             out_dir=args.out)
pruned = fxprune.compile(model, args.budget, example_inputs=(torch.randn(1, 3, 32, 32),), allocation=search,
                         round_to=1)
result = pruned.meta["fxprune"]["search"]  # every sample, rho*, the EDF comparison, the best subnetwork
print(f"rho* = {result['rho_star']:.1f} FLOPs/param ({result['rho_star'] / result['rho0']:.2f} x dense); proxy error "
      f"initial {result['comparison']['mean_error_initial']:.3f} -> refined {result['comparison']['mean_error_refined']:.3f}; "
      f"best {result['best']['error']:.3f} from the {result['best']['round']} space; plots in {args.out}/")

train = CIFAR10Loader("train", batch_size=128, shuffle=True, augment=True, seed=0, drop_last=True)
test = CIFAR10Loader("test", batch_size=500)
fxprune.finetune(pruned, train, fxprune.FinetuneConfig(epochs=args.finetune_epochs, lr=0.01))
print(f"dense {info.get('test_acc')}, searched subnetwork at {pruned.meta['fxprune']['flops']['ratio']:.1%} FLOPs: "
      f"top-1 {fxprune.evaluate(pruned, test)['top1']:.4f} after {args.finetune_epochs} epoch(s) of fine-tuning")
