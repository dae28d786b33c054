"""Normalisation layers and per-channel affine ops: BatchNorm, LayerNorm, GroupNorm, PReLU.

BatchNorm (and PReLU) act per channel: their parameters are sliced with the channel and they are
zero-exact. LayerNorm and GroupNorm reduce over channels, so after pruning they normalise over the
kept channels only; that is their reference semantics (`reference` below), recorded on the node as
a NormOverKept fact."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxprune.fxutil import argument, bind_arguments, first_input, is_get_attr
from fxprune.ir import ChannelMap
from .registry import OpEntry, op_fact, register, same_as_input


@dataclass(frozen=True)
class NormOverKept:
    """This node normalises over a channel dim: after pruning, over the kept channels only.
    `dim` is the channel dim of the input; `first` the first normalised dim (layer norm) and
    `num_groups` the groups (group norm, normalising within each group)."""

    dim: int
    first: Optional[int] = None
    num_groups: Optional[int] = None


# ----------------------------------------------------------------------------- per-channel
def channelwise(a, node: torch.fx.Node, names: List[str]) -> Any:
    """Parameters indexed by the channel of dim 1 (BatchNorm statistics and affine, PReLU slopes)."""
    m = a.tensor_map(first_input(node))
    if m is None:
        return a.opaque(node, "normalisation of an unknown value")
    if m.dims[1] is not None:
        for name in names:
            a.record_param(name, 0, m.dims[1])
    return m


def _module_params(node: torch.fx.Node, module: nn.Module, names) -> List[str]:
    return [f"{node.target}.{n}" for n in names if getattr(module, n, None) is not None]


def batch_norm_module(a, node: torch.fx.Node) -> Any:
    return channelwise(a, node, _module_params(node, a.module(node), ("weight", "bias", "running_mean", "running_var")))


def _resize_batch_norm(module, rw, node) -> None:
    module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]


register(OpEntry("BatchNorm", batch_norm_module, resize_module=_resize_batch_norm, meta_shape=same_as_input,
                 meta_shape_without_weights=True),
         modules=[nn.modules.batchnorm._BatchNorm])


def prelu_module(a, node: torch.fx.Node) -> Any:
    module = a.module(node)
    return channelwise(a, node, [node.target + ".weight"] if module.num_parameters > 1 else [])


def _resize_prelu(module, rw, node) -> None:
    module.num_parameters = module.weight.numel()


register(OpEntry("PReLU", prelu_module, resize_module=_resize_prelu), modules=[nn.PReLU])


# ----------------------------------------------------------------------------- layer norm
def layer_norm(a, node: torch.fx.Node, m: Optional[ChannelMap], n_normalized: int, names: List[str]) -> Any:
    if m is None:
        return a.opaque(node, "layer norm of an unknown value")
    first = m.ndim - n_normalized
    tracked = [d for d in range(first, m.ndim) if m.dims[d] is not None]
    if len(tracked) > 1:
        return a.opaque(node, "layer norm over several channel dims")
    if tracked:
        for name in names:
            a.record_param(name, tracked[0] - first, m.dims[tracked[0]])
        a.set_fact(node, NormOverKept(dim=tracked[0], first=first))
    return m


def layer_norm_module(a, node: torch.fx.Node) -> Any:
    module = a.module(node)
    return layer_norm(a, node, a.tensor_map(first_input(node)), len(module.normalized_shape),
                      _module_params(node, module, ("weight", "bias")))


def functional_layer_norm(a, node: torch.fx.Node) -> Any:
    bound = bind_arguments(node)
    w, b = bound.get("weight"), bound.get("bias")
    if any(p is not None and not is_get_attr(p) for p in (w, b)):
        return a.opaque(node, "layer_norm with computed affine parameters")
    names = [p.target for p in (w, b) if p is not None]
    return layer_norm(a, node, a.tensor_map(bound["input"]), len(bound["normalized_shape"]), names)


def _norm_over_kept(interp, node, fact: NormOverKept, args, kwargs, parameters, normalise):
    """The norm applied to the kept channels of its input, zeros elsewhere (its reference semantics).
    `parameters` name the call's arguments after the input, which are also the module's attribute names
    (normalized_shape / num_groups, weight, bias, eps); weight and bias are sliced to the kept channels
    before `normalise(kept_input, parameters)` runs."""
    if node.op == "call_module":
        module = interp.fetch_attr(node.target)
        p = {name: getattr(module, name, None) for name in parameters}
    else:
        p = dict(zip(parameters, args[1:]))
        p.update(kwargs)
    x, idx = args[0], interp.kept_index(node.args[0], fact.dim)
    affine_dim = 0 if fact.first is None else fact.dim - fact.first
    for name in ("weight", "bias"):
        if p.get(name) is not None:
            p[name] = p[name].index_select(affine_dim, idx)
    xs = x.index_select(fact.dim, idx)
    return torch.zeros_like(x).index_copy(fact.dim, idx, normalise(xs, p))


def _eps(p) -> float:
    return 1e-5 if p.get("eps") is None else p["eps"]  # layer_norm's and group_norm's default


def _layer_norm_reference(interp, node, fact: NormOverKept, args, kwargs):
    return _norm_over_kept(interp, node, fact, args, kwargs, ("normalized_shape", "weight", "bias", "eps"),
                           lambda xs, p: F.layer_norm(xs, xs.shape[xs.ndim - len(p["normalized_shape"]):],
                                                      p.get("weight"), p.get("bias"), _eps(p)))


def _resize_layer_norm(module, rw, node) -> None:
    x = node.args[0]
    shape = rw.input_shape(x)
    module.normalized_shape = tuple(shape[len(shape) - len(module.normalized_shape):])


def _rewrite_normalized_shape(rw, node, new) -> None:
    x = first_input(node)
    k = len(node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"])
    shape = tuple(rw.input_shape(x)[-k:])
    if len(node.args) > 1:
        new.args = (new.args[0], shape, *new.args[2:])
    else:
        new.kwargs = {**new.kwargs, "normalized_shape": shape}


register(OpEntry("LayerNorm", layer_norm_module, resize_module=_resize_layer_norm, reference=_layer_norm_reference,
                 meta_shape=same_as_input,
                 meta_shape_without_weights=True),
         modules=[nn.LayerNorm])
register(OpEntry("F.layer_norm", functional_layer_norm, rewrite_args=_rewrite_normalized_shape,
                 reference=_layer_norm_reference),
         functions=[F.layer_norm])


# ----------------------------------------------------------------------------- group norm
def group_norm(a, node: torch.fx.Node, m: Optional[ChannelMap], num_groups: int, names: List[str]) -> Any:
    """GroupNorm normalises within each group: each group keeps the same positions (so num_groups
    stays valid) and, like LayerNorm, normalises over its kept channels."""
    if m is None:
        return a.opaque(node, "group norm of an unknown value")
    if m.dims[1] is not None:
        grid = m.dims[1].reshape(num_groups, -1)
        a.es.union(grid.reshape(-1), np.tile(grid[0], num_groups))
        for name in names:
            a.record_param(name, 0, m.dims[1])
        a.set_fact(node, NormOverKept(dim=1, num_groups=num_groups))
    return m


def group_norm_module(a, node: torch.fx.Node) -> Any:
    module = a.module(node)
    return group_norm(a, node, a.tensor_map(first_input(node)), module.num_groups,
                      _module_params(node, module, ("weight", "bias")))


def _group_norm_reference(interp, node, fact: NormOverKept, args, kwargs):
    return _norm_over_kept(interp, node, fact, args, kwargs, ("num_groups", "weight", "bias", "eps"),
                           lambda xs, p: F.group_norm(xs, fact.num_groups, p.get("weight"), p.get("bias"),
                                                      _eps(p)))


def _resize_group_norm(module, rw, node) -> None:
    module.num_channels = module.weight.shape[0] if module.weight is not None else rw.input_shape(node.args[0])[1]


register(OpEntry("GroupNorm", group_norm_module, resize_module=_resize_group_norm, reference=_group_norm_reference,
                 meta_shape=same_as_input,
                 meta_shape_without_weights=True),
         modules=[nn.GroupNorm])


def norm_fact(node: torch.fx.Node) -> Optional[NormOverKept]:
    fact = op_fact(node)
    return fact if isinstance(fact, NormOverKept) else None


# ----------------------------------------------------------------------------- functional forms
def functional_channelwise(a, node: torch.fx.Node, params: List[str]) -> Any:
    """A functional per-channel op whose statistics and affine parameters are graph attributes
    (what a custom norm layer decomposes into): each is sliced with the channel."""
    bound = bind_arguments(node)
    tensors = [bound.get(p) for p in params if bound.get(p) is not None]
    if any(not is_get_attr(t) for t in tensors):
        return a.opaque(node, f"{node.target.__name__} with computed statistics or affine parameters")
    return channelwise(a, node, [t.target for t in tensors])


register(OpEntry("F.batch_norm", lambda a, node: functional_channelwise(
    a, node, ["running_mean", "running_var", "weight", "bias"])), functions=[F.batch_norm])


register(OpEntry("F.group_norm", lambda a, node: group_norm(
    a, node, a.tensor_map(first_input(node)), argument(node, "num_groups"),
    [t.target for t in (argument(node, "weight"), argument(node, "bias")) if is_get_attr(t)]),
    reference=_group_norm_reference), functions=[F.group_norm])


register(OpEntry("F.instance_norm", lambda a, node: functional_channelwise(
    a, node, ["running_mean", "running_var", "weight", "bias"])), functions=[F.instance_norm])


# ----------------------------------------------------------------------------- RMS norm
def _rms_norm_reference(interp, node, fact: NormOverKept, args, kwargs):
    return _norm_over_kept(interp, node, fact, args, kwargs, ("normalized_shape", "weight", "eps"),
                           lambda xs, p: F.rms_norm(xs, xs.shape[xs.ndim - len(p["normalized_shape"]):],
                                                    p.get("weight"), p.get("eps")))


def rms_norm_module(a, node: torch.fx.Node) -> Any:
    module = a.module(node)
    return layer_norm(a, node, a.tensor_map(first_input(node)), len(module.normalized_shape),
                      _module_params(node, module, ("weight",)))


def functional_rms_norm(a, node: torch.fx.Node) -> Any:
    bound = bind_arguments(node)
    w = bound.get("weight")
    if w is not None and not is_get_attr(w):
        return a.opaque(node, "rms_norm with a computed weight")
    return layer_norm(a, node, a.tensor_map(bound["input"]), len(bound["normalized_shape"]),
                      [w.target] if w is not None else [])


# like LayerNorm, RMSNorm normalises over its trailing dims: after pruning, over the kept channels
register(OpEntry("RMSNorm", rms_norm_module, resize_module=_resize_layer_norm, reference=_rms_norm_reference,
                 meta_shape=same_as_input,
                 meta_shape_without_weights=True), modules=[nn.RMSNorm])
register(OpEntry("F.rms_norm", functional_rms_norm, rewrite_args=_rewrite_normalized_shape,
                 reference=_rms_norm_reference), functions=[F.rms_norm])
