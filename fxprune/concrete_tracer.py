"""Capture for models whose Python code branches on shapes: torch.fx tracing where every proxy also
carries its value on the example inputs.

Plain symbolic tracing cannot answer `if x.shape[-1] % 2:`, `assert H == self.img_size`, `for blk in
range(len(x))` or `int(math.sqrt(N))`: a proxy has no value. This tracer runs the forward on the example
inputs while it records the graph, so such questions have answers. What it answers is limited to what
fxprune already specialises to: shapes, ranks, dtypes and devices, and numbers computed from them only
(the batch size included: a branch on it is taken for the example's batch). A branch on tensor *data*
(`if mask.any():`, `x.item()`) is still refused, naming the line, because the traced graph would be
wrong for other inputs.

Shape arithmetic stays in the graph where the code keeps it symbolic (`x.reshape(B, -1)` with B from
`x.shape`), so the batch dimension stays free; only values the code turns into Python numbers or
branches on are fixed. The graph is an ordinary torch.fx GraphModule with module-qualified names: the
same rules, rewrite and verifier apply.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import dis
import functools
import inspect
import operator
import sys
import types
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.fx
from torch.fx import _symbolic_trace
from torch.fx.proxy import Attribute, Scope, TraceError

# Tensor attributes and methods whose answer is fixed by the model's code (ranks, layouts), not by the
# inputs: they are answered with the example's value instead of becoming a node.
_CONSTANT_ATTRIBUTES = frozenset({"ndim", "is_sparse", "is_quantized", "layout", "is_complex"})
_CONSTANT_METHODS = frozenset({"dim", "ndimension", "is_complex", "is_contiguous"})
# Metadata that stays a node (a pruned model run in float64, or on another device, must follow its
# input) but may steer Python code: shapes, dtypes, devices.
_METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "is_cuda", "is_meta"})
_METADATA_METHODS = frozenset({"size", "numel", "nelement", "stride", "is_floating_point", "get_device",
                               "element_size"})


# Ops whose output shape depends on the input's values.
_DATA_SHAPED = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "nms",
                          "batched_nms", "_batched_nms_vanilla", "_batched_nms_coordinate_trick", "remove_small_boxes",
                          "repeat_interleave"})


class DataDependentControlFlow(TraceError):
    """The forward branched on (or converted to a Python number) a value computed from tensor data."""


@functools.lru_cache(maxsize=1024)
def _instructions(code: types.CodeType) -> Tuple[List[int], List[Tuple[str, Any]]]:
    """The offsets and (opname, argval) of a function's bytecode instructions, disassembled once per
    code object."""
    instructions = list(dis.get_instructions(code))
    return [i.offset for i in instructions], [(i.opname, i.argval) for i in instructions]


class _Proxy(torch.fx.Proxy):
    """fx's Proxy, unpacked (`x, _ = attention(...)`, `B, N, C = x.shape`) without disassembling the
    caller's code at every unpacking: fx's `Proxy.__iter__` builds every instruction of the calling
    function each time (a quarter of vit_b_16's trace, for one unpacking in each of its 12 blocks).
    The answer is fx's: the instruction at the caller's last offset, an UNPACK_SEQUENCE giving the count."""

    def __iter__(self) -> Iterator[torch.fx.Proxy]:
        caller = inspect.currentframe().f_back
        offsets, instructions = _instructions(caller.f_code)
        index = bisect.bisect_left(offsets, caller.f_lasti) if sys.version_info >= (3, 11) else caller.f_lasti // 2
        opname, count = instructions[index]
        if opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(count))
        return self.tracer.iter(self)

    def __getattr__(self, name: str) -> Attribute:
        return _Attribute(self, name)


class _Attribute(Attribute, _Proxy):
    """fx's lazy attribute proxy (`x.shape`), unpacked as _Proxy is."""


class _ValueProxy(_Proxy):
    """A proxy that knows its value on the example inputs (kept by the tracer, per node)."""

    @property
    def value(self) -> Any:
        return self.tracer.value_of(self.node)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, name: str) -> Any:
        value = self.value
        if name in _CONSTANT_ATTRIBUTES and isinstance(value, torch.Tensor):
            return getattr(value, name)
        if isinstance(value, (torch.device, torch.dtype)):  # `x.device.type` for torch.autocast(...)
            return getattr(value, name)
        return _ValueAttribute(self, name)

    def __len__(self) -> int:
        return self.tracer.length(self)

    def __int__(self) -> int:
        return int(self.tracer.shape_value(self, "int()"))

    def __contains__(self, key: Any) -> bool:  # `"masks" in outputs`: the keys a dict was built with
        value = self.value
        if isinstance(value, dict):
            return key in value
        raise DataDependentControlFlow(f"the forward tests `in` on `{self.node.format_node()}`, a value that "
                                       f"depends on tensor data")

    def __index__(self) -> int:  # range(x.shape[0]): Python needs the number itself
        return operator.index(self.tracer.shape_value(self, "an index"))

    def __float__(self) -> float:
        return float(self.tracer.shape_value(self, "float()"))


