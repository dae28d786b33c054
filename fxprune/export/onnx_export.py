"""ONNX export of a (pruned) model, graph cleanup with onnx-graphsurgeon, and the check that
onnxruntime computes what torch computes.

A pruned GraphModule is plain PyTorch (no masks, no custom ops), so it exports like the original;
these helpers make the export reproducible (fixed opset, a dynamic batch dim, a cleaned graph that
`onnx.checker` accepts) and prove it with a numerical comparison."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch

from ..errors import FxPruneError
from ..tracing import normalise_example_inputs

log = logging.getLogger("fxprune")

DEFAULT_OPSET = 17


class OnnxMismatchError(FxPruneError):
    """onnxruntime's output differs from torch's beyond the tolerance."""


@dataclass(frozen=True)
class OnnxCheck:
    """How closely onnxruntime matched torch: the largest absolute difference over all outputs, and
    that difference relative to the largest torch output magnitude (elementwise relative error is
    meaningless where an output is near zero)."""

    max_abs_error: float
    max_rel_error: float
    batch: int

    def as_dict(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error, "batch": self.batch}


def export_onnx(model: torch.nn.Module, example_inputs, path: str, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, cleanup: bool = True) -> str:
    """Export `model` (eval mode) to `path` with the batch dim dynamic, clean the graph with
    onnx-graphsurgeon and validate it with onnx.checker. Returns `path`."""
    import onnx
    inputs = normalise_example_inputs(example_inputs)
    input_names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    modes = {m: m.training for m in model.modules()}   # restored one by one: train(mode) would set them all
    model.eval()
    try:
        # Grad mode stays on: under no_grad nn.MultiheadAttention takes its fused fast path
        # (aten::_native_multi_head_attention), which has no ONNX export. The TorchScript exporter is
        # deprecated in favour of dynamo, which needs onnxscript and re-traces the model; the pruned
        # model is already a traced graph, so the classic path fits.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, path, opset_version=opset, input_names=input_names,
                              output_names=["output"], dynamo=False, do_constant_folding=True,
                              dynamic_axes={n: {0: "batch"} for n in input_names + ["output"]} if dynamic_batch else None)
    finally:
        for m, training in modes.items():
            m.training = training
    proto = onnx.load(path)
    if cleanup:
        proto = cleanup_onnx(proto)
        onnx.save(proto, path)
    onnx.checker.check_model(proto, full_check=True)
    return path


def cleanup_onnx(proto):
    """Fold constants, drop dead nodes and sort topologically (onnx-graphsurgeon). The exporter
    leaves shape arithmetic (Shape->Gather->Concat chains for reshapes) that ORT would otherwise
    evaluate at every run."""
    import onnx
    import onnx_graphsurgeon as gs
    graph = gs.import_onnx(proto)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph.fold_constants().cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = proto.ir_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(proto.opset_import)
    return onnx.shape_inference.infer_shapes(cleaned)


def compare_with_torch(model: torch.nn.Module, onnx_path: str, example_inputs, *, batch: int = 2,
                       rtol: float = 1e-4, seed: int = 0) -> OnnxCheck:
    """Run the ONNX file in onnxruntime and the model in torch on the same random inputs (batch
    `batch`, so the dynamic batch dim is exercised); raise OnnxMismatchError when the largest
    difference exceeds rtol times the largest output magnitude."""
    inputs = _random_like(normalise_example_inputs(example_inputs), batch, seed)
    session = ort_session(onnx_path, threads=None)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feeds)
    with torch.no_grad():
        expected = model.eval()(*inputs)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    if len(got) != len(expected):
        raise OnnxMismatchError(f"{onnx_path}: onnxruntime returned {len(got)} outputs, torch {len(expected)}")
    max_abs, scale = 0.0, 0.0
    for ours, ref in zip(got, expected):
        ref = ref.detach().numpy()
        if ours.shape != ref.shape:
            raise OnnxMismatchError(f"{onnx_path}: output shape {ours.shape} in onnxruntime, {ref.shape} in torch")
        max_abs = max(max_abs, float(np.abs(ours.astype(np.float64) - ref).max(initial=0.0)))
        scale = max(scale, float(np.abs(ref).max(initial=0.0)))
    check = OnnxCheck(max_abs, max_abs / scale if scale > 0 else max_abs, batch)
    if check.max_rel_error > rtol:
        raise OnnxMismatchError(f"{onnx_path}: onnxruntime differs from torch by {check.max_abs_error:.3g} "
                                f"(relative {check.max_rel_error:.3g} > rtol {rtol:g}); the export is wrong")
    return check


def ort_session(path, threads=None):
    """An onnxruntime CPU session (of a file, or a serialised model's bytes) with all graph optimisations; intra-op threads default to the
    physical core count (hyper-threads slow GEMM-bound models down).

    Thread spinning is off: by default ORT's workers busy-wait after a run, and when sessions
    alternate (as the interleaved benchmark does) one session's spinning workers steal the cores
    the next session's run needs, adding tens of milliseconds to whichever runs second."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def physical_cores() -> int:
    """Physical cores this process may run on (Linux /proc/cpuinfo; otherwise os.cpu_count())."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, current = set(), {}
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("physical id", "core id"):
                    current[key] = value.strip()
                elif not line.strip() and current:
                    cores.add((current.get("physical id"), current.get("core id")))
                    current = {}
        if current:
            cores.add((current.get("physical id"), current.get("core id")))
        if cores and all(c != (None, None) for c in cores):
            return max(1, min(len(cores), available))
    except OSError:
        pass
    return max(1, available)


def _random_like(inputs: Tuple, batch: int, seed: int) -> Tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor):
            raise FxPruneError("ONNX export needs tensor example inputs")
        shape: Sequence[int] = (batch, *t.shape[1:]) if t.dim() else ()
        out.append(torch.randn(*shape, generator=generator, dtype=t.dtype) if t.is_floating_point()
                   else t[:1].expand(*shape).clone() if t.dim() else t)
    return tuple(out)
