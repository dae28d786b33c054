"""Tracing: torch.fx.symbolic_trace on a private eval-mode copy of the user's model, the checks on
what fxprune accepts, and which torch.nn layer a module computes (`torch_layer_type`). Shape
propagation, which fills in `node.meta["fxprune.value"]`, is in shape_prop.py."""
from __future__ import annotations

import copy
import functools
import inspect
import traceback
import types
import warnings
from dataclasses import dataclass
from typing import Any, Collection, Dict, Optional, Sequence, Tuple

import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from .concrete_tracer import DataDependentControlFlow, TracesThroughUnheldModules, trace_with_values
from .errors import ExampleInputsError, UnsupportedModelError, describe_node

VALUE_KEY = "fxprune.value"


@dataclass(frozen=True)
class TensorSpec:
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Tracer(TracesThroughUnheldModules):
    """symbolic_trace's tracer, plus user-chosen leaf modules (kept opaque, hence frozen)."""

    def __init__(self, leaf_modules: Sequence[Any] = ()):
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        if _is_parametrized(m):
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
    return eval_mode(_structural_copy(model))


def eval_mode(module: torch.nn.Module) -> torch.nn.Module:
    """module.eval(), returned. Where no layer overrides train() or __setattr__, the flags are written
    directly: nn.Module.__setattr__ once per layer was 0.2 ms of each resnet50 compile, twice."""
    modules = list(module.modules())
    base = torch.nn.Module
    if any(type(m).train is not base.train or type(m).__setattr__ is not base.__setattr__ for m in modules):
        return module.eval()
    for m in modules:
        m.__dict__["training"] = False
    return module


# nn.Module's own bookkeeping attributes; any other dict, list or set a module holds is its own state
_MODULE_BOOKKEEPING = frozenset(torch.nn.Module().__dict__)


def _state_containers(module: torch.nn.Module):
    """(name, container) of every dict, list and set a module holds as its own state."""
    state = module.__dict__
    # the set difference first: nearly every attribute is bookkeeping (compile visits every module twice)
    return [(name, state[name]) for name in state.keys() - _MODULE_BOOKKEEPING
            if isinstance(state[name], (dict, list, set))]


def module_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object sharing every attribute value with `module` but its containers: each dict, list
    and set in its __dict__ (hook tables, buffer names, state a forward fills) is copied one level deep, so
    a hook or buffer registered on the copy, or a cache its forward fills while traced (LeViT keeps its
    attention bias per device in a dict; the trace would leave proxies there), never reaches `module`.
    Not copy.copy: that goes through __reduce_ex__, which parametrized modules (weight_norm) refuse, and
    takes several times as long."""
    new = object.__new__(type(module))
    state = new.__dict__
    state.update(module.__dict__)
    for name, value in module.__dict__.items():
        if isinstance(value, (dict, list, set)):
            # nn.Module's own tables are plain dicts, OrderedDicts and sets; the user's may be any subclass
            state[name] = value.copy() if name in _MODULE_BOOKKEEPING else copy.copy(value)
    return new


def graph_module(graph: torch.fx.Graph, attributes: Dict[str, Any], class_name: str,
                 non_persistent: Collection[str] = (), cls: type = torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`cls(attributes, graph, class_name)`: a GraphModule holding every value of `attributes` (modules,
    parameters, tensors) at its qualified name, under plain nn.Module containers where the path has no module
    of its own, as fx builds it. Tensors that are not parameters become buffers, persistent unless their
    name is in `non_persistent`.

    fx assigns each name through getattr and nn.Module.__setattr__ (1.1-1.8 ms for each of resnet50's two
    graph modules in a compile); the containers made here are written through their dicts instead. Inside a
    module placed by an earlier (shorter) name, the assignment goes through nn.Module as in fx."""
    gm = _empty_graph_module(cls, class_name)
    made: Dict[str, torch.nn.Module] = {"": gm}  # the containers made here, by path
    for target in sorted(attributes, key=lambda name: name.count(".")):
        value = attributes[target]
        prefix, _, field = target.rpartition(".")
        owner = _container(made, prefix)
        is_buffer = isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
        if owner is None:  # inside a module from `attributes`
            owner = gm.get_submodule(prefix)
            if is_buffer:
                owner.register_buffer(field, value, persistent=target not in non_persistent)
            else:
                setattr(owner, field, value)
        elif isinstance(value, torch.nn.Module):
            owner._modules[field] = value
        elif isinstance(value, torch.nn.Parameter):
            owner._parameters[field] = value
        elif is_buffer:
            owner._buffers[field] = value
            if target in non_persistent:
                owner._non_persistent_buffers_set.add(field)
        else:
            setattr(owner, field, value)
    gm.graph = graph
    return gm


