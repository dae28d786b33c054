"""ChannelGroupAnalysis: which channels must be removed together.

Requires: a traced GraphModule whose nodes carry `fxprune.value` (ShapePropagation).
Produces: ChannelGroups (maps of every node, units, groups, parameter slices). Does not touch the graph.

How it works: each op has a rule mapping the channel maps of its inputs to the channel map of its
output; rules create elements (conv/linear outputs), union them (residual add, shared weights, the
contracted dims of a matmul) or lay them side by side (cat, flatten). An op without a rule freezes
every channel it touches; it is never assumed to be elementwise. See fxprune/ir.py for the vocabulary.
"""
from __future__ import annotations

import inspect
import operator
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxprune.errors import FxPruneError, UnsupportedModelError, describe_node
from fxprune.ir import ChannelGroup, ChannelGroups, ChannelMap, ElementSets
from fxprune.fxutil import bind_arguments as _bind, einsum_subscripts as _einsum_subscripts
from fxprune.tracing import TensorSpec, torch_layer_type, value_spec

try:  # torchvision's fx-wrapped helpers, recognised by identity when torchvision is present
    from torchvision.models import swin_transformer as _tv_swin
    from torchvision.ops.stochastic_depth import stochastic_depth as _tv_stochastic_depth
except Exception:  # pragma: no cover - torchvision is optional
    _tv_swin = None
    _tv_stochastic_depth = None


class ChannelCount:
    """The value of `x.size(d)` (or arithmetic on it) where dim d carries channels: it changes
    when those channels are pruned, so it may only feed shape arguments the rewrite recomputes."""

    def __init__(self, elements: np.ndarray):
        self.elements = elements


# --------------------------------------------------------------------------- op tables
_UNARY_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp, torch.nn.functional.relu,
    F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.mish, F.sigmoid,
    F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.softplus, operator.neg,
}
_UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "abs", "neg", "clamp", "contiguous", "clone", "float",
    "double", "half", "to", "type_as", "detach", "hardswish", "sqrt", "rsqrt", "pow", "square",
}
_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul, operator.isub,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div", "maximum", "minimum"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten"}
_POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool2d, F.interpolate, torch._C._nn.avg_pool2d,
}
_POOL_MODULES = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d, nn.Upsample,
)
# Module types with a rule below: a subclass that changes their computation must not take it.
_RULE_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                 nn.PReLU, nn.MultiheadAttention, nn.Softmax, nn.LogSoftmax, nn.Flatten, nn.Unflatten) + _UNARY_MODULES \
                + _POOL_MODULES
_INT_ARITHMETIC = {
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod, operator.pow,
    operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
}
# Ops whose shape arguments PruneRewrite recomputes, so a ChannelCount may feed them. The rewrite
# uses these same sets: the two must agree.
SHAPE_ARG_METHODS = {"view", "reshape", "expand"}
SHAPE_ARG_FUNCTIONS = {torch.reshape}


class ChannelGroupAnalysis:
    """Analysis pass: channel groups of a traced, shape-propagated GraphModule.

    `ignore`: qualified module names whose output channels must not be pruned."""

    mutates_input = False

    def __init__(self, ignore: Sequence[str] = ()):
        self.ignore = set(ignore)

    def run(self, gm: torch.fx.GraphModule) -> ChannelGroups:
        state = _AnalysisState(gm, self.ignore)
        for node in gm.graph.nodes:
            state.visit(node)
        return state.finish()


