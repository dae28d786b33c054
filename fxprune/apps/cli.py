"""The `fxprune` command line.

  fxprune prune MODEL --budget 0.5 [--out DIR]   prune, verify, check in onnxruntime, print a before/after table
  fxprune bench MODEL --budgets 0.75,0.5        onnxruntime latency of dense vs pruned models
  fxprune viz MODEL|report.json|pruned.pt        HTML/SVG graph of the channel groups and what was cut
  fxprune analyze MODEL                          print the channel groups
  fxprune search MODEL --budget 0.5 --out DIR    search a network pruning space on CIFAR-10 (EDFs, rho*)

MODEL is a torchvision model name (random weights: nothing is downloaded), `path/to/file.py:factory`, or
a CIFAR ResNet checkpoint (`something.pt` written by examples/train_cifar_resnet.py).
Exit codes: 0 success, 2 usage error, 3 the input cannot be pruned as asked (bad model, inputs, budget),
4 internal error: verification or the onnxruntime check failed (a bug: please report it), 1 anything else."""
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

from ..report import human_count as _human

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4


def load_model(spec: str) -> Tuple[torch.nn.Module, str]:
    """A torchvision model name, `file.py:factory` (a callable returning an nn.Module) or a CIFAR ResNet
    checkpoint (.pt)."""
    if spec.endswith(".pt"):
        if not os.path.exists(spec):
            raise SystemExit(_usage_error(f"no such file: {spec}"))
        from ..training.cifar_resnet import load_cifar_resnet
        model, info = load_cifar_resnet(spec)
        return model, f"cifar_resnet{info.get('depth', '')}"
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
    if name.startswith("cifar_resnet"):
        return [1, 3, 32, 32]
    return [1, 3, 299, 299] if name == "inception_v3" else [1, 3, 224, 224]


