"""Shared rules of the allocation passes: which kept counts a group may take."""
from __future__ import annotations

from typing import Dict, List, Union

import numpy as np

from fxprune.budget import Budget, auto_step
from fxprune.cost import CostModel
from fxprune.ir import ChannelGroup, ChannelGroups, ChannelMap


RoundTo = Union[int, str]


def group_round_to(groups: ChannelGroups, group: ChannelGroup, round_to: RoundTo) -> int:
    """The step (in units) a group's kept count moves by: round_to itself, or "auto" resolved from the
    group's size and the channels one unit spans."""
    if round_to != "auto":
        return int(round_to)
    return auto_step(group.size, _channels_per_unit(groups, group))


def _channels_per_unit(groups: ChannelGroups, group: ChannelGroup) -> int:
    """Positions one unit of the group spans in a tensor carrying it (a head: its width; a channel: 1)."""
    for node, dim in group.members:
        m = groups.maps.get(node)
        if isinstance(m, ChannelMap) and m.dims[dim] is not None:
            units = groups.units_of(m.dims[dim])
            if not len(units):
                return 1
            distinct = np.count_nonzero(np.bincount(units - units.min()))  # np.unique sorts: 20x slower here
            return max(1, len(units) // distinct)
    return 1


def allowed_kept_counts(group: ChannelGroup, n_frozen: int, round_to: int, min_channels: int) -> List[int]:
    """Kept unit counts a group may take, from its full size down, largest first.

    Multiples of round_to (when the group is at least that large; see group_round_to), never below
    min_channels (nor 1), never below the number of frozen units."""
    size = group.size
    floor = max(min_channels, 1, n_frozen)
    if size <= floor:
        return [size]
    step = round_to if round_to > 1 and size >= round_to else 1
    return [size, *range((size - 1) // step * step, floor - 1, -step)]  # floor >= 1


def normalised_importance(groups: ChannelGroups, scores: np.ndarray) -> np.ndarray:
    """Scores divided by their group's mean, so groups of different scale compare (1 in a group whose
    mean is not positive)."""
    scores = np.asarray(scores, dtype=float)
    n_groups = len(groups.groups)
    totals = np.bincount(groups.unit_group, weights=scores, minlength=n_groups)
    mean = (totals / np.maximum(np.bincount(groups.unit_group, minlength=n_groups), 1))[groups.unit_group]
    positive = mean > 0
    return np.where(positive, scores / np.where(positive, mean, 1.0), 1.0)


def protected_per_group(groups: ChannelGroups, protected: np.ndarray) -> np.ndarray:
    """The number of protected units in each group (by group id)."""
    return np.bincount(groups.unit_group[protected], minlength=len(groups.groups))


def protected_units(groups: ChannelGroups, norm_scores: np.ndarray) -> np.ndarray:
    """Units that must stay so that no tensor dim is pruned to zero width.

    min_channels bounds a group, but one half of a split (ShuffleNet's chunk) or one segment of a
    tensor may hold only some of a group's units; each tracked dim keeps its most important unit."""
    protected = groups.unit_frozen.copy()
    seen_arrays = set()
    for value in groups.maps.values():
        for m in value if isinstance(value, tuple) else (value,):
            if not isinstance(m, ChannelMap):
                continue
            for d in m.tracked():
                if id(m.dims[d]) in seen_arrays:  # elementwise ops pass the same array along
                    continue
                seen_arrays.add(id(m.dims[d]))
                units = groups.units_of(m.dims[d])
                if not protected[units].any():
                    protected[units[np.argmax(norm_scores[units])]] = True
    return protected


def removal_orders(groups: ChannelGroups, protected: np.ndarray, norm_scores: np.ndarray) -> List[np.ndarray]:
    """Each group's removable units (by group id), least important first, ties broken by position.
    Sorted group by group: stable float sorts grow costly with length (one sort of all units was slower)."""
    orders = []
    for g in groups.groups:
        units = g.units[~protected[g.units]]
        orders.append(units[stable_argsort(norm_scores[units])])
    return orders


def stable_argsort(values: np.ndarray) -> np.ndarray:
    """np.argsort(values, kind="stable"). Without ties (or NaNs) every sort gives that permutation, and the
    unstable one is 5x faster on a 3072-wide group (33 against 159 us); with them, the stable sort runs."""
    order = np.argsort(values)
    ordered = values[order]
    if len(values) and (np.isnan(ordered[-1]) or (ordered[1:] == ordered[:-1]).any()):
        return np.argsort(values, kind="stable")
    return order


def meets_budget(cost: CostModel, keep: np.ndarray, budget: Budget, dense: Dict[str, float]) -> bool:
    """Every constraint of the budget holds for this keep vector."""
    return slack_of(cost, keep, budget, dense) >= -1e-9


def slack_of(cost: CostModel, keep: np.ndarray, budget: Budget, dense: Dict[str, float]) -> float:
    """budget_slack of a keep vector, evaluating only the costs the budget constrains."""
    return budget_slack(budget, {name: cost.measure(name, keep) for name in budget.constraints()}, dense)


def budget_slack(budget: Budget, values: Dict[str, float], dense: Dict[str, float]) -> float:
    """How far below the budget (relative) the tightest constraint is; negative when one is exceeded.
    values and dense: each constrained measure of the plan and of the unpruned model."""
    return min([1.0] + [1 - values[name] / (fraction * dense[name])
                        for name, fraction in budget.constraints().items() if dense[name] > 0])


def within_budget_unpruned(groups: ChannelGroups, cost: CostModel, budget: Budget) -> bool:
    """The unpruned model already meets the budget (a budget of 1.0)."""
    return meets_budget(cost, np.ones(groups.n_units, dtype=bool), budget, cost.dense())
