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

import heapq
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from fxprune.budget import LABELS, Budget
from fxprune.cost import CostModel
from fxprune.errors import BudgetError, NoPrunableChannelsError
from fxprune.ir import ChannelGroups, PrunePlan, concatenated_ranges
from .allocation_common import (allowed_kept_counts, budget_slack, group_round_to, normalised_importance,
                                protected_per_group, protected_units, removal_orders, slack_of,
                                within_budget_unpruned)


SHORTFALL_WARNING = 0.02  # warn when the result keeps this much (absolute fraction) less than the budget


# (share of the budgeted cost, group id, units) of the cheapest step that did not fit, computed on demand
SmallestRefused = Callable[[], Optional[Tuple[float, int, int]]]


class GlobalAllocation:
    mutates_input = False

    def __init__(self, budget: Budget, round_to: int = 1, min_channels: int = 1, per_cost: bool = False):
        self.budget, self.round_to, self.min_channels = budget, round_to, min_channels
        self.per_cost = per_cost

    def run(self, groups: ChannelGroups, cost: CostModel, scores: np.ndarray) -> PrunePlan:
        if within_budget_unpruned(groups, cost, self.budget):  # budget 1.0: nothing to remove
            return PrunePlan(np.ones(groups.n_units, dtype=bool))
        norm = normalised_importance(groups, scores)
        unit_cost = cost.unit_cost("params" if set(self.budget.constraints()) == {"params"} else "flops")
        prunable = ~groups.unit_frozen
        if not prunable.any():
            raise NoPrunableChannelsError(_no_prunable_message(groups))
        scale = unit_cost[prunable].mean() or 1.0
        protected = protected_units(groups, norm)
        value = norm / np.maximum(unit_cost / scale, 1e-12) if self.per_cost else norm

        # Each group's units leave in chunks (its removal order cut at the legal kept counts). All
        # chunks of all groups are laid end to end in `units`; chunk c is units[begin[c]:end[c]].
        units_parts, begin, end, chunk_group, chunk_value, offset = [], [], [], [], [], 0
        n_protected = protected_per_group(groups, protected)
        for g, order in zip(groups.groups, removal_orders(groups, protected, norm)):
            counts = allowed_kept_counts(g, int(n_protected[g.id]), group_round_to(groups, g, self.round_to),
                                         self.min_channels)
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
            raise BudgetError(unreachable_message(cost, np.ones(groups.n_units, dtype=bool), self.budget))
        values, begin, end = np.concatenate(chunk_value), np.concatenate(begin), np.concatenate(end)
        sequence = np.lexsort((np.arange(len(values)), values))  # stable: ties keep group order
        chunks = _Chunks(np.concatenate(units_parts), begin[sequence], end[sequence],
                         np.concatenate(chunk_group)[sequence])
        # partial chunks leave the widths round_to="auto" chose; a latency table measured only those
        keep, smallest_refused = _shortest_prefix(chunks, groups.n_units, cost, self.budget,
                                                  partial=self.round_to == "auto" and self.budget.latency is None)
        self._warn_if_short(groups, cost, keep, smallest_refused)
        return PrunePlan(keep)

    def _warn_if_short(self, groups: ChannelGroups, cost: CostModel, keep: np.ndarray, smallest_refused) -> None:
        """The closest result the granularity allows may still be well under the budget (a group whose
        one channel is a large share of a small model): say so, and which step was too big."""
        full = np.ones(groups.n_units, dtype=bool)
        gaps = [(LABELS[name], want, cost.measure(name, keep) / cost.measure(name, full))
                for name, want in self.budget.constraints().items()]
        if min(want - ratio for _, want, ratio in gaps) <= SHORTFALL_WARNING:
            return
        name, want, ratio = min(gaps, key=lambda t: t[1] - t[2])
        message = f"fxprune: kept {ratio:.1%} of the {name} for a budget of {want:.1%}"
        refused = smallest_refused()
        if refused is not None:
            step, gid, n_units = refused
            g = groups.groups[gid]
            message += (f": the smallest step that could come back, {n_units} unit(s) of group {g.name!r} "
                        f"({g.size} units), is {step:.1%} of the {name} and does not fit")
            message += (f". round_to=1 (now {self.round_to!r}) gives one-unit steps" if n_units > 1 else
                        ". One unit of it is that coarse; loosen the budget or accept the result")
        warnings.warn(message, stacklevel=2)


