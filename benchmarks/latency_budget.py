"""Budget(latency=...) on torchvision models: does the measured latency land on the budget?

For every model, batch size and thread count: an OnnxRuntimeTarget at that batch size and thread
count, `fxprune.compile(model, Budget(latency=B, target=...))` (its tables come from the disk cache
when an earlier run measured them; the first build's time is recorded), then an independent check:
the dense model, the latency-budget result and the FLOPs-budget result at the same B (defaults) are
exported and timed interleaved in one onnxruntime process (fxprune.export.benchmark), for about 1.5 s
of the dense model each time, three times with fresh sessions (a session's speed varies by several
percent from one to the next; twice where one run takes seconds, seven times where it takes under
20 ms, whose sessions vary most), and the median latency ratios are reported with their distance from
the budget.

    python benchmarks/latency_budget.py                                  # 3 models x b1,b32 x 1,2 threads
    python benchmarks/latency_budget.py --models resnet18 --batch-sizes 1 --threads 1

Prints one line per configuration and writes everything to --out (JSON) after each.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from typing import List, Optional

import torch
import torchvision

import fxprune
from fxprune.export.benchmark import benchmark_onnxruntime, session_medians
from fxprune.export.latency_target import OnnxRuntimeTarget


def models_and_flops_results(names: List[str], budget: float):
    """Per torchvision model name (random weights, seed 0): (name, model, example input, its FLOPs-budget
    result at `budget`), the rival every latency-budget result is timed against."""
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, 224, 224)
        yield name, model, x, fxprune.compile(model, budget, example_inputs=(x,), verify=False)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--check-runs", type=int, default=None, help="timed runs of the independent check "
                        "(default: about 1.5 s of the dense model, 30 to 300 runs)")
    parser.add_argument("--check-seconds", type=float, default=90.0, help="cap on the check's timed runs")
    parser.add_argument("--check-repeats", type=int, default=None, help="independent checks in fresh onnxruntime "
                        "sessions, the median ratio reported (default 3; 2 for runs of seconds each; 7 for a dense "
                        "run under 20 ms, where one fresh session differs from the next by up to 15 %% here)")
    parser.add_argument("--cache", help="latency table folder (default $FXPRUNE_CACHE or ~/.cache/fxprune)")
    parser.add_argument("--out", default="benchmarks/results/latency_budget.json")
    parser.add_argument("--append", action="store_true", help="add to the rows already in --out")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = json.load(open(args.out))["rows"] if args.append and os.path.exists(args.out) else []
    for name, model, x, flops_model in models_and_flops_results(args.models.split(","), args.budget):
        for batch in map(int, args.batch_sizes.split(",")):
            for threads in map(int, args.threads.split(",")):
                if any((r["model"], r["batch"], r["threads"]) == (name, batch, threads) for r in rows):
                    continue       # --append: measured in an earlier run
                rows.append(run_one(name, model, flops_model, x, batch, threads, args))
                print(line(rows[-1]), flush=True)
                with open(args.out, "w") as fh:
                    json.dump({"budget": args.budget, "rows": rows}, fh, indent=1)
    print("\n" + "\n".join(line(r) for r in rows if "compile_refitted_ratio" in r))
    return 0


def run_one(name, model, flops_model, x, batch, threads, args) -> dict:
    big = batch * (17 if name.startswith("vit") else 4) > 64      # long runs: fewer of them
    target = OnnxRuntimeTarget(batch_size=batch, threads=threads, cache_dir=args.cache,
                               model_runs=6 if big else 20, model_warmup=1 if big else 3,
                               model_max_seconds=30.0 if big else 60.0)
    start = time.perf_counter()
    pruned = fxprune.compile(model, fxprune.Budget(latency=args.budget, target=target), example_inputs=(x,),
                             verify=False)
    seconds = time.perf_counter() - start
    report = pruned.meta["fxprune"]
    dense_seconds = report["latency"]["rounds"][-1]["dense_ms"] / 1e3
    runs = args.check_runs or min(300, max(30, math.ceil(1.5 / dense_seconds)))
    repeats_wanted = args.check_repeats or (2 if big else 7 if dense_seconds < 0.02 else 3)
    with tempfile.TemporaryDirectory() as onnx_dir:
        check = benchmark_onnxruntime({"dense": model, "latency": pruned, "flops": flops_model}, (x,), name=name,
                                      batch_sizes=(batch,), threads=threads, warmup=2 if big else 5,
                                      runs=runs, max_seconds=args.check_seconds, onnx_dir=onnx_dir)
        repeats = [{row.name: row.latency[batch].median_ms for row in check.rows}]
        files = {key: os.path.join(onnx_dir, f"{key}.onnx") for key in repeats[0]}
        repeats += session_medians(files, [list(x.shape)], batch_size=batch, sessions=repeats_wanted - 1,
                                   threads=threads, warmup=2 if big else 5, runs=runs, max_seconds=args.check_seconds)
    ratio = {key: statistics.median(r[key] / r["dense"] for r in repeats) for key in repeats[0]}
    ms = {key: statistics.median(r[key] for r in repeats) for key in repeats[0]}
    latency = report["latency"]
    return {"model": name, "batch": batch, "threads": threads, "budget": args.budget,
            "check_latency_ratio": ratio["latency"], "check_flops_model_latency_ratio": ratio["flops"],
            "check_repeats": [{key: r[key] / r["dense"] for key in r} for r in repeats],
            "dense_ms": ms["dense"], "latency_model_ms": ms["latency"], "flops_model_ms": ms["flops"],
            "flops_ratio_of_latency_model": report["flops"]["ratio"],
            "flops_ratio_of_flops_model": flops_model.meta["fxprune"]["flops"]["ratio"],
            "compile_seconds": seconds, "table_seconds": latency["table_seconds"],
            "widths_measured": target.measured, "widths_cached": target.cached,
            "compile_predicted_ratio": latency["predicted_ratio"], "compile_measured_ratio": latency["measured_ratio"],
            "compile_refitted_ratio": latency["refitted_ratio"],
            "rounds": latency["rounds"], "slope": latency["slope"], "layers": latency["layers"],
            "tables": latency["tables"], "target": target.key}


def line(r: dict) -> str:
    within = abs(r["check_latency_ratio"] - r["budget"]) <= 0.05 * r["budget"]
    return (f"{r['model']:<14} b{r['batch']:<3} t{r['threads']}  latency ratio {r['check_latency_ratio']:.3f} "
            f"({'within' if within else 'OUTSIDE'} +-5% of {r['budget']}; in compile {r['compile_measured_ratio']:.3f}, "
            f"refitted {r['compile_refitted_ratio']:.3f}, {len(r['rounds'])} rounds)  FLOPs kept {r['flops_ratio_of_latency_model']:.3f}  "
            f"| FLOPs-budget model: latency {r['check_flops_model_latency_ratio']:.3f}  "
            f"| compile {r['compile_seconds']:.0f} s, tables {r['table_seconds']:.0f} s "
            f"({r['widths_measured']} measured, {r['widths_cached']} cached)")


if __name__ == "__main__":
    raise SystemExit(main())