def _empty_graph_module(cls: type, class_name: str) -> torch.fx.GraphModule:
    """`cls({}, torch.fx.Graph(), class_name)`: fx's own construction, with nothing to place yet, minus the
    code it generates for the empty graph (0.5 ms; the caller assigns the real graph, which generates it
    again). GraphModule.__new__ makes a class for each instance, so skipping recompile on that class
    touches nothing else."""
    gm = cls.__new__(cls, {}, torch.fx.Graph(), class_name)
    own_class = type(gm)
    own_class.recompile = lambda self: None
    try:
        gm.__init__({}, torch.fx.Graph(), class_name)
    finally:
        del own_class.recompile
    return gm


def _container(made: Dict[str, torch.nn.Module], path: str) -> Optional[torch.nn.Module]:
    """The container made for `path` (made now if missing), or None if the path runs into a module that
    was placed rather than made."""
    if path in made:
        return made[path]
    parent_path, _, name = path.rpartition(".")
    parent = _container(made, parent_path)
    if parent is None or name in parent._modules:
        return None
    made[path] = parent._modules[name] = torch.nn.Module()
    return made[path]


def _structural_copy(module: torch.nn.Module, recurse: bool = True) -> torch.nn.Module:
    """A new module object (recurse: and new submodule objects) sharing the parameter and buffer tensors."""
    new = module_copy(module)
    # direct __dict__ writes: nn.Module.__setattr__ is slow
    new.__dict__["_modules"] = {k: (_structural_copy(v) if v is not None and recurse else v)
                                for k, v in module._modules.items()}
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
    if module._forward_hooks or module._forward_pre_hooks or _is_parametrized(module):
        return None
    return _torch_layer_type(type(module))


def _is_parametrized(module: torch.nn.Module) -> bool:
    # torch.nn.utils.parametrize.is_parametrized, without its getattr miss (slow on nn.Module,
    # and this runs for every module several times per compile)
    return isinstance(module._modules.get("parametrizations"), torch.nn.ModuleDict)


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


