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

--in-process resolves smaller differences. The median of one process can differ from the next by 5-10 %
for the same revision (memory placement, the state of the allocator), more than a change of 1-3 ms on
resnet50. With it, each exported tree's package is renamed (fxprune_baseline, fxprune_current) and one
child per round imports both and alternates single compiles between them, so both see the same process.

    python benchmarks/compile_time.py --baseline 7739978 --models resnet50 --like-zoo --in-process --inner 24

Prints a table and writes JSON to --out."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import re
import shutil
import subprocess
import sys
import tempfile

# what both kinds of child do first: the model, the example input, and a Torch-Pruning run (as zoo.py times)
_CHILD_SETUP = r"""
import copy, gc, importlib, json, sys, time, torch, torchvision
name, inner, like_zoo, bench_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
if like_zoo:                   # as zoo.py times: both cores, Torch-Pruning run and garbage collected in between
    sys.path.insert(0, bench_dir)
    import zoo
else:
    torch.set_num_threads(1)
loaded_before = {m for m in sys.modules if m.split(".")[0] == "fxprune"}
torch.manual_seed(0)
model = getattr(torchvision.models, name)().eval()
x = torch.randn(1, 3, 224, 224)
peer = []


def between_compiles():
    if like_zoo:
        fresh = copy.deepcopy(model)
        gc.collect()
        peer.append(zoo.tp_prune(fresh, x, 0.5)[1]["seconds"])
    gc.collect()
"""

CHILD = _CHILD_SETUP + r"""
import fxprune
fxprune.compile(model, 0.5, example_inputs=(x,), verify=False)
times = []
for _ in range(inner):
    between_compiles()
    start = time.perf_counter()
    fxprune.compile(model, 0.5, example_inputs=(x,), verify=False)
    times.append(time.perf_counter() - start)
print(json.dumps({"file": fxprune.__file__, "times": times, "peer": peer}))
"""

IN_PROCESS_CHILD = _CHILD_SETUP + r"""
sys.path.insert(0, sys.argv[5])
tools = {which: importlib.import_module("fxprune_" + which) for which in ("baseline", "current")}
for tool in tools.values():
    tool.compile(model, 0.5, example_inputs=(x,), verify=False)
times, peer_before = {which: [] for which in tools}, {which: [] for which in tools}
for i in range(inner):
    for which in (("baseline", "current") if i % 2 == 0 else ("current", "baseline")):
        between_compiles()
        peer_before[which].extend(peer[-1:] if like_zoo else [])   # the Torch-Pruning run just made
        start = time.perf_counter()
        tools[which].compile(model, 0.5, example_inputs=(x,), verify=False)
        times[which].append(time.perf_counter() - start)
leaked = sorted({m for m in sys.modules if m.split(".")[0] == "fxprune"} - loaded_before)
print(json.dumps({"files": {w: t.__file__ for w, t in tools.items()}, "times": times, "peer": peer_before,
                  "leaked": leaked}))
"""

# `fxprune` where it names the package in code (imports, fxprune.x); not inside strings ("fxprune.value")
_PACKAGE_NAME = re.compile(r"(?<![\w.\"'])fxprune(?!\w)")


def export_renamed(tree: str, root: str, package: str) -> None:
    """An exported tree's fxprune as package `package` under root, every reference to fxprune in its code
    renamed."""
    target = os.path.join(root, package)
    shutil.copytree(os.path.join(tree, "fxprune"), target, symlinks=False)
    for folder, _, files in os.walk(target):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(_PACKAGE_NAME.sub(package, text))


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
    parser.add_argument("--in-process", action="store_true",
                        help="both revisions in one child per round, compiles alternating one by one")
    parser.add_argument("--out", default="benchmarks/results/compile_time.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as root:
        trees = {"baseline": export(args.baseline, root), "current": export(args.current, root)}
        if args.in_process:
            for which, tree in trees.items():
                export_renamed(tree, root, "fxprune_" + which)
        print(f"baseline {args.baseline} vs current {args.current}; {args.rounds} rounds x {args.inner} compiles, "
              f"{'as zoo.py times' if args.like_zoo else '1 thread'}\n")
        print(f"{'model':14s} {'baseline s':>10s} {'current s':>10s} {'current/baseline':>17s}")
        for name in args.models.split(","):
            times, peer = {"baseline": [], "current": []}, {"baseline": [], "current": []}
            for _ in range(args.rounds):
                if args.in_process:
                    result = _in_process_round(root, name, args.inner, args.like_zoo)
                    for which in times:
                        times[which].extend(result["times"][which])
                        peer[which].extend(result["peer"][which])
                    continue
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
                   "like_zoo": args.like_zoo, "in_process": args.in_process, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


def _in_process_round(root: str, name: str, inner: int, like_zoo: bool) -> dict:
    """One child importing both renamed packages; refuses a run where either imported plain fxprune."""
    env = dict(os.environ, FXPRUNE_VERIFY="0")
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", IN_PROCESS_CHILD, name, str(inner), str(int(like_zoo)),
                          os.path.dirname(os.path.abspath(__file__)), root], env=env, check=True,
                         capture_output=True, text=True, cwd=root).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for which, file in result["files"].items():
        if not file.startswith(os.path.join(root, "fxprune_" + which)):
            raise SystemExit(f"the child imported {file} as the {which} revision")
    if result["leaked"]:
        raise SystemExit(f"a renamed package imported plain fxprune modules: {result['leaked']}")
    return result


if __name__ == "__main__":
    sys.exit(main())
