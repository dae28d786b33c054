"""The pruning IR.

Vocabulary (used everywhere in fxprune):
- element: one channel position of one *source space* (a conv/linear output, ...). Elements are
  integers; an op that couples two channel positions unions their elements.
- unit: an equivalence class of elements; the atom of pruning. Removing a unit zeroes every tensor
  position that carries one of its elements. (A unit can carry several positions: a ViT residual
  channel is coupled to the same position in every attention head.)
- ChannelMap: for one tensor value, per dim either None (not a channel dim) or a vector of element
  ids, one per position. A position is kept iff its units are kept in every tracked dim.
- ChannelGroup: the units of coupled source spaces (conv3 + downsample + every residual add),
  scored, allocated and reported together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch.fx

from .errors import FxPruneError


class ElementSets:
    """Union-find over channel elements, with each element's source space and freeze records."""

    def __init__(self):
        # the first len(self) entries are in use; the arrays grow by doubling, since copying them whole for
        # every new space is quadratic in the number of spaces
        self._parent = np.zeros(0, dtype=np.int64)
        self._space = np.zeros(0, dtype=np.int64)
        self._n = 0
        self.spaces: List["SourceSpace"] = []
        self._freezes: List[Tuple[np.ndarray, str]] = []

    def __len__(self) -> int:
        return self._n

    def new_space(self, node: torch.fx.Node, size: int, what: str) -> np.ndarray:
        start, end = self._n, self._n + size
        if end > len(self._parent):
            capacity = max(end, 2 * len(self._parent))
            self._parent = np.concatenate([self._parent[:start], np.zeros(capacity - start, dtype=np.int64)])
            self._space = np.concatenate([self._space[:start], np.zeros(capacity - start, dtype=np.int64)])
        ids = np.arange(start, end, dtype=np.int64)
        self._parent[start:end] = ids
        self._space[start:end] = len(self.spaces)
        self._n = end
        self.spaces.append(SourceSpace(node.name, what, size))
        return ids

    def find(self, elements: np.ndarray) -> np.ndarray:
        elements = np.asarray(elements, dtype=np.int64)
        roots = elements
        while True:
            up = self._parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self._parent[elements] = roots  # path compression for the queried elements
        return roots

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union a[i] with b[i] for every i (vectorised: link larger roots to smaller ones until done)."""
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:  # a rule coupled dims of different sizes: a bug in that rule
            raise FxPruneError(f"fxprune internal error: coupling channel dims of sizes {a.shape} and {b.shape}")
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            # parent always points to a smaller id, so no cycle can form; when a root appears in
            # several pairs only one link is written now and the others are made next round
            ra, rb = ra[differ], rb[differ]
            self._parent[np.maximum(ra, rb)] = np.minimum(ra, rb)

    def union_all(self, elements: np.ndarray) -> None:
        elements = np.asarray(elements).reshape(-1)
        if elements.size > 1:
            self.union(elements[1:], np.full(elements.size - 1, elements[0]))

    def freeze(self, elements: np.ndarray, reason: str) -> None:
        elements = np.asarray(elements).reshape(-1)
        if elements.size:
            self._freezes.append((elements, reason))

    def freeze_records(self) -> List[Tuple[np.ndarray, str]]:
        return list(self._freezes)

    def space_of(self, elements: np.ndarray) -> np.ndarray:
        return self._space[np.asarray(elements, dtype=np.int64)]


@dataclass(frozen=True)
class SourceSpace:
    node: str
    what: str
    size: int


@dataclass(frozen=True, eq=False)
class ChannelMap:
    """Per dim of one tensor: None, or the element id at each position of that dim."""

    dims: Tuple[Optional[np.ndarray], ...]

    @staticmethod
    def untracked(ndim: int) -> "ChannelMap":
        return ChannelMap((None,) * ndim)

    @staticmethod
    def single(ndim: int, dim: int, elements: np.ndarray) -> "ChannelMap":
        dims = [None] * ndim
        dims[dim] = np.asarray(elements, dtype=np.int64)
        return ChannelMap(tuple(dims))

    @property
    def ndim(self) -> int:
        return len(self.dims)

    def tracked(self) -> List[int]:
        return [d for d, e in enumerate(self.dims) if e is not None]

    def is_tracked(self) -> bool:
        return any(e is not None for e in self.dims)

    def replace(self, dim: int, elements: Optional[np.ndarray]) -> "ChannelMap":
        dims = list(self.dims)
        dims[dim] = elements
        return ChannelMap(tuple(dims))

    def all_elements(self) -> np.ndarray:
        parts = [e for e in self.dims if e is not None]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class ChannelCount:
    """The value of `x.size(d)` (or arithmetic on it) where dim d carries channels: it changes
    when those channels are pruned, so it may only feed shape arguments the rewrite recomputes."""

    def __init__(self, elements: np.ndarray):
        self.elements = elements


@dataclass(frozen=True)
class ParamSlice:
    """Parameter or buffer `name` (qualified, as in named_parameters) is sliced along `dim` by `elements`."""

    name: str
    dim: int
    elements: np.ndarray = field(compare=False, repr=False)


@dataclass
class ChannelGroup:
    """Coupled channels: scored, allocated and reported together."""

    id: int
    name: str
    units: np.ndarray  # unit indices (into ChannelGroups.unit_* arrays)
    spaces: List[str]  # producing nodes of the coupled source spaces
    members: List[Tuple[str, int]] = field(default_factory=list)  # (node, dim) carrying these channels
    params: List[Tuple[str, int]] = field(default_factory=list)  # (param name, dim) sliced by these channels
    frozen_reasons: List[str] = field(default_factory=list)
    n_frozen: int = 0

    @property
    def size(self) -> int:
        return int(len(self.units))

    @property
    def prunable(self) -> bool:
        return self.n_frozen < self.size


def distinct_values(values: np.ndarray) -> List[int]:
    """np.unique(values).tolist(), fast for the common case of a single value."""
    if len(values) and (values == values[0]).all():
        return [int(values[0])]
    return np.unique(values).tolist()


def concatenated_ranges(begin: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(b, b + n) for b, n in zip(begin, lengths)]), in a few numpy calls."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - lengths - begin, lengths)


def once_per_array(fn: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], Any]:
    """fn memoised on the identity of its array argument: the analysis shares one elements array among
    every value and parameter dim that carries the same channels. Each entry holds its array, so an id
    is never reused while the cache lives."""
    cache: Dict[int, Tuple[np.ndarray, Any]] = {}

    def cached(array: np.ndarray) -> Any:
        if id(array) not in cache:
            cache[id(array)] = (array, fn(array))
        return cache[id(array)][1]
    return cached


@dataclass
class ChannelGroups:
    """Result of ChannelGroupAnalysis: maps of every node, units, groups and parameter slices."""

    maps: Dict[str, object]  # node name -> ChannelMap | tuple | None
    element_unit: np.ndarray  # element id -> unit index
    unit_group: np.ndarray  # unit index -> group id
    unit_frozen: np.ndarray  # bool per unit
    groups: List[ChannelGroup]
    param_slices: Dict[str, Dict[int, np.ndarray]]  # param name -> dim -> elements
    elements: ElementSets
    # every op the analysis could not follow ("%node (op) at line: why"), including those that froze
    # nothing because no tracked channels reached them (a conv whose weight is computed makes no group)
    blocked_ops: List[str] = field(default_factory=list)

    @property
    def n_units(self) -> int:
        return len(self.unit_group)

    def units_of(self, elements: np.ndarray) -> np.ndarray:
        return self.element_unit[np.asarray(elements, dtype=np.int64)]

    def kept_positions(self, elements: Optional[np.ndarray], keep_unit: np.ndarray) -> Optional[np.ndarray]:
        """Indices along a dim that survive, given a keep flag per unit (None: dim not tracked)."""
        if elements is None:
            return None
        return np.nonzero(keep_unit[self.units_of(elements)])[0]

    def kept_lookup(self, keep_unit: np.ndarray) -> Callable[[Optional[np.ndarray]], Optional[np.ndarray]]:
        """`kept_positions` for one keep vector (which must not change while the lookup is used),
        computed once per elements array."""
        kept = once_per_array(lambda elements: self.kept_positions(elements, keep_unit))
        return lambda elements: None if elements is None else kept(elements)

    def table(self) -> str:
        """A readable table of the groups."""
        rows = [("group", "size", "frozen", "spaces", "status")]
        for g in self.groups:
            status = "prunable" if g.prunable else "blocked: " + "; ".join(g.frozen_reasons[:2])
            if g.prunable and g.n_frozen:
                status = f"prunable ({g.n_frozen} frozen: {'; '.join(g.frozen_reasons[:1])})"
            spaces = ", ".join(g.spaces[:3]) + (f" +{len(g.spaces) - 3}" if len(g.spaces) > 3 else "")
            rows.append((str(g.id), str(g.size), str(g.n_frozen), spaces, status))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        n_prunable = sum(g.prunable for g in self.groups)
        lines.append(f"{len(self.groups)} groups, {n_prunable} prunable, {self.n_units} channel units")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def explain_frozen(self, limit: int = 10) -> str:
        """Why channels cannot be pruned: each frozen group with what froze it, then the ops the
        analysis could not follow (they may explain why a layer makes no group at all)."""
        lines = []
        frozen = [g for g in self.groups if not g.prunable]
        for g in frozen[:limit]:
            lines.append(f"  group {g.id} ({g.name}, {g.size} channels): {'; '.join(g.frozen_reasons[:3]) or 'frozen'}")
        if len(frozen) > limit:
            lines.append(f"  ... and {len(frozen) - limit} more frozen groups")
        mentioned = " ".join(r for g in self.groups for r in g.frozen_reasons)
        unexplained = [b for b in self.blocked_ops if b.split(":")[0] not in mentioned]
        if unexplained:
            lines.append("ops fxprune has no rule for (no channels are tracked through them, so the layers around "
                         "them make no prunable group):")
            lines.extend(f"  {b}" for b in unexplained[:limit])
            if len(unexplained) > limit:
                lines.append(f"  ... and {len(unexplained) - limit} more")
        return "\n".join(lines)


@dataclass
class PrunePlan:
    """Which units are kept; produced by an allocation pass, consumed by the rewrite."""

    keep_unit: np.ndarray  # bool per unit

    def kept_in_group(self, groups: ChannelGroups, group: ChannelGroup) -> int:
        return int(self.keep_unit[group.units].sum())
