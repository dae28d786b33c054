"""ChannelGroupAnalysis: which channels must be removed together.

Requires: a traced GraphModule whose nodes carry `fxprune.value` (ShapePropagation).
Produces: ChannelGroups (maps of every node, units, groups, parameter slices), and on nodes whose
rule learnt something later passes need, a typed fact (`fxprune.ops.op_fact(node)`). Does not change
the graph.

How it works: each op's entry in the op registry (fxprune/ops) has a channel rule mapping the
channel maps of its inputs to the channel map of its output; rules create elements (conv/linear
outputs), union them (residual add, shared weights, the contracted dims of a matmul) or lay them side
by side (cat, flatten). This file holds what every rule shares (the element sets, parameter slices,
coupling, freezing) and the dispatch. An op without an entry freezes every channel it touches; it is
never assumed to be elementwise. See fxprune/ir.py for the vocabulary.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx

from fxprune.errors import FxPruneError, UnsupportedModelError, describe_node
from fxprune.ir import (ChannelCount, ChannelGroup, ChannelGroups, ChannelMap, ElementSets, distinct_values,
                        once_per_array)
from fxprune.ops import FACT_KEY, REGISTRY
from fxprune.ops.shape import gathered_dim_source
from fxprune.tracing import TensorSpec, value_spec


class ChannelGroupAnalysis:
    """Analysis pass: channel groups of a traced, shape-propagated GraphModule.

    `ignore`: qualified module names whose output channels must not be pruned."""

    mutates_input = False

    def __init__(self, ignore: Sequence[str] = (), keep_outputs: bool = True):
        self.ignore = set(ignore)
        self.keep_outputs = keep_outputs

    def run(self, gm: torch.fx.GraphModule) -> ChannelGroups:
        for node in gm.graph.nodes:  # facts of an earlier analysis of the same graph must not linger
            node.meta.pop(FACT_KEY, None)
        state = ChannelAnalysis(gm, self.ignore, self.keep_outputs)
        for node in gm.graph.nodes:
            state.visit(node)
        return state.finish()


# Ops between a parameter and the op it broadcasts into that keep each of its positions: the
# parameter is sliced where its value meets channels.
_ONLY_ADD_LEADING_DIMS = frozenset({"expand", "expand_as", "contiguous", "clone", "to", "type_as", "float", "double",
                                    "half"})
_PASS_TO_PARAMETER = _ONLY_ADD_LEADING_DIMS | {"view", "reshape", "unsqueeze", "squeeze"}


def _is_tensor(arg: Any) -> bool:
    return isinstance(arg, torch.fx.Node) and isinstance(value_spec(arg), TensorSpec)


def _target_name(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _dim_before(before, after, d: int, leading_only: bool) -> Optional[int]:
    """The dim of `before` that dim d of `after` came from, when the op only adds leading dims (expand)
    or only adds/removes size-1 dims (a view that broadcasts); None otherwise."""
    if leading_only:
        d_before = d - (after.ndim - before.ndim)
        return d_before if d_before >= 0 else None
    kept_before = [i for i, n in enumerate(before.shape) if n != 1]
    kept_after = [i for i, n in enumerate(after.shape) if n != 1]
    if [before.shape[i] for i in kept_before] != [after.shape[i] for i in kept_after] or d not in kept_after:
        return None
    return kept_before[kept_after.index(d)]


def _tied_names(gm: torch.fx.GraphModule) -> Dict[str, Tuple[str, ...]]:
    """{name: every name of the same tensor} for parameters and buffers reachable under several names."""
    by_tensor: Dict[int, List[str]] = {}
    # one walk of the module tree (named_parameters and named_buffers each walk it through generators)
    for prefix, module in gm.named_modules(remove_duplicate=False):
        for tensors in (module._parameters, module._buffers):
            for local, tensor in tensors.items():
                if tensor is not None:
                    by_tensor.setdefault(id(tensor), []).append(f"{prefix}.{local}" if prefix else local)
    return {name: tuple(names) for names in by_tensor.values() if len(names) > 1 for name in names}


class ChannelAnalysis:
    """The state the channel rules read and write while the analysis walks the graph once."""

    def __init__(self, gm: torch.fx.GraphModule, ignore: set, keep_outputs: bool = True):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ignore, self.keep_outputs = ignore, keep_outputs
        self.es = ElementSets()
        self.maps: Dict[str, Any] = {}
        self.param_slices: Dict[str, Dict[int, np.ndarray]] = {}
        self.blocked_ops: List[str] = []
        self._tied = _tied_names(gm)

    # ----------------------------------------------------------------- what rules use
    def module(self, node: torch.fx.Node) -> torch.nn.Module:
        return self.modules[node.target]

    def map_of(self, arg) -> Any:
        return self.maps.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def tensor_map(self, arg) -> Optional[ChannelMap]:
        m = self.map_of(arg)
        return m if isinstance(m, ChannelMap) else None

    def set_fact(self, node: torch.fx.Node, fact: Any) -> None:
        """Record what the rule learnt for later passes (a frozen dataclass from the op's family)."""
        node.meta[FACT_KEY] = fact

    def record_param(self, name: str, dim: int, elements: np.ndarray) -> None:
        """Parameter `name` is sliced along `dim` by `elements`; a second use (shared weights,
        a module called twice) couples the channels position by position."""
        for alias in self._tied.get(name, (name,)):  # a tied weight (T5's shared embedding) is sliced alike everywhere
            dims = self.param_slices.setdefault(alias, {})
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

    def freeze_channel_counts(self, node: torch.fx.Node) -> None:
        """A channel count read by this node changes its result when pruned: freeze those channels."""
        for arg in node.all_input_nodes:
            value = self.maps.get(arg.name)
            if isinstance(value, ChannelCount) or (isinstance(value, tuple) and any(isinstance(v, ChannelCount) for v in value)):
                self.freeze_value(value, f"channel count read by {describe_node(node)}")

    # ----------------------------------------------------------------- dispatch
    def visit(self, node: torch.fx.Node) -> None:
        try:
            self.maps[node.name] = self._visit(node)
        except FxPruneError:
            raise
        except Exception as exc:  # a rule met a call form it does not expect: a bug to report, not a guess
            raise UnsupportedModelError(
                f"fxprune could not analyse {describe_node(node)}: {type(exc).__name__}: {exc}. This is a bug in "
                f"fxprune's rule for this op (please report it); until it is fixed, pass the module that makes this "
                f"call in leaf_modules= (its channels are then frozen)") from exc

    def _visit(self, node: torch.fx.Node) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return self.untracked_like(value_spec(node))
        if node.op == "output":
            if self.keep_outputs:
                self.freeze_inputs(node, "graph output (the model's outputs keep their size)")
            return None
        entry = REGISTRY.lookup(node, self.modules)
        if entry is None or not entry.accepts_channel_counts:
            self.freeze_channel_counts(node)  # counts may feed only arguments the rewrite recomputes
        result = entry.channels(self, node) if entry is not None else self.opaque(node, _no_rule(node, self.modules))
        if node.op == "call_module" and node.target in self.ignore:
            self.freeze_value(result, f"ignored by the user ({node.target})")
        return result

    # ----------------------------------------------------------------- shared by rules
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
        """A constant operand (a parameter, possibly expanded or reshaped to broadcast, as a layer scale
        `gamma.view(1, -1, 1, 1)`) met a channel dim: slice the parameter."""
        path, node, d = [(arg, dim)], arg, dim
        while node.op in ("call_method", "call_function"):
            if len(node.users) != 1:
                return False
            if _target_name(node) in _PASS_TO_PARAMETER and isinstance(node.args[0], torch.fx.Node):
                source = node.args[0]
                d = _dim_before(value_spec(source), value_spec(node), d,
                                _target_name(node) in _ONLY_ADD_LEADING_DIMS)
            elif node.target is operator.getitem and _is_tensor(node.args[0]):
                source = node.args[0]   # `table[:, idx]`: a position bias gathered from its table
                d = gathered_dim_source(node.args[1], value_spec(source).ndim, d)
            elif self._positionwise_of_one(node):  # `1 + weight` (Gemma's RMSNorm scale)
                source = node.all_input_nodes[0]
            else:
                return False
            if d is None:
                return False
            node = source
            path.append((node, d))
        if node.op != "get_attr" or len(node.users) != 1 or value_spec(node).shape[d] != len(elements):
            return False
        self.record_param(node.target, d, elements)
        for n, nd in path:  # the rewrite recomputes the size literals of these views from their maps
            m = self.maps.get(n.name)
            if isinstance(m, ChannelMap):
                self.maps[n.name] = m.replace(nd, elements)
        return True

    def _positionwise_of_one(self, node: torch.fx.Node) -> bool:
        """node maps each position of its only tensor operand on its own, keeping the shape."""
        entry = REGISTRY.lookup(node, self.modules)
        inputs = node.all_input_nodes
        return entry is not None and entry.positionwise and len(inputs) == 1 and \
            isinstance(value_spec(inputs[0]), TensorSpec) and value_spec(inputs[0]).shape == getattr(value_spec(node), "shape", None)

    # ----------------------------------------------------------------- result
    def finish(self) -> ChannelGroups:
        es = self.es
        n = len(es)
        roots = es.find(np.arange(n, dtype=np.int64))
        # np.unique(roots, return_inverse=True) without its sort: every root is its own root, so the roots
        # are the elements that map to themselves, and a unit's id is its root's rank among them
        is_root = roots == np.arange(n, dtype=np.int64)
        unique_roots = np.flatnonzero(is_root)
        element_unit = (np.cumsum(is_root) - 1)[roots]
        n_units = len(unique_roots)

        # groups: source spaces linked by any coupled element
        n_spaces = len(es.spaces)
        space_parent = list(range(n_spaces))

        def find(s):
            while space_parent[s] != s:
                space_parent[s] = space_parent[space_parent[s]]
                s = space_parent[s]
            return s

        # (space of element, space of its root) pairs, encoded as one integer each for a fast unique; a pair
        # within one space links nothing
        element_space, root_space = es.space_of(np.arange(n)), es.space_of(roots)
        across = element_space != root_space
        codes = np.unique(element_space[across] * n_spaces + root_space[across])
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
            for g in distinct_values(unit_group[units]):
                if reason not in group_reasons[g] and len(group_reasons[g]) < 8:
                    group_reasons[g].append(reason)

        groups: List[ChannelGroup] = []
        # each group's units and spaces in ascending order, from one stable sort rather than a scan per group
        units_by_group = _split_by_label(unit_group, len(group_roots))
        spaces_by_group = _split_by_label(np.asarray(space_group, dtype=np.int64), len(group_roots))
        for gid in range(len(group_roots)):
            spaces = [es.spaces[s].node for s in spaces_by_group[gid].tolist()]
            units = units_by_group[gid]
            groups.append(ChannelGroup(id=gid, name=spaces[0], units=units, spaces=spaces,
                                       frozen_reasons=group_reasons.get(gid, []), n_frozen=int(unit_frozen[units].sum())))
        # elementwise ops and parameters share element arrays
        groups_of = once_per_array(lambda elements: distinct_values(unit_group[element_unit[elements]]))
        for name, value in self.maps.items():
            for m in (value if isinstance(value, tuple) else (value,)):
                if isinstance(m, ChannelMap):
                    for d in m.tracked():
                        for g in groups_of(m.dims[d]):
                            groups[g].members.append((name, d))  # each (node, dim) is visited once
        for pname, dims in self.param_slices.items():
            for d, elements in dims.items():
                for g in groups_of(elements):
                    groups[g].params.append((pname, d))
        return ChannelGroups(maps=self.maps, element_unit=element_unit, unit_group=unit_group, unit_frozen=unit_frozen,
                             groups=groups, param_slices=self.param_slices, elements=es,
                             blocked_ops=self.blocked_ops)


# --------------------------------------------------------------------------- utilities
def _split_by_label(labels: np.ndarray, n_labels: int) -> List[np.ndarray]:
    """[np.nonzero(labels == i)[0] for i in range(n_labels)], in one sort."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels, minlength=n_labels))[:-1]) if n_labels else []


def _carries_channels(value: Any) -> bool:
    if isinstance(value, ChannelMap):
        return value.is_tracked()
    if isinstance(value, ChannelCount):
        return True
    if isinstance(value, (tuple, list)):
        return any(_carries_channels(v) for v in value)
    return False


def _no_rule(node: torch.fx.Node, modules: Dict[str, torch.nn.Module]) -> str:
    if node.op == "call_module":
        return f"no channel rule for module type {type(modules[node.target]).__name__}"
    if node.op == "call_method":
        return f"no channel rule for method .{node.target}()"
    fn = node.target
    return f"no channel rule for function {getattr(fn, '__module__', '')}.{getattr(fn, '__name__', str(fn))}"