def trace_model(model: torch.nn.Module, leaf_modules: Sequence[Any] = (),
                example_inputs: Optional[Tuple[Any, ...]] = None) -> torch.fx.GraphModule:
    """Trace `model` (already a private copy) with torch.fx. Errors point at the user's line.

    Plain symbolic tracing comes first: it never runs the model. If it fails (Python control flow on
    shapes, `len(x)`, `int(math.sqrt(N))`), the forward is traced again with values on the example
    inputs (concrete_tracer.py), which resolves what depends on shapes only.

    Parameters of forward after the example inputs that have a default (timm's `attn_mask=None`,
    `is_causal=False`) are traced with that default as a constant, so branches on them resolve; the
    pruned module still accepts them and checks they keep that value."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    n_inputs = None if example_inputs is None else len(example_inputs)
    if isinstance(example_inputs, KeywordInputs) or _takes_more_than_inputs(type(model).forward):
        _trace_forward_as_called(model, example_inputs)
        concrete_args = None
    else:
        concrete_args = _defaults_after(model, n_inputs)
    tracer = _Tracer(leaf_modules)
    containers = _own_containers(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as symbolic_failure:  # fx raises TraceError, TypeError, NotImplementedError, ...
        if example_inputs is None:
            raise UnsupportedModelError(_trace_failure_message(model, symbolic_failure)) from symbolic_failure
        _refill(containers)  # what the failed trace cached there (proxies) must not reach the next one
        try:
            tracer, graph = trace_with_values(model, _inputs_by_name(model, example_inputs), concrete_args,
                                              is_leaf=_Tracer(leaf_modules).is_leaf_module)
        except Exception as exc:
            raise UnsupportedModelError(_trace_failure_message(model, exc)) from exc
    # fxprune interprets this graph but never runs its generated code; the lazy GraphModule skips
    # the code generation (~8 ms on resnet50) until something does need it
    attributes, non_persistent = _attributes_used(tracer.root, graph)
    gm = graph_module(graph, attributes, model.__class__.__name__, non_persistent, cls=_LazyGraphModule)
    gm.training = tracer.root.training
    return gm


def _attributes_used(root: torch.nn.Module, graph: torch.fx.Graph) -> Tuple[Dict[str, Any], set]:
    """What `GraphModule(root, graph)` takes from root: the object at each call_module and get_attr target,
    and the names of the non-persistent buffers among them."""
    attributes, non_persistent = {}, set()
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr") or node.target in attributes:
            continue
        *path, field = node.target.split(".")
        owner = root
        for item in path:
            owner = _module_attribute(owner, item)
        value = attributes[node.target] = _module_attribute(owner, field)
        if isinstance(value, torch.Tensor) and field in getattr(owner, "_non_persistent_buffers_set", ()):
            non_persistent.add(node.target)
    return attributes, non_persistent


def _module_attribute(module: Any, name: str) -> Any:
    """getattr(module, name), from nn.Module's own tables first: getattr reaches those only through
    nn.Module.__getattr__, after the instance and class lookups have failed."""
    for table in ("_modules", "_parameters", "_buffers"):
        entries = getattr(module, "__dict__", {}).get(table)
        if entries is not None and name in entries:
            return entries[name]
    return getattr(module, name)


def _own_containers(model: torch.nn.Module) -> list:
    """(container, a copy of its contents) for every dict, list and set the modules hold as their own
    state (see _structural_copy)."""
    return [(value, value.copy()) for module in model.modules() for _, value in _state_containers(module)]


def _refill(containers: list) -> None:
    for container, contents in containers:
        container.clear()
        if isinstance(container, list):
            container.extend(contents)
        else:
            container.update(contents)


def _takes_more_than_inputs(forward: Any) -> bool:
    """A decorated forward (fx would read one signature and call another) or one with *args/**kwargs
    (fx would make them graph inputs)."""
    if hasattr(forward, "__wrapped__"):
        return True
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _trace_forward_as_called(model: torch.nn.Module, example_inputs: Optional[Tuple[Any, ...]]) -> None:
    """Make the private copy's forward take exactly the example inputs and call the model's own forward
    with them as the user would: by keyword for keyword inputs, by position otherwise.

    fx makes a graph input of every parameter of the function it traces, and reads the names from the
    undecorated function while it calls the decorated one. A forward with twenty optional parameters,
    or one wrapped by decorators that take `*args, **kwargs` (Hugging Face's), traces as called only
    through such an adapter; the graph's inputs then have the example inputs' names."""
    if example_inputs is None:
        raise UnsupportedModelError(f"{type(model).__name__}.forward is wrapped by a decorator; fxprune needs "
                                    f"example_inputs to trace it")
    options: Dict[str, Any] = {}
    if isinstance(example_inputs, KeywordInputs):
        names, options = example_inputs.names, example_inputs.options
        call = ", ".join([f"{n}={n}" for n in names] + [f"{n}=_options[{n!r}]" for n in options])
    else:
        names = tuple(p.name for p in _positional_parameters(model))[:len(example_inputs)]
        if len(names) < len(example_inputs):
            names = tuple(f"input_{i}" for i in range(len(example_inputs)))
        call = ", ".join(names)
    # a function with these parameter names: fx reads the graph's input names from its code object
    source = f"def forward(self, {', '.join(names)}):\n    return _model_forward(self, {call})\n"
    namespace = {"_model_forward": type(model).forward, "_options": options}
    exec(compile(source, f"<fxprune: {type(model).__name__}.forward as called>", "exec"), namespace)
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__,
                                                  "__qualname__": cls.__qualname__})


def _inputs_by_name(model: torch.nn.Module, example_inputs: Tuple[Any, ...]) -> dict:
    """{forward parameter name: example value}. A forward taking keyword inputs, *args or **kwargs has
    been given the adapter by now, whose parameters are exactly the example inputs."""
    return dict(zip((p.name for p in _positional_parameters(model)), example_inputs))


def _positional_parameters(model: torch.nn.Module) -> list:
    """forward's parameters that can be passed by position, without self."""
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _defaults_after(model: torch.nn.Module, n_inputs: Optional[int]) -> Optional[dict]:
    """{name: default} of forward's positional parameters after the first n_inputs, if all have defaults."""
    if n_inputs is None:
        return None
    try:
        rest = _positional_parameters(model)[n_inputs:]
    except (TypeError, ValueError):
        return None
    if not rest or any(p.default is inspect.Parameter.empty for p in rest):
        return None  # missing required inputs: shape propagation says which
    return {p.name: p.default for p in rest}


def _trace_failure_message(model: torch.nn.Module, exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/fxprune/" not in f.filename]
    where = f"{user[-1].filename}:{user[-1].lineno}: `{(user[-1].line or '').strip()}`" if user else "unknown line"
    if isinstance(exc, DataDependentControlFlow):
        hint = ("fxprune resolves Python control flow on shapes at trace time, but not on tensor values: the "
                "traced graph would be wrong for other inputs. Fix: rewrite the branch with tensor ops "
                "(torch.where, masking), or move it into a submodule and pass that module in `leaf_modules=` "
                "(its channels are then frozen).")
    elif isinstance(exc, NotImplementedError) and "argument of type" in str(exc):
        hint = ("an object that is not a tensor is passed to a module or an op in the graph. If it is a cache "
                "(Hugging Face's DynamicCache), turn it off: pass `use_cache=False` in the keyword example_inputs "
                "or set `model.config.use_cache = False`; fxprune prunes the forward without a cache.")
    else:
        hint = ("fx records the forward as a graph of torch calls. Fix: move the failing code into a submodule "
                "and pass that module in `leaf_modules=` (its channels are then frozen), or trace the model "
                "yourself and pass the GraphModule.")
    return f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}\n  at {where}\n  {hint}"


class KeywordInputs(tuple):
    """Example inputs given by name ({"input_ids": ..., "attention_mask": ...}): the tensors in the order
    given, and their names. The traced graph takes exactly these inputs, under these names. Values that
    are not tensors (`use_cache=False`, `return_dict=True`) are options: the forward is traced with them
    fixed, and the graph does not take them."""

    names: Tuple[str, ...] = ()
    options: Dict[str, Any] = {}

    def __new__(cls, inputs: dict) -> "KeywordInputs":
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        self = super().__new__(cls, tensors.values())
        self.names = tuple(tensors)
        self.options = {k: v for k, v in inputs.items() if k not in tensors}
        return self


def normalise_example_inputs(example_inputs) -> Tuple[Any, ...]:
    if example_inputs is None:
        raise ExampleInputsError("example_inputs is required: a tuple of tensors the model accepts, e.g. (torch.randn(1, 3, 224, 224),), "
                                 "or a dict of keyword inputs, e.g. {'input_ids': ids, 'attention_mask': mask}")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, KeywordInputs):
        return example_inputs
    if isinstance(example_inputs, dict):  # a tokenizer's BatchEncoding is a dict too
        bad = [k for k in example_inputs if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise ExampleInputsError(f"keyword example_inputs need parameter names as keys, got {bad!r}")
        return KeywordInputs(dict(example_inputs))
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ExampleInputsError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword inputs, got "
                             f"{type(example_inputs).__name__}")


def spec_of(value: Any):
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(spec_of(v) for v in value)
    return None


def value_spec(node: torch.fx.Node) -> Optional[Any]:
    return node.meta.get(VALUE_KEY)
