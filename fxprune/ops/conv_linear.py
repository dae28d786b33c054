"""Convolutions and linear layers (modules and their functional forms): they create channels.

A conv or linear layer's output features are a new source space; its input features slice the
weight's second dim. A depthwise conv (one input channel per group) has no channels of its own:
input channel i owns outputs i*k .. i*k+k-1, so `groups` follows the kept width (DepthwiseConv fact).
A grouped conv keeps the same positions in every group, so `groups` stays valid."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxprune.errors import describe_node
from fxprune.fxutil import bind_arguments, declare_signature, get_attr, is_get_attr, per_dim
from fxprune.ir import ChannelMap
from fxprune.latency import LatencyLayer, LayerSpec
from fxprune.tracing import TensorSpec, value_spec
from .registry import OpEntry, op_fact, register


CONV_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
declare_signature([F.conv1d, F.conv2d, F.conv3d], CONV_PARAMETERS, {"bias": None, "groups": 1})
declare_signature([F.linear], ("input", "weight", "bias"), {"bias": None})


@dataclass(frozen=True)
class DepthwiseConv:
    """This conv has one input channel per group: `groups` is its kept input width."""


# ----------------------------------------------------------------------------- channel rules
def conv(a, node: torch.fx.Node, m: Optional[ChannelMap], weight: str, bias: Optional[str], groups: int,
         out_channels: int, in_channels: int) -> Any:
    spec = value_spec(node)
    if m is None:
        return a.opaque(node, "conv of an unknown value")
    for d in m.tracked():
        if d != 1:
            a.es.freeze(m.dims[d], f"blocked by {describe_node(node)}: channels on a spatial dim")
    x_in = m.dims[1]
    in_per_group, out_per_group = in_channels // groups, out_channels // groups
    if groups == 1:
        if x_in is not None:
            a.record_param(weight, 1, x_in)
        out = a.new_elements(node, out_channels, "conv output")
    elif in_per_group == 1 and x_in is not None:
        out = np.repeat(x_in, out_per_group)
        a.set_fact(node, DepthwiseConv())
    else:
        if x_in is not None:
            grid = x_in.reshape(groups, in_per_group)
            a.es.union(grid.reshape(-1), np.tile(grid[0], groups))
            a.record_param(weight, 1, grid[0])
        out = np.tile(a.new_elements(node, out_per_group, "grouped conv output"), groups)
    a.record_param(weight, 0, out)
    if bias:
        a.record_param(bias, 0, out)
    return ChannelMap.single(spec.ndim, 1, out)


def conv_module(a, node: torch.fx.Node) -> Any:
    module = a.module(node)
    return conv(a, node, a.tensor_map(node.args[0] if node.args else None), node.target + ".weight",
                node.target + ".bias" if module.bias is not None else None,
                module.groups, module.out_channels, module.in_channels)


def functional_conv(a, node: torch.fx.Node) -> Any:
    bound = bind_arguments(node)
    w, b = bound.get("weight"), bound.get("bias")
    if not is_get_attr(w) or (b is not None and not is_get_attr(b)):
        return a.opaque(node, "conv with a computed weight")
    groups = bound.get("groups", 1)
    w_shape = value_spec(w).shape
    return conv(a, node, a.tensor_map(bound["input"]), w.target, b.target if b is not None else None,
                groups, w_shape[0], w_shape[1] * groups)


def linear(a, node: torch.fx.Node, m: Optional[ChannelMap], weight: str, bias: Optional[str], out_features: int) -> Any:
    if m is None:
        return a.opaque(node, "linear of an unknown value")
    if m.dims[-1] is not None:
        a.record_param(weight, 1, m.dims[-1])
    out = a.new_elements(node, out_features, "linear output")
    a.record_param(weight, 0, out)
    if bias:
        a.record_param(bias, 0, out)
    return m.replace(m.ndim - 1, out)


def linear_module(a, node: torch.fx.Node) -> Any:
    module = a.module(node)
    return linear(a, node, a.tensor_map(node.args[0] if node.args else None), node.target + ".weight",
                  node.target + ".bias" if module.bias is not None else None, module.out_features)


def functional_linear(a, node: torch.fx.Node) -> Any:
    bound = bind_arguments(node)
    x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
    if not is_get_attr(w) or (b is not None and not is_get_attr(b)):
        return a.opaque(node, "F.linear with a computed weight")
    return linear(a, node, a.tensor_map(x), w.target, b.target if b is not None else None, value_spec(w).shape[0])


# ----------------------------------------------------------------------------- rewrite
def _resize_conv(module, rw, node) -> None:
    if isinstance(op_fact(node), DepthwiseConv):
        module.groups = rw.input_shape(node.args[0])[1]
    module.out_channels = module.weight.shape[0]
    module.in_channels = module.weight.shape[1] * module.groups


def _rewrite_conv_groups(rw, node: torch.fx.Node, new: torch.fx.Node) -> None:
    """A functional depthwise conv (F.conv2d(x, w, groups=C)): `groups` is the kept input width."""
    if not isinstance(op_fact(node), DepthwiseConv):
        return
    groups = rw.input_shape(bind_arguments(node)["input"])[1]
    position = CONV_PARAMETERS.index("groups")
    if len(node.args) > position:
        new.args = (*new.args[:position], groups, *new.args[position + 1:])
    else:
        new.kwargs = {**new.kwargs, "groups": groups}


def _resize_linear(module, rw, node) -> None:
    module.out_features, module.in_features = module.weight.shape


# ----------------------------------------------------------------------------- shapes
def _conv_meta(node: torch.fx.Node, args: tuple, kwargs: dict, module: nn.Module) -> Any:
    """meta_shape of a Conv module by the conv arithmetic: on resnet50 the meta kernels of its 53 convs
    were a third of shape propagation. None where the module would refuse the input (the real run then
    says why)."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x, n = args[0], len(module.kernel_size)
    if x.ndim not in (n + 1, n + 2) or x.shape[-n - 1] != module.in_channels or x.dtype != module.weight.dtype:
        return None
    sizes = x.shape[-n:]
    if module.padding == "same":
        spatial = tuple(sizes)
    else:
        padding = (0,) * n if module.padding == "valid" else module.padding
        spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                        zip(sizes, padding, module.dilation, module.kernel_size, module.stride))
    if min(spatial, default=1) < 1:
        return None
    return torch.empty((*x.shape[:-n - 1], module.out_channels, *spatial), dtype=x.dtype, device="meta")