class _Chunks:
    """Chunks in removal order. A group stopped at chunk `stop[group]` removes nothing from there on."""

    def __init__(self, units: np.ndarray, begin: np.ndarray, end: np.ndarray, group: np.ndarray):
        lengths = end - begin
        # the chunks' ranges gathered in removal order
        self.flat, self.ends, self.group = units[concatenated_ranges(begin, lengths)], np.cumsum(lengths), group
        self.chunk_of_flat = np.repeat(np.arange(len(lengths)), lengths)

    def __len__(self) -> int:
        return len(self.ends)

    def units(self, i: int) -> np.ndarray:
        return self.flat[(self.ends[i - 1] if i else 0): self.ends[i]]

    def removal_step(self, n_units: int, stop: np.ndarray) -> np.ndarray:
        """Per unit, the chunk that removes it (len(self) if none does), given `stop`: the units the first
        k chunks remove are those whose step is below k, one comparison per unit (the bisection asks for a
        dozen prefixes per `stop`)."""
        step = np.full(n_units, len(self), dtype=np.int64)
        removed = self.chunk_of_flat < stop[self.group[self.chunk_of_flat]]
        step[self.flat[removed]] = self.chunk_of_flat[removed]
        return step


def _shortest_prefix(chunks: _Chunks, n_units: int, cost: CostModel, budget: Budget,
                     partial: bool = False) -> Tuple[np.ndarray, SmallestRefused]:
    """The first chunks (in removal order) whose removal meets the budget. The last one may be large (a
    ViT residual channel spans every block) and overshoot it by more than 0.5%: then its group stops
    there (its later chunks depend on it) and the prefix grows with the other groups' chunks instead.
    The result closest to the budget then gets back whichever removed chunks still fit (_add_back)."""
    dense = cost.dense()
    stop = np.full(int(chunks.group.max()) + 1, len(chunks))  # no group stopped
    step = chunks.removal_step(n_units, stop)                   # kept up to date with stop

    def keep_after(k: int) -> np.ndarray:
        return step >= k

    def slack(keep: np.ndarray) -> float:
        return slack_of(cost, keep, budget, dense)

    if "latency" in budget.constraints():
        # latency is not monotone along the order (a width off a kernel's channel blocking can cost more
        # than the wider aligned one), so bisection could stop at any of its crossings: the first
        # prefix that fits keeps the most importance
        slacks = []
        for k in range(len(chunks) + 1):
            slacks.append(slack(keep_after(k)))
            if slacks[-1] >= -1e-9:
                return _add_back(chunks, keep_after(k), k, stop, cost, budget, dense, partial)
        raise BudgetError(unreachable_message(cost, keep_after(int(np.argmax(slacks))), budget))
    if slack(keep_after(len(chunks))) < -1e-9:
        raise BudgetError(unreachable_message(cost, keep_after(len(chunks)), budget))
    best, best_slack, lo = None, np.inf, 0
    while True:
        hi = len(chunks)
        if slack(keep_after(hi)) < -1e-9:   # with the stopped groups the budget is out of reach
            break
        while lo < hi:
            mid = (lo + hi) // 2
            if slack(keep_after(mid)) >= -1e-9:
                hi = mid
            else:
                lo = mid + 1
        keep = keep_after(lo)
        keep_slack = slack(keep)
        if keep_slack < best_slack:
            best, best_slack, best_cut = keep, keep_slack, (lo, stop.copy())
        if lo == 0 or best_slack < 0.005:
            break
        stop[chunks.group[lo - 1]] = lo - 1
        step = chunks.removal_step(n_units, stop)
    return _add_back(chunks, best, *best_cut, cost, budget, dense, partial)


