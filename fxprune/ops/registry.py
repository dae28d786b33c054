"""The op registry: everything fxprune knows about one op, in one entry.

An entry is found by the op a graph node calls: a torch function (by identity), a Tensor method (by
name) or an nn.Module type (the torch.nn class whose computation the module runs unchanged, see
`torch_layer_type`; its entry is found through the class's bases, so one entry for `_BatchNorm` serves
BatchNorm1d/2d/3d). Each pass asks the entry for its part:

- ChannelGroupAnalysis calls `channels` (the channel rule: create, union, lay side by side, freeze);
- PruneRewrite calls `rewrite_args` (shape literals recomputed from the kept channels),
  `resize_module` (size attributes of a module whose tensors were sliced) and `adjust_tensors`;
- the verifier's masked original calls `reference` where the op is not zero-exact (it reduces over
  channels: the reference is the op over the kept channels);
- the cost model calls `flops`;
- shape propagation calls `meta_shape` to skip a module whose output shape it knows.

Facts a rule learns and a later pass needs (a conv is depthwise, a norm reduces over a channel dim,
attention heads) are frozen dataclasses stored on the node under FACT_KEY, never string keys."""
from __future__ import annotations

from dataclasses import dataclass
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.fx

from fxprune.tracing import torch_layer_type

FACT_KEY = "fxprune.op_fact"


def op_fact(node: torch.fx.Node) -> Any:
    """The fact the channel rule recorded for this node (None if it recorded none)."""
    return node.meta.get(FACT_KEY)


@dataclass(frozen=True)
class OpEntry:
    """What fxprune knows about one op. Only `channels` is required: an op without the others is
    zero-exact under masking, has no shape literals to recompute and costs no FLOPs."""

    name: str
    # (analysis, node) -> the channel map of the node's value
    channels: Callable[[Any, torch.fx.Node], Any]
    # (rewrite, node, new_node) -> None: recompute the shape literals of new_node's arguments
    rewrite_args: Optional[Callable[[Any, torch.fx.Node, torch.fx.Node], None]] = None
    # its arguments may be computed from the size of a channel dim (x.size(1)); rewrite_args replaces them
    accepts_channel_counts: bool = False
    # each output position depends only on the same position of the one tensor operand (constants aside:
    # `1 + weight`, `weight.sigmoid()`), so a parameter computed through it can still be sliced
    positionwise: bool = False
    # (module copy holding the sliced tensors, rewrite, node) -> None: make size attributes agree
    resize_module: Optional[Callable[[torch.nn.Module, Any, torch.fx.Node], None]] = None
    # (rewrite, node, fact, sliced tensors by qualified name) -> None: fix-ups across tensors
    adjust_tensors: Optional[Callable[[Any, torch.fx.Node, Any, Dict[str, torch.Tensor]], None]] = None
    # (masked-original interpreter, node, fact, args, kwargs) -> value: the op over the kept channels
    reference: Optional[Callable[[Any, torch.fx.Node, Any, tuple, dict], Any]] = None
    # (cost context, node) -> [(coef, factors)]: FLOPs as sums of coef * prod(factor sizes)
    flops: Optional[Callable[[Any, torch.fx.Node], list]] = None
    # (node, args, kwargs, the called module or None) -> output value on the meta device, or None to run
    # the op (for layers whose meta kernels cost more than computing the shape: batch_norm on meta
    # costs more than a conv, a conv's meta kernel more than the rest of its node's propagation)
    meta_shape: Optional[Callable[[torch.fx.Node, tuple, dict, Optional[torch.nn.Module]], Any]] = None
    # a module's meta_shape answers every call the module accepts without reading its weights (None
    # only where the module would refuse the input): shape propagation gives it no meta weights, and
    # where it does return None the whole propagation runs on real tensors and names the failing node
    meta_shape_without_weights: bool = False
    # (cost context, node) -> fxprune.latency.LatencyLayer or None: the layer a latency target can time
    # alone at other widths (a latency budget measures a table of it)
    latency_layer: Optional[Callable[[Any, torch.fx.Node], Any]] = None


def same_as_input(node: torch.fx.Node, args: tuple, kwargs: dict, module: Optional[torch.nn.Module]) -> Any:
    """meta_shape of a layer (module) whose output has its input's shape and dtype."""
    if node.op == "call_module" and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return args[0]
    return None


class OpRegistry:
    def __init__(self):
        self.functions: Dict[Any, OpEntry] = {}
        self.methods: Dict[str, OpEntry] = {}
        self.modules: Dict[type, OpEntry] = {}
        self._module_cache: Dict[type, Optional[OpEntry]] = {}
        self._deferred: List[Tuple[str, Dict[str, OpEntry]]] = []

    def register(self, entry: OpEntry, *, functions: Iterable[Any] = (), methods: Iterable[str] = (),
                 modules: Iterable[type] = ()) -> OpEntry:
        for table, keys in ((self.functions, functions), (self.methods, methods), (self.modules, modules)):
            for key in keys:
                if key in table and table[key] is not entry:  # one place per op: a mistake, not an override
                    raise ValueError(f"op {key!r} already has the entry {table[key].name!r}")
                table[key] = entry
        self._module_cache.clear()
        return entry

    def register_from(self, module_name: str, entries: Dict[str, OpEntry]) -> None:
        """Entries for functions of an optional library (torchvision's fx-wrapped helpers), registered
        once that library has been imported by the user's code: fxprune never imports it itself."""
        self._deferred.append((module_name, entries))

    def _resolve_deferred(self) -> None:
        for item in list(self._deferred):
            module_name, entries = item
            library = sys.modules.get(module_name)
            if library is not None:
                self._deferred.remove(item)
                for attr, entry in entries.items():
                    if hasattr(library, attr):
                        self.register(entry, functions=[getattr(library, attr)])

    def for_module_type(self, cls: type) -> Optional[OpEntry]:
        if cls not in self._module_cache:
            self._module_cache[cls] = next((self.modules[c] for c in cls.__mro__ if c in self.modules), None)
        return self._module_cache[cls]

    def lookup(self, node: torch.fx.Node, modules: Dict[str, torch.nn.Module]) -> Optional[OpEntry]:
        """The entry for the op `node` calls, or None when fxprune has no rule for it."""
        if node.op == "call_function":
            try:
                entry = self.functions.get(node.target)
                if entry is None and self._deferred:
                    self._resolve_deferred()
                    entry = self.functions.get(node.target)
                return entry
            except TypeError:  # an unhashable callable
                return None
        if node.op == "call_method":
            return self.methods.get(node.target)
        if node.op == "call_module":
            module = modules[node.target]
            layer = torch_layer_type(module)
            if layer is None:
                return CUSTOMISED_LAYER if self.for_module_type(type(module)) is not None else None
            return self.for_module_type(layer)
        return None


def _customised_layer(analysis, node: torch.fx.Node) -> Any:
    module = analysis.module(node)
    return analysis.opaque(node, f"{type(module).__name__} changes what its torch.nn base class computes (an "
                                 "overridden method, a parametrization or a forward hook); leave it out of "
                                 "leaf_modules so fx traces into it")


# A module whose torch.nn base class has an entry, but which computes something else: frozen.
CUSTOMISED_LAYER = OpEntry("customised torch.nn layer", _customised_layer)

REGISTRY = OpRegistry()
register = REGISTRY.register
