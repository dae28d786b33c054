"""Budget(latency=...) measured in eager PyTorch on a GPU (TorchTarget): does the latency land on the budget?

For every model and batch size: `fxprune.compile(model, Budget(latency=B, target=TorchTarget("cuda", batch)))`,
then an independent check: the dense model, the latency-budget result and the FLOPs-budget result at the
same B are timed interleaved by a fresh TorchTarget with more rounds, and the ratios are reported with
their distance from the budget. At batch 1 a GPU runs small kernels whose launch cost does not shrink
with the channels; the budget may be out of reach there, and the row says so instead of a ratio.

    python benchmarks/latency_gpu.py                                  # resnet50, mobilenet_v2, vit_b_16 x b1, b64
    python benchmarks/latency_gpu.py --models resnet18 --batch-sizes 32 --dtype float16

Needs a CUDA device. Prints one line per configuration and writes JSON to --out after each."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
import warnings
from typing import List, Optional

import torch

import fxprune
from fxprune.export.latency_target import TorchTarget
from latency_budget import models_and_flops_results   # benchmarks/ is on the path when run as a script


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--check-rounds", type=int, default=40, help="interleaved rounds of the independent check")
    parser.add_argument("--cache", help="latency table folder (default $FXPRUNE_CACHE or ~/.cache/fxprune)")
    parser.add_argument("--out", default="benchmarks/results/latency_gpu.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, model, x, flops_model in models_and_flops_results(args.models.split(","), args.budget):
        for batch in map(int, args.batch_sizes.split(",")):
            row = {"model": name, "batch": batch, "dtype": args.dtype, "budget": args.budget}
            try:
                target = TorchTarget(args.device, batch, dtype, cache_dir=args.cache)
                start = time.perf_counter()
                pruned = fxprune.compile(model, fxprune.Budget(latency=args.budget, target=target), example_inputs=(x,))
                row["compile_seconds"] = time.perf_counter() - start
                report = pruned.meta["fxprune"]
                row.update(target=target.key, flops_ratio=report["flops"]["ratio"], params_ratio=report["params"]["ratio"],
                           verified=report["verification"]["passed"], layer_widths_measured=target.measured,
                           latency_report={k: v for k, v in report["latency"].items() if k != "measurements"})
                check = TorchTarget(args.device, batch, dtype, model_rounds=args.check_rounds, cache_dir=args.cache)
                seconds = check.model_seconds({"dense": model, "latency": pruned, "flops": flops_model}, (x,))
                row.update(dense_ms=1e3 * seconds["dense"], latency_ratio=seconds["latency"] / seconds["dense"],
                           flops_model_latency_ratio=seconds["flops"] / seconds["dense"])
                row["within_5pct"] = abs(row["latency_ratio"] - args.budget) <= 0.05 * args.budget
                print(f"{name:14s} b{batch:<3d} {args.dtype}: dense {row['dense_ms']:.2f} ms; latency budget -> "
                      f"{row['latency_ratio']:.3f} (FLOPs {row['flops_ratio']:.3f}, compile {row['compile_seconds']:.0f} s, "
                      f"met by its own rounds: {report['latency']['met']}); FLOPs budget -> "
                      f"{row['flops_model_latency_ratio']:.3f}", flush=True)
            except Exception as exc:     # one configuration's failure is a row, not the end of the run
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()
                print(f"{name:14s} b{batch:<3d}: {row['error']}", flush=True)
            rows.append(row)
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
