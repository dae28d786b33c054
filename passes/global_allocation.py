"""GlobalAllocation: one ranking of channels across all groups, cut where the budget is met.

Each unit's value is its importance normalised within its group (by the group's mean), so groups of
different scale compare. With per_cost=True (allocation "global_per_flop") the value is further divided
by the FLOPs (or params) the unit costs, a knapsack-style greedy that keeps cheap channels; it is not the
default because where importances are nearly flat (random or early weights) cost alone decides and whole
high-resolution layers are cut to a channel or two (resnet50's first stage went from 64 to 1). Units leave in
chunks that keep every group's width legal (round_to, min_channels, frozen units); the chunks are
sorted into one order (each group's own order preserved) and the shortest prefix that meets the
budget is found by bisection on the exact cost model. Requires: ChannelGroups, CostModel, scores. Produces: PrunePlan."""
from __future__ import annotations


import numpy as np

from fxprune.budget import Budget
from fxprune.cost import CostModel
from fxprune.errors import BudgetError, NoPrunableChannelsError
from fxprune.ir import ChannelGroups, PrunePlan
from .allocation_common import (allowed_kept_counts, meets_budget, normalised_importance, protected_units,
                                removal_order, within_budget_unpruned)


class GlobalAllocation:
    mutates_input = False

    def __init__(self, budget: Budget, round_to: int = 1, min_channels: int = 1, per_cost: bool = False):
        self.budget, self.round_to, self.min_channels = budget, round_to, min_channels
        self.per_cost = per_cost

    def run(self, groups: ChannelGroups, cost: CostModel, scores: np.ndarray) -> PrunePlan:
        if within_budget_unpruned(groups, cost, self.budget):  # budget 1.0: nothing to remove
            return PrunePlan(np.ones(groups.n_units, dtype=bool))
        norm = normalised_importance(groups, scores)
        unit_cost = cost.unit_cost("flops" if self.budget.flops is not None else "params")
        prunable = ~groups.unit_frozen
        if not prunable.any():
            raise NoPrunableChannelsError(_no_prunable_message(groups))
        scale = unit_cost[prunable].mean() or 1.0
        protected = protected_units(groups, norm)
        value = norm / np.maximum(unit_cost / scale, 1e-12) if self.per_cost else norm

        # Each group's units leave in chunks (its removal order cut at the legal kept counts). All
        # chunks of all groups are laid end to end in `units`; chunk c is units[begin[c]:end[c]].
        units_parts, begin, end, chunk_group, chunk_value, offset = [], [], [], [], [], 0
        for g in groups.groups:
            order = removal_order(g, protected, norm)
            counts = allowed_kept_counts(g, int(protected[g.units].sum()), self.round_to, self.min_channels)
            ends = g.size - np.asarray(counts[1:], dtype=np.int64)  # units removed after each chunk
            if not len(ends):
                continue
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
            means = np.add.reduceat(value[order], starts) / np.maximum(ends - starts, 1)
            # a group's chunks must leave in its own order: a running max makes their values monotone,
            # so one global sort respects every group's order
            chunk_value.append(np.maximum.accumulate(means))
            units_parts.append(order[: ends[-1]])
            begin.append(offset + starts)
            end.append(offset + ends)
            chunk_group.append(np.full(len(ends), g.id))
            offset += int(ends[-1])
        if not units_parts:
            raise BudgetError(unreachable_message(cost, np.ones(groups.n_units, dtype=bool), self.budget,
                                                  cost.flops(np.ones(groups.n_units, dtype=bool)),
                                                  cost.params(np.ones(groups.n_units, dtype=bool))))
        values, begin, end = np.concatenate(chunk_value), np.concatenate(begin), np.concatenate(end)
        sequence = np.lexsort((np.arange(len(values)), values))  # stable: ties keep group order
        chunks = _Chunks(np.concatenate(units_parts), begin[sequence], end[sequence],
                         np.concatenate(chunk_group)[sequence])
        return PrunePlan(_shortest_prefix(chunks, groups.n_units, cost, self.budget))


