"""Elementwise ops: activations and other unary maps, broadcasting binary ops, Python operators.

Unary ops map zero to something (sigmoid(0) = 0.5) but act position by position, so a channel
that is zero where it is read stays exact: the masked original zeroes it again at every consumer."""
from __future__ import annotations

import operator
from typing import Any, List, Optional

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxprune.fxutil import first_input
from fxprune.ir import ChannelCount, ChannelMap
from fxprune.tracing import TensorSpec, value_spec
from .registry import REGISTRY, OpEntry, register, same_as_input


# ----------------------------------------------------------------------------- unary
def unary(a, node: torch.fx.Node) -> Any:
    """Same shape in, same channels out, position by position."""
    m = a.tensor_map(first_input(node))
    spec = value_spec(node)
    if m is None or not isinstance(spec, TensorSpec) or spec.ndim != m.ndim:
        return a.opaque(node, "unexpected shape for an elementwise op")
    return m


UNARY = register(
    OpEntry("unary elementwise", unary, meta_shape=same_as_input, meta_shape_without_weights=True, positionwise=True),
    functions=[
        torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp, F.relu, F.relu6, F.gelu,
        F.silu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.mish, F.sigmoid, F.tanh, F.dropout,
        F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.softplus,
        # an L2 norm over a dim: zeros do not contribute, so it is zero-exact
        F.normalize,
        torch.sqrt, torch.rsqrt, torch.log, torch.log1p, torch.sin, torch.cos, torch.erf, torch.square,
        torch.reciprocal, torch.sign, torch.floor, torch.ceil, torch.round, torch.clamp_min, torch.clamp_max,
        torch.nan_to_num, torch.logical_not, F.selu, F.celu, F.logsigmoid, F.softsign, F.tanhshrink, F.hardshrink,
        F.relu_, F.threshold,
    ],
    methods=["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "clamp", "clamp_",
             "clamp_min", "clamp_max", "contiguous", "clone", "float", "double", "half", "bfloat16", "bool", "long",
             "int", "to", "type", "type_as", "detach", "hardswish", "sqrt", "rsqrt", "square", "log", "log1p", "sin",
             "cos", "erf", "reciprocal", "sign", "floor", "ceil", "round", "logical_not", "exp_", "nan_to_num",
             "sqrt_"],
    modules=[nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
             nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
             nn.Dropout3d, nn.AlphaDropout, nn.SELU, nn.CELU, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
             nn.Hardshrink, nn.Threshold],
)
REGISTRY.register_from("torchvision.ops.stochastic_depth", {"stochastic_depth": UNARY})


# ----------------------------------------------------------------------------- binary
def elementwise(a, node: torch.fx.Node) -> Any:
    """Broadcasting elementwise op: positions aligned from the right are the same channel."""
    spec = value_spec(node)
    if not isinstance(spec, TensorSpec):
        return a.opaque(node, "elementwise op without a tensor result")
    tensors = [t for t in node.all_input_nodes if isinstance(value_spec(t), TensorSpec)]
    out: List[Optional[np.ndarray]] = [None] * spec.ndim
    for d in range(spec.ndim):
        entries = []  # (operand, its dim, elements, size)
        for t in tensors:
            t_spec = value_spec(t)
            td = d - (spec.ndim - t_spec.ndim)
            if td < 0:
                continue
            m = a.tensor_map(t)
            entries.append((t, td, m.dims[td] if m is not None else None, t_spec.shape[td]))
        out[d] = a.couple(node, entries, spec.shape[d], "combines")
    return ChannelMap(tuple(out))


_ARITHMETIC = {torch.add, torch.sub, torch.mul, operator.add, operator.sub, operator.mul, "add", "sub", "mul"}


