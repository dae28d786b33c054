"""onnxruntime latency of a dense model against its pruned versions, measured the way a performance
engineer would: every model exported and checked against torch, warm-up runs, then many timed runs
with all models interleaved (so machine noise hits each alike), median and spread per batch size.

`prune_and_benchmark(...)` is what `fxprune bench` and tools/ort_bench.py run."""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .onnx_export import compare_with_torch, export_onnx, ort_session, physical_cores
from ..report import human_count as _human

log = logging.getLogger("fxprune")


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per run: median, quartiles and extremes over `runs` timed runs."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    max_ms: float
    runs: int

    @staticmethod
    def of(seconds: Sequence[float]) -> "LatencyStats":
        ms = np.asarray(seconds) * 1e3
        p25, median, p75 = np.percentile(ms, [25, 50, 75])
        return LatencyStats(float(median), float(p25), float(p75), float(ms.min()), float(ms.max()), len(ms))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75_ms - self.p25_ms) / self.median_ms if self.median_ms else 0.0

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p25_ms": self.p25_ms, "p75_ms": self.p75_ms, "min_ms": self.min_ms,
                "max_ms": self.max_ms, "runs": self.runs, "spread": self.spread}


def measure_latency(onnx_files: Dict[str, str], input_shapes: Sequence[Sequence[int]], *,
                    batch_sizes: Sequence[int] = (1, 32), threads: Optional[int] = None, warmup: int = 5,
                    runs: int = 30, max_seconds: Optional[float] = None, seed: int = 0,
                    min_seconds: Optional[float] = None) -> Dict[str, Dict[int, LatencyStats]]:
    """Latency of each ONNX file per batch size. input_shapes: one shape per model input, its first
    dim replaced by the batch size. Models run interleaved, in an order rotated every round so no
    model always runs right after the same neighbour. max_seconds caps the timed rounds of one batch
    size (at least 5 rounds run); min_seconds keeps fast models running past `runs` rounds (up to 20x)
    until that much time has passed, so their median is not a handful of noisy runs."""
    sessions = {name: ort_session(path, threads) for name, path in onnx_files.items()}
    names = list(sessions)
    rng = np.random.default_rng(seed)
    result: Dict[str, Dict[int, LatencyStats]] = {n: {} for n in names}
    for batch in batch_sizes:
        feeds = {}
        for name, session in sessions.items():
            feeds[name] = {i.name: _random_feed(i.type, (batch, *shape[1:]), rng)
                           for i, shape in zip(session.get_inputs(), input_shapes)}
        for _ in range(warmup):
            for name in names:
                sessions[name].run(None, feeds[name])
        times: Dict[str, List[float]] = {n: [] for n in names}
        start = time.perf_counter()
        for r in range(runs * (20 if min_seconds else 1)):
            if r >= runs and time.perf_counter() - start >= (min_seconds or 0.0):
                break
            for i in range(len(names)):
                name = names[(i + r) % len(names)]
                t0 = time.perf_counter()
                sessions[name].run(None, feeds[name])
                times[name].append(time.perf_counter() - t0)
            if max_seconds is not None and r >= 4 and time.perf_counter() - start > max_seconds:
                break
        for name in names:
            result[name][batch] = LatencyStats.of(times[name])
        log.info("batch %d: %s", batch, ", ".join(f"{n} {result[n][batch].median_ms:.2f} ms" for n in names))
    return result


def session_medians(onnx_files: Dict[str, str], input_shapes: Sequence[Sequence[int]], *, batch_size: int,
                    sessions: int, **options) -> List[Dict[str, float]]:
    """Each model's median milliseconds at batch_size, in `sessions` fresh sets of onnxruntime sessions
    (measure_latency each time; options go to it). One session's speed differs from the next by more
    than runs within one differ, so a figure worth comparing is a median over several of these."""
    medians = []
    for _ in range(sessions):
        stats = measure_latency(onnx_files, input_shapes, batch_sizes=(batch_size,), **options)
        medians.append({name: stats[name][batch_size].median_ms for name in onnx_files})
    return medians


