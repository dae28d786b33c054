"""CIFAR-10 accuracy benchmark: every importance criterion and Torch-Pruning, pruned to the same FLOPs and
fine-tuned with the identical budget, side by side.

From a trained CIFAR ResNet checkpoint, for each FLOPs budget and each method:
  - prune: fxprune.compile(model, budget, importance=<method>) (global allocation, round_to as configured;
    Taylor gets calibration batches from the training split); "l1_inner": L1 with SCOP's paper setup
    (residual streams whole, uniform per-layer rate), the control that separates SCOP's criterion from
    its allocation; "l1_uniform": L1 at one uniform per-layer rate, residual streams included (the
    control for SCOP's "l1_streams" scope); "tp": Torch-Pruning's L1 magnitude pruner
    (BasePruner, per-layer ratio, classifier ignored), its ratio searched to the FLOPs fxprune kept;
  - measure top-1 on the test split right after pruning;
  - fine-tune with fxprune.finetune (identical epochs, schedule, batch size and seed for every method),
    once per seed, and measure top-1 again;
  - FLOPs and params (fxprune's counter for every model), onnxruntime latency at batch 1.
It prints a table (mean and std over seeds), writes JSON, and a plot of accuracy against FLOPs kept when
several budgets are run.

    python benchmarks/cifar.py --config cpu     # ResNet-20, about an hour on 2 CPU cores
    python benchmarks/cifar.py --config full --checkpoint resnet56.pt --device cuda   # ResNet-56, long fine-tune

Data: ../shared/data/cifar10_jpeg.npz, or --data / FXPRUNE_DATA. The checkpoint for "cpu" is
../shared/models/cifar_resnet20.pt; train others with examples/train_cifar_resnet.py.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from typing import Dict, List, Optional

import torch

import fxprune
from fxprune.export.benchmark import benchmark_onnxruntime
from fxprune.training.cifar_resnet import load_cifar_resnet
from fxprune.training.data import CIFAR10Loader, calibration_batches, find_cifar10
from fxprune.training.finetune import FinetuneConfig, evaluate, finetune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the library has no default data location; the repository's runs read the shared copy
os.environ.setdefault("FXPRUNE_DATA", os.path.join(REPO, "..", "shared", "data"))
CONFIGS = {
    # one fine-tune epoch per run: 7 methods x 2 seeds finish in about an hour on one core of this
    # 2-core machine (one thread: small convs gain little from the second core under load)
    "cpu": dict(checkpoint=os.path.join(REPO, "..", "shared", "models", "cifar_resnet20.pt"),
                methods="l1,l2,bn,taylor,fpgm,random,tp", budgets="0.5", seeds="0,1",
                epochs=1.0, lr=0.01, batch_size=128, train_subset=None, round_to=1, threads=1),
    "full": dict(checkpoint=None, methods="l1,l2,bn,taylor,fpgm,random,tp,aofp,scop", budgets="0.75,0.5,0.25",
                 seeds="0,1,2", epochs=40.0, lr=0.02, batch_size=128, train_subset=None, round_to=1, threads=None),
}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.table:
        return print_merged_table(args.table)
    logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")
    logging.getLogger("fxprune").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        find_cifar10(args.data)
    except FileNotFoundError as exc:
        print(f"cifar.py: CIFAR-10 not found, nothing to run: {exc}", file=sys.stderr)
        return 2
    if not args.checkpoint or not os.path.exists(args.checkpoint):
        print(f"cifar.py: checkpoint {args.checkpoint!r} not found; train one with examples/train_cifar_resnet.py",
              file=sys.stderr)
        return 2
    dense, info = load_cifar_resnet(args.checkpoint)
    dense = dense.to(args.device).eval()
    x = torch.randn(1, 3, 32, 32)
    test = CIFAR10Loader("test", batch_size=500, shuffle=False, augment=False, path=args.data)
    dense_top1 = evaluate(dense, test, device=args.device)["top1"]
    print(f"dense: depth {info.get('depth')}, recorded test acc {info.get('test_acc')}, measured {dense_top1:.4f}")
    calibration = calibration_batches(args.calibration_batches, 64, seed=0, path=args.data)
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, optimizer="sgd", schedule="cosine",
                            weight_decay=5e-4, distill_alpha=args.distill, seed=0)

    rows, started = [], time.perf_counter()
    out = {"config": vars(args), "environment": environment(),
           "dense": {"top1": dense_top1, "flops": fxprune.cost_of(dense, (x,))["flops"], **info_of(info)},
           "finetune": asdict(config), "rows": rows}
    for budget in args.budgets:
        pruned_models = {}
        for method in args.methods:
            clock = time.perf_counter()
            search_stats: dict = {}
            pruned = prune(dense.cpu(), method, budget, x, args, calibration, search_stats)
            pruned_models[method] = pruned
            cost = fxprune.cost_of(pruned, (x,))
            row = {"budget": budget, "method": method, "flops": cost["flops"], "params": cost["params"],
                   "prune_seconds": time.perf_counter() - clock,
                   "top1_pruned": evaluate(copy.deepcopy(pruned).to(args.device), test, device=args.device)["top1"],
                   "top1_finetuned": [], "finetune_seconds": [], "widths": widths_of(pruned), **search_stats}
            for seed in args.seeds:
                model = copy.deepcopy(pruned).to(args.device)
                train = CIFAR10Loader("train", batch_size=args.batch_size, shuffle=True, augment=True, seed=seed,
                                      subset=args.train_subset, drop_last=True, path=args.data)
                clock = time.perf_counter()
                finetune(model, train, FinetuneConfig(**{**asdict(config), "seed": seed}),
                         teacher=dense if args.distill else None, device=args.device)
                row["finetune_seconds"].append(time.perf_counter() - clock)
                row["top1_finetuned"].append(evaluate(model, test, device=args.device)["top1"])
            rows.append(row)
            print_row(row, dense_top1)
            write(out, args.out)
        latency = benchmark_onnxruntime({"dense": dense.cpu(), **pruned_models}, (x,), name="cifar", batch_sizes=(1,),
                                        threads=1, warmup=10, runs=50)
        for row in rows:
            if row["budget"] == budget:
                row["latency_b1_ms"] = latency.rows[[r.name for r in latency.rows].index(row["method"])].latency[1].median_ms
        out["dense"]["latency_b1_ms"] = latency.dense.latency[1].median_ms
        write(out, args.out)
    print_table(out, dense_top1)
    if len(args.budgets) > 1:
        plot(out, os.path.splitext(args.out)[0] + ".png")
    print(f"total {time.perf_counter() - started:.0f}s; wrote {args.out}")
    return 0


def prune(dense: torch.nn.Module, method: str, budget: float, x: torch.Tensor, args, calibration,
          search_stats: dict) -> torch.nn.Module:
    """The pruned model; AOFP and SCOP add what their training did to `search_stats` (goes in the row)."""
    if method == "tp":
        from zoo import search_tp_ratio, tp_prune
        target = fxprune.compile(dense, budget, example_inputs=(x,), round_to=args.round_to,
                                 verify=False).meta["fxprune"]["flops"]["ratio"]
        count = lambda m, inp: fxprune.cost_of(m, (inp,))["flops"]  # noqa: E731
        ratio, _ = search_tp_ratio(dense, x, target, count=count)
        pruned, _ = tp_prune(copy.deepcopy(dense), x, ratio)
        return pruned.eval()
    if method == "aofp":  # prunes while training on the training split (its own SGD, lr 1e-3 constant)
        config = fxprune.AOFP(theta=args.aofp_theta, iters_per_half=args.aofp_half, warmup_iters=args.aofp_warmup,
                              max_epochs=args.aofp_max_epochs, score_bn=args.aofp_score_bn,
                              flops_aware=args.aofp_flops_aware, seed=0)
        train = CIFAR10Loader("train", batch_size=64, shuffle=True, augment=True, seed=100, drop_last=True,
                              path=args.data)
        pruned = fxprune.compile(dense, budget, example_inputs=(x,), importance=config, round_to=args.round_to,
                                 data=train)
        run = pruned.meta["fxprune"]["importance"]
        search_stats["aofp"] = {"steps": run["steps"], "epochs": run["epochs"]}
        return pruned
    if method == "scop":  # default: the paper's setup (inner groups only, uniform per-layer rate, shuffle)
        config = fxprune.SCOP(knockoff=args.scop_knockoff, steps=args.scop_steps, scope=args.scop_scope, seed=0)
        train = CIFAR10Loader("train", batch_size=128, shuffle=True, augment=False, seed=200, drop_last=True,
                              path=args.data)
        pruned = fxprune.compile(dense, budget, example_inputs=(x,), importance=config, round_to=args.round_to,
                                 data=train, allocation=args.scop_allocation)
        factors = pruned.meta["fxprune"]["importance"]
        search_stats["scop"] = {"steps": args.scop_steps, "saturated": factors["saturated"],
                                "below_half": factors["below_half"]}
        return pruned
    if method == "l1_inner":  # control for SCOP's paper setup: L1 scores, SCOP's scope and uniform rate
        return fxprune.compile(dense, budget, example_inputs=(x,), importance=InnerGroupsL1(), round_to=args.round_to,
                               allocation="uniform")
    if method == "l1_uniform":  # control for SCOP(scope="l1_streams"): L1 scores at one uniform per-layer rate
        return fxprune.compile(dense, budget, example_inputs=(x,), importance="l1", round_to=args.round_to,
                               allocation="uniform")
    importance = fxprune.RandomImportance(seed=0) if method == "random" else method
    return fxprune.compile(dense, budget, example_inputs=(x,), importance=importance, round_to=args.round_to,
                           data=calibration)


class InnerGroupsL1(fxprune.L1Importance):
    """L1, but residual streams kept whole as SCOP(scope="non_residual") keeps them."""

    name = "l1_inner"

    def excluded_groups(self, gm, groups):
        return fxprune.SCOP().excluded_groups(gm, groups)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--checkpoint")
    parser.add_argument("--methods", help="comma-separated: l1,l2,bn,taylor,fpgm,random,tp,aofp,scop,l1_inner,l1_uniform")
    parser.add_argument("--budgets", help="comma-separated FLOPs budgets")
    parser.add_argument("--seeds", help="comma-separated fine-tune seeds")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--train-subset", type=int, help="fine-tune on this many training images (class-balanced)")
    parser.add_argument("--round-to", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--distill", type=float, default=0.0, help="KD weight from the dense model (0: off)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="batches of 64 for data-driven importances")
    parser.add_argument("--aofp-theta", type=float, default=0.01, help="AOFP damage threshold")
    parser.add_argument("--aofp-half", type=int, default=200, help="AOFP iterations per half (official: 1000)")
    parser.add_argument("--aofp-warmup", type=int, default=100, help="AOFP warm-up iterations (official: 500)")
    parser.add_argument("--aofp-max-epochs", type=float, default=20.0)
    parser.add_argument("--aofp-score-bn", default="base_stats", help="base_stats | batch (official) | eval")
    parser.add_argument("--aofp-flops-aware", action="store_true", help="per-group theta scaled by channel FLOPs")
    parser.add_argument("--scop-steps", type=int, default=100, help="SCOP factor-training steps (batch 128+128)")
    parser.add_argument("--scop-knockoff", default="shuffle", help="shuffle | gaussian | noise")
    parser.add_argument("--scop-scope", default="non_residual", help="non_residual (paper) | all | l1_streams")
    parser.add_argument("--scop-allocation", default="uniform", help="uniform (paper) | global")
    parser.add_argument("--data", help="CIFAR-10 npz file or pickles directory (default: $FXPRUNE_DATA, else ../shared/data)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/cifar.json")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print one table from the JSON of earlier runs (e.g. methods run in parallel processes) "
                             "and run nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="fxprune progress output")
    args = parser.parse_args(argv)
    for key, value in CONFIGS[args.config].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.methods = args.methods.split(",")
    args.budgets = [float(b) for b in str(args.budgets).split(",")]
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    return args


def widths_of(pruned: torch.nn.Module) -> Optional[Dict[str, int]]:
    """Kept width per prunable group (fxprune results only; Torch-Pruning's models carry no report)."""
    report = getattr(pruned, "meta", {}).get("fxprune")
    return {g["name"]: g["kept"] for g in report["groups"] if not g["blocked"]} if report else None


def info_of(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str))}


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}


