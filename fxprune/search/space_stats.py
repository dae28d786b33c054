"""Statistics for comparing populations of pruned subnetworks (network pruning spaces, ALGORITHMS.md 3).

A pruning space is judged by the population of subnetworks it yields, not by its single best member, so
everything here works on arrays of per-sample numbers (top-1 error, FLOPs, parameters) and is pure numpy:
the sampler and the search driver own the models, this module only reads their measurements.

Error distribution function (EDF).
    F(e) = sum_i w_i * 1[e_i < e], the weighted fraction of samples with error strictly below e (strict,
    as in the spec). Uniform weights w_i = 1/n give the plain EDF. A space whose EDF lies higher, i.e.
    further left, is better: more of its samples reach any given error. `edf_at` evaluates F on a grid,
    `edf_curve` gives the step points to draw it, and `compare_edfs` measures how two curves differ
    (dominance, the largest shortfall, the signed area between them, the Kolmogorov-Smirnov distance).

Complexity normalisation (RegNet).
    Within a regime the samples still spread over a FLOPs band, and bigger networks tend to have lower
    error, so a space that happens to sample more of the heavy end would look better for the wrong reason.
    `flops_normalized_weights` bins the samples by FLOPs (equal-width bins) and gives every non-empty bin
    the same total weight; those weights in `edf_at` give the complexity-normalised EDF.

FLOPs-to-parameter ratio buckets.
    The paper's abstract (the only verified source) conjectures an optimal "FLOPs-to-parameter-bucket
    ratio" per regime; how it is computed is our reconstruction [U/I], following RegNet's design-space
    analysis: split a regime's samples into parameter buckets (quantile buckets here, so every bucket has
    about the same number of samples), give each bucket rho_k = mean FLOPs / mean params, and take rho* as
    the rho of the bucket whose errors have the best statistic (`param_buckets`, `best_ratio`). The
    refined space keeps the subnetworks with |rho - rho*| <= delta * rho* (`in_refined_space`), and the
    refinement is accepted when its EDF dominates the initial one (`compare_edfs`).

    The default statistic is the median, which is our choice and not the paper's: with ~100 samples and
    ~10 buckets a bucket holds about ten samples, and its minimum is decided by one lucky fine-tuning run,
    so rho* would jump between buckets from seed to seed. The minimum and any quantile remain available.

`bootstrap_min` gives a RegNet-style bootstrap interval for the best error of a population.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "edf_at",
    "edf_curve",
    "flops_normalized_weights",
    "ParamBucket",
    "param_buckets",
    "best_ratio",
    "sample_ratio",
    "in_refined_space",
    "compare_edfs",
    "bootstrap_min",
]

ArrayLike = Union[Sequence[float], np.ndarray]
Statistic = Union[str, float]

_NAMED_STATISTICS = ("min", "mean", "median")


# ---------------------------------------------------------------------------------------------------------
# Input checks: every public function validates here, so a bad array fails with the argument's name instead
# of a numpy broadcasting error three calls later.

def _as_1d(name: str, values: ArrayLike, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got an array of shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: at least one sample is needed")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must be finite, but {name}[{bad}] = {arr[bad]}")
    return arr


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"len({name}) = {n}" for name, n in lengths.items())
        raise ValueError(f"{' and '.join(lengths)} must have the same length, got {described}")


def _normalized_weights(weights: Optional[ArrayLike], n: int, name: str = "weights",
                        errors_name: str = "errors") -> np.ndarray:
    """Weights summing to exactly 1 (uniform when None); negative or all-zero weights are an error."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = _as_1d(name, weights)
    if len(w) != n:
        raise ValueError(f"{errors_name} and {name} must have the same length, "
                         f"got len({errors_name}) = {n} and len({name}) = {len(w)}")
    if np.any(w < 0):
        raise ValueError(f"{name} must be >= 0, but {name}[{int(np.argmin(w))}] = {w.min()}")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"{name} sum to 0: at least one sample needs a positive weight")
    return w / total