def _random_feed(onnx_type: str, shape, rng: np.random.Generator) -> np.ndarray:
    """Random floats for a float input; zeros for an integer one (token ids, indices: zero is always a
    valid index, and latency does not depend on which one)."""
    if "float" in onnx_type or "double" in onnx_type:
        dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(onnx_type, np.float32)
        return rng.standard_normal(shape).astype(dtype)
    if "bool" in onnx_type:
        return np.ones(shape, dtype=bool)
    return np.zeros(shape, dtype=np.int32 if onnx_type == "tensor(int32)" else np.int64)


@dataclass
class BenchRow:
    name: str
    flops: float
    params: float
    onnx_bytes: int
    check: dict
    budget: Optional[float] = None
    latency: Dict[int, LatencyStats] = field(default_factory=dict)


@dataclass
class BenchResult:
    """Rows (dense first) with FLOPs, params, ONNX size, the onnxruntime check and latency."""

    model: str
    input_shapes: List[List[int]]
    batch_sizes: List[int]
    threads: int
    rows: List[BenchRow]

    @property
    def dense(self) -> BenchRow:
        return self.rows[0]

    def speedup(self, row: BenchRow, batch: int) -> float:
        return self.dense.latency[batch].median_ms / row.latency[batch].median_ms

    def as_dict(self) -> dict:
        dense = self.dense
        return {
            "format": "fxprune.bench/1", "model": self.model, "input_shapes": self.input_shapes,
            "batch_sizes": self.batch_sizes, "threads": self.threads,
            "versions": _versions(), "machine": {"cpu": platform.processor() or platform.machine(),
                                                 "cpus": os.cpu_count()},
            "rows": [{
                "name": r.name, "budget": r.budget, "flops": r.flops, "params": r.params,
                "flops_ratio": r.flops / dense.flops, "params_ratio": r.params / dense.params,
                "onnx_bytes": r.onnx_bytes, "onnxruntime_check": r.check,
                "latency": {str(b): s.as_dict() for b, s in r.latency.items()},
                "speedup": {str(b): self.speedup(r, b) for b in r.latency},
                # 1.0: latency shrank exactly as FLOPs did; above 1: latency lags FLOPs
                "latency_ratio_over_flops_ratio": {
                    str(b): (1 / self.speedup(r, b)) / (r.flops / dense.flops) for b in r.latency},
            } for r in self.rows],
        }

    def table(self) -> str:
        head = ["model", "FLOPs", "kept", "params", "ONNX MB"]
        for b in self.batch_sizes:
            head += [f"b{b} ms (IQR)", f"b{b} speed-up"]
        lines = [head]
        for r in self.rows:
            line = [r.name, _human(r.flops), f"{r.flops / self.dense.flops:.1%}", _human(r.params),
                    f"{r.onnx_bytes / 2**20:.1f}"]
            for b in self.batch_sizes:
                s = r.latency[b]
                line += [f"{s.median_ms:.2f} ({s.p25_ms:.2f}-{s.p75_ms:.2f})", f"{self.speedup(r, b):.2f}x"]
            lines.append(line)
        widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
        text = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                for row in lines]
        text.insert(1, "-" * len(text[0]))
        runs = ", ".join(f"b{b}: {self.dense.latency[b].runs}" for b in self.batch_sizes)
        text.append(f"onnxruntime CPU, {self.threads} intra-op threads, input {self.input_shapes}, "
                    f"medians of interleaved runs ({runs})")
        return "\n".join(text)

    def write_json(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(self.as_dict(), fh, indent=2)

    def plot(self, path: str) -> None:
        """Speed-up against FLOPs kept, one line per batch size, beside the ideal 1/FLOPs."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4.5))
        rows = sorted(self.rows, key=lambda r: -r.flops)
        kept = [r.flops / self.dense.flops for r in rows]
        for b in self.batch_sizes:
            ax.plot(kept, [self.speedup(r, b) for r in rows], "o-", label=f"batch {b}")
        grid = np.linspace(min(kept), 1.0, 50)
        ax.plot(grid, 1 / grid, "k--", lw=1, label="ideal (1 / FLOPs kept)")
        for r, k in zip(rows, kept):
            ax.annotate(r.name, (k, self.speedup(r, self.batch_sizes[0])), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("FLOPs kept")
        ax.set_ylabel("onnxruntime speed-up over dense")
        ax.set_title(f"{self.model}: onnxruntime CPU, {self.threads} threads")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def benchmark_onnxruntime(models: Dict[str, torch.nn.Module], example_inputs, *, name: str = "model",
                          batch_sizes: Sequence[int] = (1, 32), threads: Optional[int] = None, warmup: int = 5,
                          runs: int = 30, max_seconds: Optional[float] = None, rtol: float = 1e-4,
                          onnx_dir: Optional[str] = None) -> BenchResult:
    """Export every model (the first is the dense reference) to ONNX, check each against torch in
    onnxruntime (OnnxMismatchError beyond rtol), and measure them all interleaved. FLOPs and params
    come from a model's fxprune report when it has one, else from fxprune.cost_of. The ONNX files
    are kept in onnx_dir as `<key>.onnx` when it is given."""
    from ..compiler import cost_of
    from ..tracing import normalise_example_inputs
    inputs = normalise_example_inputs(example_inputs)
    threads = threads or physical_cores()
    with tempfile.TemporaryDirectory() as tmp:
        directory = onnx_dir or tmp
        os.makedirs(directory, exist_ok=True)
        rows, files = [], {}
        for key, model in models.items():
            report = getattr(model, "meta", {}).get("fxprune")
            cost = ({"flops": report["flops"]["after"], "params": report["params"]["after"]} if report
                    else cost_of(model, inputs))
            path = os.path.join(directory, f"{key.replace('@', '_').replace(' ', '_')}.onnx")
            log.info("exporting %s to ONNX and checking it against torch in onnxruntime", key)
            export_onnx(model, inputs, path)
            check = compare_with_torch(model, path, inputs, rtol=rtol).as_dict()
            files[key] = path
            rows.append(BenchRow(key, cost["flops"], cost["params"], os.path.getsize(path), check,
                                 report["budget"]["flops"] if report else None))
        log.info("measuring onnxruntime latency: %d models interleaved, batch sizes %s, %d threads, "
                 "%d warm-up + %d timed runs", len(files), list(batch_sizes), threads, warmup, runs)
        latency = measure_latency(files, [list(t.shape) for t in inputs], batch_sizes=batch_sizes, threads=threads,
                                  warmup=warmup, runs=runs, max_seconds=max_seconds)
    for row in rows:
        row.latency = latency[row.name]
    return BenchResult(name, [list(t.shape) for t in inputs], list(batch_sizes), threads, rows)


def prune_and_benchmark(model: torch.nn.Module, example_inputs, *, budgets: Sequence[float] = (0.5,),
                        compile_options: Optional[dict] = None,
                        extra_models: Optional[Dict[str, torch.nn.Module]] = None, **bench_options) -> BenchResult:
    """Prune `model` to each budget with fxprune.compile and benchmark the results against the
    dense model (and any `extra_models`, e.g. another tool's pruned model) in onnxruntime."""
    from ..compiler import compile
    models: Dict[str, torch.nn.Module] = {"dense": model.eval()}
    for budget in budgets:
        if budget < 1.0:
            log.info("pruning to %.0f%% of the FLOPs", 100 * budget)
            models[f"fxprune@{budget:g}"] = compile(model, budget, example_inputs=example_inputs,
                                                    **(compile_options or {}))
    models.update(extra_models or {})
    return benchmark_onnxruntime(models, example_inputs, **bench_options)


def _versions() -> dict:
    import onnx
    import onnxruntime
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


