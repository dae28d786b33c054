"""Do the defaults suit a small model? The shared CIFAR-10 ResNet-20 (16/32/64 channels) pruned to a FLOPs
budget with compile's defaults, with round_to=1 and 8, and with Torch-Pruning's L1 pruner at the FLOPs the
default kept (its ratio searched with fxprune's counter), each then given the same BatchNorm recalibration
(the same 2,000 training images, no fine-tuning) and measured on the 10,000 test images.

    python benchmarks/defaults_cifar.py                  # about 3 minutes on 2 cores
    python benchmarks/defaults_cifar.py --budget 0.3

Prints a table and writes JSON to --out. Data and checkpoint: ../shared (or --data / FXPRUNE_DATA)."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import fxprune
from fxprune.training.cifar_resnet import load_cifar_resnet
from fxprune.training.data import CIFAR10Loader, calibration_batches
from fxprune.training.finetune import evaluate, recalibrate_bn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("FXPRUNE_DATA", os.path.join(REPO, "..", "shared", "data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "..", "shared", "models", "cifar_resnet20.pt"))
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of FLOPs to keep (default 0.5)")
    parser.add_argument("--recalibration-images", type=int, default=2000)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="benchmarks/results/defaults_cifar.json")
    args = parser.parse_args()
    from zoo import search_tp_ratio, tp_prune   # Torch-Pruning's recipe, shared with zoo.py

    dense, _ = load_cifar_resnet(args.checkpoint)
    dense.eval()
    x = torch.randn(1, 3, 32, 32)
    batch = 100
    recalibration = calibration_batches(args.recalibration_images // batch, batch_size=batch, seed=0, path=args.data)
    test = CIFAR10Loader("test", batch_size=500, path=args.data)

    def flops(model) -> float:
        return fxprune.cost_of(model, (x,))["flops"]

    dense_flops = flops(dense)
    models = {name: fxprune.compile(dense, args.budget, example_inputs=(x,), **options)
              for name, options in (("fxprune defaults", {}), ("fxprune round_to=1", {"round_to": 1}),
                                    ("fxprune round_to=8", {"round_to": 8}))}
    target = flops(models["fxprune defaults"]) / dense_flops
    ratio, _ = search_tp_ratio(dense, x, target, count=lambda m, inp: flops(m))
    models["torch-pruning L1"] = tp_prune(copy.deepcopy(dense), x, ratio)[0].eval()

    rows = [{"model": "dense", "flops_ratio": 1.0, "top1": evaluate(dense, test)["top1"]}]
    for name, model in models.items():
        start = time.perf_counter()
        model = recalibrate_bn(copy.deepcopy(model), recalibration, n_batches=len(recalibration))
        rows.append({"model": name, "flops_ratio": flops(model) / dense_flops, "top1": evaluate(model, test)["top1"],
                     "seconds": time.perf_counter() - start})
    print(f"ResNet-20, budget {args.budget}, BN recalibrated on {args.recalibration_images} training images, "
          f"top-1 on 10,000 test images\n")
    print(f"{'model':22s} {'FLOPs kept':>10s} {'top-1':>7s}")
    for row in rows:
        print(f"{row['model']:22s} {row['flops_ratio']:10.3f} {100 * row['top1']:6.2f}%")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"budget": args.budget, "recalibration_images": args.recalibration_images, "rows": rows,
                   "torch": torch.__version__, "fxprune": fxprune.__version__}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
