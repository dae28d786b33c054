"""Tracing (torch.fx.symbolic_trace on a private eval-mode copy) and shape propagation.

Shape propagation runs the traced graph once on the example inputs and records, for every node,
a frozen `TensorSpec` (or a tuple of them) in `node.meta["fxprune.value"]`. Wrong example inputs
fail here, with the node that could not run."""
from __future__ import annotations

import functools
import traceback
import types
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from .errors import ExampleInputsError, UnsupportedModelError, describe_node

VALUE_KEY = "fxprune.value"


@dataclass(frozen=True)
class TensorSpec:
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, plus user-chosen leaf modules (kept opaque, hence frozen)."""

    def __init__(self, leaf_modules: Sequence[Any] = ()):
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        if torch.nn.utils.parametrize.is_parametrized(m):
            # its weight is computed by the parametrization on every call: trace into it so the
            # graph shows the computed weight (fxprune freezes such a layer, naming it)
            return False
        return super().is_leaf_module(m, qualname)


def check_capture(model: torch.nn.Module) -> None:
    """Refuse a GraphModule fxprune's rules cannot read: ATen-level graphs (torch.export(...).module(),
    make_fx, AOTAutograd) hold ops such as aten.conv2d.default, not the torch-level calls the rules
    are written for; analysing one would find no channels and prune nothing."""
    if not isinstance(model, torch.fx.GraphModule):
        return
    for node in model.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise UnsupportedModelError(
                f"{describe_node(node)} is an ATen-level op: this GraphModule was captured by torch.export, make_fx "
                f"or AOTAutograd. fxprune reads torch-level graphs (nn modules, torch.* and F.* calls, Tensor methods) "
                f"as torch.fx.symbolic_trace records them. Pass the original nn.Module (fxprune traces it itself) or "
                f"a GraphModule from torch.fx.symbolic_trace.")


def private_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy in eval mode: new module objects (so eval() leaves the user's training flags
    alone) sharing the user's parameter tensors, which fxprune only reads. Copying the weights here
    would cost as much as a forward pass; the rewrite copies exactly what the result keeps."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        warnings.warn(
            "fxprune: the model is in training mode; it is traced and pruned in eval mode (BatchNorm uses "
            "running statistics, dropout is off, auxiliary heads are dropped) and the result is returned in "
            "eval mode. Call .train() on the result to fine-tune it.",
            stacklevel=3,
        )
    return _structural_copy(model).eval()


def _structural_copy(module: torch.nn.Module) -> torch.nn.Module:
    # not copy.copy: it goes through __reduce_ex__, which parametrized modules (weight_norm) refuse
    new = object.__new__(type(module))
    new.__dict__.update(module.__dict__)
    # direct __dict__ writes: nn.Module.__setattr__ is slow and these are plain dicts
    new.__dict__["_parameters"] = dict(module._parameters)
    new.__dict__["_buffers"] = dict(module._buffers)
    new.__dict__["_modules"] = {k: (_structural_copy(v) if v is not None else None) for k, v in module._modules.items()}
    if "forward" in module.__dict__:
        _adopt_instance_forward(new, module.__dict__["forward"], module)
    return new


def _adopt_instance_forward(new: torch.nn.Module, forward: Any, original: torch.nn.Module) -> None:
    """A forward assigned in __init__ (`self.forward = self.forward_slicing`) is a method bound to
    the user's module: the copy would run the original's submodules, and fx (which traces
    `type(root).forward`) would not see it at all. The copy gets a one-off subclass whose forward
    is that function, bound to the copy."""
    if isinstance(forward, types.MethodType) and forward.__self__ is original:
        method = forward.__func__
    elif isinstance(forward, types.MethodType):
        return  # bound to another object: calling it never touches this module's state
    else:
        method = staticmethod(forward)
    cls = type(original)
    new.__class__ = type(cls.__name__, (cls,), {"forward": method, "__module__": cls.__module__,
                                                "__qualname__": cls.__qualname__})
    del new.__dict__["forward"]


# Methods a subclass may override without changing what a torch.nn layer computes.
_HARMLESS_OVERRIDES = frozenset({"__init__", "extra_repr", "reset_parameters", "_load_from_state_dict", "__setstate__",
                                 "__repr__", "_get_name", "__getstate__"})


def torch_layer_type(module: torch.nn.Module) -> Optional[type]:
    """The torch.nn layer class whose computation `module` runs unchanged, or None.

    A subclass that overrides what a call computes (a conv that standardises its weight first, a
    BatchNorm that adds an activation), a parametrized module (weight_norm) and a module with
    forward hooks must not take the rule of its torch.nn base class: None makes fxprune trace into it
    or, for a leaf, freeze its channels."""
    if module._forward_hooks or module._forward_pre_hooks or torch.nn.utils.parametrize.is_parametrized(module):
        return None
    return _torch_layer_type(type(module))


@functools.lru_cache(maxsize=None)
def _torch_layer_type(cls: type) -> Optional[type]:
    mro = cls.__mro__
    base_index = next((i for i, c in enumerate(mro) if c.__module__.startswith(("torch.nn.", "torch.ao.nn."))), None)
    if base_index is None:
        return None
    base = mro[base_index]
    base_methods = {name for name in dir(base) if callable(getattr(base, name, None))}
    for subclass in mro[:base_index]:
        changed = (set(vars(subclass)) & base_methods) - _HARMLESS_OVERRIDES
        if changed:
            return None
    return base


def trace_model(model: torch.nn.Module, leaf_modules: Sequence[Any] = ()) -> torch.fx.GraphModule:
    """Symbolically trace `model` (already a private copy). Errors point at the user's line."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise UnsupportedModelError(_trace_failure_message(model, exc)) from exc
    name = model.__class__.__name__
    # fxprune interprets this graph but never runs its generated code; the lazy GraphModule skips
    # the code generation (~8 ms on resnet50) until something does need it
    return _LazyGraphModule(tracer.root, graph, name)


