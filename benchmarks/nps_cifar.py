"""Network pruning space search on CIFAR-10 ResNet-20 at about 50 % FLOPs, against global L1 allocation
at equal FLOPs, both fine-tuned with the CIFAR benchmark's identical budget (benchmarks/cifar.py).

  1. Hold out `--val` class-balanced training images; the proxy fine-tunes on the other training
     images and measures error on the held-out ones (never on the test split).
  2. fxprune.compile(dense, budget, allocation=fxprune.SpaceSearch(...)): n initial samples in the
     regime FLOPs in [budget * (1 - band), budget], rho* from parameter buckets, n refined samples
     with |rho - rho*| <= delta rho*; search.json, edf.png and error_vs_params.png in --out-dir.
  3. Global L1 allocation with the search winner's FLOPs ratio as its budget (so it never has more).
  4. Both fine-tuned per seed (cifar.py's recipe) and measured on the test split.

    python benchmarks/nps_cifar.py                       # 24 + 24 samples, ~40 min on 2 CPU cores
    python benchmarks/nps_cifar.py --samples 100 --proxy-steps 200 --workers 8 --device cuda
    torchrun --nproc_per_node=4 benchmarks/nps_cifar.py  # samples spread over 4 processes/machines
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import List, Optional

import torch

import fxprune
from fxprune.training.cifar_resnet import load_cifar_resnet
from fxprune.training.data import CIFAR10Loader, find_cifar10
from fxprune.training.finetune import FinetuneConfig, evaluate, finetune
from fxprune.search.parallel import distributed_rank_and_size
from fxprune.search.proxy_eval import cifar10_proxy_evaluator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the library has no default data location; the repository's runs read the shared copy
os.environ.setdefault("FXPRUNE_DATA", os.path.join(REPO, "..", "shared", "data"))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")
    logging.getLogger("fxprune").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    rank, world = distributed_rank_and_size()
    try:
        find_cifar10(args.data)
    except FileNotFoundError as exc:
        print(f"nps_cifar.py: CIFAR-10 not found: {exc}", file=sys.stderr)
        return 2
    dense, info = load_cifar_resnet(args.checkpoint)
    x = torch.randn(1, 3, 32, 32)
    evaluator = cifar10_proxy_evaluator(val=args.val, steps=args.proxy_steps, lr=args.proxy_lr,
                                        recalibrate_batches=args.recalibrate_batches, device=args.device,
                                        path=args.data)
    search = fxprune.SpaceSearch(evaluator=evaluator, n_samples=args.samples, n_refined=args.refined or args.samples,
                                 band=args.band, delta=args.delta, n_buckets=args.buckets, workers=args.workers,
                                 out_dir=args.out_dir, seed=args.seed)
    started = time.perf_counter()
    searched = fxprune.compile(dense, args.budget, example_inputs=(x,), allocation=search, round_to=args.round_to)
    search_seconds = time.perf_counter() - started
    if rank != 0:
        return 0
    kept = searched.meta["fxprune"]["flops"]["ratio"]
    l1 = fxprune.compile(dense, kept, example_inputs=(x,), importance="l1", round_to=args.round_to)

    test = CIFAR10Loader("test", batch_size=500, shuffle=False, augment=False, path=args.data)
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, optimizer="sgd", schedule="cosine", weight_decay=5e-4,
                            seed=0)
    result = searched.meta["fxprune"]["search"]
    out = {"config": vars(args), "world_size": world, "dense": {"top1": evaluate(dense, test)["top1"], **{
               k: v for k, v in info.items() if isinstance(v, (int, float, str))}},
           "search_seconds": search_seconds, "finetune": asdict(config), "search": {k: v for k, v in result.items() if k != "samples"},
           "rows": []}
    for name, model in (("search", searched), ("l1_global", l1)):
        report = model.meta["fxprune"]
        row = {"method": name, "flops_ratio": report["flops"]["ratio"], "params_ratio": report["params"]["ratio"],
               "widths": {g["name"]: g["kept"] for g in report["groups"] if not g["blocked"]},
               "top1_pruned": evaluate(copy.deepcopy(model), test)["top1"], "top1_finetuned": [],
               # the search's proxy on the same held-out images, with the winner's seed: where L1 would rank
               "proxy_error": result["best"]["error"] if name == "search" else evaluator(model, result["best"]["seed"])}
        for seed in args.seeds:
            trained = copy.deepcopy(model)
            train = CIFAR10Loader("train", batch_size=128, shuffle=True, augment=True, seed=seed, drop_last=True,
                                  path=args.data)
            finetune(trained, train, FinetuneConfig(**{**asdict(config), "seed": seed}), device=args.device)
            row["top1_finetuned"].append(evaluate(trained, test, device=args.device)["top1"])
        out["rows"].append(row)
        print(f"{name:10s} FLOPs {row['flops_ratio']:.3f} params {row['params_ratio']:.3f} proxy error "
              f"{row['proxy_error']:.4f} top-1 fine-tuned "
              f"{mean_std(row['top1_finetuned'])} (per seed {row['top1_finetuned']})", flush=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    comparison = result["comparison"]
    print(f"\nsamples: {args.samples} initial + {args.refined or args.samples} refined, proxy {args.proxy_steps} "
          f"steps; search {search_seconds:.0f}s")
    print(f"rho* = {result['rho_star']:.2f} FLOPs/param ({result['rho_star'] / result['rho0']:.3f} x dense)")
    print(f"proxy error mean initial {comparison['mean_error_initial']:.4f} -> refined "
          f"{comparison['mean_error_refined']:.4f}; refined EDF dominates: {comparison['dominates']} "
          f"(max shortfall {comparison['max_shortfall']:.3f}, area {comparison['area']:.4f}; FLOPs-normalised "
          f"dominates: {result['comparison_normalized']['dominates']})")
    print(f"wrote {args.json} and {args.out_dir}/")
    return 0


def mean_std(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "..", "shared", "models", "cifar_resnet20.pt"))
    parser.add_argument("--data")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--band", type=float, default=0.04, help="regime: FLOPs in [budget(1-band), budget]")
    parser.add_argument("--samples", type=int, default=24, help="initial-space samples")
    parser.add_argument("--refined", type=int, help="refined-space samples (default: --samples)")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--buckets", type=int, default=6)
    parser.add_argument("--proxy-steps", type=int, default=30, help="fine-tune steps per sample (batch 128)")
    parser.add_argument("--proxy-lr", type=float, default=0.01)
    parser.add_argument("--recalibrate-batches", type=int, default=10)
    parser.add_argument("--val", type=int, default=2000, help="held-out training images for the proxy error")
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--epochs", type=float, default=1.0, help="final fine-tune (cifar.py --config cpu: 1)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    parser.add_argument("--seed", type=int, default=0, help="search seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default="benchmarks/results/nps")
    parser.add_argument("--json", default="benchmarks/results/nps_cifar.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