def _cumulative(sorted_weights: np.ndarray) -> np.ndarray:
    """Running sum with the last value pinned to exactly 1: the float round-off of a long cumsum would
    otherwise leave the curve at 0.9999999 and break `F(above max) == 1` checks downstream."""
    cum = np.cumsum(sorted_weights)
    cum[-1] = 1.0
    return np.clip(cum, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# EDFs

def edf_at(errors: ArrayLike, grid: ArrayLike, weights: Optional[ArrayLike] = None) -> np.ndarray:
    """The (weighted) EDF F(e) = sum_i w_i 1[e_i < e] at every point of `grid`.

    The inequality is strict, as in the spec, so F(min error) = 0 and a sample only counts at errors above
    its own. Weights default to 1/n; given weights must be >= 0 and are renormalised to sum 1, so
    `flops_normalized_weights` or raw counts can be passed alike. Returns an array of grid's shape.
    """
    e = _as_1d("errors", errors)
    w = _normalized_weights(weights, len(e))
    g = np.asarray(grid, dtype=float)
    order = np.argsort(e, kind="stable")
    sorted_e = e[order]
    # cum[k] = total weight of the k smallest errors; searchsorted(side="left") counts e_i < g exactly.
    cum = np.concatenate([[0.0], _cumulative(w[order])])
    return cum[np.searchsorted(sorted_e, g, side="left")]


def edf_curve(errors: ArrayLike, weights: Optional[ArrayLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Step points for drawing the EDF: x = the sorted distinct errors, y = F just after each x, i.e. the
    cumulative weight of e_i <= x. y is non-decreasing and y[-1] == 1; draw with `step(where="post")`
    from (x[0], 0)."""
    e = _as_1d("errors", errors)
    w = _normalized_weights(weights, len(e))
    x, inverse = np.unique(e, return_inverse=True)
    y = _cumulative(np.bincount(inverse.ravel(), weights=w, minlength=len(x)))
    return x, y


def flops_normalized_weights(flops: ArrayLike, n_bins: int = 5) -> np.ndarray:
    """RegNet's complexity normalisation: per-sample weights that give every FLOPs bin equal total weight.

    Bins are `n_bins` equal-width intervals over [min(flops), max(flops)] (half-open like np.histogram,
    the last one closed); all samples share one bin when every FLOPs value is the same. Each non-empty bin
    gets weight 1/(number of non-empty bins), split equally among its samples, so the weights sum to 1.
    """
    f = _as_1d("flops", flops)
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    lo, hi = f.min(), f.max()
    if hi == lo:
        bins = np.zeros(len(f), dtype=int)
    else:
        bins = np.minimum(np.floor((f - lo) / (hi - lo) * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    n_occupied = int(np.count_nonzero(counts))
    return 1.0 / (n_occupied * counts[bins])


# ---------------------------------------------------------------------------------------------------------
# Parameter buckets and the FLOPs-to-parameter ratio

@dataclass
class ParamBucket:
    """One parameter bucket of a regime's samples.

    rho = mean_flops / mean_params is the bucket's FLOPs-to-parameter ratio (the ratio of the means, not
    the mean of per-sample ratios, following the spec's rho_k = F_R / mean params). error_stat is the
    chosen statistic of the members' errors; members index the input arrays, in ascending params order.
    """

    index: int
    params_lo: float
    params_hi: float
    n: int
    mean_params: float
    mean_flops: float
    rho: float
    error_stat: float
    members: List[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain ints and floats only, so `json.dumps` works without a numpy-aware encoder."""
        return {
            "index": int(self.index),
            "params_lo": float(self.params_lo),
            "params_hi": float(self.params_hi),
            "n": int(self.n),
            "mean_params": float(self.mean_params),
            "mean_flops": float(self.mean_flops),
            "rho": float(self.rho),
            "error_stat": float(self.error_stat),
            "members": [int(i) for i in self.members],
        }


def _statistic_function(statistic: Statistic):
    if isinstance(statistic, str):
        if statistic in _NAMED_STATISTICS:
            return {"min": np.min, "mean": np.mean, "median": np.median}[statistic]
    elif isinstance(statistic, numbers.Real) and not isinstance(statistic, bool) and 0.0 <= statistic <= 1.0:
        q = float(statistic)
        return lambda values: np.quantile(values, q)
    raise ValueError(f"statistic must be one of {', '.join(repr(s) for s in _NAMED_STATISTICS)} "
                     f"or a quantile q in [0, 1], got {statistic!r}")


def param_buckets(params: ArrayLike, flops: ArrayLike, errors: ArrayLike, n_buckets: int = 10,
                  statistic: Statistic = "median", min_per_bucket: int = 3) -> List[ParamBucket]:
    """Split samples into quantile buckets of parameter count and summarise each (see `ParamBucket`).

    Samples are sorted by params (stable, so ties keep input order) and cut into
    min(n_buckets, n // min_per_bucket) contiguous chunks of near-equal size (at least one chunk), so a
    small population is never split into buckets too thin to hold a statistic. statistic is "min",
    "mean", "median" (default; see the module docstring for why) or a quantile q in [0, 1].
    """
    p = _as_1d("params", params)
    f = _as_1d("flops", flops)
    e = _as_1d("errors", errors)
    _check_same_length(params=p, flops=f, errors=e)
    if np.any(p <= 0):
        raise ValueError(f"params must be > 0 (rho = flops / params), but params[{int(np.argmin(p))}] = {p.min()}")
    for name, value in (("n_buckets", n_buckets), ("min_per_bucket", min_per_bucket)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    reduce = _statistic_function(statistic)

    n_chunks = max(1, min(int(n_buckets), len(p) // int(min_per_bucket)))
    order = np.argsort(p, kind="stable")
    buckets = []
    for k, members in enumerate(np.array_split(order, n_chunks)):
        mean_params = float(p[members].mean())
        mean_flops = float(f[members].mean())
        buckets.append(ParamBucket(
            index=k,
            params_lo=float(p[members].min()),
            params_hi=float(p[members].max()),
            n=int(len(members)),
            mean_params=mean_params,
            mean_flops=mean_flops,
            rho=mean_flops / mean_params,
            error_stat=float(reduce(e[members])),
            members=[int(i) for i in members],
        ))
    return buckets


def best_ratio(buckets: Sequence[ParamBucket]) -> ParamBucket:
    """The bucket with the lowest error_stat; rho* is its `.rho`. Ties go to the bucket with more samples
    (its statistic is better supported), then to the lower index, so the choice is deterministic."""
    buckets = list(buckets)
    if not buckets:
        raise ValueError("buckets is empty: param_buckets returns at least one bucket for a non-empty sample")
    return min(buckets, key=lambda b: (b.error_stat, -b.n, b.index))


def sample_ratio(flops: ArrayLike, params: ArrayLike) -> np.ndarray:
    """rho = flops / params per sample, elementwise. Arrays of the same shape, or a scalar with anything."""
    f = np.asarray(flops, dtype=float)
    p = np.asarray(params, dtype=float)
    if f.shape != p.shape and f.ndim > 0 and p.ndim > 0:
        raise ValueError(f"flops and params must have the same shape, got {f.shape} and {p.shape}")
    if np.any(p <= 0):
        raise ValueError("params must be > 0 to form the ratio flops / params")
    return np.asarray(f / p)


def in_refined_space(rho: ArrayLike, rho_star: float, delta: float) -> np.ndarray:
    """Membership of the refined space P*: |rho - rho*| <= delta * rho*, elementwise (boundary included).
    Returns a bool array of rho's shape."""
    if not (np.isfinite(rho_star) and rho_star > 0):
        raise ValueError(f"rho_star must be a positive finite number, got {rho_star!r}")
    if not (np.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}")
    r = np.asarray(rho, dtype=float)
    return np.asarray(np.abs(r - rho_star) <= delta * rho_star)


# ---------------------------------------------------------------------------------------------------------
# Comparing two populations

def compare_edfs(refined_errors: ArrayLike, initial_errors: ArrayLike,
                 refined_weights: Optional[ArrayLike] = None, initial_weights: Optional[ArrayLike] = None,
                 tolerance: float = 0.0) -> dict:
    """How the refined space's EDF compares with the initial one's.

    Both step functions only change at sample errors, so evaluating them on the pooled sorted errors plus
    one point just above the maximum (where both are 1) sees every value they take; the results are exact,
    not sampled. Returns a dict of plain numbers:
      dominates      F_ref >= F_init - tolerance at every grid point (the refinement is accepted)
      max_shortfall  max(F_init - F_ref), clipped at 0: how far the refined curve dips below at worst
      area           integral of (F_ref - F_init) de over the error axis; > 0 means the refined curve lies
                     higher/left. It equals the difference of the (weighted) mean errors, init - ref.
      ks             max |F_ref - F_init|
      mean_error_refined / mean_error_initial      weighted means (the weights given, or uniform)
      median_error_refined / median_error_initial  unweighted medians
      n_refined / n_initial
    """
    e_ref = _as_1d("refined_errors", refined_errors)
    e_init = _as_1d("initial_errors", initial_errors)
    w_ref = _normalized_weights(refined_weights, len(e_ref), "refined_weights", "refined_errors")
    w_init = _normalized_weights(initial_weights, len(e_init), "initial_weights", "initial_errors")
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")

    pooled = np.unique(np.concatenate([e_ref, e_init]))
    grid = np.append(pooled, np.nextafter(pooled[-1], np.inf))
    f_ref = edf_at(e_ref, grid, w_ref)
    f_init = edf_at(e_init, grid, w_init)
    diff = f_ref - f_init
    # With strict inequality F is constant on (g_j, g_{j+1}] and equals its value at g_{j+1} there.
    area = float(np.sum(diff[1:] * np.diff(grid)))
    return {
        "dominates": bool(np.all(diff >= -tolerance)),
        "max_shortfall": float(max(0.0, float(np.max(-diff)))),
        "area": area,
        "ks": float(np.max(np.abs(diff))),
        "mean_error_refined": float(np.dot(w_ref, e_ref)),
        "mean_error_initial": float(np.dot(w_init, e_init)),
        "median_error_refined": float(np.median(e_ref)),
        "median_error_initial": float(np.median(e_init)),
        "n_refined": int(len(e_ref)),
        "n_initial": int(len(e_init)),
    }


def bootstrap_min(errors: ArrayLike, n_boot: int = 1000, seed: int = 0) -> dict:
    """Bootstrap of a population's best (minimum) error, as RegNet does for its best models.

    Resamples the errors with replacement n_boot times and takes each resample's minimum. Returns
    {"min_mean": mean of those minima, "ci95": [2.5th, 97.5th percentile], "observed_min": min(errors),
    "n_boot": n_boot}. Deterministic for a given seed. The interval never reaches below the observed
    minimum: it says how repeatable the best sample is, not where the space's true optimum lies.
    """
    e = _as_1d("errors", errors)
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    minima = np.empty(int(n_boot))
    chunk = max(1, 2_000_000 // len(e))   # bounds the index matrix to ~16 MB for large populations
    for start in range(0, int(n_boot), chunk):
        stop = min(int(n_boot), start + chunk)
        minima[start:stop] = e[rng.integers(0, len(e), size=(stop - start, len(e)))].min(axis=1)
    lo, hi = np.percentile(minima, [2.5, 97.5])
    return {
        "min_mean": float(minima.mean()),
        "ci95": [float(lo), float(hi)],
        "observed_min": float(e.min()),
        "n_boot": int(n_boot),
    }
