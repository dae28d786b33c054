"""Small helpers over torch.fx nodes shared by the passes and the cost model."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx

from .tracing import TensorSpec, value_spec


def per_dim(value: Any, n: int) -> Tuple[Any, ...]:
    """A layer's per-dim setting (kernel_size, stride, output_size...) as an n-tuple: a single value
    stands for every dim."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def get_attr(module: torch.nn.Module, qualname: str) -> Any:
    """The parameter, buffer or submodule at a qualified name (a get_attr target)."""
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# Parameter names of builtins without a Python signature (and with overloaded schemas fx cannot pick
# between), declared by the op family files beside the op's entry (declare_signature).
_BUILTIN_PARAMETERS: Dict[Any, Tuple[Tuple[str, ...], Dict[str, Any]]] = {}


def declare_signature(functions, names: Tuple[str, ...], defaults: Dict[str, Any]) -> None:
    """Let bind_arguments read calls of these builtins by parameter name."""
    for fn in functions:
        _BUILTIN_PARAMETERS[fn] = (tuple(names), dict(defaults))


def bind_arguments(node: torch.fx.Node) -> Dict[str, Any]:
    """Arguments of a call_function node by parameter name (defaults filled in)."""
    if node.target in _BUILTIN_PARAMETERS:
        names, defaults = _BUILTIN_PARAMETERS[node.target]
        bound = dict(defaults)
        bound.update(zip(names, node.args))
        bound.update(node.kwargs)
        return bound
    try:
        bound = signature(node.target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    except (TypeError, ValueError):
        return {}



def signature(fn: Any) -> inspect.Signature:
    """inspect.signature(fn), once per function: building it walks the function's code and defaults
    (50 us for nn.MultiheadAttention.forward, asked for at every attention node of every compile)."""
    try:
        return _cached_signature(fn)
    except TypeError:  # an unhashable callable (or one inspect cannot read: it raises again here)
        return inspect.signature(fn)


_cached_signature = functools.lru_cache(maxsize=512)(inspect.signature)


def is_get_attr(arg: Any) -> bool:
    return isinstance(arg, torch.fx.Node) and arg.op == "get_attr"


def first_input(node: torch.fx.Node) -> Any:
    """The first (tensor) argument of a call, passed by position or by name."""
    if node.args:
        return node.args[0]
    for name in ("input", "tensors", "tensor", "self", "x", "a"):
        if name in node.kwargs:
            return node.kwargs[name]
    return None


def argument(node: torch.fx.Node, name: str, default: Any = None, position: Optional[int] = None) -> Any:
    """An argument by name (bound through the callable's signature where it has one) or, for
    builtins without a signature, by keyword or its usual `position`."""
    value = bind_arguments(node).get(name)
    if value is None:
        value = node.kwargs.get(name)
    if value is None and position is not None and len(node.args) > position:
        value = node.args[position]
    return default if value is None else value


# bias + mat1 @ mat2 (Hugging Face's Conv1D is torch.addmm(bias, x, weight))
ADD_PRODUCT = (torch.addmm, torch.baddbmm, "addmm", "baddbmm")


def einsum_subscripts(node: torch.fx.Node):
    """(operands, subscripts) of a matmul/einsum node, or None if it is not one we understand."""
    fn = node.target
    if fn is torch.einsum or getattr(fn, "__name__", "") == "einsum":
        equation = node.args[0].replace(" ", "")
        if "..." in equation or "->" not in equation:
            return None
        operands = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
        lhs, rhs = equation.split("->")
        return operands, lhs.split(",") + [rhs]
    a, b = (node.args[1], node.args[2]) if fn in ADD_PRODUCT else (node.args[0], node.args[1])
    sa, sb = value_spec(a), value_spec(b)
    if not (isinstance(sa, TensorSpec) and isinstance(sb, TensorSpec)) or sa.ndim < 2 or sb.ndim < 2:
        return None
    nb = max(sa.ndim, sb.ndim) - 2
    batch = [chr(ord("a") + i) for i in range(nb)]
    sub_a = "".join(batch[nb - (sa.ndim - 2):]) + "yk"
    sub_b = "".join(batch[nb - (sb.ndim - 2):]) + "kz"
    return [a, b], [sub_a, sub_b, "".join(batch) + "yz"]




class ScratchBuffer:
    """One reusable block of memory for large temporaries that die at once (|w| before a sum, rows
    gathered before their columns). A fresh tensor of megabytes is mapped new by the allocator and
    costs a page fault per 4 KiB on first touch, several times the kernel that fills it; on resnet50
    this was a quarter of compile. Each `like` call invalidates the previous view."""

    def __init__(self):
        self.block: Optional[torch.Tensor] = None

    def like(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        block = self.block
        if block is None or block.numel() < numel or block.dtype != dtype or block.device != device:
            block = self.block = torch.empty(max(numel, block.numel() if block is not None else 0), dtype=dtype,
                                             device=device)
        return block[:numel].view(shape)
