"""Training-step cost of AOFP against plain training, on CIFAR ResNet-20 (or -56).

Three step kinds, each timed over the same batches (medians of --steps steps after warm-up):
  plain     ordinary training step of the eager model (forward, backward, SGD);
  base      AOFP's base path only: the masked graph (fxprune's masked original, differentiable),
            forward + backward + SGD, no score paths;
  aofp      a full AOFP step: base path plus every group's score path (half its search space
            masked, damage at its consumers) and the search bookkeeping.
overhead = aofp / plain. Random inputs (the cost does not depend on the data).

    python benchmarks/aofp_overhead.py --depth 20 --batch-size 64 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from fxprune.training.cifar_resnet import cifar_resnet
from fxprune.compiler import _analyse
from fxprune.passes.aofp import AOFP, AOFPPass, _Capturing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/aofp_overhead.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cifar_resnet(args.depth)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    config = AOFP(iters_per_half=10**9, warmup_iters=0)  # halves never end: every group samples every step
    gm, groups = _analyse(model, (x[:1],), set(), ())
    trainer = AOFPPass(config, 0.5).trainer(gm, groups)
    keep = np.ones(groups.n_units, dtype=bool)
    plain_opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    gm.train()

    def plain():
        loss = F.cross_entropy(model(x), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def base():
        loss = F.cross_entropy(_Capturing(gm, groups, keep, set()).run(x), y)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    step = [max(trainer.search.starts)]  # every group past its staggered start: all score paths run each step

    def full():
        trainer.step(step[0], x, y)
        step[0] += 1

    times = {}
    for name, fn in (("plain", plain), ("base", base), ("aofp", full)):
        for _ in range(3):
            fn()
        samples = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples) * 1e3
    result = {"depth": args.depth, "batch_size": args.batch_size, "threads": args.threads, "targets": len(trainer.targets),
              "ms_per_step": times, "overhead_vs_plain": times["aofp"] / times["plain"],
              "score_paths_vs_base": (times["aofp"] - times["base"]) / times["base"]}
    print(f"ResNet-{args.depth}, batch {args.batch_size}, {args.threads} thread(s), {len(trainer.targets)} target groups")
    for name, ms in times.items():
        print(f"  {name:6s} {ms:8.1f} ms/step  ({ms / times['plain']:.2f}x plain)")
    print(f"  score paths of all groups add {100 * result['score_paths_vs_base']:.0f}% to the base path")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
