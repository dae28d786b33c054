"""Latency as a cost: per-layer tables measured on a target, calibrated against whole-model timings.

A target (`Budget(latency=..., target=...)`; `fxprune.export.latency_target.OnnxRuntimeTarget` is the
onnxruntime one) is any object with
    key: str                                      what its measurements are valid for (machine, runtime,
                                                  batch size, threads)
    layer_seconds(spec, widths) -> [seconds]      one layer alone at each (in, out) width
    model_seconds({name: module}, inputs) -> {name: seconds}   whole models, timed interleaved
This module only calls it, so the compiler core needs no runtime.

The model (HALP, NetAdapt): every conv and linear layer whose op entry describes it (`latency_layer`)
gets a table over a grid of its (input, output) widths, interpolated bilinearly between grid points
(bilinear is exact for a cost that goes as in x out, so the table only has to carry the measured
departures from it: blocked kernels, cache sizes). Layers of the same shape share a table. Ops with
FLOPs but no table (attention's matmuls between activations) are priced at the seconds per FLOP the
tables measured. The sum misses everything else (norms, activations, adds, the runtime's fixed
cost), so the prediction of a keep vector's latency, as a fraction of the dense model's, is

    1 - s * (1 - tables(keep) / tables(dense))

with s fitted to whole-model timings of pruned models (s = 1 before any: the tables alone)."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch.fx

from .budget import auto_step
log = logging.getLogger("fxprune")

# the grid of each layer dim, as fractions of its full width (then aligned: see width_grid)
GRID_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
MAX_EXACT_WIDTHS = 8    # a dim with at most this many round_to="auto" widths has all of them measured


@dataclass(frozen=True)
class LayerSpec:
    """One conv or linear layer at full width, as a target builds and times it alone. input_shape is
    at the example inputs' batch size (dim 0); a target replaces it by its own."""

    op: str                              # "conv" or "linear"
    input_shape: Tuple[int, ...]         # conv: (N, C, *spatial); linear: (..., in_features)
    out_channels: int
    kernel: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    padding: Tuple[int, ...] = ()
    dilation: Tuple[int, ...] = ()
    depthwise: bool = False              # one input channel per group: the width is in = out = groups
    bias: bool = False

    @property
    def in_channels(self) -> int:
        return self.input_shape[1] if self.op == "conv" else self.input_shape[-1]


@dataclass
class LatencyLayer:
    """What an op entry's `latency_layer` returns: the layer, and the cost factors (a constant, or the
    unit of every position) of its input and output channel dims. A depthwise conv's out_factor is 1."""

    spec: LayerSpec
    in_factor: Any
    out_factor: Any
    node: str = ""


def width_grid(full: int, fractions: Sequence[float] = GRID_FRACTIONS) -> List[int]:
    """Widths a table measures for a dim of `full` channels. A narrow dim (at most MAX_EXACT_WIDTHS widths
    under round_to="auto") gets every one of them: there a width that breaks a kernel's channel blocking
    can cost more than the aligned width above it (ResNet-20's 3x3 conv at 15 channels took 1.5x its time
    at 16 in onnxruntime), which no interpolation between distant grid points would see. A wide dim gets
    the fractions rounded up to its auto step (8 channels), where every choice is aligned anyway."""
    step = auto_step(full)
    if full // step <= MAX_EXACT_WIDTHS:
        return sorted({*range(step, full + 1, step), full})
    return sorted({min(full, max(step, math.ceil(full * f / step) * step)) for f in fractions})


@dataclass
class LatencyTable:
    """Seconds of one layer at every (in, out) width of the grid (out_widths == [1] for depthwise)."""

    spec: LayerSpec
    in_widths: List[int]
    out_widths: List[int]
    seconds: np.ndarray                  # (len(in_widths), len(out_widths))

    @staticmethod
    def measure(spec: LayerSpec, target: Any) -> "LatencyTable":
        in_widths = width_grid(spec.in_channels)
        out_widths = [1] if spec.depthwise else width_grid(spec.out_channels)
        points = [(i, i if spec.depthwise else o) for i in in_widths for o in out_widths]
        seconds = np.asarray(target.layer_seconds(spec, points), dtype=np.float64)
        return LatencyTable(spec, in_widths, out_widths, seconds.reshape(len(in_widths), len(out_widths)))


