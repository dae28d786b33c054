"""OnnxRuntimeTarget: where `Budget(latency=...)` measures (see fxprune/latency.py for the protocol).

Layers are timed alone: each (in, out) width of a table becomes a one-node ONNX graph (Conv, or
MatMul + Add for a linear layer) built with onnx.helper, run in an onnxruntime session with the
target's thread count at its batch size. Tables are cached on disk per target key (CPU model,
onnxruntime version, provider, threads, batch size), so a model's tables are measured once per machine.
Whole models are exported to ONNX once per compile and timed interleaved (dense, pruned, dense, ...)."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..cache import cache_dir as default_cache_dir
from ..latency import LayerSpec
from .onnx_export import export_onnx, ort_session, physical_cores

log = logging.getLogger("fxprune")


class _CachedLayerTimes:
    """What every target shares: layer times cached on disk per target key, measured on a miss by the
    subclass's `_time_layer(spec, in_width, out_width)`."""

    cache_dir: str
    _table: Optional[Dict[str, float]]

    def __init__(self, cache_dir: Optional[str]):
        self.cache_dir = cache_dir or default_cache_dir()
        self._table = None
        self.measured = self.cached = 0   # layer widths timed / read from the cache by this target

    key: str

    @property
    def cache_path(self) -> str:
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, "latency", f"{digest}.json")

    def _cache(self) -> Dict[str, float]:
        if self._table is None:
            self._table = {}
            try:
                with open(self.cache_path) as fh:
                    stored = json.load(fh)
                if stored.get("key") == self.key:
                    self._table = dict(stored["seconds"])
            except (OSError, ValueError, KeyError):
                pass
        return self._table

    def _save(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
            tmp = self.cache_path + f".{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump({"key": self.key, "seconds": self._table}, fh)
            os.replace(tmp, self.cache_path)
        except OSError as exc:  # a read-only home: the tables live for this process only
            log.warning("fxprune: could not write the latency cache %s (%s)", self.cache_path, exc)

    def layer_seconds(self, spec: LayerSpec, widths: Sequence[Tuple[int, int]]) -> List[float]:
        """Median seconds of `spec` alone at each (in, out) width (from the cache where measured before)."""
        cache, out, new = self._cache(), [], 0
        for in_width, out_width in widths:
            entry = f"{spec!r}@{in_width}x{out_width}"
            if entry not in cache:
                cache[entry] = self._time_layer(spec, in_width, out_width)
                new += 1
            out.append(cache[entry])
        self.measured += new
        self.cached += len(widths) - new
        if new:
            self._save()
            log.info("latency table: %s %s -> %d: %d widths measured (%d layer widths so far, %d from the cache)",
                     spec.op, "x".join(map(str, spec.input_shape[1:])), spec.out_channels, new, self.measured,
                     self.cached)
        return out

    def _time_layer(self, spec: LayerSpec, in_width: int, out_width: int) -> float:
        raise NotImplementedError


class OnnxRuntimeTarget(_CachedLayerTimes):
    """onnxruntime CPU latency at `batch_size` with `threads` intra-op threads.

    layer_runs / model_runs (after model_warmup untimed runs): timed runs per measurement (the median
    counts; a layer stops early once its runs pass layer_seconds_cap; whole models run interleaved for
    at least model_min_seconds and at most model_max_seconds, split over model_sessions fresh sets of
    onnxruntime sessions: the same model differs by several percent from one session to the next, more
    than between runs of one session, so a measurement takes the median over sessions); cache_dir:
    where tables are kept (default $FXPRUNE_CACHE or ~/.cache/fxprune; an unwritable folder keeps them
    in memory only)."""

    def __init__(self, batch_size: int = 1, threads: Optional[int] = None, *, layer_runs: int = 7,
                 model_runs: int = 20, model_warmup: int = 3, model_min_seconds: float = 5.0,
                 model_max_seconds: float = 60.0, model_sessions: int = 3,
                 layer_seconds_cap: float = 0.5,
                 cache_dir: Optional[str] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.threads = threads or physical_cores()
        self.layer_runs, self.model_runs, self.model_warmup = layer_runs, model_runs, model_warmup
        self.model_min_seconds, self.model_max_seconds = model_min_seconds, model_max_seconds
        if not isinstance(model_sessions, int) or model_sessions < 1:
            raise ValueError(f"model_sessions must be a positive integer, got {model_sessions!r}")
        self.model_sessions = model_sessions
        self.layer_seconds_cap = layer_seconds_cap
        super().__init__(cache_dir)
        self._exported: Dict[int, Tuple[torch.nn.Module, str]] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="fxprune-latency-")

    # ------------------------------------------------------------------ identity and cache
    @property
    def key(self) -> str:
        import onnxruntime
        return (f"onnxruntime-{onnxruntime.__version__}-cpu/{_cpu_name()}/{platform.machine()}/"
                f"threads{self.threads}/batch{self.batch_size}")

    def __repr__(self) -> str:
        return f"OnnxRuntimeTarget(batch_size={self.batch_size}, threads={self.threads})"

    def _time_layer(self, spec: LayerSpec, in_width: int, out_width: int) -> float:
        proto, feed = _layer_graph(spec, in_width, out_width, self.batch_size)
        session = ort_session(proto.SerializeToString(), self.threads)
        t0 = time.perf_counter()
        session.run(None, feed)   # warm-up: first runs allocate and pick kernels
        if time.perf_counter() - t0 < 0.05:
            session.run(None, feed)
        times, start = [], time.perf_counter()
        for _ in range(self.layer_runs):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
            if len(times) >= 3 and time.perf_counter() - start > self.layer_seconds_cap:
                break
        return float(np.median(times))

    # ------------------------------------------------------------------ whole models
    def model_seconds(self, models: Dict[str, torch.nn.Module], example_inputs: Tuple[Any, ...]) -> Dict[str, float]:
        """Seconds of each model at the target's batch size, timed interleaved in model_sessions fresh
        sets of sessions: the median over sessions of each session's median (each model is exported to
        ONNX once per target object)."""
        from .benchmark import session_medians
        files = {name: self._onnx_file(model, example_inputs) for name, model in models.items()}
        per_session = session_medians(files, [list(t.shape) for t in example_inputs], batch_size=self.batch_size,
                                      sessions=self.model_sessions, threads=self.threads, warmup=self.model_warmup,
                                      runs=self.model_runs, max_seconds=self.model_max_seconds / self.model_sessions,
                                      min_seconds=self.model_min_seconds / self.model_sessions)
        return {name: float(np.median([s[name] for s in per_session])) / 1e3 for name in models}

    def _onnx_file(self, model: torch.nn.Module, example_inputs) -> str:
        if id(model) not in self._exported:
            path = os.path.join(self._tmp.name, f"model{len(self._exported)}.onnx")
            export_onnx(model, example_inputs, path)
            self._exported[id(model)] = (model, path)   # the model is held so its id is not reused
        return self._exported[id(model)][1]


class TorchTarget(_CachedLayerTimes):
    """Eager PyTorch latency on `device` ("cuda", "cuda:1", "cpu") at `batch_size`, in `dtype`: for a
    model that is deployed as PyTorch (on a GPU, say) rather than through onnxruntime.

    Layers are timed alone as nn.Conv2d/nn.Linear at each width; whole models run interleaved for
    `model_rounds` rounds of `model_runs` calls each (median per model). On CUDA every timing waits for
    the device to finish (torch.cuda.synchronize), so a number is the kernels' time plus the launch
    overhead a Python caller pays, which is what a small model is limited by. Tables are cached on disk
    per key (device name, torch version, dtype, batch size; CPU: threads)."""

    def __init__(self, device: str = "cuda", batch_size: int = 1, dtype: torch.dtype = torch.float32, *,
                 layer_runs: int = 20, model_runs: int = 10, model_rounds: int = 15, warmup: int = 3,
                 cache_dir: Optional[str] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TorchTarget(device={device!r}): this torch sees no CUDA device; use "
                             f"OnnxRuntimeTarget for CPU deployment or TorchTarget(device='cpu')")
        self.batch_size, self.dtype = batch_size, dtype
        self.layer_runs, self.model_runs, self.model_rounds, self.warmup = layer_runs, model_runs, model_rounds, warmup
        super().__init__(cache_dir)

    @property
    def key(self) -> str:
        where = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else
                 f"{_cpu_name()}/{platform.machine()}/threads{torch.get_num_threads()}")
        return f"torch-{torch.__version__}-{self.device.type}/{where}/{str(self.dtype)[6:]}/batch{self.batch_size}"

    def __repr__(self) -> str:
        return f"TorchTarget(device={str(self.device)!r}, batch_size={self.batch_size}, dtype={self.dtype})"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time_calls(self, fn, runs: int) -> float:
        """Median seconds of one call of fn over `runs` timed calls (after warm-up)."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(runs):
            self._sync()
            t0 = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def _time_layer(self, spec: LayerSpec, in_width: int, out_width: int) -> float:
        shape = list(spec.input_shape)
        shape[0] = self.batch_size if len(shape) > 1 else shape[0]
        if spec.op == "conv":
            shape[1] = in_width
            groups = in_width if spec.depthwise else 1
            out_width = in_width if spec.depthwise else out_width
            conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[len(spec.kernel)]
            layer = conv(in_width, out_width, spec.kernel, spec.stride, spec.padding, spec.dilation, groups,
                         bias=spec.bias)
        else:
            shape[-1] = in_width
            layer = torch.nn.Linear(in_width, out_width, bias=spec.bias)
        layer = layer.to(self.device, self.dtype).eval()
        x = torch.randn(shape, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            return self._time_calls(lambda: layer(x), self.layer_runs)

    def model_seconds(self, models: Dict[str, torch.nn.Module], example_inputs: Tuple[Any, ...]) -> Dict[str, float]:
        """Median seconds of each model at the target's batch size, the models called in turn (a round
        of model_runs calls each, model_rounds rounds, the order rotated every round)."""
        inputs = tuple(_at_batch(t, self.batch_size).to(self.device, self.dtype if t.is_floating_point() else t.dtype)
                       if isinstance(t, torch.Tensor) else t for t in example_inputs)
        placed = {name: copy.deepcopy(model).to(self.device, self.dtype).eval() for name, model in models.items()}
        names, times = list(placed), {name: [] for name in placed}
        with torch.no_grad():
            for name in names:
                for _ in range(self.warmup):
                    placed[name](*inputs)
            for r in range(self.model_rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    model = placed[name]
                    times[name].append(self._time_calls(lambda: model(*inputs), self.model_runs))
        return {name: float(np.median(t)) for name, t in times.items()}


def _at_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """An example input (batch 1 in dim 0) repeated to `batch` rows."""
    if t.dim() == 0 or t.shape[0] == batch:
        return t
    return t[:1].expand(batch, *t.shape[1:]).contiguous()


def _layer_graph(spec: LayerSpec, in_width: int, out_width: int, batch: int):
    """A one-layer ONNX model of `spec` at these widths, and a random input for it."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    shape = list(spec.input_shape)
    shape[0] = batch if len(shape) > 1 else shape[0]
    nodes, inits = [], []
    if spec.op == "conv":
        shape[1] = in_width
        group = in_width if spec.depthwise else 1
        out_width = in_width if spec.depthwise else out_width
        w = rng.standard_normal((out_width, in_width // group, *spec.kernel)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "w"))
        inputs = ["x", "w"]
        if spec.bias:
            inits.append(numpy_helper.from_array(np.zeros(out_width, np.float32), "b"))
            inputs.append("b")
        nodes.append(helper.make_node("Conv", inputs, ["y"], kernel_shape=list(spec.kernel), strides=list(spec.stride),
                                      pads=list(spec.padding) * 2, dilations=list(spec.dilation), group=group))
    else:
        shape[-1] = in_width
        w = rng.standard_normal((in_width, out_width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y0" if spec.bias else "y"]))
        if spec.bias:
            inits.append(numpy_helper.from_array(np.zeros(out_width, np.float32), "b"))
            nodes.append(helper.make_node("Add", ["y0", "b"], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, {"x": rng.standard_normal(shape).astype(np.float32)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
