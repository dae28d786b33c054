"""Latency budget vs FLOPs budget at the same measured latency, after the same fine-tune: the shared
CIFAR-10 ResNet-20.

1. `fxprune.compile(dense, Budget(latency=B, target=OnnxRuntimeTarget(batch, threads)))`;
2. a FLOPs budget searched (bisection, each candidate timed against the dense model in onnxruntime)
   until its result measures the latency the latency-budget result measured;
3. both timed once more, interleaved with the dense model;
4. each fine-tuned the same way (same epochs, learning rate, data order and seed) for every seed, and
   measured on the 10,000 test images.

    python benchmarks/latency_cifar.py                       # 2 seeds, 1 epoch each: ~20 minutes on 2 cores
    python benchmarks/latency_cifar.py --seeds 0 --epochs 0.2

Prints a table and writes JSON to --out. Data and checkpoint: ../shared (or --data / FXPRUNE_DATA)."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import warnings

import torch

import fxprune
from fxprune.export.latency_target import OnnxRuntimeTarget
from fxprune.training.cifar_resnet import load_cifar_resnet
from fxprune.training.data import CIFAR10Loader
from fxprune.training.finetune import FinetuneConfig, evaluate, finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("FXPRUNE_DATA", os.path.join(REPO, "..", "shared", "data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "..", "shared", "models", "cifar_resnet20.pt"))
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of the measured latency to keep")
    parser.add_argument("--batch", type=int, default=32, help="onnxruntime batch size of the target")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="benchmarks/results/latency_cifar.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")

    dense, _ = load_cifar_resnet(args.checkpoint)
    dense.eval()
    x = torch.randn(1, 3, 32, 32)
    target = OnnxRuntimeTarget(batch_size=args.batch, threads=args.threads, model_runs=30)

    latency_model = fxprune.compile(dense, fxprune.Budget(latency=args.budget, target=target), example_inputs=(x,))
    wanted = latency_model.meta["fxprune"]["latency"]["measured_ratio"]
    flops_model, search = same_latency_flops_model(dense, x, target, wanted)
    final = target.model_seconds({"dense": dense, "latency": latency_model, "flops": flops_model}, (x,))
    timing = {name: final[name] / final["dense"] for name in ("latency", "flops")}
    print(f"measured latency (interleaved, batch {args.batch}, {args.threads} thread(s)): latency-budget model "
          f"{timing['latency']:.3f}, FLOPs-budget model {timing['flops']:.3f} of the dense model")

    test = CIFAR10Loader("test", batch_size=500, path=args.data)
    rows = {"dense": {"top1": evaluate(dense, test)["top1"]}}
    for name, model in (("latency budget", latency_model), ("FLOPs budget", flops_model)):
        report = model.meta["fxprune"]
        rows[name] = {"flops_ratio": report["flops"]["ratio"], "params_ratio": report["params"]["ratio"],
                      "latency_ratio": timing["latency" if name.startswith("latency") else "flops"], "top1": []}
        for seed in map(int, args.seeds.split(",")):
            train = CIFAR10Loader("train", batch_size=128, shuffle=True, augment=True, seed=seed, path=args.data)
            config = FinetuneConfig(epochs=args.epochs, lr=args.lr, seed=seed, log_every=0)
            tuned = copy.deepcopy(model)
            finetune(tuned, train, config)          # in place
            rows[name]["top1"].append(evaluate(tuned, test)["top1"])
            print(f"{name}, seed {seed}: top-1 {100 * rows[name]['top1'][-1]:.2f}%", flush=True)
    print(f"\nResNet-20, latency budget {args.budget} on {target.key}; fine-tune {args.epochs} epoch(s) lr {args.lr}\n")
    print(f"{'model':16s} {'latency':>8s} {'FLOPs':>7s} {'params':>7s} {'top-1 per seed':>22s} {'mean':>7s}")
    for name, row in rows.items():
        if name == "dense":
            print(f"{name:16s} {1.0:8.3f} {1.0:7.3f} {1.0:7.3f} {'':>22s} {100 * row['top1']:6.2f}%")
            continue
        seeds = " ".join(f"{100 * t:.2f}%" for t in row["top1"])
        print(f"{name:16s} {row['latency_ratio']:8.3f} {row['flops_ratio']:7.3f} {row['params_ratio']:7.3f} "
              f"{seeds:>22s} {100 * statistics.mean(row['top1']):6.2f}%")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"budget": args.budget, "target": target.key, "epochs": args.epochs, "lr": args.lr, "rows": rows,
                   "flops_search": search, "latency_report": latency_model.meta["fxprune"]["latency"]}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


def same_latency_flops_model(dense, x, target, wanted: float, steps: int = 7):
    """The FLOPs budget whose result measures `wanted` of the dense latency (bisection on the budget)."""
    lo, hi, tried, best = 0.05, 1.0, [], None
    for _ in range(steps):
        budget = (lo + hi) / 2
        model = fxprune.compile(dense, budget, example_inputs=(x,))
        seconds = target.model_seconds({"dense": dense, "candidate": model}, (x,))
        ratio = seconds["candidate"] / seconds["dense"]
        tried.append({"flops_budget": budget, "latency_ratio": ratio})
        if best is None or abs(ratio - wanted) < abs(best[1] - wanted):
            best = (model, ratio)
        if abs(ratio - wanted) <= 0.01:
            break
        lo, hi = (budget, hi) if ratio < wanted else (lo, budget)
    return best[0], tried


if __name__ == "__main__":
    sys.exit(main())
