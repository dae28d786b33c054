"""fxprune's native kernels (fxprune/native) against torch's ops, on the weights compile reads.

The weights are vit_b_16's 48 encoder matrices (random, the model's shapes), cut as compile cuts them at
half the FLOPs: 612 of 768 hidden channels and 1584 of 3072 MLP channels kept. Both forms of each step run
on the same tensors, alternately, with the CPU caches flushed before every timed call (compile reads weights
a Torch-Pruning run or the user's own work has long evicted):
- magnitude sums: per row and per column of |w| (the L1 score); torch: |w| into scratch, then `sum(1)` and
  `mv` with a ones vector (passes/l1_importance.py without the kernels);
- cuts on both dims: w[rows][:, cols]; torch: rows by index_select, then columns by gather (passes/rewrite.py).
Results are checked equal (sums to float rounding, cuts exactly) before timing.

    python benchmarks/native_kernels.py
    python benchmarks/native_kernels.py --repeat 15 --out benchmarks/results/native_kernels.json

Prints a table and writes JSON to --out."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from fxprune import native
from fxprune.fxutil import ScratchBuffer
from fxprune.passes.rewrite import _sliced


def vit_b_16_weights():
    """(weight, kept rows, kept columns) of vit_b_16's encoder matrices at half the FLOPs."""
    torch.manual_seed(0)
    hidden = torch.sort(torch.randperm(768)[:612]).values
    qkv = torch.cat([hidden, hidden + 768, hidden + 1536])
    mlp = torch.sort(torch.randperm(3072)[:1584]).values
    weights = []
    for _ in range(12):
        weights += [(torch.randn(2304, 768), qkv, hidden), (torch.randn(768, 768), hidden, hidden),
                    (torch.randn(3072, 768), mlp, hidden), (torch.randn(768, 3072), hidden, mlp)]
    return weights


def torch_sums(weights):
    scratch, ones, out = torch.empty(3072 * 768), torch.ones(3072), []
    for w, _, _ in weights:
        magnitude = torch.abs(w, out=scratch[:w.numel()].view(w.shape))
        out.append({0: magnitude.sum(1), 1: torch.mv(magnitude.t(), ones[:w.shape[0]])})
    return out


def native_sums(weights):
    batch = native.MagnitudeSums(1)
    for w, _, _ in weights:
        batch.add(w, [0, 1])
    return batch.run()


def torch_cuts(weights):
    scratch = (ScratchBuffer(), ScratchBuffer())
    return [_sliced(w, [(0, rows), (1, cols)], scratch) for w, rows, cols in weights]


def native_cuts(weights):
    cuts = native.Cuts()
    out = [cuts.add(w, rows, cols) for w, rows, cols in weights]
    assert cuts.run()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=9, help="timed calls of each form (the median is reported)")
    parser.add_argument("--flush-mb", type=int, default=1200, help="memory written before each call to flush caches")
    parser.add_argument("--out", default="benchmarks/results/native_kernels.json", help="JSON output path")
    args = parser.parse_args()
    if native.library() is None:
        sys.exit("the native kernels cannot be built here (no C compiler, or FXPRUNE_NATIVE=0): nothing to compare")

    weights = vit_b_16_weights()
    for a, b in zip(torch_sums(weights), native_sums(weights)):
        for d in (0, 1):
            torch.testing.assert_close(b[d], a[d].double(), rtol=1e-5, atol=0)
    for a, b in zip(torch_cuts(weights), native_cuts(weights)):
        assert torch.equal(a, b)

    flush = torch.empty(args.flush_mb * (1 << 20) // 4)
    forms = {"sums": (torch_sums, native_sums), "cuts": (torch_cuts, native_cuts)}
    times = {step: {"torch": [], "native": []} for step in forms}
    for _ in range(args.repeat):
        for step, (with_torch, with_native) in forms.items():
            for label, fn in (("torch", with_torch), ("native", with_native)):
                flush.fill_(1.0)
                start = time.perf_counter()
                fn(weights)
                times[step][label].append(time.perf_counter() - start)
    rows = {step: {label: statistics.median(t) for label, t in by.items()} for step, by in times.items()}
    print(f"48 vit_b_16 encoder weights, {torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"{'step':6s} {'torch ms':>9s} {'native ms':>10s} {'ratio':>6s}")
    for step, r in rows.items():
        print(f"{step:6s} {1e3 * r['torch']:9.1f} {1e3 * r['native']:10.1f} {r['torch'] / r['native']:5.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "repeat": args.repeat, "median_seconds": rows,
                   "seconds": times}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