class _ValueAttribute(Attribute, _ValueProxy):
    """`x.shape`, `x.view`, ...: fx's lazy attribute proxy, with a value."""


# proxies of a node fx would record as the node itself (Tracer.create_arg); attributes are left to fx,
# which makes their getattr node on demand
_PROXIES = frozenset({torch.fx.Proxy, _Proxy, _ValueProxy})


# argument types fx records as they are (torch.fx.node.base_types less Tensor, which it stores as a constant)
_PLAIN_ARGUMENTS = frozenset({int, float, bool, complex, str, type(None), type(...), torch.dtype, torch.device,
                              torch.memory_format, torch.layout})


class _ModuleStack(collections.OrderedDict):
    """fx's module call stack, with the copy fx records in every node's meta made as a plain OrderedDict
    directly: copy.copy goes through __reduce_ex__ (1.9 against 0.2 us, once per node)."""

    def __copy__(self) -> "collections.OrderedDict":
        return collections.OrderedDict(self)


class _Scope(Scope):
    """fx's current scope, copied (once per module call) without __reduce_ex__ (1.2 against 0.2 us)."""

    def __copy__(self) -> Scope:
        return Scope(self.module_path, self.module_type)


def create_node_then_args(create, op: str, target: Any, args: tuple, kwargs: dict,
                          name: Any = None, type_expr: Any = None) -> torch.fx.Node:
    """`create(op, target, args, kwargs, name, type_expr)` (a Graph's or a Tracer's create_node), with the
    arguments assigned after the node is made. The node is the same; what is skipped is Graph.create_node's
    walk of every argument (a pytree walk) that warns about raw SymInts, which fxprune's graphs never hold:
    both tracers record Python ints and proxies, and the rewrite copies their nodes. 12% of a resnet50
    trace (6.24 against 5.50 ms)."""
    node = create(op, target, (), {}, name, type_expr)
    if args:
        node.args = args      # the same accounting of uses and users as at creation
    if kwargs:
        node.kwargs = kwargs
    return node