def mean_std(values: List[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def print_row(row: dict, dense_top1: float) -> None:
    print(f"  {row['method']:7s} budget {row['budget']}: FLOPs {row['flops'] / 1e6:.1f}M, top-1 pruned "
          f"{100 * row['top1_pruned']:.2f}, fine-tuned {mean_std(row['top1_finetuned'])} "
          f"(dense {100 * dense_top1:.2f}; {sum(row['finetune_seconds']):.0f}s fine-tuning)", flush=True)


def print_table(out: dict, dense_top1: float) -> None:
    dense = out["dense"]
    print(f"\ndense: top-1 {100 * dense_top1:.2f}, latency b1 {dense.get('latency_b1_ms', float('nan')):.3f} ms")
    print(f"{'budget':>6s} {'method':22s} {'FLOPs':>8s} {'kept':>6s} {'params':>8s} {'top-1 pruned':>12s} "
          f"{'top-1 fine-tuned (mean ± std)':>30s} {'ORT b1 ms':>9s}")
    flops0 = dense.get("flops")  # older JSON lacks it: then the first row is taken to have met its budget
    for row in out["rows"]:
        flops0 = flops0 or row["flops"] / row["budget"]
        print(f"{row['budget']:6.2f} {row['method']:22s} {row['flops'] / 1e6:7.1f}M {row['flops'] / flops0:6.1%} "
              f"{row['params'] / 1e3:7.1f}K {100 * row['top1_pruned']:12.2f} {mean_std(row['top1_finetuned']):>30s} "
              f"{row.get('latency_b1_ms', float('nan')):9.3f}")
    print(f"fine-tune: {out['finetune']['epochs']} epochs, lr {out['finetune']['lr']}, seeds {out['config']['seeds']}")


def print_merged_table(paths: List[str]) -> int:
    """One table from several runs' JSON. Rows are named by method, and by method@file where two files
    share a method (variants of one method run with other settings)."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append((os.path.splitext(os.path.basename(path))[0], json.load(fh)))
    first = runs[0][1]
    for name, run in runs[1:]:
        if run["finetune"] != first["finetune"] or abs(run["dense"]["top1"] - first["dense"]["top1"]) > 1e-9:
            print(f"cifar.py: {name} used another fine-tune or dense model than {runs[0][0]}: not comparable",
                  file=sys.stderr)
            return 2
    methods = [row["method"] for _, run in runs for row in run["rows"]]
    rows = []
    for name, run in runs:
        for row in run["rows"]:
            label = row["method"] if methods.count(row["method"]) == 1 else f"{row['method']}@{name}"
            rows.append({**row, "method": label})
    print_table({**first, "rows": rows}, first["dense"]["top1"])
    return 0


def plot(out: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    by_method: Dict[str, list] = {}
    for row in out["rows"]:
        by_method.setdefault(row["method"], []).append((row["budget"], statistics.mean(row["top1_finetuned"])))
    for method, points in by_method.items():
        points.sort()
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=method)
    ax.axhline(100 * out["dense"]["top1"], color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("FLOPs budget (fraction kept)")
    ax.set_ylabel("top-1 after fine-tuning (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def write(out: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    sys.exit(main())
