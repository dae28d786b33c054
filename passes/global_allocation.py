"""GlobalAllocation: one ranking of channels across all groups, cut where the budget is met.

Each unit's value is its importance normalised within its group divided by the FLOPs (or params)
it costs, so a cheap, important channel outlives an expensive, unimportant one. Units leave in
chunks that keep every group's width legal (round_to, min_channels, frozen units); the chunks are
merged into one order and the shortest prefix that meets the budget is found by bisection on the
exact cost model. Requires: ChannelGroups, CostModel, scores. Produces: PrunePlan."""
from __future__ import annotations

import heapq
from typing import List, Tuple

import numpy as np

from fxprune.budget import Budget
from fxprune.cost import CostModel
from fxprune.errors import BudgetError, NoPrunableChannelsError
from fxprune.ir import ChannelGroups, PrunePlan
from .allocation_common import (allowed_kept_counts, meets_budget, normalised_importance, protected_units,
                                removal_order)


class GlobalAllocation:
    mutates_input = False

    def __init__(self, budget: Budget, round_to: int = 1, min_channels: int = 1):
        self.budget, self.round_to, self.min_channels = budget, round_to, min_channels

    def run(self, groups: ChannelGroups, cost: CostModel, scores: np.ndarray) -> PrunePlan:
        norm = normalised_importance(groups, scores)
        unit_cost = cost.unit_cost("flops" if self.budget.flops is not None else "params")
        prunable = ~groups.unit_frozen
        if not prunable.any():
            raise NoPrunableChannelsError(_no_prunable_message(groups))
        scale = unit_cost[prunable].mean() or 1.0
        protected = protected_units(groups, norm)
        value = norm / np.maximum(unit_cost / scale, 1e-12)

        per_group: List[List[np.ndarray]] = []
        per_group_values: List[np.ndarray] = []
        for g in groups.groups:
            order = removal_order(g, protected, norm)
            counts = allowed_kept_counts(g, int(protected[g.units].sum()), self.round_to, self.min_channels)
            ends = g.size - np.asarray(counts[1:], dtype=np.int64)  # units removed after each chunk
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64) if len(ends) else ends
            per_group.append([order[a:b] for a, b in zip(starts, ends)])
            sums = np.add.reduceat(value[order], starts) if len(starts) else np.zeros(0)
            per_group_values.append(sums / np.maximum(ends - starts, 1))

        # merge the groups' chunk sequences by value, each group keeping its own order
        chunks: List[Tuple[int, np.ndarray]] = []  # (group id, units), in removal order
        heap: List[Tuple[float, int, int]] = [(float(v[0]), gid, 0) for gid, v in enumerate(per_group_values) if len(v)]
        heapq.heapify(heap)
        while heap:
            _, gid, i = heapq.heappop(heap)
            chunks.append((gid, per_group[gid][i]))
            if i + 1 < len(per_group[gid]):
                heapq.heappush(heap, (float(per_group_values[gid][i + 1]), gid, i + 1))
        return PrunePlan(_shortest_prefix(chunks, groups.n_units, cost, self.budget))


def _shortest_prefix(chunks: List[Tuple[int, np.ndarray]], n_units: int, cost: CostModel, budget: Budget) -> np.ndarray:
    full = np.ones(n_units, dtype=bool)
    flops0, params0 = cost.flops(full), cost.params(full)

    def keep_after(k: int) -> np.ndarray:
        keep = full.copy()
        if k:
            keep[np.concatenate([units for _, units in chunks[:k]])] = False
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


def _tighten(chunks, k: int, keep_after, cost: CostModel, budget: Budget, flops0: float, params0: float) -> np.ndarray:
    """The k-th chunk may be large (a ViT residual channel spans every block) and overshoot the
    budget. Retry from the state before it, skipping chunks that would overshoot by more than 0.5%
    (a skipped group stops there, its later chunks depend on it); keep whichever result is closer."""
    best = keep_after(k)
    if k == 0 or _slack(cost, best, budget, flops0, params0) < 0.005:
        return best
    keep, stopped = keep_after(k - 1), set()
    for gid, units in chunks[k - 1:]:
        if gid in stopped:
            continue
        trial = keep.copy()
        trial[units] = False
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
    reasons = []
    for g in groups.groups:
        for r in g.frozen_reasons:
            if r not in reasons:
                reasons.append(r)
    listed = "\n  ".join(reasons[:10])
    return f"no channel can be pruned: every group is frozen. Reasons:\n  {listed}"
