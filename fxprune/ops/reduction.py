"""Ops that reduce or resample: softmax, sum/mean/max over dims, pooling and resizing.

A sum over a channel dim is exact over the kept channels (the removed ones are zero). A mean over
channels is the normalising step of hand-written norms (RMSNorm's `x.pow(2).mean(-1)`, a LayerNorm2d's
`x.mean(1)`): like LayerNorm, after pruning it averages the kept channels, and the verifier's reference
is the mean over the kept channels (MeanOverKept). A max or min over channels freezes them. Pooling must
act on dims that carry no channels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxprune.fxutil import argument, declare_signature, first_input, per_dim
from fxprune.ir import ChannelMap
from fxprune.tracing import TensorSpec, value_spec
from .registry import OpEntry, register


def softmax(a, node: torch.fx.Node) -> Any:
    m = a.tensor_map(first_input(node))
    if node.op == "call_module":
        dim = a.module(node).dim
    else:
        dim = argument(node, "dim", position=1)
    if m is None:
        return a.opaque(node, "softmax of an unknown value")
    if dim is not None and m.dims[dim % m.ndim] is not None:
        return a.opaque(node, "softmax over a channel dim")
    return m


declare_signature([torch.softmax, torch.log_softmax], ("input", "dim", "dtype"), {"dtype": None})
register(OpEntry("softmax", softmax), functions=[F.softmax, F.log_softmax, torch.softmax, torch.log_softmax],
         methods=["softmax", "log_softmax"], modules=[nn.Softmax, nn.LogSoftmax])


@dataclass(frozen=True)
class MeanOverKept:
    """This mean reduces channel dims `dims` of its input: after pruning it averages the kept channels."""

    dims: Tuple[int, ...]


def reduction(a, node: torch.fx.Node) -> Any:
    name = node.target if isinstance(node.target, str) else node.target.__name__
    m = a.tensor_map(first_input(node))
    spec = value_spec(node)
    dims = argument(node, "dim", position=1)
    if m is None or dims is None or not isinstance(spec, TensorSpec):
        return a.opaque(node, f"{name} over all dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % m.ndim for d in dims)
    channel_dims = tuple(d for d in dims if m.dims[d] is not None)
    if channel_dims and name == "mean":
        a.set_fact(node, MeanOverKept(channel_dims))
    elif channel_dims and name != "sum":  # sum over kept channels is exact
        return a.opaque(node, f"{name} over a channel dim")
    keepdim = spec.ndim == m.ndim
    return ChannelMap(tuple(None if d in dims else e for d, e in enumerate(m.dims) if keepdim or d not in dims))


def _mean_over_kept_reference(interp, node: torch.fx.Node, fact: MeanOverKept, args, kwargs) -> Any:
    x = args[0]
    for d in fact.dims:
        x = x.index_select(d, interp.kept_index(node.args[0], d))
    if node.op == "call_method":
        return getattr(x, node.target)(*args[1:], **kwargs)
    return node.target(x, *args[1:], **kwargs)


register(OpEntry("sum/mean/amax/amin", reduction, reference=_mean_over_kept_reference),
         functions=[torch.sum, torch.mean, torch.amax, torch.amin], methods=["sum", "mean", "amax", "amin"])


def pool(a, node: torch.fx.Node) -> Any:
    """Pooling/resizing over the trailing spatial dims; channel dims must be elsewhere."""
    m = a.tensor_map(first_input(node))
    spec = value_spec(node)
    if m is None or not isinstance(spec, TensorSpec) or spec.ndim != m.ndim:
        return a.opaque(node, "pooling with an unexpected shape")
    n_spatial = max(m.ndim - 2, 1)
    if any(m.dims[d] is not None for d in range(m.ndim - n_spatial, m.ndim)):
        return a.opaque(node, "pooling over a channel dim")
    return m


_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
              nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool2d: 2}


def _pool_meta(node: torch.fx.Node, args: tuple, kwargs: dict, module) -> Any:
    """meta_shape of a pooling module by the pooling arithmetic (its meta kernels are Python
    decompositions: adaptive_avg_pool2d on meta cost a fifth of resnet50's shape propagation). None
    where the module returns indices or may refuse the input (the kernel then runs and decides)."""
    n = _POOL_DIMS.get(type(module))
    if n is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or \
            getattr(module, "return_indices", False) or args[0].ndim not in (n + 1, n + 2):
        return None
    x = args[0]
    sizes = x.shape[-n:]
    if hasattr(module, "output_size"):
        wanted = per_dim(module.output_size, n)
        spatial = tuple(s if w is None else w for s, w in zip(sizes, wanted))
        if min(sizes) < 1:
            return None
    else:
        kernel, padding = per_dim(module.kernel_size, n), per_dim(module.padding, n)
        stride = per_dim(module.stride if module.stride is not None else module.kernel_size, n)
        dilation = per_dim(getattr(module, "dilation", 1), n)
        # kernels differ in what they refuse (avg_pool3d an input smaller than its kernel even when
        # padded): the rule answers only inputs every window fits unpadded
        if any(2 * p > k for p, k in zip(padding, kernel)) or \
                any(s < d * (k - 1) + 1 for s, d, k in zip(sizes, dilation, kernel)):
            return None
        spatial = tuple(_pooled_size(*sdkps, module.ceil_mode) for sdkps in zip(sizes, dilation, kernel, padding, stride))
        if min(spatial) < 1:
            return None
    return torch.empty((*x.shape[:-n], *spatial), dtype=x.dtype, device="meta")


def _pooled_size(size: int, dilation: int, kernel: int, padding: int, stride: int, ceil_mode: bool) -> int:
    """ATen's pooling_output_shape: with ceil_mode the last window must start inside the input or its
    left padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


register(OpEntry("pooling/resizing", pool, meta_shape=_pool_meta),
         functions=[F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d,
                    F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool2d, F.interpolate,
                    torch._C._nn.avg_pool2d],
         modules=[nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d,
                  nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d, nn.Upsample])
