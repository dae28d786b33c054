"""Cost model: FLOPs and parameters of the traced graph as functions of which units are kept.

Convention: FLOPs = 2 x multiply-accumulates of conv, linear, matmul/einsum and attention, the
convention of `torch.utils.flop_counter.FlopCounterMode`; elementwise ops, norms and pooling are not
counted. Params = elements of every nn.Parameter (buffers excluded).

Every cost is a sum of terms `coef * prod(size_i)` where each size is a constant or the number of
kept positions of a channel vector, so the cost of any plan is exact and cheap to evaluate
(allocation evaluates it many times)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.fx

from .fxutil import get_attr
from .ir import ChannelGroups, ChannelMap, concatenated_ranges, once_per_array
from .latency import LatencyModel, TableInterpolator
from .ops import REGISTRY
from .tracing import TensorSpec

Factor = Union[int, np.ndarray]  # a constant size, or the unit of every position of a channel dim


@dataclass
class Term:
    coef: float
    factors: List[Factor]
    node: str


class CostModel:
    """FLOPs and params (and latency, once `add_latency` gave it a LatencyModel) of any keep vector.
    Each is a "measure" by name: "flops", "params", "latency"."""

    def __init__(self, flops_terms: List[Term], param_terms: List[Term], n_units: int):
        self.flops_terms = flops_terms
        self.param_terms = param_terms
        self.n_units = n_units
        self._terms = {"flops": _VectorisedTerms(flops_terms), "params": _VectorisedTerms(param_terms)}
        self._dense: dict = {}
        self.latency_model: Optional[LatencyModel] = None

    def add_latency(self, model: LatencyModel) -> "CostModel":
        """A copy that also prices latency with `model` (the FLOPs and params terms are shared)."""
        new = copy.copy(self)
        new._terms = {**self._terms, "latency": _LatencyTerms(model, self.n_units, self.flops_terms)}
        new._dense, new.latency_model = {}, model
        return new

    @property
    def measures(self) -> Tuple[str, ...]:
        return tuple(self._terms)

    def measure(self, name: str, keep_unit: np.ndarray) -> float:
        if keep_unit.all():  # the dense cost: asked for by every pass and check, computed once
            if name not in self._dense:
                self._dense[name] = self._terms[name](keep_unit)
            return self._dense[name]
        return self._terms[name](keep_unit)

    def dense(self) -> dict:
        full = np.ones(self.n_units, dtype=bool)
        return {name: self.measure(name, full) for name in self._terms}

    def flops(self, keep_unit: np.ndarray) -> float:
        return self.measure("flops", keep_unit)

    def params(self, keep_unit: np.ndarray) -> float:
        return self.measure("params", keep_unit)

    def latency(self, keep_unit: np.ndarray) -> float:
        """Predicted latency on the LatencyModel's target, in the tables' seconds (only ratios to the
        dense value mean anything: the calibration scales everything but the dense model's time)."""
        return self.measure("latency", keep_unit)

    def latency_tables_ratio(self, keep_unit: np.ndarray) -> float:
        """The latency tables' sum at keep_unit over theirs at full width (before calibration)."""
        terms = self._terms["latency"]
        return terms.tables_seconds(terms.sizes_for(keep_unit)) / terms.tables_dense if terms.tables_dense else 1.0

    def tracker(self, keep_unit: np.ndarray, measures: Optional[Iterable[str]] = None) -> "CostTracker":
        """Every measure of `keep_unit` (or those named) kept up to date as units leave or return, each
        change costing time in proportion to the positions it touches (greedy allocation tries thousands
        of changes, and needs only the measures its budget constrains)."""
        return CostTracker(self, keep_unit, measures)

    def unit_cost(self, which: str = "flops") -> np.ndarray:
        """d cost / d unit at full width: what removing one unit alone would save (FLOPs or params;
        latency is priced by FLOPs here)."""
        return self._terms["params" if which == "params" else "flops"].unit_cost(self.n_units)


class _VectorisedTerms:
    """sum_t coef_t * prod_i size_ti in a few numpy calls: allocation evaluates it hundreds of times.

    A channel factor is an array of units, and most are shared: a conv's output units size its FLOPs, its
    weight, its norm's parameters and the next conv's input (on resnet50 the params terms hold 214 channel
    factors, 106,256 positions, but 54 distinct arrays). The distinct arrays are laid end to end in one
    index array; kept counts per array come from one `np.add.reduceat`, each factor (slot) takes its
    array's count, and per-term products come from one `np.multiply.reduceat`."""

    def __init__(self, terms: List[Term]):
        self.coef = np.array([t.coef for t in terms], dtype=np.float64)
        sizes, channel_slots, slot_array, term_starts = [], [], [], []
        arrays: List[np.ndarray] = []
        array_of: Dict[int, int] = {}   # id of a factor -> its distinct array (the terms keep the factors alive)
        for term in terms:
            term_starts.append(len(sizes))
            for f in term.factors or [1]:
                if isinstance(f, int):
                    sizes.append(float(f))
                    continue
                channel_slots.append(len(sizes))
                sizes.append(0.0)
                if id(f) not in array_of:
                    array_of[id(f)] = len(arrays)
                    arrays.append(np.asarray(f, dtype=np.int64))
                slot_array.append(array_of[id(f)])
        self.sizes = np.array(sizes, dtype=np.float64)
        self.channel_slots = np.array(channel_slots, dtype=np.int64)
        self.slot_array = np.array(slot_array, dtype=np.int64)
        self.term_starts = np.array(term_starts, dtype=np.int64)
        self.arrays = arrays
        self.lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self.indices = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.empty = self.lengths == 0

    def sizes_for(self, keep_unit: np.ndarray) -> np.ndarray:
        """Every factor's size under keep_unit (constants as they are, channel factors counted)."""
        sizes = self.sizes.copy()
        if len(self.channel_slots):
            # the cast inside reduceat: half the time of a float copy first (allocation evaluates this often)
            counts = np.add.reduceat(keep_unit[self.indices], self.starts, dtype=np.float64) if len(self.indices) \
                else np.zeros(len(self.arrays))
            counts[self.empty] = 0.0  # reduceat returns the element at a start for empty segments
            sizes[self.channel_slots] = counts[self.slot_array]
        return sizes

    def total(self, sizes: np.ndarray) -> float:
        if not len(self.coef):
            return 0.0
        return float(np.dot(self.coef, np.multiply.reduceat(sizes, self.term_starts)))

    def __call__(self, keep_unit: np.ndarray) -> float:
        return self.total(self.sizes_for(keep_unit)) if len(self.coef) else 0.0

    def unit_cost(self, n_units: int) -> np.ndarray:
        """Per unit, at full width: the sum, over the channel factors holding it, of its term's coef times
        the product of the term's other factors (what removing that unit alone saves)."""
        cost = np.zeros(n_units)
        if not len(self.channel_slots):
            return cost
        sizes = self.sizes_for(np.ones(n_units, dtype=bool))
        term_of_slot = np.repeat(np.arange(len(self.term_starts)), np.diff(np.append(self.term_starts, len(sizes))))
        slot_terms = term_of_slot[self.channel_slots]
        slot_sizes = sizes[self.channel_slots]
        # the product of the other factors is the term's product over this one: both are exact integers
        # (below 2**53), so the quotient is too, and coef multiplies it as it would the product itself
        others = np.multiply.reduceat(sizes, self.term_starts)[slot_terms] / np.where(slot_sizes > 0, slot_sizes, 1)
        per_slot = self.coef[slot_terms] * others
        # slot by slot, each over its array's units (the order of the additions fixes the float sums)
        positions = np.concatenate([self.arrays[a] for a in self.slot_array])
        np.add.at(cost, positions, np.repeat(per_slot, self.lengths[self.slot_array]))
        return cost


class _LatencyTerms(_VectorisedTerms):
    """A LatencyModel over the same slot machinery. One term per timed layer, with factors [in, out],
    is priced by its table; every FLOPs term of an op without a table (attention's q.k^T and .v, a
    matmul between activations) is priced at the seconds per FLOP the tables measured at full width,
    so a plan that removes heads (and their attention) is not mistaken for one that keeps them. The
    sum is then calibrated (see fxprune.latency)."""

    def __init__(self, model: LatencyModel, n_units: int, flops_terms: List[Term]):
        timed = {layer.node for layer in model.layers}
        untimed = [t for t in flops_terms if t.node not in timed]
        self.n_tables = len(model.layers)
        super().__init__([Term(1.0, [layer.in_factor, layer.out_factor], layer.node) for layer in model.layers]
                         + untimed)
        self.model = model
        self.interpolate = TableInterpolator(model.tables)
        full = self.sizes_for(np.ones(n_units, dtype=bool))
        tables_full = self.interpolate(full[self.term_starts[:self.n_tables]], full[self.term_starts[:self.n_tables] + 1])
        timed_flops = _VectorisedTerms([t for t in flops_terms if t.node in timed])(np.ones(n_units, dtype=bool))
        self.coef[self.n_tables:] *= tables_full / timed_flops if timed_flops else 0.0
        self.tables_dense = self.tables_seconds(full)
        model.untimed_share = 1 - tables_full / self.tables_dense if self.tables_dense else 0.0

    def tables_seconds(self, sizes: np.ndarray) -> float:
        """The timed layers' seconds at these counts, plus the untimed ops' (uncalibrated)."""
        starts = self.term_starts[:self.n_tables]
        seconds = self.interpolate(sizes[starts], sizes[starts + 1])
        if len(self.coef) > self.n_tables:
            products = np.multiply.reduceat(sizes, self.term_starts)[self.n_tables:]
            seconds += float(np.dot(self.coef[self.n_tables:], products))
        return seconds

    def total(self, sizes: np.ndarray) -> float:
        """In the tables' seconds at full width: the calibrated ratio (which changes as the model is
        refitted) times a constant, so the dense cost never changes."""
        if not self.tables_dense:
            return 0.0
        return self.tables_dense * (1 - self.model.slope * (1 - self.tables_seconds(sizes) / self.tables_dense))

    def __call__(self, keep_unit: np.ndarray) -> float:
        return self.total(self.sizes_for(keep_unit))


class _TermsState:
    """One _VectorisedTerms evaluated at a keep vector, with the channel counts it was built from, so a
    change of a few units updates the counts and recomputes only the per-term products."""

    def __init__(self, terms: _VectorisedTerms, keep_unit: np.ndarray):
        self.terms = terms
        self.sizes = terms.sizes_for(keep_unit)
        # which distinct array each position belongs to, and the positions of each unit (CSR by unit)
        self.array_of_position = np.repeat(np.arange(len(terms.arrays)), terms.lengths)
        self.positions_by_unit = np.argsort(terms.indices, kind="stable")
        self.unit_ptr = np.concatenate([[0], np.cumsum(np.bincount(terms.indices, minlength=len(keep_unit)))])

    def total(self, sizes: np.ndarray) -> float:
        return self.terms.total(sizes)

    def sizes_after(self, units: np.ndarray, sign: float) -> np.ndarray:
        """Sizes once `units` (each changing state) are added (sign +1) or removed (-1)."""
        return self.sizes_after_each(units, np.zeros(len(units), dtype=np.int64), 1, sign)[0]

    def sizes_after_each(self, units: np.ndarray, owner: np.ndarray, n_sets: int, sign: float) -> np.ndarray:
        """sizes_after of each of n_sets sets of units on its own (a row each), from one count of all their
        positions; `units` (each changing state, none twice in a set) belong to the sets `owner` names."""
        begin = self.unit_ptr[units]
        lengths = self.unit_ptr[units + 1] - begin
        arrays = self.array_of_position[self.positions_by_unit[concatenated_ranges(begin, lengths)]]
        n_arrays = len(self.terms.arrays)
        delta = np.bincount(np.repeat(owner, lengths) * n_arrays + arrays, minlength=n_sets * n_arrays)
        delta = delta.reshape(n_sets, n_arrays).astype(np.float64)
        sizes = np.tile(self.sizes, (n_sets, 1))
        sizes[:, self.terms.channel_slots] += sign * delta[:, self.terms.slot_array]
        return sizes


class CostTracker:
    """Every measure of a keep vector that changes a few units at a time (CostModel.tracker).
    `if_changed` prices a change without making it; `change` makes it. `values[name]` is current."""

    def __init__(self, cost: CostModel, keep_unit: np.ndarray, measures: Optional[Iterable[str]] = None):
        self.keep = keep_unit.copy()
        names = cost.measures if measures is None else tuple(measures)
        self._states = {name: _TermsState(cost._terms[name], self.keep) for name in names}
        self.values = {name: state.total(state.sizes) for name, state in self._states.items()}

    def _changing(self, units: np.ndarray, kept: bool) -> np.ndarray:
        units = np.unique(np.asarray(units, dtype=np.int64))
        return units[self.keep[units] != kept]

    def if_changed(self, units: np.ndarray, kept: bool) -> Dict[str, float]:
        """Every measure were `units` set to kept/removed."""
        return self.if_changed_each([units], kept)[0]

    def if_changed_each(self, unit_sets: List[np.ndarray], kept: bool) -> List[Dict[str, float]]:
        """`if_changed` of each set of units on its own, the same values in one pass over their positions
        (the greedy allocation prices a few dozen candidate chunks against one state)."""
        if not unit_sets:
            return []
        n_units = len(self.keep)
        # each set's distinct units that change state, from one sort of (set, unit) keys
        keys = np.unique(np.concatenate([np.asarray(units, dtype=np.int64) + i * n_units
                                         for i, units in enumerate(unit_sets)]))
        owner, units = np.divmod(keys, n_units)
        changing = self.keep[units] != kept
        owner, units = owner[changing], units[changing]
        sign = 1.0 if kept else -1.0
        values: List[Dict[str, float]] = [{} for _ in unit_sets]
        for name, state in self._states.items():
            for row, sizes in zip(values, state.sizes_after_each(units, owner, len(unit_sets), sign)):
                row[name] = state.total(sizes)
        return values

    def change(self, units: np.ndarray, kept: bool) -> None:
        units = self._changing(units, kept)
        sign = 1.0 if kept else -1.0
        for state in self._states.values():
            state.sizes = state.sizes_after(units, sign)
        self.keep[units] = kept
        self.values = {name: state.total(state.sizes) for name, state in self._states.items()}


class CostContext:
    """What an op's `flops` function reads: factors of weights and tensor dims (a constant size, or the
    unit of every position of a channel dim, so the cost follows the plan)."""

    def __init__(self, gm: torch.fx.GraphModule, groups: ChannelGroups):
        self.gm, self.groups = gm, groups
        # a conv's output channels are also its norm's and its consumers' input channels: one lookup each
        self.units_of = once_per_array(groups.units_of)
        # parameter shapes from one walk of the module tree (get_attr walks a path per call)
        self._shapes = {name: p.shape for name, p in gm.named_parameters(remove_duplicate=False)}

    def dim_factor(self, elements: Optional[np.ndarray], size: int) -> Factor:
        return int(size) if elements is None else self.units_of(elements)

    def weight_factors(self, name: str) -> List[Factor]:
        shape = self._shapes[name] if name in self._shapes else get_attr(self.gm, name).shape
        sliced = self.groups.param_slices.get(name, {})
        return [self.dim_factor(sliced.get(d), s) for d, s in enumerate(shape)]

    def leading_factors(self, node: torch.fx.Node, spec: TensorSpec) -> List[Factor]:
        """A linear layer's output dims before the feature dim (tokens; channels in token mixing)."""
        m = self.groups.maps.get(node.name)
        return [self.dim_factor(m.dims[d] if isinstance(m, ChannelMap) else None, spec.shape[d])
                for d in range(spec.ndim - 1)]


def build_cost_model(gm: torch.fx.GraphModule, groups: ChannelGroups) -> CostModel:
    """FLOPs from each op's registry entry; params from every nn.Parameter."""
    modules = dict(gm.named_modules())
    context = CostContext(gm, groups)
    flops: List[Term] = []
    for node in gm.graph.nodes:
        entry = REGISTRY.lookup(node, modules) if node.op.startswith("call_") else None
        if entry is not None and entry.flops is not None:
            flops.extend(Term(coef, factors, node.name) for coef, factors in entry.flops(context, node))
    param_terms = [Term(1.0, context.weight_factors(name), name) for name, _ in gm.named_parameters()]
    return CostModel(flops, param_terms, groups.n_units)
