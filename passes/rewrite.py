"""PruneRewrite: emit a new, physically smaller GraphModule.

Requires: the traced GraphModule, its ChannelGroups and a PrunePlan. Produces: a NEW GraphModule
(node names preserved, so the verifier can compare node by node) that shares no tensor with the input:
sliced tensors are new, everything else is copied. The input module and its graph are never modified.

What changes: every sliced parameter/buffer (index_select along its channel dims); modules whose
parameters changed get resized shallow copies (in/out channels, groups of depthwise convs,
normalized_shape, attention embed_dim); shape literals the graph carries (view/reshape/expand
sizes, split sizes, layer_norm's normalized_shape) are recomputed from the kept channels, so the
result runs without anyone patching attributes by hand."""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.fxutil import CONV_PARAMETERS, bind_arguments, get_attr
from fxprune.passes.dependency import SHAPE_ARG_FUNCTIONS, SHAPE_ARG_METHODS, ChannelCount
from fxprune.ir import ChannelGroups, ChannelMap, PrunePlan
from fxprune.tracing import value_spec



class PruneRewrite(PassBase):
    """torch.fx PassBase: `PruneRewrite(groups, plan)(gm).graph_module` is the pruned model."""

    mutates_input = False

    def __init__(self, groups: ChannelGroups, plan: PrunePlan):
        super().__init__()
        self.groups, self.plan = groups, plan

    # ----------------------------------------------------------------- channel arithmetic
    def kept(self, elements: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return self.groups.kept_positions(elements, self.plan.keep_unit)

    def new_shape(self, shape, m: Any) -> List[int]:
        if not isinstance(m, ChannelMap):
            return list(shape)
        return [len(self.kept(e)) if e is not None else s for s, e in zip(shape, m.dims)]

    # ----------------------------------------------------------------- the pass
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        new_tensors = self.sliced_tensors(gm)
        resized_prefixes = {name.rsplit(".", 1)[0] for name in new_tensors}
        resized_prefixes |= {p.rsplit(".", i)[0] for p in list(resized_prefixes) for i in range(1, p.count(".") + 1)}
        root: Dict[str, Any] = {}
        graph = torch.fx.Graph()
        env: Dict[torch.fx.Node, torch.fx.Node] = {}
        for node in gm.graph.nodes:
            new = graph.node_copy(node, lambda n: env[n])
            new.meta = {k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta}
            self.rewrite_arguments(node, new)
            env[node] = new
            if node.op == "call_module" and node.target not in root:
                module = gm.get_submodule(node.target)
                # modules whose size attributes follow their input even without sliced tensors
                # (LayerNorm without affine parameters) are refreshed too
                if node.target in resized_prefixes or "reduces_over" in self.groups.special.get(node.name, {}):
                    module = _with_tensors(module, node.target + ".", new_tensors)
                    _refresh_attributes(module, self, node)
                    root[node.target] = module
                else:
                    root[node.target] = copy.deepcopy(module)
            elif node.op == "get_attr" and node.target not in root:
                root[node.target] = new_tensors.get(node.target) if node.target in new_tensors else \
                    _copy_tensor(get_attr(gm, node.target))
        graph.lint()
        pruned = torch.fx.GraphModule(root, graph, class_name="Pruned" + type(gm).__name__)
        return PassResult(pruned, True)

    def sliced_tensors(self, gm: torch.fx.GraphModule) -> Dict[str, torch.Tensor]:
        """Every parameter/buffer with a channel dim, index_select-ed to the kept channels."""
        out: Dict[str, torch.Tensor] = {}
        originals = {name: get_attr(gm, name) for name in self.groups.param_slices}
        with torch.no_grad():
            for name, dims in self.groups.param_slices.items():
                original = originals[name]
                tensor, sliced = original.detach(), False
                for dim, elements in sorted(dims.items()):  # rows first: gathering columns of fewer rows is cheaper
                    idx = self.kept(elements)
                    if len(idx) != tensor.shape[dim]:
                        tensor = tensor.index_select(dim, torch.as_tensor(idx, device=tensor.device))
                        sliced = True
                if sliced:  # a new tensor; unsliced ones are cloned with their module (never shared)
                    out[name] = tensor
            self.fold_attention_scale(out)
        return {name: (nn.Parameter(t, requires_grad=originals[name].requires_grad)
                       if isinstance(originals[name], nn.Parameter) else t) for name, t in out.items()}

    def fold_attention_scale(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Attention scales q.k by head_dim**-0.5 with head_dim read from the (pruned) width. Folding
        sqrt(new/old) into the q projection keeps the original scale, so the pruned model equals the
        zero-masked original exactly and stays closer to the unpruned one."""
        for info in self.groups.special.values():
            if info.get("kind") != "attention" or not info.get("fold_scale"):
                continue
            old = len(info["elements"])
            new = len(self.kept(info["elements"]))
            if new == old or info["q_weight"] not in tensors:
                continue
            factor = math.sqrt(new / old)
            for name in (info["q_weight"], info["q_bias"]):
                if name is not None and name in tensors:
                    tensors[name][:new] *= factor

    # ----------------------------------------------------------------- shape literals
    def rewrite_arguments(self, node: torch.fx.Node, new: torch.fx.Node) -> None:
        maps = self.groups.maps
        if node.op == "call_method" and node.target in SHAPE_ARG_METHODS:
            sizes, new_sizes = node.args[1:], new.args[1:]
            packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
            sizes, new_sizes = (list(sizes[0]), list(new_sizes[0])) if packed else (list(sizes), list(new_sizes))
            fixed = self.fixed_sizes(node, sizes, new_sizes)
            if fixed is not None:
                new.args = (new.args[0], tuple(fixed)) if packed else (new.args[0], *fixed)
        elif node.op == "call_function" and node.target in SHAPE_ARG_FUNCTIONS:
            fixed = self.fixed_sizes(node, list(node.args[1]), list(new.args[1]))
            if fixed is not None:
                new.args = (new.args[0], tuple(fixed))
        elif self.is_split(node):
            self.rewrite_split(node, new)
        elif node.op == "call_function" and self.groups.special.get(node.name, {}).get("depthwise"):
            self.rewrite_conv_groups(node, new)
        elif node.op == "call_function" and node.target is torch.nn.functional.layer_norm:
            x = node.args[0]
            k = len(node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"])
            shape = self.new_shape(value_spec(x).shape, maps.get(x.name))[-k:]
            if len(node.args) > 1:
                new.args = (new.args[0], tuple(shape), *new.args[2:])
            else:
                new.kwargs = {**new.kwargs, "normalized_shape": tuple(shape)}

    def fixed_sizes(self, node: torch.fx.Node, sizes: List[Any], new_sizes: List[Any]) -> Optional[List[Any]]:
        """Shape arguments with every channel dim (literal or computed from a channel count)
        replaced by its new literal size; batch and spatial arguments stay as traced.
        `sizes` are the original graph's arguments, `new_sizes` the same in the new graph."""
        spec = value_spec(node)
        if len(sizes) != spec.ndim:
            return None
        shape = self.new_shape(spec.shape, self.groups.maps.get(node.name))
        m = self.groups.maps.get(node.name)
        out, changed = [], False
        for i, (s, new_s) in enumerate(zip(sizes, new_sizes)):
            tracked = isinstance(m, ChannelMap) and m.dims[i] is not None
            counts = isinstance(s, torch.fx.Node) and isinstance(self.groups.maps.get(s.name), ChannelCount)
            if (tracked and not (isinstance(s, int) and s == -1)) or counts:
                out.append(shape[i] if tracked else spec.shape[i])
                changed = True
            else:
                out.append(new_s)
        return out if changed else None

    def rewrite_conv_groups(self, node: torch.fx.Node, new: torch.fx.Node) -> None:
        """A functional depthwise conv (F.conv2d(x, w, groups=C)): `groups` is the kept input width."""
        x = bind_arguments(node)["input"]
        groups = self.new_shape(value_spec(x).shape, self.groups.maps.get(x.name))[1]
        position = CONV_PARAMETERS.index("groups")
        if len(node.args) > position:
            new.args = (*new.args[:position], groups, *new.args[position + 1:])
        else:
            new.kwargs = {**new.kwargs, "groups": groups}

    @staticmethod
    def is_split(node: torch.fx.Node) -> bool:
        return (node.op == "call_function" and node.target in (torch.split, torch.chunk, torch.tensor_split)) or (
            node.op == "call_method" and node.target in ("split", "chunk", "tensor_split"))

    def rewrite_split(self, node: torch.fx.Node, new: torch.fx.Node) -> None:
        parts = self.groups.maps.get(node.name)
        x = node.args[0]
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        xm = self.groups.maps.get(x.name)
        if not isinstance(parts, tuple) or not isinstance(xm, ChannelMap) or xm.dims[dim % xm.ndim] is None:
            return
        d = dim % xm.ndim
        sizes = [len(self.kept(p.dims[d])) for p in parts]
        new.op, new.target = "call_function", torch.split
        new.args, new.kwargs = (new.args[0], sizes, d), {}


def _copy_tensor(t: Any) -> Any:
    if isinstance(t, nn.Parameter):
        return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
    return t.detach().clone() if isinstance(t, torch.Tensor) else copy.deepcopy(t)


def _with_tensors(module: nn.Module, prefix: str, new_tensors: Dict[str, torch.Tensor]) -> nn.Module:
    """Copy of `module` holding the new tensors where it has them and copies of the rest."""
    new = copy.copy(module)
    new.__dict__["_parameters"] = {k: new_tensors[prefix + k] if prefix + k in new_tensors else _copy_tensor(v)
                                   for k, v in module._parameters.items()}
    new.__dict__["_buffers"] = {k: new_tensors[prefix + k] if prefix + k in new_tensors else _copy_tensor(v)
                                for k, v in module._buffers.items()}
    new.__dict__["_modules"] = {k: (_with_tensors(sub, prefix + k + ".", new_tensors) if sub is not None else None)
                                for k, sub in module._modules.items()}
    return new


def _refresh_attributes(module: nn.Module, rewrite: PruneRewrite, node: torch.fx.Node) -> None:
    """Make size attributes agree with the sliced tensors."""
    groups = rewrite.groups
    if isinstance(module, nn.modules.conv._ConvNd):
        if groups.special.get(node.name, {}).get("depthwise"):
            x = node.args[0]
            module.groups = rewrite.new_shape(value_spec(x).shape, groups.maps.get(x.name))[1]
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]
    elif isinstance(module, nn.LayerNorm):
        x = node.args[0]
        shape = rewrite.new_shape(value_spec(x).shape, groups.maps.get(x.name))
        module.normalized_shape = tuple(shape[len(shape) - len(module.normalized_shape):])
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    elif isinstance(module, nn.MultiheadAttention):
        e = module.in_proj_weight.shape[1]
        module.embed_dim = module.kdim = module.vdim = e
        module.head_dim = e // module.num_heads
        module.out_proj.in_features = module.out_proj.out_features = e
