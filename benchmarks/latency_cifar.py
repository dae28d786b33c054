"""Latency budget vs FLOPs budget at the same measured latency, after the same fine-tune: the shared
CIFAR-10 ResNet-20.

1. `fxprune.compile(dense, Budget(latency=B, target=OnnxRuntimeTarget(batch, threads)))`;
2. FLOPs-budget results over a grid of budgets, timed together with the dense and the latency-budget
   model (all interleaved; --sessions timings, each itself the target's median over its own fresh
   onnxruntime sessions; the median ratio per model counts): the one
   whose latency is closest to the latency-budget model's is its equal-latency rival. One timing per
   candidate, as a bisection does, is not enough here: the same model in a new session moves by
   several percent;
3. the pair timed again, in new sessions, as an independent check of the match;
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

import numpy as np
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
    parser.add_argument("--grid", type=float, nargs=3, default=(0.2, 0.46, 0.02), metavar=("FROM", "TO", "STEP"),
                        help="FLOPs budgets tried for the equal-latency FLOPs model")
    parser.add_argument("--sessions", type=int, default=3, help="timings per comparison (each the target's median over model_sessions fresh sessions)")
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
    budgets = [round(b, 3) for b in np.arange(args.grid[0], args.grid[1] + 1e-9, args.grid[2])]
    flops_model, search = same_latency_flops_model(dense, x, target, latency_model, budgets, args.sessions)
    check = interleaved_ratios(target, {"dense": dense, "latency": latency_model, "flops": flops_model}, x,
                               args.sessions)
    timing = {name: statistics.median(check[name]) for name in ("latency", "flops")}
    print(f"independent check (interleaved, {args.sessions} timings, batch {args.batch}, {args.threads} "
          f"thread(s)): latency-budget model {timing['latency']:.3f}, FLOPs-budget model {timing['flops']:.3f} "
          f"of the dense model", flush=True)

    test = CIFAR10Loader("test", batch_size=500, path=args.data)
    rows = {"dense": {"top1": evaluate(dense, test)["top1"]}}
    for name, model in (("latency budget", latency_model), ("FLOPs budget", flops_model)):
        report = model.meta["fxprune"]
        rows[name] = {"flops_ratio": report["flops"]["ratio"], "params_ratio": report["params"]["ratio"],
                      "latency_ratio": timing["latency" if name.startswith("latency") else "flops"],
                      "conv_widths": [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)],
                      "top1": []}
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
                   "flops_search": search, "check_ratios": check, "latency_report": latency_model.meta["fxprune"]["latency"]}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


def interleaved_ratios(target, models, x, sessions: int):
    """Each model's latency over the dense model's, `sessions` times (each a target.model_seconds call:
    a median over the target's own fresh sessions)."""
    ratios = {name: [] for name in models if name != "dense"}
    for _ in range(sessions):
        seconds = target.model_seconds(models, (x,))
        for name in ratios:
            ratios[name].append(seconds[name] / seconds["dense"])
    return ratios


def same_latency_flops_model(dense, x, target, latency_model, budgets, sessions: int):
    """The FLOPs-budget result (one per budget in `budgets`) whose median measured latency is closest
    to the latency-budget model's, all timed in the same interleaved runs."""
    candidates = {f"{b:.3f}": fxprune.compile(dense, b, example_inputs=(x,)) for b in budgets}
    ratios = interleaved_ratios(target, {"dense": dense, "latency": latency_model, **candidates}, x, sessions)
    medians = {name: statistics.median(r) for name, r in ratios.items()}
    chosen = min(candidates, key=lambda name: abs(medians[name] - medians["latency"]))
    search = [{"flops_budget": float(name), "latency_ratios": ratios[name], "chosen": name == chosen}
              for name in candidates]
    print(f"latency-budget model: {medians['latency']:.3f} of the dense latency; FLOPs budgets: "
          + ", ".join(f"{name} -> {medians[name]:.3f}" for name in candidates) + f"; chosen {chosen}", flush=True)
    return candidates[chosen], search + [{"latency_budget_model": ratios["latency"]}]


if __name__ == "__main__":
    sys.exit(main())
