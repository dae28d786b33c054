"""Prune the torchvision classification zoo with fxprune and with Torch-Pruning, side by side.

For every model (randomly initialised, batch 1, 224x224 input, 299x299 for inception_v3) and a
FLOPs budget (the fraction of FLOPs to keep), this measures:

fxprune
    - whether `fxprune.compile(model, budget, verify=False)` succeeds, and its wall time end to end
      (after one untimed compile);
    - the FLOPs and params ratios it kept (from its report, `pruned.meta["fxprune"]`);
    - whether a second `compile(..., verify=True)` passes, and the verification time alone
      (`report["seconds"]["verify"]`).

Torch-Pruning (same architecture and weights, on its own deep copy)
    - L1 magnitude pruning (`BasePruner` + `MagnitudeImportance(p=1)`, per-layer ratio, final
      classifier ignored), its `pruning_ratio` chosen by a bracketed search so that the FLOPs it
      keeps, by its own counter `tp.utils.count_ops_and_params`, match the ratio fxprune kept;
    - the time of a run at that ratio: pruner construction (which builds the dependency graph) and
      `pruner.step()`, separately and together. The search probes are not timed;
    - the FLOPs ratio it reached by its own counter and by fxprune's convention
      (`torch.utils.flop_counter.FlopCounterMode`, which fxprune's cost model matches exactly).

speed ratio = Torch-Pruning seconds / fxprune compile seconds (verify=False), each the median of
--repeat timed runs taken alternately (fxprune, Torch-Pruning, fxprune, ...) so that machine noise
falls on both alike, each after collecting the garbage of the one before (untimed): above 1 means
fxprune is faster.

Run from the repository root:

    python benchmarks/zoo.py                                  # all 80 models, budget 0.5
    python benchmarks/zoo.py --models resnet18,mobilenet_v2   # about a minute
    python benchmarks/zoo.py --budget 0.3 --skip vit_h_14 --max-params 200e6 --threads 8

A row is printed per model as it finishes, a summary at the end, and everything (with the
environment) is written as JSON to --out after every model, so an interrupted run keeps its rows.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch_pruning as tp
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fxprune

HIGHLIGHT = ("resnet50", "vit_b_16", "densenet201")
INPUT_SIZE = {"inception_v3": 299}     # every other model takes 224x224
TARGET_TOLERANCE = 0.02                # "on target": |flops ratio - target| / target <= 2%
PROBE_TOLERANCE = 0.005                # Torch-Pruning ratio search stops this close to the target,
RATIO_RESOLUTION = 1e-3                # or when its bracket on pruning_ratio is this narrow,
MAX_PROBES = 10                        # or after this many probes
MAX_TP_RATIO = 0.95                    # pruning every channel of a layer is not a valid model


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = select_models(args)
    env = environment(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    warm_up()
    print(f"budget {args.budget}, {len(names)} models, {args.threads} threads\n")
    print(header(), flush=True)
    rows: List[Dict[str, Any]] = []
    for name in names:
        row = run_model(name, args.budget, args.max_params, args.repeat, peer=not args.no_peer)
        rows.append(row)
        print(format_row(row), flush=True)
        out.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
        gc.collect()                   # the biggest models hold several GiB between copies

    print_summary(rows, args.budget)
    print(f"\nwrote {out}")
    return 0


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated model names (default: all torchvision classifiers)")
    parser.add_argument("--skip", default="", help="comma-separated model names to leave out")
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of FLOPs to keep (default 0.5)")
    parser.add_argument("--max-params", type=float, default=None,
                        help="skip models with more parameters than this, e.g. 200e6 (default: no limit)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: all cores available to this process)")
    parser.add_argument("--no-peer", action="store_true",
                        help="fxprune only: skip Torch-Pruning (its ratio search takes hours over all 80 models)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per tool and model; the median is reported (default 3)")
    parser.add_argument("--out", default="benchmarks/results/zoo.json", help="JSON output path")
    return parser.parse_args(argv)


def select_models(args: argparse.Namespace) -> List[str]:
    available = torchvision.models.list_models(module=torchvision.models)
    names = args.models.split(",") if args.models else available
    unknown = [n for n in names if n not in available]
    if unknown:
        sys.exit(f"unknown model(s): {', '.join(unknown)}")
    skip = set(filter(None, args.skip.split(",")))
    return [n for n in names if n not in skip]


def environment(args: argparse.Namespace) -> Dict[str, Any]:
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_pruning": tp.__version__, "fxprune": fxprune.__version__,
            "cpu_count": os.cpu_count(), "threads": args.threads,
            "budget": args.budget, "max_params": args.max_params}


def warm_up() -> None:
    """Run both tools once on a tiny network so that one-off costs (lazy imports, first-call
    dispatch set-up) are not billed to whichever model happens to come first."""
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        fxprune.compile(tiny, 0.5, example_inputs=(x,), verify=True, round_to=1)
    tp_prune(copy.deepcopy(tiny), x, 0.5)


# ---------------------------------------------------------------------------------------------
# one model


def run_model(name: str, budget: float, max_params: Optional[float], repeat: int = 3,
              peer: bool = True) -> Dict[str, Any]:
    torch.manual_seed(0)               # the same random weights and input on every run
    model = torchvision.models.get_model(name).eval()
    size = INPUT_SIZE.get(name, 224)
    x = torch.randn(1, 3, size, size)
    n_params = sum(p.numel() for p in model.parameters())
    row: Dict[str, Any] = {"model": name, "input_size": size, "params": n_params}
    if max_params is not None and n_params > max_params:
        row["skipped"] = f"{n_params / 1e6:.0f}M params > --max-params"
        return row

    tp_model = copy.deepcopy(model)    # Torch-Pruning prunes in place; keep it apart from fxprune
    row["fxprune"] = run_fxprune(model, x, budget)
    target = row["fxprune"].get("flops_ratio", budget)     # match what fxprune kept, else the budget
    row["torch_pruning"] = run_torch_pruning(tp_model, x, target) if peer else {"error": "skipped (--no-peer)"}
    time_side_by_side(row, model, tp_model, x, budget, repeat)
    fx_s, tp_s = row["fxprune"].get("seconds"), row["torch_pruning"].get("seconds")
    row["speed_ratio"] = tp_s / fx_s if fx_s and tp_s else None
    return row


def run_fxprune(model: torch.nn.Module, x: torch.Tensor, budget: float) -> Dict[str, Any]:
    """One compile for the result (also the warm-up of the timed runs), one with verification."""
    result: Dict[str, Any] = {}
    try:
        with torch.no_grad():
            pruned = fxprune.compile(model, budget, example_inputs=(x,), verify=False)
    except Exception as exc:           # a failure on one model must not stop the zoo
        result["error"] = describe(exc)
        return result
    report = pruned.meta["fxprune"]
    result.update(ok=True, flops_ratio=report["flops"]["ratio"], params_ratio=report["params"]["ratio"],
                  flops_before=report["flops"]["before"], seconds_by_pass=report["seconds"])
    del pruned

    # Verification runs as a separate compile so that its cost stays out of the timing.
    try:
        with torch.no_grad():
            verified = fxprune.compile(model, budget, example_inputs=(x,), verify=True)
        report = verified.meta["fxprune"]
        result.update(verified=bool(report["verification"]["passed"]), verify_seconds=report["seconds"]["verify"],
                      verification=report["verification"])
    except Exception as exc:
        result.update(verified=False, verify_error=describe(exc))
    return result


def run_torch_pruning(model: torch.nn.Module, x: torch.Tensor, target: float) -> Dict[str, Any]:
    """The pruning ratio that keeps `target` of the FLOPs (the search is the warm-up of the timed
    runs), and one pruned model at it, checked and counted."""
    result: Dict[str, Any] = {"target_flops_ratio": target}
    try:
        ratio, probes = search_tp_ratio(model, x, target)
        result.update(pruning_ratio=ratio, probes=probes)
        pruned, _ = tp_prune(copy.deepcopy(model), x, ratio)
        with torch.no_grad():
            out = pruned(x)            # a pruned model that cannot run is a failure, not a result
        if out.shape != (1, 1000):
            raise RuntimeError(f"pruned model returns shape {tuple(out.shape)}")
        result.update(ok=True, flops_ratio=tp_flops(pruned, x) / tp_flops(model, x),
                      flops_ratio_fxprune_convention=fx_flops(pruned, x) / fx_flops(model, x),
                      params_ratio=n_params(pruned) / n_params(model))
    except Exception as exc:
        result["error"] = describe(exc)
    return result


def time_side_by_side(row: Dict[str, Any], model: torch.nn.Module, tp_model: torch.nn.Module, x: torch.Tensor,
                      budget: float, repeat: int) -> None:
    """Timed runs of both tools, alternating (fxprune, Torch-Pruning, fxprune, ...) so that machine
    noise falls on both alike; each tool's median goes into its result. The garbage of the run before
    (the other tool's objects and cycles) is collected before each run, untimed, as timeit does:
    otherwise one tool's run pays for collecting the other's."""
    fx, tpr = row["fxprune"], row["torch_pruning"]
    fx_runs, tp_runs = [], []
    for _ in range(repeat):
        if fx.get("ok"):
            gc.collect()
            with torch.no_grad():
                start = time.perf_counter()
                results = [fxprune.compile(model, budget, example_inputs=(x,), verify=False)]
                fx_runs.append(time.perf_counter() - start)
            results.clear()                # the pruned model is freed untimed, as Torch-Pruning's is
        if tpr.get("ok"):
            fresh = copy.deepcopy(tp_model)
            gc.collect()
            tp_runs.append(tp_prune(fresh, x, tpr["pruning_ratio"])[1])
    if fx_runs:
        fx.update(seconds=statistics.median(fx_runs), seconds_runs=fx_runs)
    if tp_runs:
        tpr.update(sorted(tp_runs, key=lambda t: t["seconds"])[len(tp_runs) // 2])   # the median run
        tpr["seconds_runs"] = [t["seconds"] for t in tp_runs]


# ---------------------------------------------------------------------------------------------
# Torch-Pruning


def tp_prune(model: torch.nn.Module, x: torch.Tensor, ratio: float,
             **options) -> Tuple[torch.nn.Module, Dict[str, float]]:
    """Prune `model` in place with L1 magnitude at `ratio` (options: more BasePruner arguments,
    e.g. round_to); returns it and the timings.

    Not under no_grad: Torch-Pruning builds its dependency graph from the autograd graph of a
    forward pass and asserts that grad is enabled."""
    start = time.perf_counter()
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, global_pruning=False,
                                  ignored_layers=[classifier(model)], **tp_vit_options(model), **options)
    built = time.perf_counter()
    pruner.step()
    patched = tp_vit_patch(model)
    done = time.perf_counter()
    return model, {"graph_seconds": built - start, "step_seconds": done - built, "seconds": done - start,
                   "manual_patch": patched}


def tp_vit_options(model: torch.nn.Module) -> Dict[str, Any]:
    """Torch-Pruning's own recipe for torchvision's ViT (its examples): declare the attention heads
    and the parameters used directly (class token, position embedding)."""
    if not isinstance(model, torchvision.models.VisionTransformer):
        return {}
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    return {"num_heads": heads,
            "unwrapped_parameters": [(model.class_token, 2), (model.encoder.pos_embedding, 2)]}


def tp_vit_patch(model: torch.nn.Module) -> bool:
    """The attribute Torch-Pruning's ViT example patches by hand after pruning (the model's reshape
    uses it); fxprune rewrites such constants itself. Returns whether a patch was needed."""
    if not isinstance(model, torchvision.models.VisionTransformer):
        return False
    model.hidden_dim = model.conv_proj.out_channels
    return True


def search_tp_ratio(model: torch.nn.Module, x: torch.Tensor, target: float, count=None,
                    **options) -> Tuple[float, int]:
    """Search `pruning_ratio` (FLOPs fall as it grows) until Torch-Pruning keeps `target` of the
    FLOPs by its own counter; each probe prunes a fresh copy. Returns the closest ratio found and
    the number of probes. count: the FLOPs counter (default Torch-Pruning's own); options go to tp_prune.

    Kept FLOPs are a step function of the ratio (channel counts are integers), so the target may
    fall inside a step: the search also stops when the bracket is narrower than RATIO_RESOLUTION."""
    count = count or tp_flops
    full = count(model, x)
    lo, hi = 0.0, MAX_TP_RATIO
    ratio = min(1.0 - target ** 0.5, MAX_TP_RATIO)
    best, best_error = ratio, float("inf")
    for probe in range(1, MAX_PROBES + 1):
        pruned, _ = tp_prune(copy.deepcopy(model), x, ratio, **options)
        kept = count(pruned, x) / full
        error = abs(kept - target) / target
        if error < best_error:
            best, best_error = ratio, error
        if kept > target:
            lo = ratio
        else:
            hi = ratio
        if error <= PROBE_TOLERANCE or hi - lo < RATIO_RESOLUTION:
            break
        # A conv's FLOPs scale with (1 - ratio)^2 when both its sides are pruned: aim with that
        # model (a probe or two usually suffices), falling back to bisection if it leaves the bracket.
        guess = 1.0 - (1.0 - ratio) * (target / kept) ** 0.5
        ratio = guess if lo < guess < hi else (lo + hi) / 2
    return best, probe


def classifier(model: torch.nn.Module) -> torch.nn.Module:
    """The layer producing the logits, whose 1000 outputs must stay: the last nn.Linear, or the
    last conv for models without one (squeezenet). Auxiliary heads (googlenet, inception_v3) are
    registered before the main one, so 'last' is the main classifier."""
    modules = list(model.modules())
    linears = [m for m in modules if isinstance(m, torch.nn.Linear)]
    return (linears or [m for m in modules if isinstance(m, torch.nn.Conv2d)])[-1]


# ---------------------------------------------------------------------------------------------
# counting


def tp_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(tp.utils.count_ops_and_params(model, x)[0])


def fx_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------------------------------------
# output

COLUMNS = [("model", 20), ("fx", 4), ("verif", 5), ("flops", 6), ("params", 6), ("fx s", 7), ("verif s", 7),
           ("tp", 4), ("tp flops", 8), ("(fx conv)", 9), ("tp graph", 8), ("tp step", 7), ("tp s", 7), ("tp/fx", 6)]


def header() -> str:
    line = " ".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in enumerate(COLUMNS))
    return line + "\n" + "-" * len(line)


def format_row(row: Dict[str, Any]) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    fx, tpr = row.get("fxprune", {}), row.get("torch_pruning", {})
    if "skipped" in row:
        cells = [row["model"], "skip"] + [""] * (len(COLUMNS) - 2)
    else:
        cells = [row["model"], "ok" if fx.get("ok") else "FAIL",
                 "-" if not fx.get("ok") else ("ok" if fx.get("verified") else "FAIL"),
                 num(fx.get("flops_ratio"), ".3f"), num(fx.get("params_ratio"), ".3f"),
                 num(fx.get("seconds"), ".2f"), num(fx.get("verify_seconds"), ".2f"),
                 "ok" if tpr.get("ok") else "FAIL",
                 num(tpr.get("flops_ratio"), ".3f"), num(tpr.get("flops_ratio_fxprune_convention"), ".3f"),
                 num(tpr.get("graph_seconds"), ".2f"), num(tpr.get("step_seconds"), ".2f"),
                 num(tpr.get("seconds"), ".2f"), num(row.get("speed_ratio"), ".1f")]
    line = " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))
    errors = [f"fxprune: {fx['error']}" if "error" in fx else None,
              f"fxprune verify: {fx['verify_error']}" if "verify_error" in fx else None,
              f"torch-pruning: {tpr['error']}" if "error" in tpr else None,
              row.get("skipped")]
    return line + "".join(f"\n    {e}" for e in errors if e)


def print_summary(rows: List[Dict[str, Any]], budget: float) -> None:
    run = [r for r in rows if "skipped" not in r]
    fx = [r["fxprune"] for r in run]
    tps = [r["torch_pruning"] for r in run]

    def on_target(ratio):
        return ratio is not None and abs(ratio - budget) / budget <= TARGET_TOLERANCE

    counts = [("fxprune compiled", sum(bool(f.get("ok")) for f in fx)),
              ("fxprune verified", sum(bool(f.get("verified")) for f in fx)),
              ("fxprune FLOPs within 2% of budget", sum(on_target(f.get("flops_ratio")) for f in fx)),
              ("torch-pruning ran", sum(bool(t.get("ok")) for t in tps)),
              ("torch-pruning within 2%, its counter", sum(on_target(t.get("flops_ratio")) for t in tps)),
              ("torch-pruning within 2%, fxprune's", sum(on_target(t.get("flops_ratio_fxprune_convention"))
                                                         for t in tps))]
    print(f"\nsummary: {len(run)} models run, {len(rows) - len(run)} skipped, budget {budget}")
    for label, count in counts:
        print(f"  {label:<38} {count}/{len(run)}")
    speed = [r["speed_ratio"] for r in run if r.get("speed_ratio")]
    if speed:
        print(f"  {'median speed ratio tp/fx':<38} {statistics.median(speed):.2f}x over {len(speed)} models "
              f"(min {min(speed):.2f}x, max {max(speed):.2f}x)")
    highlighted = [r for r in rows if r["model"] in HIGHLIGHT]
    if highlighted:
        print("\nhighlighted:")
        print(header())
        for row in highlighted:
            print(format_row(row))


if __name__ == "__main__":
    sys.exit(main())