class TracesThroughUnheldModules(torch.fx.Tracer):
    """A module the forward calls but the model does not hold is traced through, like the code it wraps.
    Libraries wrap plain functions in module objects at import time (transformers' hub kernels make
    `apply_rotary_pos_emb` a global nn.Module); fx would record a call_module with no name in the model
    and fail. One holding parameters or buffers cannot be traced through (its tensors would have no name
    in the graph) and is refused, naming its type."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scope, self.module_stack = _Scope("", None), _ModuleStack()

    def create_arg(self, a: Any) -> Any:
        """fx's own result, sooner for the arguments nearly every node has (proxies, numbers, strings,
        plain tuples, lists and keyword dicts of them): Tracer.create_arg first checks every argument for a parameter,
        a constant tensor and a custom opaque type, a third of the time of a resnet50 trace."""
        kind = type(a)
        if kind in _PROXIES:
            return a.node
        if kind in _PLAIN_ARGUMENTS:
            return a
        if kind is tuple:
            return tuple(self.create_arg(x) for x in a)
        if kind is list:
            return [self.create_arg(x) for x in a]
        if kind is dict and all(type(k) is str for k in a):   # keyword arguments
            return {k: self.create_arg(v) for k, v in a.items()}
        return super().create_arg(a)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> torch.fx.Node:
        if self.check_mutable_operations:  # fx's check reads the arguments at creation
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        return create_node_then_args(super().create_node, kind, target, args, kwargs, name, type_expr)

    def trace(self, root, concrete_args=None):
        with _module_hooks_without_slot_updates(root):
            return super().trace(root, concrete_args)

    def call_module(self, m: torch.nn.Module, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
                raise TraceError(f"the forward calls a {type(m).__qualname__} that is not a submodule of the model "
                                 f"and holds parameters or buffers: register it as a submodule (assign it to an "
                                 f"attribute of a module) so its weights have a name") from None
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


@contextlib.contextmanager
def _module_hooks_without_slot_updates(root: Any) -> Iterator[None]:
    """fx records module calls and parameter reads by patching nn.Module.__call__ and nn.Module.__getattr__
    for the trace, and reverting them after. Assigning a special method to a class makes CPython update that
    slot in every subclass: with the 1,300 nn.Module subclasses of torchvision and Torch-Pruning loaded, the
    two patches and their reverts took about 3 ms of each vit_b_16 compile. fx's own wrappers are installed
    where no slot changes instead:
    - calls: nn.Module.__call__ runs self._call_impl, an ordinary attribute; it runs fx's call wrapper,
      whose forward reaches _call_impl again for the same module and then runs the original. Every module
      call reaches the tracer as before, those of modules the model does not hold included.
    - parameter reads: fx's wrapper goes on the classes of the model's modules. It turns a read into a node
      only for a tensor the model holds, and a module the model does not hold is refused when it has
      tensors (TracesThroughUnheldModules), so the graph is the same.
    Where that would not hold (a class with a _call_impl or __getattr__ of its own, a module compiled in
    place, the model holding a bare nn.Module), fx patches nn.Module for that method, as it does."""
    module = torch.nn.Module
    modules = list(root.modules()) if isinstance(root, module) else []
    classes = {type(m) for m in modules}
    fx_patcher = getattr(_symbolic_trace, "_Patcher", None)
    own = set()
    if (module.__call__ is getattr(module, "_wrapped_call_impl", None)
            and all(_defines(c, "_call_impl") is module for c in classes)
            and all(getattr(m, "_compiled_call_impl", None) is None for m in modules)):  # compiled: no _call_impl
        own.add("__call__")
    if classes and module not in classes and all(_defines(c, "__getattr__") is module for c in classes):
        own.add("__getattr__")
    if fx_patcher is None or not own:
        yield
        return

    class Patcher(fx_patcher):
        def patch_method(self, cls, name, new_fn, deduplicate=True):
            if cls is not module or name not in own:
                return super().patch_method(cls, name, new_fn, deduplicate)
            new_fn.__fx_already_patched = deduplicate
            if name == "__getattr__":
                for c in classes:
                    self.patches_made.append(_ClassAttribute(c, name, new_fn, inherited=True))
                    self.patches_made[-1].patch()
            else:
                self.patches_made.append(_ClassAttribute(module, "_call_impl", _call_impl_through(new_fn)))
                self.patches_made[-1].patch()

    _symbolic_trace._Patcher = Patcher
    try:
        yield
    finally:
        _symbolic_trace._Patcher = fx_patcher


def _call_impl_through(call_wrapper: Any) -> Any:
    """nn.Module._call_impl that sends a call to fx's `call_wrapper` (module, *args, **kwargs), whose
    forward comes back here for the same module: that call runs the original."""
    original = torch.nn.Module._call_impl
    forwarding: set = set()

    def _call_impl(module, *args, **kwargs):
        if id(module) in forwarding:
            return original(module, *args, **kwargs)
        forwarding.add(id(module))
        try:
            return call_wrapper(module, *args, **kwargs)
        finally:
            forwarding.discard(id(module))
    return _call_impl


def _defines(cls: type, name: str) -> type:
    """The class of cls's MRO whose own namespace holds `name`."""
    return next(c for c in cls.__mro__ if name in vars(c))


