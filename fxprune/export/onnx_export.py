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
    if isinstance(model, torch.fx.GraphModule):
        model, runs_at_other_batches = fold_input_independent(model, inputs, dynamic_batch=dynamic_batch)
        if dynamic_batch and not runs_at_other_batches:
            log.warning("fxprune: the graph runs only at the example's batch size %d (it was traced with the "
                        "batch fixed); the ONNX file gets a fixed batch dimension", inputs[0].shape[0])
            dynamic_batch = False
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


# Ops whose value differs between calls with the same arguments: never folded.
_NONDETERMINISTIC = ("rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
                     "bernoulli", "multinomial", "normal", "poisson", "dropout", "empty", "empty_like")
# Reads of a tensor's metadata, not its values.
_METADATA_ATTRIBUTES = ("shape", "device", "dtype", "ndim", "is_cuda", "layout")
_METADATA_METHODS = ("size", "dim", "numel", "get_device")


def fold_input_independent(gm: torch.fx.GraphModule, inputs: Tuple, *,
                           dynamic_batch: bool = True) -> Tuple[torch.fx.GraphModule, bool]:
    """A copy of `gm` (sharing its parameters) in which every tensor that depends on no input value and
    (with `dynamic_batch`) not on the batch size is a buffer. Traced models build position ids, causal
    and packed-sequence masks and rotary tables from the input's shape; with the shape fixed those
    are constants, and folding them keeps ops the exporter cannot translate (Hugging Face's mask code
    uses torch.diff) out of the ONNX graph. Batch invariance is checked by running the graph at three
    batch sizes. Returns the folded copy (`gm` itself when nothing folds) and whether the graph ran at
    the other batch sizes (False: it was traced with its batch fixed, and is folded for that batch)."""
    candidates = _value_independent_nodes(gm.graph)
    if not any(n.op != "get_attr" for n in candidates):
        return gm, True
    runs = [_capture(gm, inputs, candidates)]
    runs_at_other_batches = True
    if dynamic_batch and inputs and all(isinstance(t, torch.Tensor) and t.dim() for t in inputs):
        batch = inputs[0].shape[0]
        try:
            runs += [_capture(gm, _random_like(inputs, other, seed=1), candidates) for other in (batch + 1, 2 * batch + 5)]
        except Exception:   # e.g. Hugging Face's masks index a batch-1 tensor with arange(batch)
            runs_at_other_batches = False
            runs = runs[:1]
    invariant = {n for n in candidates if n.op == "get_attr" or all(_same(runs[0][n], run[n]) for run in runs[1:])}
    frontier = [n for n in gm.graph.nodes if n in invariant and n.op != "get_attr"
                and isinstance(runs[0][n], torch.Tensor) and any(user not in invariant for user in n.users)]
    if not frontier:
        return gm, runs_at_other_batches
    graph = torch.fx.Graph()
    copies: dict = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    folded = torch.fx.GraphModule(gm, graph)
    for i, node in enumerate(frontier):
        name = f"_folded_constant_{i}"
        folded.register_buffer(name, runs[0][node].detach().clone())
        with graph.inserting_before(copies[node]):
            copies[node].replace_all_uses_with(graph.get_attr(name))
    graph.eliminate_dead_code()
    folded.recompile()
    return folded, runs_at_other_batches


def _value_independent_nodes(graph: torch.fx.Graph) -> set:
    """Nodes whose value is fixed by the parameters and the inputs' shapes (not the inputs' values)."""
    independent = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            independent.add(node)
        elif node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
                and node.args[1] in _METADATA_ATTRIBUTES:
            independent.add(node)
        elif node.op == "call_method" and node.target in _METADATA_METHODS:
            independent.add(node)
        elif node.op in ("call_function", "call_method", "call_module") \
                and all(arg in independent for arg in node.all_input_nodes) \
                and _target_name(node) not in _NONDETERMINISTIC:
            independent.add(node)
    return independent


def _capture(gm: torch.fx.GraphModule, inputs: Tuple, nodes: set) -> dict:
    """The values `nodes` take when gm runs on `inputs`."""
    values = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node in nodes and node.op != "get_attr":
                values[node] = value
            return value

    with torch.no_grad():
        _Recorder(gm).run(*inputs)
    return values


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:   # values without a plain equality (e.g. tensors inside containers) are not folded
        return False


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


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
    `batch`, so the dynamic batch dim is exercised; a file exported with a fixed batch is checked at
    that batch); raise OnnxMismatchError when the largest
    difference exceeds rtol times the largest output magnitude."""
    session = ort_session(onnx_path, threads=None)
    exported_batch = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    if isinstance(exported_batch, int):     # exported with a fixed batch: check at that one
        batch = exported_batch
    inputs = _random_like(normalise_example_inputs(example_inputs), batch, seed)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feeds)
    with torch.no_grad():
        expected = model.eval()(*inputs)
    # the exporter flattens nested outputs (tuples, dicts such as Hugging Face's) to their tensors, in order
    expected = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
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
