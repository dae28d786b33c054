"""UniformAllocation: the same keep ratio in every prunable group (the least important units leave),
with the ratio found by bisection so the budget is met. Requires/produces as GlobalAllocation."""
from __future__ import annotations

import numpy as np

from fxprune.budget import Budget
from fxprune.cost import CostModel
from fxprune.errors import BudgetError, NoPrunableChannelsError
from fxprune.ir import ChannelGroups, PrunePlan
from .allocation_common import (allowed_kept_counts, group_round_to, meets_budget, normalised_importance,
                                protected_per_group, protected_units, removal_orders, within_budget_unpruned)
from .global_allocation import _no_prunable_message, unreachable_message


class UniformAllocation:
    mutates_input = False

    def __init__(self, budget: Budget, round_to: int = 1, min_channels: int = 1):
        self.budget, self.round_to, self.min_channels = budget, round_to, min_channels

    def run(self, groups: ChannelGroups, cost: CostModel, scores: np.ndarray) -> PrunePlan:
        if within_budget_unpruned(groups, cost, self.budget):  # budget 1.0: nothing to remove
            return PrunePlan(np.ones(groups.n_units, dtype=bool))
        if groups.unit_frozen.all():
            raise NoPrunableChannelsError(_no_prunable_message(groups))
        norm = normalised_importance(groups, scores)
        protected = protected_units(groups, norm)
        orders = removal_orders(groups, protected, norm)
        n_protected = protected_per_group(groups, protected)
        allowed = [allowed_kept_counts(g, int(n_protected[g.id]), group_round_to(groups, g, self.round_to),
                                       self.min_channels)
                   for g in groups.groups]
        full = np.ones(groups.n_units, dtype=bool)
        dense = cost.dense()

        def keep_at(ratio: float) -> np.ndarray:
            keep = full.copy()
            for g, order, counts in zip(groups.groups, orders, allowed):
                want = ratio * g.size
                kept = min(counts, key=lambda c: (abs(c - want), -c))
                keep[order[: g.size - kept]] = False
            return keep

        def meets(keep) -> bool:
            return meets_budget(cost, keep, self.budget, dense)

        if not meets(keep_at(0.0)):
            raise BudgetError(unreachable_message(cost, keep_at(0.0), self.budget))
        lo, hi = 0.0, 1.0  # invariant: keep_at(lo) meets the budget
        for _ in range(40):
            mid = (lo + hi) / 2
            if meets(keep_at(mid)):
                lo = mid
            else:
                hi = mid
        return PrunePlan(keep_at(lo))