class _ClassAttribute:
    """fx's patch protocol (patch, revert) for one attribute of a class. `inherited`: the class does not
    hold it itself, and the revert deletes it so the inherited one shows again."""

    def __init__(self, cls: type, name: str, new_fn: Any, inherited: bool = False):
        self.cls, self.name, self.new_fn, self.inherited = cls, name, new_fn, inherited
        self.original = None if inherited else vars(cls)[name]

    def patch(self) -> None:
        setattr(self.cls, self.name, self.new_fn)

    def revert(self) -> None:
        if self.inherited:
            delattr(self.cls, self.name)
        else:
            setattr(self.cls, self.name, self.original)


class ConcreteShapeTracer(TracesThroughUnheldModules):
    """torch.fx.Tracer whose proxies carry their value on the example inputs (see the module doc).

    inputs: {forward parameter name: example value}."""

    def __init__(self, inputs: Dict[str, Any], is_leaf=None):
        # buffers as graph nodes: a real tensor mixed with proxies (`self.ids[:, :n].expand(b, n)`)
        # would reach torch's argument parser, which does not dispatch every overload to proxies
        super().__init__()
        self.proxy_buffer_attributes = True
        self._inputs = inputs
        self._is_leaf = is_leaf
        self._values: Dict[torch.fx.Node, Any] = {}
        self._from_shapes: Dict[torch.fx.Node, bool] = {}
        self._data_shaped: Dict[torch.fx.Node, bool] = {}
        self._evaluating = False  # while a node's value is computed, modules run as plain Python

    # -- values ---------------------------------------------------------------------------------

    def value_of(self, node: torch.fx.Node) -> Any:
        if node not in self._values:
            # get_attr nodes for constants and parameters, and rebuilt objects, are made by create_node
            if node.op == "get_attr":
                self._values[node] = functools.reduce(getattr, node.target.split("."), self.root)
            elif node.op == "call_function":
                self._values[node] = self._evaluate(node)
            else:
                raise TraceError(f"no value for {node.format_node()}")
            self._from_shapes[node] = False
        return self._values[node]

    def shape_value(self, proxy: torch.fx.Proxy, use: str) -> Any:
        """The value of a proxy computed from shapes only; data-dependent values are refused."""
        node = proxy.node
        value = self.value_of(node)
        if not self._from_shapes.get(node, False):
            raise DataDependentControlFlow(
                f"the forward uses the value of `{node.format_node()}` in {use}, and that value depends on "
                f"tensor data, not only on shapes: a traced graph cannot branch on it. Rewrite it with tensor "
                f"ops (torch.where, masking), or move it into a submodule passed in `leaf_modules=`.")
        return value

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        return bool(self.shape_value(obj, "a condition (if/while/assert/and/or)"))

    def length(self, obj: torch.fx.Proxy) -> int:
        """len(x): a tensor's first dimension (a shape, unless the tensor's shape depends on data), or
        the number of items of a tuple or dict a leaf returned."""
        value = self.value_of(obj.node)
        if isinstance(value, torch.Tensor) and self._data_shaped.get(obj.node, False):
            raise DataDependentControlFlow(f"the forward takes len() of `{obj.node.format_node()}`, whose shape "
                                           f"depends on tensor data")
        return len(value)

    def iter(self, obj: torch.fx.Proxy) -> Iterator:
        value = self.value_of(obj.node)
        if isinstance(value, dict):
            return iter(value.keys())
        return (obj[i] for i in range(self.length(obj)))

    def keys(self, obj: torch.fx.Proxy) -> Any:
        return self.value_of(obj.node).keys()

    def create_arg(self, a: Any) -> Any:
        try:
            return super().create_arg(a)
        except NotImplementedError:
            # a plain Python object passed between modules (torchvision's ImageList): rebuilt in the
            # graph from its attributes, so that proxies inside it stay inputs of the call
            if not hasattr(a, "__dict__") or isinstance(a, (torch.nn.Module, torch.Tensor, type)):
                raise
            return self.create_node("call_function", _rebuilder(type(a)), (super().create_arg(dict(vars(a))),), {})

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        value = self._evaluate(node)
        if kind == "call_method" and target in _CONSTANT_METHODS:
            self.graph.erase_node(node)  # answered with the example's value
            return value
        self._values[node] = value
        self._data_shaped[node] = self._has_data_dependent_shape(node, args, kwargs)
        self._from_shapes[node] = self._computed_from_shapes(node, value)
        return proxy

    def _has_data_dependent_shape(self, node: torch.fx.Node, args, kwargs) -> bool:
        """Whether the value's shape depends on tensor data (nonzero, a boolean mask, NMS, or anything
        computed from such a tensor): its sizes are data, not shapes, and may not steer Python code."""
        if any(self._data_shaped.get(n, False) for n in node.all_input_nodes):
            return True
        name = getattr(node.target, "__name__", str(node.target))
        if name in _DATA_SHAPED or (node.op == "call_function" and node.target is torch.where and len(node.args) == 1):
            return True
        if node.target is operator.getitem:  # x[mask] with a boolean mask
            indices = self.value_of(node.args[1]) if isinstance(node.args[1], torch.fx.Node) else node.args[1]
            indices = indices if isinstance(indices, tuple) else (indices,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        return False

    def _evaluate(self, node: torch.fx.Node) -> Any:
        evaluating, self._evaluating = self._evaluating, True
        try:
            return self._run(node)
        finally:
            self._evaluating = evaluating

    def _run(self, node: torch.fx.Node) -> Any:
        args, kwargs = _mutable(torch.fx.node.map_arg((node.args, node.kwargs), self.value_of))
        if node.op == "placeholder":
            name = node.target.lstrip("*")
            if name in self._inputs:
                return self._inputs[name]
            if args:  # a parameter traced at its default value
                return args[0]
            return () if node.target.startswith("*") and not node.target.startswith("**") else {}
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(node.target)(*args, **kwargs)
        return self.value_of(node)

    def _computed_from_shapes(self, node: torch.fx.Node, value: Any) -> bool:
        if isinstance(value, torch.Tensor) or node.op in ("placeholder", "get_attr", "call_module"):
            return False
        if self._data_shaped.get(node.args[0] if node.args else None, False):
            return False  # the size of a tensor whose shape depends on data
        if node.op == "call_method" and node.target in _METADATA_METHODS:
            return True
        if node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRIBUTES:
            return True
        return all(self._from_shapes.get(n, False) for n in node.all_input_nodes)

    # -- modules --------------------------------------------------------------------------------

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return self._is_leaf(m, qualname)

    def call_module(self, m: torch.nn.Module, forward, args, kwargs):
        if self._evaluating:  # a module run on real tensors while a value is computed: nothing to record
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


# Factories whose sizes are varargs: torch's argument parser does not hand `torch.ones(b, n)` to the
# proxies' __torch_function__ when b and n are proxies, so they are recorded by a wrapper.
_FACTORIES = ("ones", "zeros", "empty", "full", "rand", "randn", "randint", "eye", "tensor", "as_tensor")


@contextlib.contextmanager
def _torch_functions_for_proxies(tracer: ConcreteShapeTracer):
    """While tracing: factories with proxy sizes become nodes, and `torch.finfo(x.dtype).min` (attention
    masks) gets the example's dtype. x.dtype stays a node so that the pruned model follows its input's
    dtype, but finfo and iinfo need a real one."""
    originals = {name: getattr(torch, name) for name in _FACTORIES + ("finfo", "iinfo")}

    def recording(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            if _proxies((args, kwargs)):
                return tracer.create_proxy("call_function", function, args, kwargs)
            return function(*args, **kwargs)
        return call

    def resolving(info):
        def call(dtype=None, *args):
            if isinstance(dtype, torch.fx.Proxy):
                dtype = tracer.value_of(dtype.node)
            return info(dtype, *args) if dtype is not None else info(*args)
        return call

    for name in _FACTORIES:
        setattr(torch, name, recording(originals[name]))
    torch.finfo, torch.iinfo = resolving(originals["finfo"]), resolving(originals["iinfo"])
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(torch, name, function)


def trace_with_values(root: torch.nn.Module, inputs: Dict[str, Any], concrete_args: Dict[str, Any],
                      is_leaf=None, max_outlined: int = 8) -> "tuple[ConcreteShapeTracer, torch.fx.Graph]":
    """Trace with values. Code that cannot be traced (it branches on tensor data, or checks that its
    input is a real tensor) inside a submodule's forward, or inside another method of a module (detection
    post-processing: top-k of the scores above a threshold, NMS), is kept out of the graph's channel
    analysis: the submodule becomes a leaf, the method one opaque call (its inputs' channels are frozen,
    and it runs unchanged in the pruned model). The forward of the model itself must be traceable."""
    leaves: set = set()
    is_leaf = is_leaf or torch.fx.Tracer().is_leaf_module

    def leaf(m: torch.nn.Module, qualname: str) -> bool:
        return id(m) in leaves or is_leaf(m, qualname)

    outlined = []
    state = {id(m): (m, dict(m.__dict__)) for m in root.modules()}
    try:
        while True:
            _restore(state)  # a trace may store proxies in modules (AnchorGenerator caches its anchors)
            for owner, method in outlined:
                _outline_method(owner, method)
            tracer = ConcreteShapeTracer(inputs, leaf)
            try:
                with torch.no_grad(), _torch_functions_for_proxies(tracer):
                    graph = tracer.trace(root, concrete_args=concrete_args or None)
                break
            except (TraceError, AssertionError, TypeError, NotImplementedError) as exc:
                # data-dependent branches, and checks that a proxy is not a tensor (BoxCoder's asserts)
                owner, method = _data_dependent_method(exc, root)
                if owner is None or len(outlined) >= max_outlined:
                    raise
                if method == "forward":
                    leaves.add(id(owner))
                else:
                    outlined.append((owner, method))
    finally:
        _restore(state)  # the outlined methods too: the graph's call targets keep the originals
    tracer._values.clear()  # the example's activations: not needed once the graph is recorded
    for node in reversed(graph.nodes):  # shape queries whose answer only steered Python code
        if tracer._from_shapes.get(node) and not node.users:
            graph.erase_node(node)
    return tracer, graph


def _mutable(value: Any) -> Any:
    """fx's immutable lists and dicts as plain ones: the code called with them may update them."""
    if isinstance(value, tuple):
        return tuple(_mutable(v) for v in value)
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=None)
def _rebuilder(cls: type):
    def rebuild(attributes: dict) -> Any:
        obj = object.__new__(cls)
        obj.__dict__.update(attributes)
        return obj
    rebuild.__name__ = rebuild.__qualname__ = f"rebuild_{cls.__name__}"
    return rebuild


def _restore(state: Dict[int, Any]) -> None:
    """Put back the attributes each module had before tracing (new ones, such as fx's tensor constants
    on the root, stay)."""
    for module, attributes in state.values():
        for name in [k for k in module.__dict__ if k not in attributes and not k.startswith("_tensor_constant")]:
            del module.__dict__[name]
        module.__dict__.update(attributes)


def _data_dependent_method(exc: BaseException, root: torch.nn.Module):
    """(module, method name) of the innermost method of a module of `root` running when `exc` was
    raised, outside torch and fxprune; (None, None) if it is the root's own forward."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        owner = frame.f_locals.get("self")
        path = frame.f_code.co_filename
        if not isinstance(owner, torch.nn.Module) or "/torch/" in path or "/fxprune/" in path:
            continue
        if owner is root and frame.f_code.co_name == "forward":
            return None, None
        return owner, frame.f_code.co_name
    return None, None


def _outline_method(owner: torch.nn.Module, method: str) -> None:
    """Make `owner.method(...)` one call node while tracing (an instance attribute over the class's)."""
    original = getattr(owner, method)

    @functools.wraps(original)
    def outlined(*args, **kwargs):  # the graph's target; interpreters pass fx's immutable containers
        return original(*_mutable(args), **_mutable(kwargs))

    @functools.wraps(original)
    def call(*args, **kwargs):
        tracer = next((x.tracer for x in _proxies((args, kwargs))), None)
        if tracer is None or tracer._evaluating:
            return original(*args, **kwargs)
        return tracer.create_proxy("call_function", outlined, args, kwargs)

    owner.__dict__[method] = call


def _proxies(tree: Any) -> list:
    found: list = []
    torch.fx.node.map_aggregate(tree, lambda x: found.append(x) if isinstance(x, torch.fx.Proxy) else None)
    return found