@dataclass
class LatencyModel:
    """Predicted latency of a keep vector from per-layer tables (see the module docstring).

    `layers` pairs each layer (its factors) with its table; `fit` adds a whole-model measurement."""

    layers: List[LatencyLayer]
    tables: List[LatencyTable]
    target_key: str
    slope: float = 1.0                  # s: the share of the dense latency that follows the tables
    measurements: List[Tuple[float, float]] = field(default_factory=list)  # (tables ratio, measured ratio)
    table_seconds: float = 0.0          # wall time spent measuring tables (0 when all came from the cache)
    untimed_share: float = 0.0          # of the dense prediction: ops without a table, priced by their FLOPs

    def fit(self, tables_ratio: float, measured_ratio: float) -> None:
        """One pruned model's measured latency ratio: s by least squares through (1, 1) over all of them."""
        self.measurements.append((tables_ratio, measured_ratio))
        x = np.array([1 - p for p, _ in self.measurements])
        y = np.array([1 - r for _, r in self.measurements])
        if (x > 1e-6).any():
            self.slope = float(np.clip(np.dot(x, y) / np.dot(x, x), 0.05, 2.0))

    def as_dict(self) -> Dict[str, Any]:
        return {"target": self.target_key, "layers": len(self.layers), "tables": len({id(t) for t in self.tables}),
                "slope": self.slope, "table_seconds": self.table_seconds, "untimed_share": self.untimed_share,
                "measurements": [{"tables_ratio": p, "measured_ratio": r} for p, r in self.measurements]}


class TableInterpolator:
    """All tables at once: seconds of every layer at its (in, out) kept counts, bilinear between grid
    points (and clipped to the grid)."""

    def __init__(self, tables: List[LatencyTable]):
        n = len(tables)
        g_in = max((len(t.in_widths) for t in tables), default=1) + 1
        g_out = max((len(t.out_widths) for t in tables), default=1) + 1
        # axes padded past the full width (never reached) so every row has the same length
        self.in_axis, self.out_axis = np.zeros((n, g_in)), np.zeros((n, g_out))
        self.values = np.zeros((n, g_in, g_out))
        for k, t in enumerate(tables):
            self.in_axis[k] = _padded(t.in_widths, g_in)
            self.out_axis[k] = _padded(t.out_widths, g_out)
            self.values[k] = np.pad(t.seconds, ((0, g_in - t.seconds.shape[0]), (0, g_out - t.seconds.shape[1])),
                                    mode="edge")
        self.rows = np.arange(n)

    def __call__(self, x_in: np.ndarray, x_out: np.ndarray) -> float:
        if not len(self.rows):
            return 0.0
        i, ti = _bracket(self.in_axis, x_in)
        o, to = _bracket(self.out_axis, x_out)
        r, v = self.rows, self.values
        low = v[r, i, o] * (1 - to) + v[r, i, o + 1] * to
        high = v[r, i + 1, o] * (1 - to) + v[r, i + 1, o + 1] * to
        return float(np.sum(low * (1 - ti) + high * ti))


def _padded(widths: List[int], length: int) -> np.ndarray:
    last = widths[-1]
    return np.array(list(widths) + [last + k for k in range(1, length - len(widths) + 1)], dtype=np.float64)


def _bracket(axis: np.ndarray, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per row: the grid interval holding x, and x's position in it (clipped to the grid)."""
    i = np.clip((axis <= x[:, None]).sum(1) - 1, 0, axis.shape[1] - 2)
    rows = np.arange(len(x))
    a0, a1 = axis[rows, i], axis[rows, i + 1]
    return i, np.clip((x - a0) / (a1 - a0), 0.0, 1.0)


def build_latency_model(gm: torch.fx.GraphModule, context: Any, target: Any) -> LatencyModel:
    """Tables for every layer an op entry describes, measured on `target` (layers of one shape share a
    table; the target caches them on disk)."""
    from .ops import REGISTRY
    modules = dict(gm.named_modules())
    layers: List[LatencyLayer] = []
    for node in gm.graph.nodes:
        entry = REGISTRY.lookup(node, modules) if node.op.startswith("call_") else None
        if entry is not None and entry.latency_layer is not None:
            layer = entry.latency_layer(context, node)
            if layer is not None:
                layer.node = node.name
                layers.append(layer)
    start = last_line = time.perf_counter()
    specs = list(dict.fromkeys(layer.spec for layer in layers))
    by_spec: Dict[LayerSpec, LatencyTable] = {}
    for k, spec in enumerate(specs):
        by_spec[spec] = LatencyTable.measure(spec, target)
        if time.perf_counter() - last_line > 2.0 or (k + 1 == len(specs) and last_line > start):
            last_line = time.perf_counter()
            log.info("latency tables on %s: %d/%d layer shapes, %.0f s", target.key, k + 1, len(specs),
                     last_line - start)
    model = LatencyModel(layers, [by_spec[layer.spec] for layer in layers], str(target.key))
    model.table_seconds = time.perf_counter() - start
    return model