def _usage_error(message: str) -> int:
    print(f"fxprune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


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
    latency = report.get("latency")
    if latency:
        print(f"  latency: predicted {latency['predicted_ratio']:.1%}, measured {latency['measured_ratio']:.1%} of the "
              f"dense {latency['dense_ms']:.2f} ms ({len(latency['rounds'])} round(s); {report['budget']['target']})")
    v = report["verification"]
    if v:
        print(f"  verification: PASSED (pruned == masked original in float64, max error {v['max_abs_error']:.2g})")
    else:
        print("  verification: skipped (--no-verify)")
    print(f"  compile time: {seconds:.2f}s")


def _budget(args, flops: Optional[float], batch: int):
    """The Budget of the command line: --latency (timed in onnxruntime at the first batch size and
    --threads) or the FLOPs fraction, and --params with either."""
    import fxprune
    if getattr(args, "latency", None) is not None:
        from fxprune.export.latency_target import OnnxRuntimeTarget
        return fxprune.Budget(latency=args.latency, params=args.params,
                              target=OnnxRuntimeTarget(batch_size=batch, threads=args.threads))
    return fxprune.Budget(flops=flops, params=args.params) if args.params else flops


def _round_to(text: str):
    return text if text == "auto" else int(text)


def _compile_options(args) -> dict:
    options = dict(importance=args.importance, min_channels=args.min_channels, ignore=args.ignore)
    if hasattr(args, "allocation"):
        options["allocation"] = args.allocation
    if args.round_to is not None:
        options["round_to"] = args.round_to
    return options


def _bench_options(args) -> dict:
    return dict(batch_sizes=args.batch_sizes, threads=args.threads, warmup=args.warmup, runs=args.runs,
                max_seconds=args.max_seconds)


def cmd_prune(args) -> int:
    import fxprune
    from fxprune.export.benchmark import benchmark_onnxruntime
    model, name = load_model(args.model)
    shape = args.input_shape or default_input_shape(name)
    x = torch.randn(*shape)
    budget = _budget(args, args.budget, args.batch_sizes[0])
    start = time.perf_counter()
    pruned = fxprune.compile(model.eval(), budget, example_inputs=(x,), verify=not args.no_verify,
                             **_compile_options(args))
    seconds = time.perf_counter() - start
    report = pruned.meta["fxprune"]
    print_summary(name, report, seconds)
    written = []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        fxprune.save(pruned, os.path.join(args.out, "pruned.pt"))
        with open(os.path.join(args.out, "report.json"), "w") as fh:
            json.dump(report, fh, indent=2)
        written += ["pruned.pt (fxprune.load(path), or fxprune.load(path, model=..., example_inputs=...))",
                    "report.json"]
        written += _write_viz(report, args.out, name)
    if not args.no_bench:
        result = benchmark_onnxruntime({"dense": model, "pruned": pruned}, (x,), name=name, onnx_dir=args.out,
                                       **_bench_options(args))
        print()
        print(result.table())
        check = result.rows[1].check
        print(f"  onnxruntime matches torch: max abs error {check['max_abs_error']:.2g}, "
              f"relative {check['max_rel_error']:.2g}")
        if args.out:
            result.write_json(os.path.join(args.out, "bench.json"))
            written += ["dense.onnx", "pruned.onnx", "bench.json"]
    if written:
        print(f"\nwrote to {os.path.normpath(args.out)}/: " + ", ".join(written))
    return EXIT_OK


def cmd_search(args) -> int:
    import fxprune
    from fxprune.search.proxy_eval import cifar10_proxy_evaluator
    model, name = load_model(args.model)
    x = torch.randn(*(args.input_shape or [1, 3, 32, 32]))
    try:
        evaluator = cifar10_proxy_evaluator(val=args.val, steps=args.proxy_steps, lr=args.proxy_lr,
                                            recalibrate_batches=args.recalibrate_batches, device=args.device,
                                            path=args.data)
    except FileNotFoundError as exc:
        return _usage_error(f"the search evaluates on CIFAR-10, which was not found ({exc}); pass --data")
    search = fxprune.SpaceSearch(evaluator=evaluator, n_samples=args.samples, n_refined=args.refined,
                                 band=args.band, delta=args.delta, n_buckets=args.buckets, workers=args.workers,
                                 out_dir=args.out, seed=args.seed)
    start = time.perf_counter()
    options = {"round_to": 1, **_compile_options(args)}  # the search's levels are keep ratios: no rounding
    pruned = fxprune.compile(model.eval(), args.budget, example_inputs=(x,), allocation=search, **options)
    seconds = time.perf_counter() - start
    from fxprune.search.parallel import distributed_rank_and_size
    if distributed_rank_and_size()[0] != 0:
        return EXIT_OK
    report = pruned.meta["fxprune"]
    print_summary(name, report, seconds)
    result = report["search"]
    comparison = result["comparison"]
    print(f"  search: rho* = {result['rho_star']:.4g} FLOPs/param ({result['rho_star'] / result['rho0']:.3f} x dense), "
          f"proxy error mean {comparison['mean_error_initial']:.4f} (initial) -> {comparison['mean_error_refined']:.4f} "
          f"(refined); refined EDF dominates: {comparison['dominates']}; best {result['best']['error']:.4f} "
          f"({result['best']['round']} space)")
    fxprune.save(pruned, os.path.join(args.out, "pruned.pt"))
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"\nwrote to {os.path.normpath(args.out)}/: search.json (every sample), edf.png, error_vs_params.png, "
          f"pruned.pt, report.json")
    return EXIT_OK


def _write_viz(report: dict, out: str, name: str) -> List[str]:
    from fxprune.apps.visualize import visualize
    paths = visualize(report, out, name=name)
    return [os.path.basename(p) for p in paths.values()]


