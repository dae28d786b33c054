"""The `fxprune` command line.

  fxprune prune MODEL --budget 0.5 [--out DIR]   prune, verify, print a before/after table
  fxprune analyze MODEL                           print the channel groups

MODEL is a torchvision model name (random weights: nothing is downloaded) or `path/to/file.py:factory`.
Exit codes: 0 success, 2 usage error, 3 the input cannot be pruned as asked (bad model, inputs, budget),
4 internal verification error (a bug: please report it), 1 anything else."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from typing import List, Optional, Tuple

import torch

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4


def load_model(spec: str) -> Tuple[torch.nn.Module, str]:
    """A torchvision model name, or `file.py:factory` (a callable returning an nn.Module)."""
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path, factory = spec.split(":", 1)
        if not os.path.exists(path):
            raise SystemExit(_usage_error(f"no such file: {path}"))
        module_spec = importlib.util.spec_from_file_location("fxprune_user_model", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, factory):
            raise SystemExit(_usage_error(f"{path} has no attribute {factory!r}"))
        return getattr(module, factory)(), spec
    try:
        import torchvision
    except ImportError:
        raise SystemExit(_usage_error("torchvision is not installed; pass path/to/file.py:factory instead"))
    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        import difflib
        close = difflib.get_close_matches(spec, names, n=3)
        raise SystemExit(_usage_error(f"unknown model {spec!r}" + (f"; did you mean {', '.join(close)}?" if close else "")))
    kwargs = {"init_weights": False} if spec in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(spec, weights=None, **kwargs), spec


def default_input_shape(name: str) -> List[int]:
    return [1, 3, 299, 299] if name == "inception_v3" else [1, 3, 224, 224]


def _usage_error(message: str) -> int:
    print(f"fxprune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def print_summary(name: str, report: dict, seconds: float) -> None:
    f, p = report["flops"], report["params"]
    rows = [("", "dense", "pruned", "kept"),
            ("FLOPs", _human(f["before"]), _human(f["after"]), f"{f['ratio']:.1%}"),
            ("params", _human(p["before"]), _human(p["after"]), f"{p['ratio']:.1%}")]
    print(f"\n{name}: pruned with {report['options']['importance']} importance, "
          f"{report['options']['allocation']} allocation, budget {report['budget']}")
    for row in rows:
        print(f"  {row[0]:8s}{row[1]:>12s}{row[2]:>12s}{row[3]:>9s}")
    groups = report["groups"]
    print(f"  groups: {len(groups)} ({sum(not g['blocked'] for g in groups)} prunable, "
          f"{sum(g['kept'] < g['size'] for g in groups)} pruned)")
    v = report["verification"]
    if v:
        print(f"  verification: PASSED (pruned == masked original in float64, max error {v['max_abs_error']:.2g})")
    else:
        print("  verification: skipped (--no-verify)")
    print(f"  compile time: {seconds:.2f}s")


def cmd_prune(args) -> int:
    import fxprune
    model, name = load_model(args.model)
    shape = args.input_shape or default_input_shape(name)
    x = torch.randn(*shape)
    budget = fxprune.Budget(flops=args.budget, params=args.params) if args.params else args.budget
    start = time.perf_counter()
    pruned = fxprune.compile(model.eval(), budget, example_inputs=(x,), importance=args.importance,
                             allocation=args.allocation, round_to=args.round_to, min_channels=args.min_channels,
                             ignore=args.ignore, verify=not args.no_verify)
    seconds = time.perf_counter() - start
    report = pruned.meta["fxprune"]
    print_summary(name, report, seconds)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save(pruned, os.path.join(args.out, "pruned.pt"))
        with open(os.path.join(args.out, "report.json"), "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"  wrote {args.out}/pruned.pt (torch.save of the GraphModule) and {args.out}/report.json")
    return EXIT_OK


def cmd_analyze(args) -> int:
    import fxprune
    model, name = load_model(args.model)
    shape = args.input_shape or default_input_shape(name)
    print(fxprune.analyze(model.eval(), (torch.randn(*shape),), ignore=args.ignore).table())
    return EXIT_OK


def _shape(text: str) -> List[int]:
    try:
        return [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1,3,224,224, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxprune", description="Structured pruning of PyTorch models with torch.fx.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("model", help="torchvision model name (random init) or path/to/file.py:factory")
        p.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224")
        p.add_argument("--ignore", action="append", default=[], help="module name pattern whose outputs stay (repeatable)")

    prune = sub.add_parser("prune", help="prune a model to a budget, verify it, print a before/after table")
    common(prune)
    prune.add_argument("--budget", type=float, default=0.5, help="fraction of FLOPs to keep, in (0, 1] (default 0.5)")
    prune.add_argument("--params", type=float, help="also keep at most this fraction of the parameters")
    prune.add_argument("--importance", default="l1", help="l1 (default) or l2")
    prune.add_argument("--allocation", default="global", choices=["global", "uniform"])
    prune.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this")
    prune.add_argument("--min-channels", type=int, default=1)
    prune.add_argument("--no-verify", action="store_true", help="skip the float64 verification")
    prune.add_argument("--out", help="directory for pruned.pt and report.json")
    prune.set_defaults(run=cmd_prune)

    analyze = sub.add_parser("analyze", help="print the channel groups of a model")
    common(analyze)
    analyze.set_defaults(run=cmd_analyze)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    import fxprune
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="[fxprune] %(message)s",
                        stream=sys.stderr)
    try:
        return args.run(args)
    except fxprune.VerificationError as exc:
        print(f"fxprune: internal error (please report): {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except fxprune.FxPruneError as exc:
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