def _trace_failure_message(model: torch.nn.Module, exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/fxprune/" not in f.filename]
    where = f"{user[-1].filename}:{user[-1].lineno}: `{(user[-1].line or '').strip()}`" if user else "unknown line"
    hint = (
        "fx traces the forward once with symbolic values, so Python control flow (if/for/while) may not "
        "depend on tensor values or shapes. Fix: rewrite the branch with tensor ops (torch.where), move it "
        "into a submodule and pass that module in `leaf_modules=` (its channels are then frozen), or trace "
        "the model yourself with `concrete_args` and pass the GraphModule."
    )
    return f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}\n  at {where}\n  {hint}"


def normalise_example_inputs(example_inputs) -> Tuple[Any, ...]:
    if example_inputs is None:
        raise ExampleInputsError("example_inputs is required: a tuple of tensors the model accepts, e.g. (torch.randn(1, 3, 224, 224),)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ExampleInputsError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def spec_of(value: Any):
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(spec_of(v) for v in value)
    return None


# Layers whose output has their input's shape and dtype: on the meta device their kernels are Python
# decompositions (batch_norm costs more than a conv), so shape propagation skips them.
_SHAPE_PRESERVING = (
    torch.nn.modules.batchnorm._BatchNorm, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU,
    torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Identity,
    torch.nn.Dropout, torch.nn.LayerNorm, torch.nn.GroupNorm,
)


class ShapePropagation(torch.fx.Interpreter):
    """Analysis pass: records `node.meta["fxprune.value"]`; leaves the graph unchanged."""

    failed_node: Optional[torch.fx.Node] = None

    def __init__(self, module: torch.nn.Module, graph: torch.fx.Graph, meta: bool):
        super().__init__(module, graph=graph)
        self.meta = meta

    def run_node(self, n: torch.fx.Node) -> Any:
        self.failed_node = n
        module = self.submodules.get(n.target) if n.op == "call_module" else None
        if self.meta and _is_shape_preserving(module) and len(n.args) == 1 and not n.kwargs \
                and isinstance(self.env.get(n.args[0]), torch.Tensor):
            result = self.env[n.args[0]]
        elif self.meta and isinstance(module, torch.nn.MultiheadAttention) and n.kwargs.get("need_weights") is False \
                and n.args and isinstance(self.env.get(n.args[0]), torch.Tensor):
            # attention output has the query's shape; interpreting the module on meta costs ~4 ms
            result = (self.env[n.args[0]], None)
        else:
            result = super().run_node(n)
        n.meta[VALUE_KEY] = spec_of(result)
        return result


def _is_shape_preserving(module: Optional[torch.nn.Module]) -> bool:
    return module is not None and isinstance(module, _SHAPE_PRESERVING) and torch_layer_type(module) is not None


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Tuple[Any, ...]) -> Any:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) != len(placeholders):
        raise ExampleInputsError(
            f"the model takes {len(placeholders)} input(s) ({', '.join(p.name for p in placeholders)}) but "
            f"example_inputs has {len(example_inputs)}"
        )
    try:  # shapes only: on the meta device no kernel computes anything
        with torch.no_grad():
            return ShapePropagation(_meta_weights(gm), gm.graph, meta=True).run(*[_to_meta(x) for x in example_inputs])
    except Exception:
        pass  # an op without a meta kernel, or inputs that do not fit: the real run tells which
    interpreter = ShapePropagation(gm, gm.graph, meta=False)
    try:
        with torch.no_grad():
            return interpreter.run(*example_inputs)
    except Exception as exc:
        # fx appends its own "While executing ..." text to the message; keep the first line only
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ExampleInputsError(
            f"the model failed on example_inputs at {describe_node(interpreter.failed_node)}: "
            f"{type(exc).__name__}: {first_line}\n  check the shape and dtype of example_inputs (the model takes "
            f"{len(placeholders)} input(s): {', '.join(p.name for p in placeholders)})"
        ) from None


def _to_meta(x: Any) -> Any:
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def _meta_weights(gm: torch.fx.GraphModule) -> torch.nn.Module:
    """A copy of the module tree over meta-device weights, for interpreting gm's graph on shapes.
    Only modules the graph calls (and the get_attr targets) get meta tensors; shape-preserving
    layers are skipped by the interpreter and need none."""
    # a plain Module holding gm's attributes: copying the GraphModule itself would regenerate its code
    root = torch.nn.Module()
    root.__dict__["_parameters"] = dict(gm._parameters)
    root.__dict__["_buffers"] = dict(gm._buffers)
    root.__dict__["_modules"] = {k: (_structural_copy(v) if v is not None else None) for k, v in gm._modules.items()}
    wanted = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and not _is_shape_preserving(root.get_submodule(node.target)):
            wanted.update(id(m) for m in root.get_submodule(node.target).modules())
        elif node.op == "get_attr":
            owner = node.target.rpartition(".")[0]
            wanted.add(id(root.get_submodule(owner) if owner else root))
    for module in root.modules():
        if id(module) not in wanted:
            continue
        module.__dict__["_parameters"] = {k: (torch.nn.Parameter(_to_meta(v), v.requires_grad) if v is not None else None)
                                          for k, v in module._parameters.items()}
        module.__dict__["_buffers"] = {k: (_to_meta(v) if v is not None else None) for k, v in module._buffers.items()}
    return root


def value_spec(node: torch.fx.Node) -> Optional[Any]:
    return node.meta.get(VALUE_KEY)