def cmd_bench(args) -> int:
    import fxprune
    from fxprune.export.benchmark import prune_and_benchmark
    model, name = load_model(args.model)
    shape = args.input_shape or default_input_shape(name)
    x = torch.randn(*shape)
    extra = {}
    if args.latency is not None:   # predicted (and measured while compiling) vs this benchmark's measurement
        extra[f"latency@{args.latency:g}"] = fxprune.compile(model.eval(), _budget(args, None, args.batch_sizes[0]),
                                                            example_inputs=(x,), **_compile_options(args))
    result = prune_and_benchmark(model.eval(), (x,), budgets=args.budgets, name=name,
                                 compile_options=_compile_options(args), onnx_dir=args.onnx_dir, extra_models=extra,
                                 **_bench_options(args))
    print(result.table())
    for key, pruned in extra.items():
        latency, row = pruned.meta["fxprune"]["latency"], next(r for r in result.rows if r.name == key)
        batch = args.batch_sizes[0]
        print(f"{key}: predicted {latency['predicted_ratio']:.1%} of the dense latency at batch {batch}, measured "
              f"{latency['measured_ratio']:.1%} while compiling and "
              f"{row.latency[batch].median_ms / result.dense.latency[batch].median_ms:.1%} here")
    if args.json:
        result.write_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    return EXIT_OK


def cmd_viz(args) -> int:
    import fxprune
    source = args.source
    if source.endswith(".json") and os.path.exists(source):
        with open(source) as fh:
            report = json.load(fh)
        name = os.path.splitext(os.path.basename(source))[0]
    elif source.endswith(".pt") and os.path.exists(source):
        report = fxprune.load(source).meta["fxprune"]
        name = os.path.splitext(os.path.basename(source))[0]
    else:
        model, name = load_model(source)
        shape = args.input_shape or default_input_shape(name)
        report = fxprune.compile(model.eval(), args.budget, example_inputs=(torch.randn(*shape),),
                                 verify=args.budget < 1.0).meta["fxprune"]
    os.makedirs(args.out, exist_ok=True)
    print(f"wrote to {os.path.normpath(args.out)}/: " + ", ".join(_write_viz(report, args.out, name)))
    return EXIT_OK


