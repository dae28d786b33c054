"""PruningSpace: the population of subnetworks of one model, one keep ratio per channel group, and a
sampler that draws from it inside a pruning regime (a FLOPs band), optionally restricted to a band of
FLOPs-to-parameter ratios (the refined space of Network Pruning Spaces, ALGORITHMS.md 3).

A subnetwork is a vector of kept widths, one per prunable group, each taken from the group's levels:
the keep ratios (0.1, 0.15, ..., 1.0 by default) mapped to the kept counts the group may take
(round_to, min_channels, frozen units; allocation_common.allowed_kept_counts). Which channels stay at a
given width is decided by an importance (L1 by default): the least important leave first, so weights
are inherited exactly as the other allocations do.

Sampling: rejection alone is hopeless in a narrow band (a 4 %-wide band around half the FLOPs of
ResNet-20 accepts about 2 % of uniform draws, fewer as groups multiply). Instead each sample starts
from a uniform draw of levels and is repaired coordinate by coordinate: a random group is set to a
level drawn uniformly among those that put the subnetwork inside the constraints, or, when no level
does, to the level that comes closest. Once inside, `mix_steps` more such coordinate draws (a Gibbs
sweep restricted to the regime) spread the samples over the regime instead of leaving them on its
edge. Every draw is exact: FLOPs and parameters come from the cost model, not an estimate.
Requires: ChannelGroups, CostModel, scores per unit. Produces: widths and PrunePlans (pure numpy)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fxprune.cost import CostModel
from fxprune.errors import BudgetError, ConfigError, NoPrunableChannelsError
from fxprune.ir import ChannelGroups, PrunePlan
from .allocation_common import (allowed_kept_counts, group_round_to, normalised_importance, protected_per_group,
                                protected_units, removal_orders)

DEFAULT_KEEP_RATIOS = tuple(round(0.1 + 0.05 * i, 2) for i in range(19))  # 0.1, 0.15, ..., 1.0


@dataclass(frozen=True)
class Regime:
    """Subnetworks whose FLOPs lie in [flops_lo, flops_hi] (fractions of the original), and, for a refined
    space, whose FLOPs/params ratio rho satisfies |rho - rho_star| <= delta * rho_star."""

    flops_lo: float
    flops_hi: float
    rho_star: Optional[float] = None
    delta: Optional[float] = None

    def __post_init__(self):
        if not 0.0 < self.flops_lo <= self.flops_hi <= 1.0:
            raise ConfigError(f"a FLOPs regime needs 0 < lo <= hi <= 1, got [{self.flops_lo}, {self.flops_hi}]")
        if (self.rho_star is None) != (self.delta is None):
            raise ConfigError("a refined regime needs both rho_star and delta")

    def refined(self, rho_star: float, delta: float) -> "Regime":
        return Regime(self.flops_lo, self.flops_hi, float(rho_star), float(delta))

    def as_dict(self) -> dict:
        return {"flops_lo": self.flops_lo, "flops_hi": self.flops_hi, "rho_star": self.rho_star, "delta": self.delta}


class PruningSpace:
    def __init__(self, groups: ChannelGroups, cost: CostModel, scores: np.ndarray, *,
                 keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS, round_to: int = 1, min_channels: int = 1):
        if not keep_ratios or min(keep_ratios) <= 0 or max(keep_ratios) > 1:
            raise ConfigError(f"keep_ratios must be fractions in (0, 1], got {list(keep_ratios)!r}")
        self.groups, self.cost = groups, cost
        norm = normalised_importance(groups, scores)
        protected = protected_units(groups, norm)
        orders, n_protected = removal_orders(groups, protected, norm), protected_per_group(groups, protected)
        self.dims: List[int] = []                 # group id of each searchable dimension
        self.levels: List[np.ndarray] = []        # kept counts a dimension may take, ascending
        self.orders: List[np.ndarray] = []        # its removable units, least important first
        for g in groups.groups:
            if not g.prunable:
                continue
            counts = allowed_kept_counts(g, int(n_protected[g.id]), group_round_to(groups, g, round_to),
                                         min_channels)
            levels = sorted({min(counts, key=lambda c: (abs(c - r * g.size), -c)) for r in keep_ratios})
            if len(levels) < 2:
                continue                          # nothing to choose: the group stays whole
            self.dims.append(g.id)
            self.levels.append(np.array(levels, dtype=np.int64))
            self.orders.append(orders[g.id])
        if not self.dims:
            raise NoPrunableChannelsError("the pruning space is empty: no channel group can take two widths "
                                          "(every group frozen or too small for round_to/min_channels)")
        full = np.ones(groups.n_units, dtype=bool)
        self.flops0, self.params0 = cost.flops(full), cost.params(full)

    @property
    def names(self) -> List[str]:
        return [self.groups.groups[gid].name for gid in self.dims]

    @property
    def sizes(self) -> List[int]:
        return [self.groups.groups[gid].size for gid in self.dims]

    def __len__(self) -> int:
        return len(self.dims)

    # --- one subnetwork -------------------------------------------------------------------------

    def keep_vector(self, widths: Sequence[int]) -> np.ndarray:
        """Keep flag per unit: each group keeps its `width` most important removable units."""
        keep = np.ones(self.groups.n_units, dtype=bool)
        for gid, order, width in zip(self.dims, self.orders, widths):
            keep[order[: self.groups.groups[gid].size - int(width)]] = False
        return keep

    def plan(self, widths: Sequence[int]) -> PrunePlan:
        return PrunePlan(self.keep_vector(widths))

    def cost_of(self, widths: Sequence[int]) -> Tuple[float, float]:
        """(FLOPs, params) of the subnetwork, absolute."""
        keep = self.keep_vector(widths)
        return self.cost.flops(keep), self.cost.params(keep)

    def widths_by_name(self, widths: Sequence[int]) -> Dict[str, int]:
        return {name: int(w) for name, w in zip(self.names, widths)}

    # --- sampling -------------------------------------------------------------------------------

    def violation(self, flops: float, params: float, regime: Regime) -> float:
        """How far (relative) a subnetwork is outside the regime; 0 inside."""
        f = flops / self.flops0
        out = max(0.0, f - regime.flops_hi) + max(0.0, regime.flops_lo - f)
        if regime.rho_star is not None:
            rho = flops / params if params > 0 else 0.0
            out += max(0.0, abs(rho - regime.rho_star) - regime.delta * regime.rho_star) / regime.rho_star
        return out

    def sample(self, rng: np.random.Generator, regime: Regime, *, mix_steps: Optional[int] = None,
               max_moves: Optional[int] = None, max_restarts: int = 50) -> np.ndarray:
        """Widths of one subnetwork inside `regime` (see the module docstring for the method)."""
        max_moves = max_moves or 20 * len(self)
        mix_steps = len(self) if mix_steps is None else mix_steps
        for _ in range(max_restarts):
            index = np.array([rng.integers(len(levels)) for levels in self.levels])
            for _ in range(max_moves):
                if self._violation_at(index, regime) == 0.0:
                    break
                self._redraw(rng, index, int(rng.integers(len(self))), regime)
            else:
                continue
            for _ in range(mix_steps):                      # wander inside the regime
                self._redraw(rng, index, int(rng.integers(len(self))), regime)
            return self._widths(index)
        raise BudgetError(self._unreachable(regime))

    def sample_many(self, n: int, rng: np.random.Generator, regime: Regime, *, unique: bool = True,
                    **options) -> List[np.ndarray]:
        """n subnetworks inside `regime`, distinct when `unique` (and the space allows it)."""
        samples, seen = [], set()
        for _ in range(20 * n):
            widths = self.sample(rng, regime, **options)
            key = tuple(int(w) for w in widths)
            if unique and key in seen:
                continue
            seen.add(key)
            samples.append(widths)
            if len(samples) == n:
                return samples
        raise BudgetError(f"found only {len(samples)} distinct subnetworks in the regime {regime.as_dict()} "
                          f"after {20 * n} draws; ask for fewer samples, widen the band or use finer keep_ratios")

    def _widths(self, index: np.ndarray) -> np.ndarray:
        return np.array([levels[i] for levels, i in zip(self.levels, index)], dtype=np.int64)

    def _violation_at(self, index: np.ndarray, regime: Regime) -> float:
        return self.violation(*self.cost_of(self._widths(index)), regime)

    def _redraw(self, rng: np.random.Generator, index: np.ndarray, dim: int, regime: Regime) -> None:
        """Set one coordinate to a level drawn uniformly among those inside the regime, or the closest."""
        trial = index.copy()
        violations = np.empty(len(self.levels[dim]))
        for level in range(len(violations)):
            trial[dim] = level
            violations[level] = self._violation_at(trial, regime)
        best = np.flatnonzero(violations <= violations.min() + 1e-12)
        index[dim] = int(rng.choice(best))

    def _unreachable(self, regime: Regime) -> str:
        lowest = self.cost_of([levels[0] for levels in self.levels])[0] / self.flops0
        return (f"no subnetwork found in the regime {regime.as_dict()}: the pruning space spans FLOPs ratios "
                f"{lowest:.3f}..1.000 with keep ratios down to the smallest level; widen the band, lower "
                f"the smallest keep ratio, or (refined space) raise delta")