class _Chunks:
    """Chunks in removal order; `removed(k)` = the units of the first k, as one index array."""

    def __init__(self, units: np.ndarray, begin: np.ndarray, end: np.ndarray, group: np.ndarray):
        lengths = end - begin
        # the chunks' ranges gathered in removal order (vectorised concatenation of ranges)
        ends_in_order = np.cumsum(lengths)
        index = np.arange(int(ends_in_order[-1])) - np.repeat(ends_in_order - lengths - begin, lengths)
        self.flat, self.ends, self.group = units[index], ends_in_order, group

    def __len__(self) -> int:
        return len(self.ends)

    def removed(self, k: int) -> np.ndarray:
        return self.flat[: self.ends[k - 1]] if k else self.flat[:0]

    def units(self, i: int) -> np.ndarray:
        return self.flat[(self.ends[i - 1] if i else 0): self.ends[i]]


def _shortest_prefix(chunks: _Chunks, n_units: int, cost: CostModel, budget: Budget) -> np.ndarray:
    full = np.ones(n_units, dtype=bool)
    flops0, params0 = cost.flops(full), cost.params(full)

    def keep_after(k: int) -> np.ndarray:
        keep = full.copy()
        keep[chunks.removed(k)] = False
        return keep

    if not meets_budget(cost, keep_after(len(chunks)), budget, flops0, params0):
        raise BudgetError(unreachable_message(cost, keep_after(len(chunks)), budget, flops0, params0))
    lo, hi = 0, len(chunks)
    while lo < hi:
        mid = (lo + hi) // 2
        if meets_budget(cost, keep_after(mid), budget, flops0, params0):
            hi = mid
        else:
            lo = mid + 1
    return _tighten(chunks, lo, keep_after, cost, budget, flops0, params0)


def _tighten(chunks: _Chunks, k: int, keep_after, cost: CostModel, budget: Budget, flops0: float,
             params0: float) -> np.ndarray:
    """The k-th chunk may be large (a ViT residual channel spans every block) and overshoot the
    budget. Retry from the state before it, skipping chunks that would overshoot by more than 0.5%
    (a skipped group stops there, its later chunks depend on it); keep whichever result is closer."""
    best = keep_after(k)
    if k == 0 or _slack(cost, best, budget, flops0, params0) < 0.005:
        return best
    keep, stopped = keep_after(k - 1), set()
    for i in range(k - 1, len(chunks)):
        gid = int(chunks.group[i])
        if gid in stopped:
            continue
        trial = keep.copy()
        trial[chunks.units(i)] = False
        if meets_budget(cost, trial, budget, flops0, params0):
            if _slack(cost, trial, budget, flops0, params0) < 0.005:
                keep = trial
                break
            stopped.add(gid)
        else:
            keep = trial
    if meets_budget(cost, keep, budget, flops0, params0) and \
            _slack(cost, keep, budget, flops0, params0) < _slack(cost, best, budget, flops0, params0):
        return keep
    return best


def _slack(cost: CostModel, keep: np.ndarray, budget: Budget, flops0: float, params0: float) -> float:
    """How far below the budget (relative) the tightest constraint is."""
    slacks = []
    if budget.flops is not None:
        slacks.append(1 - cost.flops(keep) / (budget.flops * flops0))
    if budget.params is not None:
        slacks.append(1 - cost.params(keep) / (budget.params * params0))
    return min(slacks)


def unreachable_message(cost: CostModel, keep: np.ndarray, budget: Budget, flops0: float, params0: float) -> str:
    got = f"FLOPs {cost.flops(keep) / flops0:.1%}, params {cost.params(keep) / params0:.1%}"
    want = ", ".join(f"{k} {v:.1%}" for k, v in (("FLOPs", budget.flops), ("params", budget.params)) if v is not None)
    return (f"budget unreachable: pruning every prunable channel down to min_channels/round_to keeps {got} of the "
            f"original, but the budget asks for {want}. Frozen groups (graph outputs, ignored modules, ops without "
            f"a rule; see fxprune.analyze(...)) keep the rest. Loosen the budget, lower min_channels/round_to, or "
            f"remove entries from ignore.")


def _no_prunable_message(groups: ChannelGroups) -> str:
    return (f"no channel can be pruned: every channel group is frozen (print fxprune.analyze(model, inputs) for "
            f"the full table).\n{groups.explain_frozen()}")
