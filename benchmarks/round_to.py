"""What channel rounding buys in onnxruntime: FLOPs-budget results at several round_to, timed together.

For every model (torchvision, random init, 224x224): `fxprune.compile(model, budget, round_to=R)` for each R,
all exported to ONNX with the dense model and timed interleaved (fxprune.export.benchmark), --repeats times in
fresh sessions; the median latency ratio to the dense model and the ratio per FLOP kept are reported.

    python benchmarks/round_to.py                                   # resnet50, mobilenet_v2; 8, 16, auto; b1 t1
    python benchmarks/round_to.py --models resnet18 --round-to 1,8 --threads 2

Prints one line per result and writes JSON to --out."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import warnings
from typing import List, Optional

import torch
import torchvision

import fxprune
from fxprune.export.benchmark import session_medians
from fxprune.export.onnx_export import export_onnx


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--round-to", default="8,16,auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="timings in fresh onnxruntime sessions (median)")
    parser.add_argument("--out", default="benchmarks/results/round_to.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    choices = [r if r == "auto" else int(r) for r in args.round_to.split(",")]
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
        models = {"dense": model, **{f"round_to={r}": fxprune.compile(model, args.budget, example_inputs=(x,), round_to=r,
                                                                        verify=False) for r in choices}}
        with tempfile.TemporaryDirectory() as folder:
            files = {k: export_onnx(m, (x,), os.path.join(folder, f"{i}.onnx")) for i, (k, m) in enumerate(models.items())}
            timings = session_medians(files, [list(x.shape)], batch_size=args.batch, sessions=args.repeats,
                                      threads=args.threads, runs=args.runs)
        for key, pruned in models.items():
            if key == "dense":
                continue
            ratio = statistics.median(t[key] / t["dense"] for t in timings)
            flops = pruned.meta["fxprune"]["flops"]["ratio"]
            rows.append({"model": name, "round_to": key.split("=")[1], "flops_ratio": flops, "latency_ratio": ratio,
                         "latency_per_flop": ratio / flops, "batch": args.batch, "threads": args.threads})
            print(f"{name:14s} {key:14s} FLOPs {flops:.3f}  latency {ratio:.3f}  latency/FLOPs {ratio / flops:.3f}",
                  flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"budget": args.budget, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
