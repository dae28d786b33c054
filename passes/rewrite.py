"""PruneRewrite: emit a new, physically smaller GraphModule.

Requires: the traced GraphModule, its ChannelGroups and a PrunePlan. Produces: a NEW GraphModule
(node names preserved, so the verifier can compare node by node) that shares no tensor with the input:
sliced tensors are new, everything else is copied. The input module and its graph are never modified.

What changes: every sliced parameter/buffer (index_select along its channel dims; a cut on the
columns is one pass of fxprune/native where it applies); modules whose
parameters changed get resized shallow copies (in/out channels, groups of depthwise convs,
normalized_shape, attention embed_dim); shape literals the graph carries (view/reshape/expand
sizes, split sizes, layer_norm's normalized_shape) are recomputed from the kept channels, so the
result runs without anyone patching attributes by hand."""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.concrete_tracer import create_node_then_args
from fxprune.fxutil import ScratchBuffer, get_attr
from fxprune.ir import ChannelGroups, ChannelMap, PrunePlan, once_per_array
from fxprune.native import Cuts
from fxprune.ops import REGISTRY, op_fact
from fxprune.tracing import graph_module, module_copy, value_spec



class PruneRewrite(PassBase):
    """torch.fx PassBase: `PruneRewrite(groups, plan)(gm).graph_module` is the pruned model."""

    mutates_input = False

    def __init__(self, groups: ChannelGroups, plan: PrunePlan):
        super().__init__()
        self.groups, self.plan = groups, plan
        self._kept = groups.kept_lookup(plan.keep_unit)

    # ----------------------------------------------------------------- channel arithmetic
    def kept(self, elements: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return self._kept(elements)

    def new_shape(self, shape, m: Any) -> List[int]:
        if not isinstance(m, ChannelMap):
            return list(shape)
        return [len(self.kept(e)) if e is not None else s for s, e in zip(shape, m.dims)]

    def input_shape(self, x: torch.fx.Node) -> List[int]:
        """The shape of node x's value after pruning."""
        return self.new_shape(value_spec(x).shape, self.groups.maps.get(x.name))

    # ----------------------------------------------------------------- the pass
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        modules = dict(gm.named_modules())
        entries = {node: REGISTRY.lookup(node, modules) for node in gm.graph.nodes}
        originals = {name: _tensor_at(modules, gm, name) for name in self.groups.param_slices}
        new_tensors = self.sliced_tensors(originals, entries)
        # one copy per original tensor, so tied parameters (an LM's input and output embedding) stay tied
        copies: Dict[int, Any] = {id(originals[name]): t for name, t in new_tensors.items()}
        resized_prefixes = {name.rsplit(".", 1)[0] for name in new_tensors}
        resized_prefixes |= {p.rsplit(".", i)[0] for p in list(resized_prefixes) for i in range(1, p.count(".") + 1)}
        root: Dict[str, Any] = {}
        graph = torch.fx.Graph()
        env: Dict[torch.fx.Node, torch.fx.Node] = {}
        for node in gm.graph.nodes:
            entry = entries[node]
            new = create_node_then_args(graph.create_node, node.op, node.target, map_arg(node.args, env.__getitem__),
                                        map_arg(node.kwargs, env.__getitem__), node.name, node.type)
            new.meta = {k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta}
            if entry is not None and entry.rewrite_args is not None:
                entry.rewrite_args(self, node, new)                      # shape literals of the kept widths
            env[node] = new
            if node.op == "call_module" and node.target not in root:
                module = modules[node.target]
                # a module whose size attributes follow its input without sliced tensors of its own
                # (LayerNorm without affine parameters) is resized too
                if node.target in resized_prefixes or op_fact(node) is not None:
                    module = _with_tensors(module, node.target + ".", new_tensors, copies)
                    if entry is not None and entry.resize_module is not None:
                        entry.resize_module(module, self, node)
                    root[node.target] = module
                else:
                    root[node.target] = _copy_module(module, copies)
            elif node.op == "get_attr" and node.target not in root:
                root[node.target] = new_tensors.get(node.target) if node.target in new_tensors else \
                    _copy_tensor(get_attr(gm, node.target), copies)
        # graph.lint() runs in the pipeline's checks (FXPRUNE_VERIFY=1, as in the tests): 0.6 ms on resnet50
        pruned = graph_module(graph, root, "Pruned" + type(gm).__name__, _non_persistent_buffers(gm, modules))
        pruned.training = gm.training      # its layers are copies in their own mode; the wrapper follows gm
        return PassResult(pruned, True)

    def sliced_tensors(self, originals: Dict[str, torch.Tensor],
                       entries: Dict[torch.fx.Node, Any]) -> Dict[str, torch.Tensor]:
        """Every parameter/buffer with a channel dim (`originals`: by qualified name), index_select-ed to
        the kept channels, then the fix-ups ops make across tensors (attention's q scale)."""
        out: Dict[str, torch.Tensor] = {}
        first_name: Dict[int, str] = {}  # a tensor tied under several names is sliced once (alike, by analysis)
        scratch = (ScratchBuffer(), ScratchBuffer())  # a gather cannot read and write the same memory
        # one index tensor per channel array (a conv's outputs index its norm's four tensors too)
        index = once_per_array(lambda elements: torch.from_numpy(self.kept(elements)))
        native, written_natively = Cuts(), []  # tensors cut on their columns: one native call writes them all
        with torch.no_grad():  # every op below then gives a plain new tensor: no detach needed
            for name, dims in self.groups.param_slices.items():
                tensor = originals[name]
                if first_name.setdefault(id(tensor), name) != name:
                    continue
                cuts = []
                for dim, elements in sorted(dims.items()):
                    kept = index(elements)
                    if len(kept) != tensor.shape[dim]:
                        cuts.append((dim, kept.to(tensor.device)))
                if cuts:  # a new tensor; unsliced ones are cloned with their module (never shared)
                    out[name] = _native_cut(native, tensor, cuts)
                    if out[name] is None:
                        out[name] = _sliced(tensor, cuts, scratch)
                    else:
                        written_natively.append((name, tensor, cuts))
            if not native.run():  # the call failed (out of memory): torch's ops
                for name, tensor, cuts in written_natively:
                    out[name] = _sliced(tensor, cuts, scratch)
            for node, entry in entries.items():
                if entry is not None and entry.adjust_tensors is not None and op_fact(node) is not None:
                    entry.adjust_tensors(self, node, op_fact(node), out)
        new = {name: (nn.Parameter(t, requires_grad=originals[name].requires_grad)
                      if isinstance(originals[name], nn.Parameter) else t) for name, t in out.items()}
        for name, original in originals.items():
            if first_name[id(original)] in new:
                new[name] = new[first_name[id(original)]]
        return new


def _native_cut(native: Cuts, tensor: torch.Tensor, cuts: List[Tuple[int, torch.Tensor]]) -> Optional[torch.Tensor]:
    """The new tensor the native kernels will write (at `native.run()`) for a cut on dims 0 and 1 or on
    dim 1 alone, in one pass where torch's ops take two; None for other cuts (a cut on rows alone is one
    index_select already) or where the kernels do not apply."""
    dims = [dim for dim, _ in cuts]
    if dims == [0, 1]:
        return native.add(tensor, cuts[0][1], cuts[1][1])
    if dims == [1]:
        return native.add(tensor, None, cuts[0][1])
    return None


def _sliced(tensor: torch.Tensor, cuts: List[Tuple[int, torch.Tensor]], scratch) -> torch.Tensor:
    """A new tensor: `tensor` index_select-ed along each (dim, kept indices) of `cuts` (in dim order);
    intermediates are gathered into the two `scratch` buffers' reused memory."""
    if len(cuts) == 1 and cuts[0][0] == 0:
        return tensor.index_select(0, cuts[0][1])  # rows (and 1-d tensors): one copy
    if _gathers_kernels(tensor, cuts):
        return _gather_kernels(tensor, cuts[0][1], cuts[1][1])
    # rows first: the columns of only the kept rows are gathered (vit_b_16's matrices cut both ways, in
    # the pipeline: 61 against 83 ms for columns first, which reads every row)
    for i, (dim, idx) in enumerate(cuts):
        tensor = _select(tensor, dim, idx, scratch[i % 2] if i + 1 < len(cuts) else None)
    return tensor


# A conv weight cut on both channel dims is gathered in one pass, kernel by kernel, when its kernels are
# big enough for that to beat two index_selects (3x3 and up: 512x512x3x3 at 70% kept, 1.7 against 3.2 ms).
_KERNEL_GATHER_MIN_KERNEL, _KERNEL_GATHER_MIN_NUMEL = 4, 1 << 16


def _tensor_at(modules: Dict[str, nn.Module], root: nn.Module, name: str) -> Any:
    """The parameter or buffer at a qualified name, through the module table (get_attr walks the path;
    a module registered under two names is in the table under one)."""
    prefix, _, local = name.rpartition(".")
    module = modules.get(prefix)
    if module is None:
        return get_attr(root, name)
    if local in module._parameters:
        return module._parameters[local]
    return module._buffers[local] if local in module._buffers else getattr(module, local)


def _non_persistent_buffers(gm: torch.fx.GraphModule, modules: Dict[str, nn.Module]) -> set:
    """The get_attr targets of gm that are non-persistent buffers (they stay out of the state_dict)."""
    names = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            prefix, _, field = node.target.rpartition(".")
            if field in getattr(modules.get(prefix), "_non_persistent_buffers_set", ()):
                names.add(node.target)
    return names


def _select(tensor: torch.Tensor, dim: int, idx: torch.Tensor, out_buffer: Optional[ScratchBuffer]) -> torch.Tensor:
    """tensor.index_select(dim, idx), into `out_buffer`'s memory if given. Columns of a matrix (the cut
    dim last, as a linear layer's or 1x1 conv's inputs) are a `gather` along rows, twice as fast as
    index_select on a dim other than the first (1000x2048 at 70% kept: 0.48 against 0.95 ms)."""
    shape = tensor.shape[:dim] + (len(idx),) + tensor.shape[dim + 1:]
    out = out_buffer.like(shape, tensor.dtype, tensor.device) if out_buffer is not None else \
        torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    rows = math.prod(tensor.shape[:dim])
    if dim > 0 and rows > 1 and math.prod(tensor.shape[dim + 1:]) == 1 and tensor.is_contiguous():
        matrix = tensor.view(rows, tensor.shape[dim])
        torch.gather(matrix, 1, idx.expand(rows, len(idx)), out=out.view(rows, len(idx)))
        return out
    return torch.index_select(tensor, dim, idx, out=out)


def _cut_on_rows_and_columns(tensor: torch.Tensor, cuts) -> bool:
    """A contiguous tensor cut on dims 0 and 1 only."""
    return len(cuts) == 2 and cuts[0][0] == 0 and cuts[1][0] == 1 and tensor.is_contiguous()


def _gathers_kernels(tensor: torch.Tensor, cuts) -> bool:
    return (_cut_on_rows_and_columns(tensor, cuts) and tensor.ndim > 2
            and tensor[0, 0].numel() >= _KERNEL_GATHER_MIN_KERNEL and tensor.numel() >= _KERNEL_GATHER_MIN_NUMEL)


def _gather_kernels(tensor: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """tensor[rows][:, columns] for a contiguous [O, I, *kernel] tensor, as one gather of whole kernels."""
    n_out, n_in = tensor.shape[:2]
    flat = (rows[:, None] * n_in + columns[None, :]).reshape(-1)
    return tensor.reshape(n_out * n_in, -1).index_select(0, flat).view(len(rows), len(columns), *tensor.shape[2:])


def _copy_tensor(t: Any, copies: Dict[int, Any]) -> Any:
    """A copy of t, made once per original (`copies` maps id(original) -> copy; also deepcopy's memo)."""
    if id(t) not in copies:
        if isinstance(t, nn.Parameter):
            copies[id(t)] = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
        elif isinstance(t, torch.Tensor):
            copies[id(t)] = t.detach().clone()
        else:
            return copy.deepcopy(t, copies)
    return copies[id(t)]


_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)


def _copy_module(module: nn.Module, copies: Dict[int, Any]) -> nn.Module:
    """A copy sharing nothing mutable with `module`. A layer holding only numbers, strings, tuples of them
    and empty containers (ReLU, pooling, Flatten) is copied shallowly: deepcopy walks every attribute and
    was a visible share of the rewrite on resnet50."""
    def immutable(value: Any) -> bool:
        return isinstance(value, _IMMUTABLE) or (isinstance(value, tuple) and all(immutable(v) for v in value))

    if module._parameters or module._buffers or module._modules or not all(
            immutable(v) or (isinstance(v, (dict, set, list)) and not v) for v in module.__dict__.values()):
        return copy.deepcopy(module, copies)
    return module_copy(module)


def _with_tensors(module: nn.Module, prefix: str, new_tensors: Dict[str, torch.Tensor],
                  copies: Dict[int, Any]) -> nn.Module:
    """Copy of `module` holding the new tensors where it has them and copies of the rest."""
    new = module_copy(module)
    new.__dict__["_parameters"] = {k: new_tensors[prefix + k] if prefix + k in new_tensors else
                                   _copy_tensor(v, copies) for k, v in module._parameters.items()}
    new.__dict__["_buffers"] = {k: new_tensors[prefix + k] if prefix + k in new_tensors else
                                _copy_tensor(v, copies) for k, v in module._buffers.items()}
    new.__dict__["_modules"] = {k: (_with_tensors(sub, prefix + k + ".", new_tensors, copies) if sub is not None else None)
                                for k, sub in module._modules.items()}
    return new
