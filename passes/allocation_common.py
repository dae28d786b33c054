"""Shared rules of the allocation passes: which kept counts a group may take."""
from __future__ import annotations

from typing import List

import numpy as np

from fxprune.ir import ChannelGroup, ChannelGroups


def allowed_kept_counts(group: ChannelGroup, n_frozen: int, round_to: int, min_channels: int) -> List[int]:
    """Kept unit counts a group may take, from its full size down, largest first.

    Multiples of round_to (when the group is at least that large), never below min_channels (nor 1),
    never below the number of frozen units."""
    size = group.size
    floor = max(min_channels, 1, n_frozen)
    if size <= floor:
        return [size]
    step = round_to if round_to > 1 and size >= round_to else 1
    counts = [size]
    k = (size - 1) // step * step
    while k >= floor and k > 0:
        counts.append(k)
        k -= step
    return counts


def normalised_importance(groups: ChannelGroups, scores: np.ndarray) -> np.ndarray:
    """Scores divided by their group's mean, so groups of different scale compare."""
    out = np.ones_like(scores, dtype=float)
    for g in groups.groups:
        s = scores[g.units].astype(float)
        mean = s.mean() if len(s) else 0.0
        out[g.units] = s / mean if mean > 0 else 1.0
    return out


def removal_order(groups: ChannelGroups, group: ChannelGroup, norm_scores: np.ndarray) -> np.ndarray:
    """The group's prunable units, least important first (ties broken by position)."""
    units = group.units[~groups.unit_frozen[group.units]]
    return units[np.argsort(norm_scores[units], kind="stable")]