class _AnalysisState:
    def __init__(self, gm: torch.fx.GraphModule, ignore: set):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ignore = ignore
        self.es = ElementSets()
        self.maps: Dict[str, Any] = {}
        self.param_slices: Dict[str, Dict[int, np.ndarray]] = {}
        self.special: Dict[str, dict] = {}
        self.blocked_ops: List[str] = []

    # ----------------------------------------------------------------- helpers
    def map_of(self, arg) -> Any:
        return self.maps.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def tensor_map(self, arg) -> Optional[ChannelMap]:
        m = self.map_of(arg)
        return m if isinstance(m, ChannelMap) else None

    def record_param(self, name: str, dim: int, elements: np.ndarray) -> None:
        """Parameter `name` is sliced along `dim` by `elements`; a second use (shared weights,
        a module called twice) couples the channels position by position."""
        dims = self.param_slices.setdefault(name, {})
        if dim in dims:
            self.es.union(dims[dim], elements)
        else:
            dims[dim] = np.asarray(elements, dtype=np.int64)

    def new_elements(self, node: torch.fx.Node, size: int, what: str) -> np.ndarray:
        elements = self.es.new_space(node, size, what)
        if node.op == "call_module" and node.target in self.ignore:
            self.es.freeze(elements, f"ignored by the user ({node.target})")
        return elements

    def freeze_value(self, value: Any, reason: str) -> None:
        if isinstance(value, ChannelMap):
            self.es.freeze(value.all_elements(), reason)
        elif isinstance(value, ChannelCount):
            self.es.freeze(value.elements, reason)
        elif isinstance(value, (tuple, list)):
            for v in value:
                self.freeze_value(v, reason)

    def freeze_inputs(self, node: torch.fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            self.freeze_value(self.maps.get(arg.name), reason)

    def untracked_like(self, spec: Any) -> Any:
        if isinstance(spec, TensorSpec):
            return ChannelMap.untracked(spec.ndim)
        if isinstance(spec, tuple):
            return tuple(self.untracked_like(s) for s in spec)
        return None

    def opaque(self, node: torch.fx.Node, why: str) -> Any:
        """No rule: freeze whatever channels flow in; the output carries none we know of."""
        self.blocked_ops.append(f"{describe_node(node)}: {why}")
        if any(_carries_channels(self.maps.get(a.name)) for a in node.all_input_nodes):
            self.freeze_inputs(node, f"blocked by {describe_node(node)}: {why}")
        return self.untracked_like(value_spec(node))

    # ----------------------------------------------------------------- dispatch
    def visit(self, node: torch.fx.Node) -> None:
        try:
            self._visit(node)
        except FxPruneError:
            raise
        except Exception as exc:  # a rule met a call form it does not expect: a bug to report, not a guess
            raise UnsupportedModelError(
                f"fxprune could not analyse {describe_node(node)}: {type(exc).__name__}: {exc}. This is a bug in "
                f"fxprune's rule for this op (please report it); until it is fixed, pass the module that makes this "
                f"call in leaf_modules= (its channels are then frozen)") from exc

    def _visit(self, node: torch.fx.Node) -> None:
        self._check_channel_count_uses(node)
        if node.op == "placeholder" or node.op == "get_attr":
            result = self.untracked_like(value_spec(node))
        elif node.op == "output":
            self.freeze_inputs(node, "graph output (the model's outputs keep their size)")
            return
        elif node.op == "call_module":
            result = self.visit_module(node, self.modules[node.target])
            if node.target in self.ignore:
                self.freeze_value(result, f"ignored by the user ({node.target})")
        elif node.op == "call_function":
            result = self.visit_function(node, node.target)
        elif node.op == "call_method":
            result = self.visit_method(node, node.target)
        else:  # pragma: no cover
            result = self.opaque(node, f"unknown node kind {node.op}")
        self.maps[node.name] = result

    def _check_channel_count_uses(self, node: torch.fx.Node) -> None:
        """A channel count may only feed int arithmetic and shape arguments the rewrite recomputes."""
        if node.op == "call_method" and node.target in SHAPE_ARG_METHODS:
            return
        if node.op == "call_function" and (node.target in SHAPE_ARG_FUNCTIONS or
                                           (node.target in _INT_ARITHMETIC and not isinstance(value_spec(node), TensorSpec))):
            return
        for arg in node.all_input_nodes:
            value = self.maps.get(arg.name)
            if isinstance(value, ChannelCount) or (isinstance(value, tuple) and any(isinstance(v, ChannelCount) for v in value)):
                if node.op == "call_function" and node.target is operator.getitem:
                    continue
                self.freeze_value(value, f"channel count read by {describe_node(node)}")

    def visit_module(self, node, module) -> Any:
        x = node.args[0] if node.args else None
        if isinstance(module, _RULE_MODULES) and torch_layer_type(module) is None:
            return self.opaque(node, f"{type(module).__name__} changes what its torch.nn base class computes "
                                     "(an overridden method, a parametrization or a forward hook); leave it out "
                                     "of leaf_modules so fx traces into it")
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            return self.conv(node, self.tensor_map(x), node.target + ".weight",
                             node.target + ".bias" if module.bias is not None else None,
                             module.groups, module.out_channels, module.in_channels)
        if isinstance(module, nn.Linear):
            return self.linear(node, self.tensor_map(x), node.target + ".weight",
                               node.target + ".bias" if module.bias is not None else None, module.out_features)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            names = [node.target + "." + n for n in ("weight", "bias", "running_mean", "running_var")
                     if getattr(module, n, None) is not None]
            return self.channelwise_params(node, self.tensor_map(x), 1, names)
        if isinstance(module, nn.LayerNorm):
            names = [node.target + "." + n for n in ("weight", "bias") if getattr(module, n, None) is not None]
            return self.layer_norm(node, self.tensor_map(x), len(module.normalized_shape), names)
        if isinstance(module, nn.GroupNorm):
            names = [node.target + "." + n for n in ("weight", "bias") if getattr(module, n, None) is not None]
            return self.group_norm(node, self.tensor_map(x), module.num_groups, names)
        if isinstance(module, nn.PReLU):
            names = [node.target + ".weight"] if module.num_parameters > 1 else []
            return self.channelwise_params(node, self.tensor_map(x), 1, names)
        if isinstance(module, nn.MultiheadAttention):
            return self.multihead_attention(node, module)
        if isinstance(module, _UNARY_MODULES):
            return self.unary(node, x)
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, x, module.dim)
        if isinstance(module, _POOL_MODULES):
            return self.pool(node, x)
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x)
        return self.opaque(node, f"no channel rule for module type {type(module).__name__}")

    def visit_function(self, node, fn) -> Any:
        spec = value_spec(node)
        if fn is operator.getitem:
            return self.getitem(node)
        if not isinstance(spec, (TensorSpec, tuple)) and fn in _INT_ARITHMETIC:
            return self.int_arithmetic(node)
        if fn is getattr:
            return self.attribute(node)
        if fn in _BINARY_FUNCTIONS:
            return self.elementwise(node, node.all_input_nodes)
        if fn in _UNARY_FUNCTIONS or (_tv_stochastic_depth is not None and fn is _tv_stochastic_depth):
            return self.unary(node, _input(node))
        if fn in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            return self.softmax(node, _input(node), _arg(node, "dim"))
        if fn is F.normalize:  # an L2 norm over a dim: zeros do not contribute, so it is zero-exact
            return self.unary(node, _input(node))
        if fn in _RESHAPE_FUNCTIONS:
            return self.reshape(node, _input(node))
        if fn in (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims):
            return self.permute(node, _input(node))
        if fn is torch.cat or fn is torch.concat:
            return self.cat(node, list(_input(node)), _arg(node, "dim", 0))
        if fn in (torch.split, torch.chunk, torch.tensor_split):
            return self.split(node, _input(node))
        if fn in _POOL_FUNCTIONS:
            return self.pool(node, _input(node))
        if fn in (torch.matmul, torch.bmm, torch.mm, operator.matmul):
            return self.matmul_or_einsum(node)
        if fn is torch.einsum or getattr(fn, "__name__", "") == "einsum":
            return self.matmul_or_einsum(node)
        if fn in (torch.sum, torch.mean, torch.amax, torch.amin):
            return self.reduction(node, fn.__name__)
        if fn is F.linear:
            return self.functional_linear(node)
        if fn in (F.conv1d, F.conv2d, F.conv3d):
            return self.functional_conv(node)
        if fn is F.layer_norm:
            return self.functional_layer_norm(node)
        if fn is F.pad:
            return self.pad(node)
        if _tv_swin is not None and fn is getattr(_tv_swin, "_patch_merging_pad", None):
            return self.patch_merging_pad(node)
        if _tv_swin is not None and fn is getattr(_tv_swin, "shifted_window_attention", None):
            return self.shifted_window_attention(node)
        if fn is torch.roll:
            return self.roll(node)
        name = getattr(fn, "__module__", "") + "." + getattr(fn, "__name__", str(fn))
        return self.opaque(node, f"no channel rule for function {name}")

    def visit_method(self, node, method: str) -> Any:
        x = node.args[0]
        if method in ("size", "dim"):
            return self.size(node)
        if method in _BINARY_METHODS:
            return self.elementwise(node, node.all_input_nodes)
        if method in _UNARY_METHODS:
            return self.unary(node, x)
        if method in ("softmax", "log_softmax"):
            return self.softmax(node, x, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        if method in _RESHAPE_METHODS:
            return self.reshape(node, x)
        if method in ("permute", "transpose", "swapaxes", "swapdims", "t"):
            return self.permute(node, x)
        if method in ("expand", "expand_as"):
            return self.expand(node, x)
        if method in ("split", "chunk", "tensor_split"):
            return self.split(node, x)
        if method in ("sum", "mean", "amax", "amin"):
            return self.reduction(node, method)
        if method in ("matmul",):
            return self.matmul_or_einsum(node)
        return self.opaque(node, f"no channel rule for method .{method}()")

    # ----------------------------------------------------------------- metadata and int values
    def size(self, node) -> Any:
        m = self.tensor_map(node.args[0])
        if node.target == "dim" or m is None:
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        counts = tuple(ChannelCount(e) if e is not None else None for e in m.dims)
        return counts if dim is None else counts[dim]

    def attribute(self, node) -> Any:
        m = self.tensor_map(node.args[0])
        if node.args[1] == "shape" and m is not None:
            return tuple(ChannelCount(e) if e is not None else None for e in m.dims)
        if node.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda"):
            return None
        return self.opaque(node, f"no channel rule for attribute .{node.args[1]}")

    def int_arithmetic(self, node) -> Any:
        counts = [self.maps.get(a.name) for a in node.all_input_nodes]
        counts = [c for c in counts if isinstance(c, ChannelCount)]
        if counts:
            return ChannelCount(np.concatenate([c.elements for c in counts]))
        return None

    def getitem(self, node) -> Any:
        source, index = node.args
        value = self.map_of(source)
        if isinstance(value, (tuple, list)):
            return value[index]
        if isinstance(value, ChannelMap):
            return self.tensor_index(node, value, index)
        return None if not isinstance(value_spec(node), TensorSpec) else self.untracked_like(value_spec(node))

    def tensor_index(self, node, m: ChannelMap, index) -> Any:
        """x[...]: ints and full slices of channel dims are understood; anything else freezes them."""
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.fx.Node) or (not isinstance(i, (int, slice, type(None), type(Ellipsis)))) for i in index):
            return self.opaque(node, "tensor indexing by a tensor or list")
        n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: List[Any] = []
        for i in index:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (m.ndim - n_real))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (m.ndim - sum(1 for i in expanded if i is not None)))
        out, d = [], 0
        for i in expanded:
            if i is None:
                out.append(None)
                continue
            e = m.dims[d]
            if isinstance(i, slice) and i == slice(None):
                out.append(e)
            elif e is not None:
                self.es.freeze(e, f"blocked by {describe_node(node)}: indexing a channel dim")
                if isinstance(i, slice):
                    out.append(None)
            elif isinstance(i, slice):
                out.append(None)
            d += 1
        return ChannelMap(tuple(out))

    # ----------------------------------------------------------------- elementwise family
    def unary(self, node, x) -> Any:
        m = self.tensor_map(x)
        spec = value_spec(node)
        if m is None or not isinstance(spec, TensorSpec) or spec.ndim != m.ndim:
            return self.opaque(node, "unexpected shape for an elementwise op")
        return m

    def softmax(self, node, x, dim) -> Any:
        m = self.tensor_map(x)
        if m is None:
            return self.opaque(node, "softmax of an unknown value")
        if dim is not None and m.dims[dim % m.ndim] is not None:
            return self.opaque(node, "softmax over a channel dim")
        return m

    def elementwise(self, node, operands: List[torch.fx.Node]) -> Any:
        """Broadcasting elementwise op: positions aligned from the right are the same channel."""
        spec = value_spec(node)
        if not isinstance(spec, TensorSpec):
            return self.opaque(node, "elementwise op without a tensor result")
        tensors = [a for a in operands if isinstance(value_spec(a), TensorSpec)]
        out: List[Optional[np.ndarray]] = [None] * spec.ndim
        for d in range(spec.ndim):
            entries = []  # (operand, its dim, elements, size)
            for a in tensors:
                a_spec = value_spec(a)
                ad = d - (spec.ndim - a_spec.ndim)
                if ad < 0:
                    continue
                m = self.tensor_map(a)
                entries.append((a, ad, m.dims[ad] if m is not None else None, a_spec.shape[ad]))
            out[d] = self.couple(node, entries, spec.shape[d], "combines")
        return ChannelMap(tuple(out))

    def couple(self, node, entries, size: int, verb: str, broadcasting: bool = True) -> Optional[np.ndarray]:
        """Operands meeting at one dim (of an elementwise op, cat's other dims, a contraction letter)
        carry the same channels: union their element vectors. An operand without channels there is
        fine if it broadcasts (size 1) or is a parameter fxprune can slice; otherwise the channels
        are frozen. `entries` are (operand, its dim, elements or None, its size). Returns the
        dim's elements, or None when no operand tracks channels there."""
        entries = self.freeze_broadcast_channels(node, entries, size)
        tracked = [e for _, _, e, _ in entries if e is not None]
        if not tracked:
            return None
        ref = tracked[0]
        for operand, dim, e, operand_size in entries:
            if e is not None:
                if e is not ref:
                    self.es.union(ref, e)
            elif (operand_size != 1 or not broadcasting) and not self.make_sliceable(operand, dim, ref):
                self.es.freeze(ref, f"blocked by {describe_node(node)}: {verb} channels with %{operand.name}, "
                                    "whose channels fxprune cannot slice")
        return ref

    def freeze_broadcast_channels(self, node, entries, size: int):
        """A one-channel tensor broadcast over `size` channels (a CBAM spatial gate): its channel is
        read by every output channel, so it cannot be removed; it is frozen and takes no part."""
        if size == 1:
            return entries
        kept = []
        for a, ad, e, s in entries:
            if e is not None and s == 1:
                self.es.freeze(e, f"blocked by {describe_node(node)}: one channel of %{a.name} is broadcast over {size}")
                e = None
            kept.append((a, ad, e, s))
        return kept

    def make_sliceable(self, arg: torch.fx.Node, dim: int, elements: np.ndarray) -> bool:
        """A constant operand (a parameter, possibly expanded) met a channel dim: slice the parameter."""
        path, node = [], arg
        while node.op == "call_method" and node.target in ("expand", "expand_as", "contiguous", "clone", "to", "type_as"):
            if len(node.users) != 1:
                return False
            path.append(node)
            node = node.args[0]
        if node.op != "get_attr" or len(node.users) != 1:
            return False
        spec = value_spec(node)
        pdim = dim - (value_spec(arg).ndim - spec.ndim)
        if pdim < 0 or spec.shape[pdim] != len(elements):
            return False
        self.record_param(node.target, pdim, elements)
        for n in [node] + path:
            m = self.maps[n.name]
            self.maps[n.name] = m.replace(dim - (value_spec(arg).ndim - value_spec(n).ndim), elements)
        return True

    def pool(self, node, x) -> Any:
        """Pooling/resizing over the trailing spatial dims; channel dims must be elsewhere."""
        m = self.tensor_map(x)
        spec = value_spec(node)
        if m is None or not isinstance(spec, TensorSpec) or spec.ndim != m.ndim:
            return self.opaque(node, "pooling with an unexpected shape")
        n_spatial = max(m.ndim - 2, 1)
        if any(m.dims[d] is not None for d in range(m.ndim - n_spatial, m.ndim)):
            return self.opaque(node, "pooling over a channel dim")
        return m

    def pad(self, node) -> Any:
        m = self.tensor_map(node.args[0])
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        if m is None or not isinstance(pad, (tuple, list)):
            return self.opaque(node, "pad with unknown arguments")
        padded = range(m.ndim - len(pad) // 2, m.ndim)
        if any(m.dims[d] is not None and any(pad[2 * (m.ndim - 1 - d) + k] != 0 for k in (0, 1)) for d in padded):
            return self.opaque(node, "padding a channel dim")
        return m

    def roll(self, node) -> Any:
        m = self.tensor_map(node.args[0])
        dims = _arg(node, "dims")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if m is None or not dims or any(m.dims[d] is not None for d in dims):
            return self.opaque(node, "roll over a channel dim")
        return m

    def reduction(self, node, name: str) -> Any:
        m = self.tensor_map(node.args[0])
        spec = value_spec(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if m is None or dims is None or not isinstance(spec, TensorSpec):
            return self.opaque(node, f"{name} over all dims")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(d % m.ndim for d in dims)
        reduced_channels = [d for d in dims if m.dims[d] is not None]
        if reduced_channels and name != "sum":  # sum over kept channels is exact; mean/max are not
            return self.opaque(node, f"{name} over a channel dim")
        keepdim = spec.ndim == m.ndim
        return ChannelMap(tuple(None if d in dims else e for d, e in enumerate(m.dims) if keepdim or d not in dims))

    # ----------------------------------------------------------------- layout
    def permute(self, node, x) -> Any:
        m = self.tensor_map(x)
        if m is None:
            return self.opaque(node, "permute of an unknown value")
        args = list(node.args[1:])
        if node.target in ("t",):
            order = list(range(m.ndim))[::-1]
        elif node.target in (torch.permute, "permute"):
            order = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            if not args:
                order = list(node.kwargs.get("dims"))
        else:  # transpose / swapaxes
            if len(args) < 2:  # dims passed by name
                args = [v for k, v in node.kwargs.items() if k not in ("input", "self")]
            a, b = args[0] % m.ndim, args[1] % m.ndim
            order = list(range(m.ndim))
            order[a], order[b] = order[b], order[a]
        return ChannelMap(tuple(m.dims[d % m.ndim] for d in order))

    def expand(self, node, x) -> Any:
        m = self.tensor_map(x)
        spec = value_spec(node)
        if m is None or not isinstance(spec, TensorSpec):
            return self.opaque(node, "expand of an unknown value")
        offset = spec.ndim - m.ndim
        return ChannelMap(tuple([None] * offset + list(m.dims)))

    def reshape(self, node, x) -> Any:
        """view/reshape/flatten/squeeze: map channels through blocks of dims with equal products."""
        m = self.tensor_map(x)
        out_spec, in_spec = value_spec(node), value_spec(x)
        if m is None or not isinstance(out_spec, TensorSpec):
            return self.opaque(node, "reshape of an unknown value")
        out: List[Optional[np.ndarray]] = [None] * out_spec.ndim
        for in_dims, out_dims in _reshape_blocks(in_spec.shape, out_spec.shape):
            tracked = [d for d in in_dims if m.dims[d] is not None]
            if not tracked:
                continue
            if not out_dims:
                self.es.freeze(m.dims[tracked[0]], f"blocked by {describe_node(node)}: a channel dim of size 1 vanishes")
                continue
            if len(tracked) > 1:
                for d in tracked:
                    self.es.freeze(m.dims[d], f"blocked by {describe_node(node)}: merges two channel dims")
                continue
            if len(in_dims) == 1 and len(out_dims) == 1:
                out[out_dims[0]] = m.dims[in_dims[0]]
                continue
            block_in = [in_spec.shape[d] for d in in_dims]
            grid = np.broadcast_to(
                m.dims[tracked[0]].reshape([-1 if d == tracked[0] else 1 for d in in_dims]), block_in
            ).reshape([out_spec.shape[d] for d in out_dims])
            varying = [a for a in range(grid.ndim) if grid.shape[a] > 1 and np.any(np.diff(grid, axis=a) != 0)]
            if not varying:  # every position is the same element: the last non-trivial dim carries it
                varying = [max(a for a in range(grid.ndim) if grid.shape[a] > 1)]
            carrier = varying[-1]
            # Outer split dims (heads, shuffle groups) keep all their positions: the same channel
            # position in each of them is one unit, so the kept set stays a product set.
            base_index = tuple(slice(None) if a == carrier else 0 for a in range(grid.ndim))
            base = grid[base_index]
            if len(varying) > 1:
                shape = [grid.shape[a] if a == carrier else 1 for a in range(grid.ndim)]
                self.es.union(grid.reshape(-1), np.broadcast_to(base.reshape(shape), grid.shape).reshape(-1))
            out[out_dims[carrier]] = np.ascontiguousarray(base)
        return ChannelMap(tuple(out))

    def cat(self, node, tensors: List[Any], dim: int) -> Any:
        spec = value_spec(node)
        maps = [self.tensor_map(t) if isinstance(t, torch.fx.Node) else None for t in tensors]
        if not isinstance(spec, TensorSpec) or any(m is None for m in maps):
            return self.opaque(node, "cat of unknown values")
        dim = dim % spec.ndim
        others = self.elementwise_dims(node, tensors, skip=dim)
        if all(m.dims[dim] is None for m in maps):
            cat_elements = None
        else:
            parts = []
            for t, m in zip(tensors, maps):
                if m.dims[dim] is not None:
                    parts.append(m.dims[dim])
                else:
                    fresh = self.new_elements(node, value_spec(t).shape[dim], f"cat input %{t.name}")
                    self.es.freeze(fresh, f"constant segment of {describe_node(node)}")
                    parts.append(fresh)
            cat_elements = np.concatenate(parts)
        return ChannelMap(tuple(cat_elements if d == dim else others[d] for d in range(spec.ndim)))

    def elementwise_dims(self, node, tensors, skip: int) -> List[Optional[np.ndarray]]:
        """Unify the non-`skip` dims of same-rank tensors (cat's other dims)."""
        ndim = value_spec(node).ndim
        result: List[Optional[np.ndarray]] = [None] * ndim
        for d in range(ndim):
            if d == skip:
                continue
            entries = [(t, d, self.tensor_map(t).dims[d], value_spec(t).shape[d]) for t in tensors]
            result[d] = self.couple(node, entries, value_spec(node).shape[d], "joins", broadcasting=False)
        return result

    def split(self, node, x) -> Any:
        m = self.tensor_map(x)
        spec = value_spec(node)
        if m is None or not isinstance(spec, tuple):
            return self.opaque(node, "split of an unknown value")
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        dim %= m.ndim
        outs, start = [], 0
        for part in spec:
            size = part.shape[dim]
            e = m.dims[dim]
            outs.append(m.replace(dim, None if e is None else e[start:start + size]))
            start += size
        return tuple(outs)

    # ----------------------------------------------------------------- contractions
    def matmul_or_einsum(self, node) -> Any:
        parsed = _einsum_subscripts(node)
        if parsed is None:
            return self.opaque(node, "matmul of vectors or einsum with ellipsis/implicit output")
        operands, subscripts = parsed
        return self.contraction(node, operands, subscripts[:-1], subscripts[-1])

    def contraction(self, node, operands, subscripts: List[str], out_sub: str) -> Any:
        """matmul/einsum: a contracted letter's channels meet position by position (both sides
        drop the same ones); a batch letter must carry the same channels in every operand."""
        by_letter: Dict[str, List[Tuple[torch.fx.Node, int, Optional[np.ndarray], int]]] = defaultdict(list)
        for op, sub in zip(operands, subscripts):
            spec, m = value_spec(op), self.tensor_map(op)
            if m is None or len(sub) != spec.ndim or len(set(sub)) != len(sub):
                return self.opaque(node, "contraction with unsupported subscripts")
            for d, letter in enumerate(sub):
                by_letter[letter].append((op, d, m.dims[d], spec.shape[d]))
        letter_elements: Dict[str, Optional[np.ndarray]] = {}
        for letter, entries in by_letter.items():
            letter_elements[letter] = self.couple(node, entries, max(size for _, _, _, size in entries), "contracts")
        return ChannelMap(tuple(letter_elements.get(letter) for letter in out_sub))

    # ----------------------------------------------------------------- parameterised layers
    def conv(self, node, m: Optional[ChannelMap], weight: str, bias: Optional[str], groups: int,
             out_channels: int, in_channels: int) -> Any:
        spec = value_spec(node)
        if m is None:
            return self.opaque(node, "conv of an unknown value")
        for d in m.tracked():
            if d != 1:
                self.es.freeze(m.dims[d], f"blocked by {describe_node(node)}: channels on a spatial dim")
        x_in = m.dims[1]
        in_per_group, out_per_group = in_channels // groups, out_channels // groups
        if groups == 1:
            if x_in is not None:
                self.record_param(weight, 1, x_in)
            out = self.new_elements(node, out_channels, "conv output")
        elif in_per_group == 1 and x_in is not None:
            # depthwise: input channel i owns outputs i*k .. i*k+k-1; dropping it drops its group
            out = np.repeat(x_in, out_per_group)
            self.special[node.name] = {"depthwise": True}
        else:
            # grouped: every group must keep the same positions so that `groups` stays valid
            if x_in is not None:
                grid = x_in.reshape(groups, in_per_group)
                self.es.union(grid.reshape(-1), np.tile(grid[0], groups))
                self.record_param(weight, 1, grid[0])
            out = np.tile(self.new_elements(node, out_per_group, "grouped conv output"), groups)
        self.record_param(weight, 0, out)
        if bias:
            self.record_param(bias, 0, out)
        return ChannelMap.single(spec.ndim, 1, out)

    def linear(self, node, m: Optional[ChannelMap], weight: str, bias: Optional[str], out_features: int) -> Any:
        if m is None:
            return self.opaque(node, "linear of an unknown value")
        if m.dims[-1] is not None:
            self.record_param(weight, 1, m.dims[-1])
        out = self.new_elements(node, out_features, "linear output")
        self.record_param(weight, 0, out)
        if bias:
            self.record_param(bias, 0, out)
        return m.replace(m.ndim - 1, out)

    def channelwise_params(self, node, m: Optional[ChannelMap], dim: int, names: List[str]) -> Any:
        if m is None:
            return self.opaque(node, "normalisation of an unknown value")
        if m.dims[dim] is not None:
            for name in names:
                self.record_param(name, 0, m.dims[dim])
        return m

    def layer_norm(self, node, m: Optional[ChannelMap], n_normalized: int, names: List[str]) -> Any:
        """LayerNorm reduces over its normalised dims, so after pruning it normalises over the kept
        channels only; that is its reference semantics (verify.py implements it)."""
        if m is None:
            return self.opaque(node, "layer norm of an unknown value")
        first = m.ndim - n_normalized
        tracked = [d for d in range(first, m.ndim) if m.dims[d] is not None]
        if len(tracked) > 1:
            return self.opaque(node, "layer norm over several channel dims")
        if tracked:
            for name in names:
                self.record_param(name, tracked[0] - first, m.dims[tracked[0]])
            self.special[node.name] = {"reduces_over": tracked[0], "kind": "layer_norm", "first": first}
        return m

    def group_norm(self, node, m: Optional[ChannelMap], num_groups: int, names: List[str]) -> Any:
        """GroupNorm normalises within each group: each group keeps the same positions (so
        num_groups stays valid) and, like LayerNorm, normalises over its kept channels."""
        if m is None:
            return self.opaque(node, "group norm of an unknown value")
        if m.dims[1] is not None:
            grid = m.dims[1].reshape(num_groups, -1)
            self.es.union(grid.reshape(-1), np.tile(grid[0], num_groups))
            for name in names:
                self.record_param(name, 0, m.dims[1])
            self.special[node.name] = {"reduces_over": 1, "kind": "group_norm", "num_groups": num_groups}
        return m

    def functional_linear(self, node) -> Any:
        bound = _bind(node)
        x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
        if not _is_get_attr(w) or (b is not None and not _is_get_attr(b)):
            return self.opaque(node, "F.linear with a computed weight")
        return self.linear(node, self.tensor_map(x), w.target, b.target if b is not None else None, value_spec(w).shape[0])

    def functional_conv(self, node) -> Any:
        bound = _bind(node)
        w, b = bound.get("weight"), bound.get("bias")
        if not _is_get_attr(w) or (b is not None and not _is_get_attr(b)):
            return self.opaque(node, "conv with a computed weight")
        groups = bound.get("groups", 1)
        w_shape = value_spec(w).shape
        return self.conv(node, self.tensor_map(bound["input"]), w.target, b.target if b is not None else None,
                         groups, w_shape[0], w_shape[1] * groups)

    def functional_layer_norm(self, node) -> Any:
        bound = _bind(node)
        w, b = bound.get("weight"), bound.get("bias")
        if any(p is not None and not _is_get_attr(p) for p in (w, b)):
            return self.opaque(node, "layer_norm with computed affine parameters")
        names = [p.target for p in (w, b) if p is not None]
        return self.layer_norm(node, self.tensor_map(bound["input"]), len(bound["normalized_shape"]), names)

    # ----------------------------------------------------------------- attention
    def heads_coupled(self, e: np.ndarray, num_heads: int) -> np.ndarray:
        """Position p of every head is one unit, so that every head keeps the same size."""
        grid = e.reshape(num_heads, -1)
        self.es.union(grid.reshape(-1), np.tile(grid[0], num_heads))
        return grid[0]

    def multihead_attention(self, node, module: nn.MultiheadAttention) -> Any:
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs).arguments
        q, k, v = bound["query"], bound["key"], bound["value"]
        maps = [self.tensor_map(t) for t in (q, k, v)]
        if (not module._qkv_same_embed_dim or module.bias_k is not None or any(m is None for m in maps)
                or any(d != m.ndim - 1 for m in maps for d in m.tracked())):
            return self.opaque(node, "MultiheadAttention with separate k/v dims, bias_kv or channels off the last dim")
        e = maps[0].dims[-1]
        if e is None:
            e = self.new_elements(node, module.embed_dim, "attention embedding")
            self.es.freeze(e, f"blocked by {describe_node(node)}: its input channels are not tracked")
        for other in maps[1:]:
            if other.dims[-1] is not None and other.dims[-1] is not e:
                self.es.union(e, other.dims[-1])
        self.heads_coupled(e, module.num_heads)
        t = node.target
        self.record_param(t + ".in_proj_weight", 1, e)
        self.record_param(t + ".in_proj_weight", 0, np.tile(e, 3))
        if module.in_proj_bias is not None:
            self.record_param(t + ".in_proj_bias", 0, np.tile(e, 3))
        self.record_param(t + ".out_proj.weight", 0, e)
        self.record_param(t + ".out_proj.weight", 1, e)
        if module.out_proj.bias is not None:
            self.record_param(t + ".out_proj.bias", 0, e)
        self.special[node.name] = {"kind": "attention", "num_heads": module.num_heads, "elements": e,
                                   "q_weight": t + ".in_proj_weight", "q_bias": t + ".in_proj_bias" if module.in_proj_bias is not None else None,
                                   "fold_scale": True}
        out = maps[0].replace(maps[0].ndim - 1, e)
        spec = value_spec(node)
        return tuple([out] + [self.untracked_like(s) for s in spec[1:]]) if isinstance(spec, tuple) else out

    def shifted_window_attention(self, node) -> Any:
        bound = _bind(node)
        m = self.tensor_map(bound["input"])
        weights = [bound.get(n) for n in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias")]
        if m is None or any(w is not None and not _is_get_attr(w) for w in weights) or m.tracked() not in ([], [m.ndim - 1]):
            return self.opaque(node, "window attention with computed weights or channels off the last dim")
        e = m.dims[-1]
        if e is None:
            return self.opaque(node, "window attention on untracked channels")
        self.heads_coupled(e, bound["num_heads"])
        qkv_w, proj_w, qkv_b, proj_b = weights
        self.record_param(qkv_w.target, 1, e)
        self.record_param(qkv_w.target, 0, np.tile(e, 3))
        self.record_param(proj_w.target, 0, e)
        self.record_param(proj_w.target, 1, e)
        if qkv_b is not None:
            self.record_param(qkv_b.target, 0, np.tile(e, 3))
        if proj_b is not None:
            self.record_param(proj_b.target, 0, e)
        # Swin v1 scales q by head_dim**-0.5 computed from the pruned C; v2 uses cosine attention
        # (F.normalize per head), which ignores zeroed positions and needs no correction.
        self.special[node.name] = {"kind": "attention", "num_heads": bound["num_heads"], "elements": e,
                                   "q_weight": qkv_w.target, "q_bias": qkv_b.target if qkv_b is not None else None,
                                   "fold_scale": bound.get("logit_scale") is None}
        return m

    def patch_merging_pad(self, node) -> Any:
        """torchvision Swin: concatenates 4 spatial phases along the last (channel) dim."""
        m = self.tensor_map(node.args[0])
        if m is None or m.tracked() not in ([], [m.ndim - 1]):
            return self.opaque(node, "patch merging with channels off the last dim")
        e = m.dims[-1]
        return m if e is None else m.replace(m.ndim - 1, np.tile(e, 4))

    # ----------------------------------------------------------------- result
    def finish(self) -> ChannelGroups:
        es = self.es
        n = len(es)
        roots = es.find(np.arange(n, dtype=np.int64))
        unique_roots, element_unit = np.unique(roots, return_inverse=True)
        n_units = len(unique_roots)

        # groups: source spaces linked by any coupled element
        n_spaces = len(es.spaces)
        space_parent = list(range(n_spaces))

        def find(s):
            while space_parent[s] != s:
                space_parent[s] = space_parent[space_parent[s]]
                s = space_parent[s]
            return s

        # (space of element, space of its root) pairs, encoded as one integer each for a fast unique
        codes = np.unique(es.space_of(np.arange(n)) * n_spaces + es.space_of(roots)) if n else np.zeros(0, np.int64)
        for a, b in zip((codes // max(n_spaces, 1)).tolist(), (codes % max(n_spaces, 1)).tolist()):
            ra, rb = find(a), find(b)
            if ra != rb:
                space_parent[max(ra, rb)] = min(ra, rb)
        space_group_root = np.array([find(s) for s in range(n_spaces)], dtype=np.int64)
        group_roots, space_group = np.unique(space_group_root, return_inverse=True) if n_spaces else ([], [])
        unit_group = space_group[es.space_of(unique_roots)] if n_units else np.zeros(0, dtype=np.int64)

        unit_frozen = np.zeros(n_units, dtype=bool)
        group_reasons: Dict[int, List[str]] = defaultdict(list)
        for elements, reason in es.freeze_records():
            units = element_unit[elements]
            unit_frozen[units] = True
            for g in _distinct(unit_group[units]):
                if reason not in group_reasons[g] and len(group_reasons[g]) < 8:
                    group_reasons[g].append(reason)

        groups: List[ChannelGroup] = []
        for gid in range(len(group_roots)):
            spaces = [es.spaces[s].node for s in np.nonzero(space_group == gid)[0]]
            units = np.nonzero(unit_group == gid)[0]
            groups.append(ChannelGroup(id=gid, name=spaces[0], units=units, spaces=spaces,
                                       frozen_reasons=group_reasons.get(gid, []), n_frozen=int(unit_frozen[units].sum())))
        groups_of_array: Dict[int, List[int]] = {}  # elementwise ops pass the same arrays along
        for name, value in self.maps.items():
            for m in (value if isinstance(value, tuple) else (value,)):
                if isinstance(m, ChannelMap):
                    for d in m.tracked():
                        key = id(m.dims[d])
                        if key not in groups_of_array:
                            groups_of_array[key] = _distinct(unit_group[element_unit[m.dims[d]]])
                        for g in groups_of_array[key]:
                            groups[g].members.append((name, d))  # each (node, dim) is visited once
        for pname, dims in self.param_slices.items():
            for d, elements in dims.items():
                for g in _distinct(unit_group[element_unit[elements]]):
                    groups[g].params.append((pname, d))
        return ChannelGroups(maps=self.maps, element_unit=element_unit, unit_group=unit_group, unit_frozen=unit_frozen,
                             groups=groups, param_slices=self.param_slices, elements=es, special=self.special,
                             blocked_ops=self.blocked_ops)


# --------------------------------------------------------------------------- utilities
def _distinct(values: np.ndarray) -> List[int]:
    """np.unique(values).tolist(), fast for the common case of a single value."""
    if len(values) and (values == values[0]).all():
        return [int(values[0])]
    return np.unique(values).tolist()


def _carries_channels(value: Any) -> bool:
    if isinstance(value, ChannelMap):
        return value.is_tracked()
    if isinstance(value, ChannelCount):
        return True
    if isinstance(value, (tuple, list)):
        return any(_carries_channels(v) for v in value)
    return False


def _is_get_attr(arg) -> bool:
    return isinstance(arg, torch.fx.Node) and arg.op == "get_attr"


def _input(node: torch.fx.Node) -> Any:
    """The first (tensor) argument of a call, passed by position or by name."""
    if node.args:
        return node.args[0]
    for name in ("input", "tensors", "tensor", "self", "x", "a"):
        if name in node.kwargs:
            return node.kwargs[name]
    return None


def _arg(node: torch.fx.Node, name: str, default=None):
    value = _bind(node).get(name, default)
    return default if value is None else value


def _reshape_blocks(in_shape: Sequence[int], out_shape: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Pair contiguous runs of input and output dims with equal products (size-1 dims alone)."""
    blocks, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1:
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1:
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            break
        in_dims, out_dims = [i], [j]
        p_in, p_out = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out:
                p_in *= in_shape[i]
                in_dims.append(i)
                i += 1
            else:
                p_out *= out_shape[j]
                out_dims.append(j)
                j += 1
        blocks.append((in_dims, out_dims))
    return blocks
