"""Compile time of this checkout against an earlier commit, side by side in one run.

Each revision is exported (`git archive`) to a temporary folder and imported from there by a child
process, so both run the same Python, torch and model weights. The children alternate (baseline,
current, baseline, current, ...) so that machine noise falls on both alike. In each child one
warm-up compile is discarded, then `fxprune.compile(model, 0.5, verify=False)` is timed `--inner`
times; a row reports the median of all timed compiles per revision and their ratio.

    python benchmarks/compile_time.py --baseline HEAD~3
    python benchmarks/compile_time.py --baseline 610a072 --models resnet50,vit_b_16,densenet201 --rounds 3
    python benchmarks/compile_time.py --baseline 8372df5 --models resnet50 --like-zoo --inner 15

--like-zoo times as zoo.py does: both cores, and between compiles a deep copy of the model pruned by
Torch-Pruning (ratio 0.5) and the garbage collected. Without it one thread compiles back to back, which
on a VM that returns freed memory to its host can bill page faults on the new weights to either side.

Prints a table and writes JSON to --out."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import copy, gc, json, sys, time, torch, torchvision
name, inner, like_zoo, bench_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
if like_zoo:                   # as zoo.py times: both cores, Torch-Pruning run and garbage collected in between
    sys.path.insert(0, bench_dir)
    import zoo
else:
    torch.set_num_threads(1)
import fxprune
torch.manual_seed(0)
model = getattr(torchvision.models, name)().eval()
x = torch.randn(1, 3, 224, 224)
fxprune.compile(model, 0.5, example_inputs=(x,), verify=False)
times, peer = [], []
for _ in range(inner):
    if like_zoo:
        fresh = copy.deepcopy(model)
        gc.collect()
        peer.append(zoo.tp_prune(fresh, x, 0.5)[1]["seconds"])
        gc.collect()
    start = time.perf_counter()
    fxprune.compile(model, 0.5, example_inputs=(x,), verify=False)
    times.append(time.perf_counter() - start)
print(json.dumps({"file": fxprune.__file__, "times": times, "peer": peer}))
"""

def export(rev: str, root: str) -> str:
    """The tree of `rev` as an importable folder (passes/ mapped to fxprune.passes as in pyproject)."""
    path = os.path.join(root, rev.replace("/", "_").replace("~", "_"))
    os.makedirs(path)
    archive = subprocess.run(["git", "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
    os.symlink(os.path.join(path, "passes"), os.path.join(path, "fxprune", "passes"))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--current", default="HEAD", help="git revision measured as current (default HEAD)")
    parser.add_argument("--models", default="resnet50,vit_b_16,densenet201")
    parser.add_argument("--rounds", type=int, default=3, help="alternating child processes per revision and model")
    parser.add_argument("--inner", type=int, default=3, help="timed compiles per child")
    parser.add_argument("--like-zoo", action="store_true",
                        help="both cores, a Torch-Pruning run between compiles (as zoo.py times)")
    parser.add_argument("--out", default="benchmarks/results/compile_time.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as root:
        trees = {"baseline": export(args.baseline, root), "current": export(args.current, root)}
        print(f"baseline {args.baseline} vs current {args.current}; {args.rounds} rounds x {args.inner} compiles, "
              f"{'as zoo.py times' if args.like_zoo else '1 thread'}\n")
        print(f"{'model':14s} {'baseline s':>10s} {'current s':>10s} {'current/baseline':>17s}")
        for name in args.models.split(","):
            times, peer = {"baseline": [], "current": []}, {"baseline": [], "current": []}
            for _ in range(args.rounds):
                for which, tree in trees.items():
                    env = dict(os.environ, PYTHONPATH=tree, FXPRUNE_VERIFY="0")
                    out = subprocess.run([sys.executable, "-c", CHILD, name, str(args.inner), str(int(args.like_zoo)),
                                          os.path.dirname(os.path.abspath(__file__))], env=env, check=True,
                                         capture_output=True, text=True, cwd=root).stdout
                    result = json.loads(out.strip().splitlines()[-1])
                    if not result["file"].startswith(tree):
                        raise SystemExit(f"the child imported {result['file']}, not the exported {which} tree")
                    times[which].extend(result["times"])
                    peer[which].extend(result["peer"])
            base, cur = statistics.median(times["baseline"]), statistics.median(times["current"])
            rows.append({"model": name, "baseline_s": base, "current_s": cur, "ratio": cur / base, "times": times,
                         **({"torch_pruning_times": peer} if args.like_zoo else {})})
            print(f"{name:14s} {base:10.3f} {cur:10.3f} {cur / base:17.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"baseline": args.baseline, "current": args.current, "rounds": args.rounds, "inner": args.inner,
                   "like_zoo": args.like_zoo, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