def _linear_meta(node: torch.fx.Node, args: tuple, kwargs: dict, module: nn.Module) -> Any:
    """meta_shape of a Linear module: the input's shape with out_features last."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if x.ndim < 1 or x.shape[-1] != module.in_features or x.dtype != module.weight.dtype:
        return None
    return torch.empty((*x.shape[:-1], module.out_features), dtype=x.dtype, device="meta")


# ----------------------------------------------------------------------------- FLOPs
def _conv_flops(cost, node: torch.fx.Node, weight: str):
    spec = value_spec(node)
    if not isinstance(spec, TensorSpec):
        return []
    # the conv rule keeps channels on dim 1 only: batch and spatial sizes are constants
    return [(2.0 * math.prod(spec.shape) / spec.shape[1], cost.weight_factors(weight))]


def _linear_flops(cost, node: torch.fx.Node, weight: str):
    spec = value_spec(node)
    if not isinstance(spec, TensorSpec):
        return []
    return [(2.0, cost.leading_factors(node, spec) + cost.weight_factors(weight))]


def _conv_layer(cost, node: torch.fx.Node, x: Any, weight: str, has_bias: bool, stride, padding, dilation,
                groups: int, padding_mode: str = "zeros") -> Optional[LatencyLayer]:
    """A dense or depthwise conv with numeric zero padding, as a latency target times it."""
    x_spec, out_spec = value_spec(x) if isinstance(x, torch.fx.Node) else None, value_spec(node)
    if not isinstance(x_spec, TensorSpec) or not isinstance(out_spec, TensorSpec) or isinstance(padding, str) \
            or padding_mode != "zeros":
        return None
    factors = cost.weight_factors(weight)
    shape = _weight_shape(cost, weight)
    n_spatial = x_spec.ndim - 2
    depthwise = groups > 1 and shape[1] == 1 and shape[0] == groups
    if groups > 1 and not depthwise:
        return None
    spec = LayerSpec("conv", tuple(x_spec.shape), int(shape[0]), tuple(shape[2:]), _ints(stride, n_spatial),
                     _ints(padding, n_spatial), _ints(dilation, n_spatial), depthwise, has_bias)
    return LatencyLayer(spec, factors[0], 1) if depthwise else LatencyLayer(spec, factors[1], factors[0])


def _linear_layer(cost, node: torch.fx.Node, x: Any, weight: str, has_bias: bool) -> Optional[LatencyLayer]:
    """A linear layer whose leading (token) dims are not pruned, as a latency target times it."""
    x_spec, out_spec = value_spec(x) if isinstance(x, torch.fx.Node) else None, value_spec(node)
    if not isinstance(x_spec, TensorSpec) or not isinstance(out_spec, TensorSpec):
        return None
    if not all(isinstance(f, int) for f in cost.leading_factors(node, out_spec)):
        return None
    out_factor, in_factor = cost.weight_factors(weight)
    spec = LayerSpec("linear", tuple(x_spec.shape), int(out_spec.shape[-1]), bias=has_bias)
    return LatencyLayer(spec, in_factor, out_factor)


def _conv_module_layer(cost, node: torch.fx.Node) -> Optional[LatencyLayer]:
    m = cost.gm.get_submodule(node.target)
    return _conv_layer(cost, node, node.args[0] if node.args else None, node.target + ".weight", m.bias is not None,
                       m.stride, m.padding, m.dilation, m.groups, m.padding_mode)


def _functional_conv_layer(cost, node: torch.fx.Node) -> Optional[LatencyLayer]:
    bound = bind_arguments(node)
    w, b = bound.get("weight"), bound.get("bias")
    if not is_get_attr(w):
        return None
    return _conv_layer(cost, node, bound.get("input"), w.target, b is not None, bound.get("stride", 1),
                       bound.get("padding", 0), bound.get("dilation", 1), bound.get("groups", 1))


def _linear_module_layer(cost, node: torch.fx.Node) -> Optional[LatencyLayer]:
    m = cost.gm.get_submodule(node.target)
    return _linear_layer(cost, node, node.args[0] if node.args else None, node.target + ".weight", m.bias is not None)


def _functional_linear_layer(cost, node: torch.fx.Node) -> Optional[LatencyLayer]:
    bound = bind_arguments(node)
    w = bound.get("weight")
    return _linear_layer(cost, node, bound.get("input"), w.target, bound.get("bias") is not None) \
        if is_get_attr(w) else None


def _weight_shape(cost, weight: str) -> Tuple[int, ...]:
    return tuple(get_attr(cost.gm, weight).shape)


def _ints(value: Any, n: int) -> Tuple[int, ...]:
    return tuple(int(v) for v in per_dim(value, n))


def _functional_weight(node: torch.fx.Node) -> Optional[str]:
    w = bind_arguments(node).get("weight")
    return w.target if is_get_attr(w) else None


register(OpEntry("Conv", conv_module, resize_module=_resize_conv, latency_layer=_conv_module_layer,
                 flops=lambda cost, node: _conv_flops(cost, node, node.target + ".weight"),
                 meta_shape=_conv_meta, meta_shape_without_weights=True),
         modules=[nn.Conv1d, nn.Conv2d, nn.Conv3d])
register(OpEntry("F.conv", functional_conv, rewrite_args=_rewrite_conv_groups, latency_layer=_functional_conv_layer,
                 flops=lambda cost, node: _conv_flops(cost, node, w) if (w := _functional_weight(node)) else []),
         functions=[F.conv1d, F.conv2d, F.conv3d])
register(OpEntry("Linear", linear_module, resize_module=_resize_linear, latency_layer=_linear_module_layer,
                 flops=lambda cost, node: _linear_flops(cost, node, node.target + ".weight"),
                 meta_shape=_linear_meta, meta_shape_without_weights=True),
         modules=[nn.Linear])
register(OpEntry("F.linear", functional_linear, latency_layer=_functional_linear_layer,
                 flops=lambda cost, node: _linear_flops(cost, node, w) if (w := _functional_weight(node)) else []),
         functions=[F.linear])


def _transposed_conv(a, node: torch.fx.Node) -> Any:
    return a.opaque(node, "no channel rule for transposed convolutions yet")


register(OpEntry("ConvTranspose (frozen; FLOPs counted)", _transposed_conv,
                 flops=lambda cost, node: _conv_flops(cost, node, node.target + ".weight")),
         modules=[nn.modules.conv._ConvTransposeNd])


# ----------------------------------------------------------------------------- embeddings
def embedding(a, node: torch.fx.Node, weight: str, embedding_dim: int) -> Any:
    """A lookup of rows of the weight: the output's last dim is a new channel space, the weight's
    columns (a transformer's hidden size starts here)."""
    spec = value_spec(node)
    if not isinstance(spec, TensorSpec):
        return a.opaque(node, "embedding of an unknown value")
    out = a.new_elements(node, embedding_dim, "embedding")
    a.record_param(weight, 1, out)
    return ChannelMap((None,) * (spec.ndim - 1) + (out,))


def embedding_module(a, node: torch.fx.Node) -> Any:
    return embedding(a, node, node.target + ".weight", a.module(node).embedding_dim)


def functional_embedding(a, node: torch.fx.Node) -> Any:
    w = bind_arguments(node).get("weight")
    if not is_get_attr(w):
        return a.opaque(node, "F.embedding with a computed weight")
    return embedding(a, node, w.target, value_spec(w).shape[1])


def _resize_embedding(module, rw, node) -> None:
    module.embedding_dim = module.weight.shape[1]


declare_signature([F.embedding], ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                                  "sparse"), {"padding_idx": None, "max_norm": None, "norm_type": 2.0,
                                              "scale_grad_by_freq": False, "sparse": False})
register(OpEntry("Embedding", embedding_module, resize_module=_resize_embedding), modules=[nn.Embedding])
register(OpEntry("F.embedding", functional_embedding), functions=[F.embedding])
