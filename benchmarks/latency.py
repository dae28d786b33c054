"""onnxruntime latency of fxprune's pruned models against the dense model and Torch-Pruning's, side by side.

For every model (torchvision, random init, 224x224) and a FLOPs budget, this builds
  - dense: the original model;
  - fxprune: `fxprune.compile(model, budget)` with its defaults (global L1, round_to="auto");
  - fxprune-rt1, fxprune-rt8: the same with round_to=1 and 8 (what channel rounding buys);
  - tp: Torch-Pruning 1.6 L1 magnitude (`BasePruner`, per-layer ratio, classifier ignored; its ViT recipe),
    its pruning_ratio searched until it keeps the FLOPs fxprune kept (counted the same way, fxprune's
    cost model = FlopCounterMode's convention);
  - tp-rt8: the same with Torch-Pruning's round_to=8;
then exports each to ONNX, checks it against torch in onnxruntime, and times all of them interleaved
(fxprune.export.benchmark: warm-up, then rounds in rotated order; median and IQR) at each batch size.

Run from the repository root (about 15 minutes on 2 cores for the three default models):

    python benchmarks/latency.py                                    # resnet50, mobilenet_v2, vit_b_16 at 0.5
    python benchmarks/latency.py --models resnet18 --batch-sizes 1 --runs 10

It prints a table per model and writes everything to --out (JSON) after each model.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import warnings
from typing import Dict, List, Optional

import torch
import torchvision

import fxprune
from fxprune.export.benchmark import benchmark_onnxruntime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo import search_tp_ratio, tp_prune  # noqa: E402  (Torch-Pruning recipe shared with zoo.py)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: physical cores)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=150.0, help="cap per model and batch size")
    parser.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--out", default="benchmarks/results/latency.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    results = {}
    for name in args.models.split(","):
        models = build_variants(name, args.budget, peer=not args.no_peer)
        x = torch.randn(1, 3, 224, 224)
        result = benchmark_onnxruntime(models, (x,), name=name, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                                       threads=args.threads, warmup=args.warmup, runs=args.runs,
                                       max_seconds=args.max_seconds)
        print(f"\n{name} at budget {args.budget}")
        print(result.table())
        print(latency_vs_flops(result))
        results[name] = result.as_dict()
        with open(args.out, "w") as fh:
            json.dump({"budget": args.budget, "results": results}, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


def build_variants(name: str, budget: float, peer: bool = True) -> Dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    if isinstance(model, torchvision.models.VisionTransformer):
        # torchvision zero-initialises the ViT head: every logit would be 0 and the ONNX check vacuous
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(1, 3, 224, 224)
    models: Dict[str, torch.nn.Module] = {"dense": model}
    models["fxprune"] = fxprune.compile(model, budget, example_inputs=(x,))
    models["fxprune-rt1"] = fxprune.compile(model, budget, example_inputs=(x,), round_to=1)
    models["fxprune-rt8"] = fxprune.compile(model, budget, example_inputs=(x,), round_to=8)
    if peer:
        target = models["fxprune"].meta["fxprune"]["flops"]["ratio"]
        for key, options in (("tp", {}), ("tp-rt8", {"round_to": 8})):
            ratio, _ = search_tp_ratio(model, x, target, count=fx_flops, **options)
            models[key], _ = tp_prune(copy.deepcopy(model), x, ratio, **options)
    return models


def fx_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    return fxprune.cost_of(model, (x,))["flops"]


def latency_vs_flops(result) -> str:
    """Per pruned model and batch size: latency ratio / FLOPs ratio (1.0 = latency fell as FLOPs did)."""
    lines = ["latency ratio / FLOPs ratio (1.0: latency follows FLOPs exactly):"]
    dense = result.dense
    for row in result.rows[1:]:
        flops_ratio = row.flops / dense.flops
        cells = [f"b{b}: {(1 / result.speedup(row, b)) / flops_ratio:.2f}" for b in result.batch_sizes]
        lines.append(f"  {row.name:12s} FLOPs {flops_ratio:.1%}  " + "  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
