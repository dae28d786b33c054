"""AOFP's binary filter search (ALGORITHMS.md 1.3 and 1.4): which channels of each group to mask.

AOFP (Ding et al., ICML 2019) prunes while training. For every channel group it keeps a *base mask*
b (the alive channels) and a *search space* S. Every training step it masks a random half R of S on a
separate "score path", and the training loop measures the damage T that masking R does to the next
layer's output (ALGORITHMS.md 1.2; computed elsewhere). T is credited to every channel of R. After H
steps (one "half") the m = |S|/2 channels with the lowest mean damage are either pruned together (if
even the worst of them stays below theta: a "move"), or become the new search space (binary search:
"narrow"), or, when m = 1 and it still fails, the search restarts from all alive channels.

This module is only that bookkeeping, in numpy, so it can be tested against a synthetic damage oracle
and reused by any training loop:

    search = AOFPSearch(sizes=[64, 128], config=AOFPSearchConfig(theta=0.01), seed=0)
    for it in range(n_iters):
        samples = search.sample(it)                  # R per group (None: group not searching)
        score_masks = search.score_masks(samples)    # b with R zeroed, for the score paths
        damages = train_step(search.masks, score_masks)   # one T per group (None where not sampled)
        search.record(samples, damages)
        events = search.step_end(it)                 # moves / narrows / restarts of this step

Deviations from the official code, and the choices this module makes where ALGORITHMS.md is silent,
are marked "[I]" below:

- [I] A channel never sampled in a half gets tau = 999 (treated as important) in *both* variants.
  The TF code gives it tau = 0, which would let an unmeasured channel be pruned; we do not copy that.
- [I] At most `max(min_channels, 1)` channels stay alive per group (the official PyTorch code only
  asserts |S| >= 2). A move that would cross that floor prunes only the lowest-damage channels of K
  that fit. Frozen channels count as alive but are never in S and never pruned.
- [I] A group is *finished* (sample() returns None, no more halves) once it has at most
  `max(min_channels, 1)` alive channels, or fewer than 2 searchable (alive, not frozen) channels:
  with |S| = 1 the half size m = floor(|S|/2) is 0, which the PyTorch code asserts against and the
  TF code skips. Alive channels only ever decrease, so a finished group stays finished.
- [I] Only channels of S are ranked (the PyTorch code sorts all n channels, relying on tau = 999 to
  push the ones outside S to the end; ranking S directly is the same unless a damage exceeds 999).
  Ties are broken by channel index (stable sort), so results do not depend on sort internals.
- [I] Staggered starts use the group's position in the list, start_g = W + idx * floor(H / L)
  (the official code uses the conv index).
- [I] One numpy Generator per group, spawned from one seed, so a run is reproducible and resumable
  (state_dict), and adding steps to one group does not change another group's draws.
- Timing: a half covers H consecutive iterations [half_start, half_start + H - 1]; step_end(it) at
  the last of them decides, and the next half starts at it + 1 (the official code starts the next
  half at the iteration that decides; counting that step once or twice is a one-step difference).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

try:  # the project's error type when it is importable; the bookkeeping itself only needs numpy
    from fxprune.errors import ConfigError as _ErrorBases
    _ERROR_BASES: tuple = (_ErrorBases, ValueError)
except Exception:  # pragma: no cover - standalone use without torch
    _ERROR_BASES = (ValueError,)


class AOFPSearchError(*_ERROR_BASES):  # type: ignore[misc]
    """An invalid AOFP search configuration or state (a ConfigError, and a ValueError for callers
    outside fxprune)."""


#: tau of a channel that was never sampled in a half: "important", so it is never pruned unmeasured.
UNSAMPLED_TAU = 999.0

VARIANTS = ("pytorch", "tf")


@dataclass
class AOFPSearchConfig:
    """Hyperparameters of the per-group search (ALGORITHMS.md 1.3-1.5; defaults = PyTorch VGG/ResNet).

    theta          -- a move happens when the m-th lowest mean damage is < theta ("tf": <= theta).
    iters_per_half -- H, the number of steps of one half.
    warmup_iters   -- W, iterations before the first group starts.
    min_channels   -- never leave a group with fewer alive channels (at least 1 in any case).
    variant        -- "pytorch" (aofp_conv.py) or "tf" (tf_benchmark_version): TF sizes the first half
                      after every (re)start as the power of two nearest |S|/2 and tests <= theta.
    single_dropout -- TF's use_single_dropout: mask one random channel of S per step instead of half.
    """

    theta: float = 0.01
    iters_per_half: int = 1000
    warmup_iters: int = 500
    min_channels: int = 1
    variant: str = "pytorch"
    single_dropout: bool = False

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise AOFPSearchError(f"AOFPSearchConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if not (isinstance(self.iters_per_half, (int, np.integer)) and self.iters_per_half >= 1):
            raise AOFPSearchError(f"AOFPSearchConfig.iters_per_half must be an int >= 1, got {self.iters_per_half!r}")
        if not (isinstance(self.warmup_iters, (int, np.integer)) and self.warmup_iters >= 0):
            raise AOFPSearchError(f"AOFPSearchConfig.warmup_iters must be an int >= 0, got {self.warmup_iters!r}")
        if not (isinstance(self.min_channels, (int, np.integer)) and self.min_channels >= 0):
            raise AOFPSearchError(f"AOFPSearchConfig.min_channels must be an int >= 0, got {self.min_channels!r}")
        if not (isinstance(self.theta, (int, float, np.floating)) and math.isfinite(self.theta)):
            raise AOFPSearchError(f"AOFPSearchConfig.theta must be a finite number, got {self.theta!r}")


def tf_first_half_size(space_size: int, granu: int = 1) -> int:
    """The TF code's `calc_next_half_size`: the first half's size after a (re)start.

    Of the two powers of two (times granu) bracketing |S|/2, the one p whose ratio |S|/p is closer to
    2 (ties go to the larger). E.g. 2 -> 1, 3 -> 2, 6 -> 4, 10 -> 4, 12 -> 8, 16 -> 8. Note that
    "closer in ratio" is not "closer in absolute value": 11 -> 8, although 5.5 is nearer to 4."""
    if granu > space_size:
        granu = 1
    small, large = granu, granu * 2
    while large * 2 <= space_size:
        small *= 2
        large *= 2
    if space_size / small - 2 < 2 - space_size / large:
        return small
    return large


class GroupSearch:
    """The per-group state machine of ALGORITHMS.md 1.3, for one group of n channels (units).

    Attributes:
        alive        -- bool (n,), the base mask b (frozen channels are always alive).
        frozen       -- bool (n,), channels that are never searched nor pruned.
        search_space -- int indices of S, ascending.
        history      -- list of event dicts, one per completed half (see step_end).
        start_iter   -- the first iteration at which this group samples.
        half_start   -- the first iteration of the current half.
    """

    def __init__(self, n: int, start_iter: int, config: AOFPSearchConfig, rng: np.random.Generator,
                 frozen: Optional[np.ndarray] = None, theta_scale: float = 1.0):
        config.validate()
        if not (math.isfinite(theta_scale) and theta_scale > 0):
            raise AOFPSearchError(f"theta_scale must be a positive finite number, got {theta_scale!r}")
        self.theta = config.theta * float(theta_scale)  # this group's move threshold
        n = int(n)
        if n < 0:
            raise AOFPSearchError(f"group size must be >= 0, got {n}")
        self.n = n
        self.config = config
        self.rng = rng
        self.start_iter = int(start_iter)
        if frozen is None:
            self.frozen = np.zeros(n, dtype=bool)
        else:
            self.frozen = np.asarray(frozen, dtype=bool).copy()
            if self.frozen.shape != (n,):
                raise AOFPSearchError(f"frozen mask has shape {self.frozen.shape}, expected ({n},)")
        self.alive = np.ones(n, dtype=bool)
        self.history: List[Dict[str, Any]] = []
        self.half_start = self.start_iter
        self._reset_space()
        self._clear_accumulators()

    # ---------------------------------------------------------------- derived state
    @property
    def floor(self) -> int:
        """The fewest alive channels the group may keep ([I] at least 1: a 0-wide group breaks the net)."""
        return max(int(self.config.min_channels), 1)

    @property
    def searchable(self) -> np.ndarray:
        """Alive channels that may be pruned (bool mask): what S is reset to."""
        return self.alive & ~self.frozen

    @property
    def search_space(self) -> np.ndarray:
        return np.flatnonzero(self._in_space)

    @property
    def finished(self) -> bool:
        """True when nothing can be pruned any more (see the module docstring)."""
        return int(self.alive.sum()) <= self.floor or int(self.searchable.sum()) < 2

    def started(self, it: int) -> bool:
        return it >= self.start_iter

    def half_size(self) -> int:
        """m for the current half: floor(|S|/2); TF's first half after a (re)start: tf_first_half_size."""
        size = int(self._in_space.sum())
        if self.config.variant == "tf" and self._fresh:
            return tf_first_half_size(size)
        return size // 2

    def drop_size(self) -> int:
        """|R| of one step: floor(|S|/2), or 1 with single_dropout (TF's nb_drop, granu = 1)."""
        size = int(self._in_space.sum())
        return min(1, size) if self.config.single_dropout else size // 2

    def tau(self) -> np.ndarray:
        """Mean damage per channel so far in this half, A_j / N_j; UNSAMPLED_TAU where N_j = 0."""
        out = np.full(self.n, UNSAMPLED_TAU, dtype=np.float64)
        seen = self._acc_n > 0
        out[seen] = self._acc_t[seen] / self._acc_n[seen]
        return out

    # ---------------------------------------------------------------- per step
    def sample(self, it: int) -> Optional[np.ndarray]:
        """R for step `it`: floor(|S|/2) indices drawn uniformly without replacement from S, ascending.

        None before the group's start iteration, or once it is finished. Call once per step: each
        call draws from the group's generator."""
        if it < self.start_iter or self.finished:
            return None
        space = self.search_space
        k = self.drop_size()
        if k < 1:  # cannot happen while not finished (|S| >= 2); kept as a guard, not as a path
            return None
        return np.sort(self.rng.choice(space, size=k, replace=False))

    def record(self, sampled: Optional[np.ndarray], t: Optional[float]) -> None:
        """Credit damage t to every sampled channel: A_j += t, N_j += 1.

        A None sample or a None / non-finite t is ignored (a step whose damage was not measured
        should not count as harmless). Only channels still in S are credited, like the official
        `t_related = search_space & ~score_mask`."""
        if sampled is None or t is None:
            return
        t = float(t)
        if not math.isfinite(t):
            return
        idx = np.asarray(sampled, dtype=np.int64).reshape(-1)
        idx = idx[self._in_space[idx]]
        # np.add.at, not fancy-index +=, so a repeated index (never produced by sample) is not lost
        np.add.at(self._acc_t, idx, t)
        np.add.at(self._acc_n, idx, 1)

    def step_end(self, it: int) -> Optional[Dict[str, Any]]:
        """Call after every step. When the current half has run H steps, decide and return the event:

        {"kind": "move" | "narrow" | "restart",
         "pruned": indices pruned by this event (empty unless a move),
         "candidates": K, the m lowest-damage channels of S (ascending indices),
         "tau_max": the m-th lowest mean damage, "size": m, "space_size": |S| of the half,
         "iter": it}
        else None."""
        if it < self.start_iter or self.finished:
            return None
        if it < self.half_start + self.config.iters_per_half - 1:
            return None
        return self._decide(it)

    # ---------------------------------------------------------------- the decision of 1.3
    def _decide(self, it: int) -> Dict[str, Any]:
        cfg = self.config
        space = self.search_space
        m = self.half_size()
        tau_all = self.tau()
        self._clear_accumulators()  # every half measures afresh: the weights changed meanwhile
        tau_space = tau_all[space]
        order = np.argsort(tau_space, kind="stable")
        candidates = space[order[:m]]
        tau_max = float(tau_space[order[m - 1]])
        passed = tau_max <= self.theta if cfg.variant == "tf" else tau_max < self.theta
        pruned = np.zeros(0, dtype=np.int64)
        if passed:
            # A move. Respect the floor: keep only the lowest-damage channels of K that fit.
            room = max(int(self.alive.sum()) - self.floor, 0)
            pruned = np.sort(candidates[:room]).astype(np.int64)
            self.alive[pruned] = False
            kind = "move"
            self._reset_space()
        elif m > 1:
            # Binary search: the m least damaging become S, and the next half halves them again.
            kind = "narrow"
            self._in_space = np.zeros(self.n, dtype=bool)
            self._in_space[candidates] = True
            self._fresh = False
        else:
            # Even the single least damaging channel hurts: start over from all alive channels.
            kind = "restart"
            self._reset_space()
        self.half_start = it + 1
        event = {
            "kind": kind,
            "pruned": pruned,
            "candidates": np.sort(candidates).astype(np.int64),
            "tau_max": tau_max,
            "size": int(m),
            "space_size": int(len(space)),
            "iter": int(it),
        }
        self.history.append(event)
        return event

    def _reset_space(self) -> None:
        self._in_space = self.searchable.copy()
        self._fresh = True  # the TF variant sizes the first half after a (re)start differently

    def _clear_accumulators(self) -> None:
        self._acc_t = np.zeros(self.n, dtype=np.float64)
        self._acc_n = np.zeros(self.n, dtype=np.int64)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume bit-identically (copies; the generator's state included)."""
        return {
            "n": self.n,
            "start_iter": self.start_iter,
            "half_start": self.half_start,
            "alive": self.alive.copy(),
            "frozen": self.frozen.copy(),
            "in_space": self._in_space.copy(),
            "fresh": bool(self._fresh),
            "acc_t": self._acc_t.copy(),
            "acc_n": self._acc_n.copy(),
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        if int(d["n"]) != self.n:
            raise AOFPSearchError(f"state_dict is for a group of {d['n']} channels, this group has {self.n}")
        self.start_iter = int(d["start_iter"])
        self.half_start = int(d["half_start"])
        self.alive = np.asarray(d["alive"], dtype=bool).copy()
        self.frozen = np.asarray(d["frozen"], dtype=bool).copy()
        self._in_space = np.asarray(d["in_space"], dtype=bool).copy()
        self._fresh = bool(d["fresh"])
        self._acc_t = np.asarray(d["acc_t"], dtype=np.float64).copy()
        self._acc_n = np.asarray(d["acc_n"], dtype=np.int64).copy()
        self.rng.bit_generator.state = copy.deepcopy(d["rng"])
        self.history = copy.deepcopy(list(d["history"]))


class AOFPSearch:
    """All groups at once with staggered starts: start_g = W + idx * floor(H / L).

    idx is the group's position in `sizes` and L = len(sizes); staggering spreads the groups' moves
    over the half so that they do not all change the network in the same step (ALGORITHMS.md 1.4).
    Each group has its own Generator spawned from `seed`, so the same seed gives the same run."""

    def __init__(self, sizes: Sequence[int], config: Optional[AOFPSearchConfig] = None, seed: int = 0,
                 frozen: Optional[Sequence[Optional[np.ndarray]]] = None,
                 theta_scale: Optional[Sequence[float]] = None):
        self.config = config if config is not None else AOFPSearchConfig()
        self.config.validate()
        sizes = [int(s) for s in sizes]
        n_groups = len(sizes)
        if frozen is None:
            frozen = [None] * n_groups
        if len(frozen) != n_groups:
            raise AOFPSearchError(f"got {len(frozen)} frozen masks for {n_groups} groups")
        theta_scale = [1.0] * n_groups if theta_scale is None else [float(t) for t in theta_scale]
        if len(theta_scale) != n_groups:
            raise AOFPSearchError(f"got {len(theta_scale)} theta scales for {n_groups} groups")
        self.seed = seed
        stagger = self.config.iters_per_half // n_groups if n_groups else 0
        seeds = np.random.SeedSequence(seed).spawn(n_groups)
        self.groups = [
            GroupSearch(n, self.config.warmup_iters + idx * stagger, self.config,
                        np.random.default_rng(seeds[idx]), frozen[idx], theta_scale[idx])
            for idx, n in enumerate(sizes)
        ]

    @property
    def sizes(self) -> List[int]:
        return [g.n for g in self.groups]

    @property
    def starts(self) -> List[int]:
        return [g.start_iter for g in self.groups]

    @property
    def masks(self) -> List[np.ndarray]:
        """The base masks b (copies): True = alive."""
        return [g.alive.copy() for g in self.groups]

    @property
    def widths(self) -> List[int]:
        return [int(g.alive.sum()) for g in self.groups]

    @property
    def finished(self) -> bool:
        """True once no group can prune any more."""
        return all(g.finished for g in self.groups)

    @property
    def history(self) -> List[Dict[str, Any]]:
        """Every group's events in (iteration, group) order, each with a "group" key."""
        events = [dict(e, group=i) for i, g in enumerate(self.groups) for e in g.history]
        return sorted(events, key=lambda e: (e["iter"], e["group"]))

    def sample(self, it: int) -> List[Optional[np.ndarray]]:
        return [g.sample(it) for g in self.groups]

    def score_masks(self, samples: Sequence[Optional[np.ndarray]]) -> List[np.ndarray]:
        """s_g = b_g with R_g zeroed (ALGORITHMS.md 1.2); b_g itself where R_g is None."""
        self._check_len(samples, "samples")
        out = []
        for g, r in zip(self.groups, samples):
            s = g.alive.copy()
            if r is not None:
                s[np.asarray(r, dtype=np.int64)] = False
            out.append(s)
        return out

    def record(self, samples: Sequence[Optional[np.ndarray]], damages: Sequence[Optional[float]]) -> None:
        """One damage per group; None / nan for groups that were not sampled (ignored)."""
        self._check_len(samples, "samples")
        self._check_len(damages, "damages")
        for g, r, t in zip(self.groups, samples, damages):
            g.record(r, t)

    def step_end(self, it: int) -> List[Dict[str, Any]]:
        """The events of this step, each with a "group" key."""
        events = []
        for i, g in enumerate(self.groups):
            e = g.step_end(it)
            if e is not None:
                events.append(dict(e, group=i))
        return events

    def state_dict(self) -> Dict[str, Any]:
        return {
            "config": asdict(self.config),
            "seed": self.seed,
            "groups": [g.state_dict() for g in self.groups],
        }

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        """Restore a state_dict (the config stays this object's; group sizes must match)."""
        states = d["groups"]
        if [int(s["n"]) for s in states] != self.sizes:
            raise AOFPSearchError(
                f"state_dict group sizes {[int(s['n']) for s in states]} do not match {self.sizes}")
        for g, s in zip(self.groups, states):
            g.load_state_dict(s)

    def _check_len(self, seq: Sequence[Any], what: str) -> None:
        if len(seq) != len(self.groups):
            raise AOFPSearchError(f"got {len(seq)} {what} for {len(self.groups)} groups")