def broadcast_meta(node: torch.fx.Node, args: tuple, kwargs: dict, module: Optional[nn.Module]) -> Any:
    """meta_shape of out-of-place add/sub/mul over tensors of one dtype (and numbers that keep it):
    the broadcast shape. Their meta kernels are Python decompositions that cost more than a conv
    (every residual add of a ResNet); anything else (mixed dtypes, other ops) runs the kernel."""
    if node.target not in _ARITHMETIC or len(args) != 2 or set(kwargs) - {"alpha"}:
        return None
    tensors = [x for x in args if isinstance(x, torch.Tensor)]
    if not tensors or any(t.dtype != tensors[0].dtype or t.device.type != "meta" for t in tensors):
        return None
    dtype = tensors[0].dtype
    if dtype == torch.bool:         # bool arithmetic promotes or refuses (bool - bool): the kernel decides
        return None
    numbers_keep_dtype = all(isinstance(x, torch.Tensor) or type(x) is int or
                             (type(x) is float and dtype.is_floating_point) for x in (*args, *kwargs.values()))
    if not numbers_keep_dtype:
        return None
    shapes = [t.shape for t in tensors]
    # torch.broadcast_shapes is a Python reference implementation; operands of one shape are the common case
    shape = shapes[0] if all(s == shapes[0] for s in shapes) else torch.broadcast_shapes(*shapes)
    return torch.empty(shape, dtype=dtype, device="meta")


register(OpEntry("binary elementwise", elementwise, positionwise=True, meta_shape=broadcast_meta),
         functions=[torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where, torch.pow,
                    torch.true_divide, torch.rsub, torch.fmod, torch.remainder, torch.floor_divide, torch.eq, torch.ne,
                    torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or, torch.lerp,
                    torch.addcmul, torch.addcdiv, torch.masked_fill],
         methods=["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow", "eq",
                  "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "masked_fill", "masked_fill_", "lerp",
                  "addcmul", "where", "fmod", "remainder"])
# x.expand_as(other) is x broadcast against other: the output has other's shape and, dim by dim, other's
# channels, which x's must then be (a gate expanded to the tensor it gates)
register(OpEntry("expand_as", elementwise), methods=["expand_as"])


# ----------------------------------------------------------------------------- Python operators


def python_operator(a, node: torch.fx.Node) -> Any:
    """`x + y` on tensors is elementwise; on ints (sizes read with x.size(d)) it is shape arithmetic,
    and a channel count stays a channel count through it."""
    if node.target is operator.add and all(isinstance(x, (tuple, list, torch.fx.Node)) for x in node.args) \
            and not isinstance(value_spec(node), TensorSpec):
        # size tuples joined (`x.size()[:-1] + (n,)`): each position keeps what it was
        return sum((_positions(a, x) for x in node.args), ())
    if not isinstance(value_spec(node), (TensorSpec, tuple)):
        counts = [a.map_of(arg) for arg in node.all_input_nodes]
        counts = [c for c in counts if isinstance(c, ChannelCount)]
        return ChannelCount(np.concatenate([c.elements for c in counts])) if counts else None
    a.freeze_channel_counts(node)  # a count that becomes a tensor value changes it when pruned
    return elementwise(a, node)  # every operator here acts position by position on tensors


def _positions(a, x: Any) -> tuple:
    value = a.map_of(x) if isinstance(x, torch.fx.Node) else None
    if isinstance(value, tuple):
        return value
    return tuple(a.map_of(v) if isinstance(v, torch.fx.Node) else None for v in x) if isinstance(x, (tuple, list)) \
        else (None,) * len(value_spec(x) or ())


register(OpEntry("Python operator", python_operator, accepts_channel_counts=True, positionwise=True,
                 meta_shape=broadcast_meta),
         functions=[operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.pow, operator.neg, operator.pos, operator.invert, operator.eq, operator.ne, operator.lt,
                    operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.xor, operator.iadd,
                    operator.imul, operator.isub, operator.itruediv])


# torch._assert(condition, message): a check, no tensor result. A condition computed from a channel
# count (x.shape[1] == 64) would fail after pruning: the dispatcher freezes such counts, as for any op
# that does not accept them.
register(OpEntry("torch._assert", lambda a, node: None),
         functions=[torch._assert, torch.fx._symbolic_trace._assert_is_none])