def cmd_analyze(args) -> int:
    import fxprune
    model, name = load_model(args.model)
    shape = args.input_shape or default_input_shape(name)
    print(fxprune.analyze(model.eval(), (torch.randn(*shape),), ignore=args.ignore).table())
    return EXIT_OK


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


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

    def pruning(p, allocation=True):
        p.add_argument("--importance", default="l1", help="l1 (default), l2, bn, fpgm or random (taylor needs "
                       "calibration data: use the Python API's data=)")
        if allocation:
            p.add_argument("--allocation", default="global", choices=["global", "global_per_flop", "uniform"])
        p.add_argument("--round-to", type=_round_to, help="kept widths are multiples of this, or 'auto' per layer "
                                                          "width (default: compile's, auto)")
        p.add_argument("--min-channels", type=int, default=1)

    def latency(p, batch_sizes, runs):
        p.add_argument("--batch-sizes", type=_ints, default=batch_sizes, help="comma-separated, e.g. 1,32")
        p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: physical cores)")
        p.add_argument("--warmup", type=int, default=5, help="untimed runs per model and batch size")
        p.add_argument("--runs", type=int, default=runs, help="timed runs per model and batch size")
        p.add_argument("--max-seconds", type=float, help="stop timing a batch size after this long (>= 5 runs)")

    prune = sub.add_parser("prune", help="prune a model to a budget, verify it, check and time it in onnxruntime")
    common(prune)
    pruning(prune)
    latency(prune, [1], 20)
    prune.add_argument("--budget", type=float, default=0.5, help="fraction of FLOPs to keep, in (0, 1] (default 0.5)")
    prune.add_argument("--params", type=float, help="also keep at most this fraction of the parameters")
    prune.add_argument("--latency", type=float, help="keep this fraction of the onnxruntime latency measured at the "
                       "first --batch-sizes and --threads, instead of --budget (tables are cached)")
    prune.add_argument("--no-verify", action="store_true", help="skip the float64 verification")
    prune.add_argument("--no-bench", action="store_true", help="skip the ONNX export and onnxruntime timing")
    prune.add_argument("--out", help="directory for pruned.pt, report.json, ONNX files, HTML/SVG/PNG views, bench.json")
    prune.set_defaults(run=cmd_prune)

    bench = sub.add_parser("bench", help="onnxruntime latency of the dense model and pruned versions")
    common(bench)
    pruning(bench)
    latency(bench, [1, 32], 30)
    bench.add_argument("--budgets", type=_floats, default=[0.5], help="comma-separated FLOPs budgets, e.g. 0.75,0.5,0.25")
    bench.add_argument("--latency", type=float, help="also prune to this fraction of the latency at the first "
                       "--batch-sizes and report its predicted vs measured latency")
    bench.set_defaults(params=None)
    bench.add_argument("--json", help="write the results as JSON here")
    bench.add_argument("--plot", help="write a PNG of speed-up against FLOPs kept here (needs matplotlib)")
    bench.add_argument("--onnx-dir", help="keep the ONNX files here")
    bench.set_defaults(run=cmd_bench)

    viz = sub.add_parser("viz", help="draw the channel groups and what was cut (HTML, SVG, width chart PNG)")
    viz.add_argument("source", help="a model (torchvision name or file.py:factory), a report.json or a pruned.pt")
    viz.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224")
    viz.add_argument("--budget", type=float, default=1.0, help="prune a model to this budget first (default 1.0: "
                     "only show the groups)")
    viz.add_argument("--out", default="fxprune-viz", help="output directory (default fxprune-viz)")
    viz.set_defaults(run=cmd_viz)

    search = sub.add_parser("search", help="search a network pruning space (widths by sampling subnetworks in a "
                                           "FLOPs band, rho* refinement); evaluates on CIFAR-10")
    common(search)
    pruning(search, allocation=False)
    search.add_argument("--budget", type=float, default=0.5, help="fraction of FLOPs to keep (the regime's top)")
    search.add_argument("--band", type=float, default=0.04, help="regime: FLOPs in [budget(1-band), budget]")
    search.add_argument("--samples", type=int, default=32, help="subnetworks evaluated in the initial space")
    search.add_argument("--refined", type=int, help="subnetworks evaluated in the refined space (default: --samples)")
    search.add_argument("--delta", type=float, default=0.1, help="refined space: |rho - rho*| <= delta rho*")
    search.add_argument("--buckets", type=int, default=10, help="parameter buckets for rho*")
    search.add_argument("--proxy-steps", type=int, default=30, help="fine-tune steps per sample (batch 128)")
    search.add_argument("--proxy-lr", type=float, default=0.01)
    search.add_argument("--recalibrate-batches", type=int, default=10, help="BN recalibration batches per sample")
    search.add_argument("--val", type=int, default=2000, help="held-out training images for the proxy error")
    search.add_argument("--workers", type=int, default=1, help="evaluation processes (per torchrun rank)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--data", help="CIFAR-10 npz or pickles directory (default: $FXPRUNE_DATA)")
    search.add_argument("--device", default="cpu")
    search.add_argument("--out", default="fxprune-search", help="output directory (default fxprune-search)")
    search.set_defaults(run=cmd_search)

    analyze = sub.add_parser("analyze", help="print the channel groups of a model")
    common(analyze)
    analyze.set_defaults(run=cmd_analyze)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    import fxprune
    from fxprune.export.onnx_export import OnnxMismatchError
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="[fxprune] %(message)s",
                        stream=sys.stderr)
    try:
        return args.run(args)
    except (fxprune.VerificationError, OnnxMismatchError) as exc:
        print(f"fxprune: internal error (please report): {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except fxprune.FxPruneError as exc:
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