def _add_back(chunks: _Chunks, keep: np.ndarray, k: int, stop: np.ndarray, cost: CostModel, budget: Budget,
              dense: Dict[str, float], partial: bool) -> Tuple[np.ndarray, SmallestRefused]:
    """Chunks come off whole, so the cut can leave up to a chunk of the budget unused. Return removed
    chunks while they fit, most valuable first; only a group's last removed chunk may return (its
    order is kept), after which the one before it may. `partial`: then also parts of refused chunks
    (see below). Also returns a function giving the cheapest step that did not fit, as (its share of
    the budgeted cost, group id, units), or None."""
    index = np.arange(k)
    removed = index[index < stop[chunks.group[index]]]
    by_group: Dict[int, List[int]] = {}
    for i, group in zip(removed.tolist(), chunks.group[removed].tolist()):
        by_group.setdefault(group, []).append(i)
    candidates = [-chunks_of[-1] for chunks_of in by_group.values()]  # a max-heap on removal order = value
    heapq.heapify(candidates)
    state, refused_chunks = cost.tracker(keep, budget.constraints()), []
    # latency is not additive: a chunk may not fit alone and yet fit with the chunks removed before it
    # (16 -> 24 channels back on a blocked kernel can cost less than 16 -> 20)
    steps_together = len(chunks) if "latency" in budget.constraints() else 1
    while candidates:
        if steps_together == 1:
            i, units = _first_that_fits(candidates, refused_chunks, chunks, state, budget, dense)
            if i is None:
                continue
            chunks_of, n = by_group[int(chunks.group[i])], 1
        else:
            i = -heapq.heappop(candidates)
            chunks_of = by_group[int(chunks.group[i])]
            for n in range(1, min(steps_together, len(chunks_of)) + 1):
                units = np.concatenate([chunks.units(c) for c in chunks_of[-n:]])
                if budget_slack(budget, state.if_changed(units, kept=True), dense) >= -1e-9:
                    break
            else:
                refused_chunks.append(i)
                continue                     # the group's earlier chunks stay out with it
        state.change(units, kept=True)
        del chunks_of[-n:]
        if chunks_of:
            heapq.heappush(candidates, -chunks_of[-1])
    if partial and budget_slack(budget, state.values, dense) > SHORTFALL_WARNING:
        # round_to="auto" aligns widths where that costs little of the budget; here the steps it
        # makes leave more than SHORTFALL_WARNING unused, so the most valuable units of the refused
        # chunks may come back one at a time (most valuable chunk first)
        for i in sorted(refused_chunks, reverse=True):
            units = chunks.units(i)
            for m in range(len(units) - 1, 0, -1):
                if budget_slack(budget, state.if_changed(units[-m:], kept=True), dense) >= -1e-9:
                    state.change(units[-m:], kept=True)
                    break

    def smallest_refused() -> Optional[Tuple[float, int, int]]:
        """The cheapest step that still does not fit; priced only for the warning, which is rare."""
        refused = None
        for i in refused_chunks:
            units = chunks.units(i)
            units = units[~state.keep[units]][-1:] if partial else units
            if not len(units):
                continue
            values = state.if_changed(units, kept=True)
            if budget_slack(budget, values, dense) >= -1e-9:
                continue
            tightest = min(budget.constraints(), key=lambda m: 1 - values[m] / (budget.constraints()[m] * dense[m]))
            step = (values[tightest] - state.values[tightest]) / dense[tightest]
            if refused is None or step < refused[0]:
                refused = (step, int(chunks.group[i]), len(units))
        return refused
    return state.keep, smallest_refused


# candidates priced together by _first_that_fits: most chunks are refused once the budget is nearly used up,
# and pricing a window costs little more than pricing one; a window stops a long run of acceptances from
# pricing every remaining candidate each time
_PRICING_WINDOW = 16


def _first_that_fits(candidates: List[int], refused_chunks: List[int], chunks: _Chunks, state, budget: Budget,
                     dense: Dict[str, float]) -> Tuple[Optional[int], Optional[np.ndarray]]:
    """Pop candidates (a max-heap of negated chunk indices) in order until one fits the budget once returned,
    with the result of popping and pricing them one at a time: those before it are refused against the same
    state, those after it go back to be priced against the new one. Returns (chunk, its units) or (None, None)."""
    window = [-heapq.heappop(candidates) for _ in range(min(_PRICING_WINDOW, len(candidates)))]
    unit_sets = [chunks.units(i) for i in window]
    for j, values in enumerate(state.if_changed_each(unit_sets, kept=True)):
        if budget_slack(budget, values, dense) >= -1e-9:
            refused_chunks.extend(window[:j])
            for i in window[j + 1:]:
                heapq.heappush(candidates, -i)
            return window[j], unit_sets[j]
    refused_chunks.extend(window)
    return None, None


def unreachable_message(cost: CostModel, keep: np.ndarray, budget: Budget) -> str:
    dense = cost.dense()
    got = ", ".join(f"{LABELS[m]} {cost.measure(m, keep) / dense[m]:.1%}" for m in cost.measures)
    want = ", ".join(f"{LABELS[m]} {v:.1%}" for m, v in budget.constraints().items())
    return (f"budget unreachable: pruning every prunable channel down to min_channels/round_to keeps {got} of the "
            f"original, but the budget asks for {want}. Frozen groups (graph outputs, ignored modules, ops without "
            f"a rule; see fxprune.analyze(...)) keep the rest. Loosen the budget, lower min_channels/round_to, or "
            f"remove entries from ignore.")


def _no_prunable_message(groups: ChannelGroups) -> str:
    return (f"no channel can be pruned: every channel group is frozen (print fxprune.analyze(model, inputs) for "
            f"the full table).\n{groups.explain_frozen()}")
