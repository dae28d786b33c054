"""SpaceSearch: allocation by searching a network pruning space (He et al. 2023, reconstructed in
ALGORITHMS.md 3 after RegNet's design-space method) instead of ranking channels globally.

  1. The initial space: one keep ratio per channel group (passes/pruning_space.py), restricted to the
     regime FLOPs in [budget * (1 - band), budget].
  2. Sample n subnetworks there, inherit weights by the importance (L1 by default), evaluate each with
     a cheap proxy (fxprune/proxy_eval.py), in parallel (fxprune/parallel.py).
  3. Bucket them by parameter count; each bucket's FLOPs-to-parameter ratio rho = FLOPs / params
     (the regime fixes FLOPs, so buckets differ in rho); rho* is the ratio of the bucket whose errors
     are lowest (fxprune/space_stats.py).
  4. The refined space: the regime with |rho - rho*| <= delta * rho*. Sample it and evaluate again.
  5. Compare the two populations by their error distribution functions (plain and FLOPs-normalised),
     and return the best subnetwork seen as the plan.

Everything random is seeded; with the same seed a search in one process, in a process pool and under
torchrun gives the same samples and the same errors. Requires: the traced GraphModule, ChannelGroups,
CostModel, scores. Produces: PrunePlan and a SearchResult (JSON, plots)."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from fxprune.search import space_stats
from fxprune.budget import Budget
from fxprune.cost import CostModel
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGroups, PrunePlan
from fxprune.search.parallel import Evaluator, distributed_rank_and_size, evaluate_samples
from .pruning_space import DEFAULT_KEEP_RATIOS, PruningSpace, Regime

log = logging.getLogger("fxprune")


@dataclass
class SpaceSearch:
    """Search settings; pass as compile(..., allocation=fxprune.SpaceSearch(evaluator=...)).

    evaluator(model, seed) -> error: e.g. fxprune.ProxyEvaluator(train, val, steps=...).
    n_samples / n_refined: subnetworks evaluated in the initial / refined space (n_refined None:
        n_samples). band: the regime is FLOPs in [budget * (1 - band), budget].
    keep_ratios: the levels each group's keep ratio may take. n_buckets, statistic: parameter buckets
        and the statistic of their errors that picks rho* ("median", "mean", "min" or a quantile).
    delta: refined space |rho - rho*| <= delta * rho*. workers: evaluation processes on this machine
        (under torchrun, per rank). out_dir: write search.json and the PNG plots there (rank 0).
    seed: sampling and the evaluators' seeds."""

    evaluator: Optional[Evaluator] = None
    n_samples: int = 32
    n_refined: Optional[int] = None
    band: float = 0.04
    keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS
    n_buckets: int = 10
    statistic: Any = "median"
    delta: float = 0.1
    flops_bins: int = 5
    workers: int = 1
    out_dir: Optional[str] = None
    seed: int = 0
    name: str = field(default="search", init=False)

    def __post_init__(self):
        if self.evaluator is None or not callable(self.evaluator):
            raise ConfigError("SpaceSearch needs evaluator=<callable(model, seed) -> error>, e.g. "
                              "fxprune.ProxyEvaluator(train_loader, val_loader, steps=100)")
        if self.n_samples < 4 or (self.n_refined is not None and self.n_refined < 2):
            raise ConfigError("SpaceSearch needs n_samples >= 4 (buckets of the initial space) and n_refined >= 2")
        if not 0.0 <= self.band < 1.0 or self.delta <= 0:
            raise ConfigError(f"SpaceSearch: band must be in [0, 1) and delta > 0, got {self.band}, {self.delta}")

    def bind(self, budget: Budget, round_to: int, min_channels: int, gm: torch.fx.GraphModule) -> "SpaceSearchPass":
        if budget.flops is None or budget.params is not None:
            raise ConfigError("SpaceSearch regimes are FLOPs bands: give a FLOPs budget (a float or "
                              "Budget(flops=...)) without a params constraint")
        return SpaceSearchPass(self, budget.flops, round_to, min_channels, gm)


@dataclass
class SearchResult:
    """Everything a search measured: samples (dicts), rho*, buckets, the EDF comparison, the best."""

    samples: List[Dict[str, Any]]
    regime: Dict[str, Any]
    rho0: float
    rho_star: float
    buckets: List[Dict[str, Any]]
    comparison: Dict[str, Any]
    comparison_normalized: Dict[str, Any]
    best: Dict[str, Any]
    settings: Dict[str, Any]
    seconds: float

    def errors(self, round_name: str) -> np.ndarray:
        return np.array([s["error"] for s in self.samples if s["round"] == round_name])

    def as_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("regime", "rho0", "rho_star", "buckets", "comparison",
                                               "comparison_normalized", "best", "settings", "seconds", "samples")}

    def summary(self) -> Dict[str, Any]:
        """What the pruned model's report keeps: all but the per-sample list."""
        out = self.as_dict()
        out.pop("samples")
        out["n_samples"] = {r: int(sum(s["round"] == r for s in self.samples)) for r in ("initial", "refined")}
        return out

    def write(self, out_dir: str) -> List[str]:
        """search.json (every sample), edf.png (initial vs refined), error_vs_params.png; the paths."""
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "search.json")
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=1)
        paths = [path]
        try:
            from fxprune.search.space_plots import plot_edfs, plot_error_vs_params
        except ImportError:  # pragma: no cover - matplotlib is optional
            return paths
        populations = {r: {"errors": [s["error"] for s in self.samples if s["round"] == r],
                           "flops": [s["flops"] for s in self.samples if s["round"] == r]}
                       for r in ("initial", "refined")}
        try:
            paths.append(plot_edfs(populations, os.path.join(out_dir, "edf.png"),
                                   title=f"pruning space EDFs, FLOPs {self.regime['flops_lo']:.3f}-"
                                         f"{self.regime['flops_hi']:.3f}"))
            paths.append(plot_error_vs_params(self.samples, os.path.join(out_dir, "error_vs_params.png"),
                                              rho_star=self.rho_star, delta=self.settings["delta"]))
        except ImportError as exc:
            log.warning("search plots skipped: %s", exc)
        return paths


class SpaceSearchPass:
    def __init__(self, config: SpaceSearch, flops_budget: float, round_to: int, min_channels: int,
                 gm: torch.fx.GraphModule):
        self.config, self.flops_budget = config, flops_budget
        self.round_to, self.min_channels, self.gm = round_to, min_channels, gm

    def run(self, groups: ChannelGroups, cost: CostModel, scores: np.ndarray) -> PrunePlan:
        from fxprune.passes.rewrite import PruneRewrite
        config, started = self.config, time.perf_counter()
        space = PruningSpace(groups, cost, scores, keep_ratios=config.keep_ratios, round_to=self.round_to,
                             min_channels=self.min_channels)
        regime = Regime(self.flops_budget * (1 - config.band), self.flops_budget)
        rng = np.random.default_rng(config.seed)
        log.info("search: %d groups, regime FLOPs %.3f-%.3f, %d + %d samples", len(space), regime.flops_lo,
                 regime.flops_hi, config.n_samples, config.n_refined or config.n_samples)

        def evaluate_round(name: str, round_index: int, regime: Regime, n: int) -> List[Dict[str, Any]]:
            widths = space.sample_many(n, rng, regime)
            seeds = [int(np.random.SeedSequence([config.seed, round_index, i]).generate_state(1)[0]) for i in range(n)]
            build = lambda i: PruneRewrite(groups, space.plan(widths[i]))(self.gm).graph_module.eval()  # noqa: E731
            errors = evaluate_samples(build, seeds, config.evaluator, workers=config.workers, label=f"search {name}")
            rows = []
            for i, (w, error) in enumerate(zip(widths, errors)):
                flops, params = space.cost_of(w)
                rows.append({"round": name, "index": i, "error": error, "flops": flops, "params": params,
                             "flops_ratio": flops / space.flops0, "params_ratio": params / space.params0,
                             "rho": flops / params, "seed": seeds[i], "widths": space.widths_by_name(w)})
            return rows

        initial = evaluate_round("initial", 0, regime, config.n_samples)
        buckets = space_stats.param_buckets([r["params"] for r in initial], [r["flops"] for r in initial],
                                            [r["error"] for r in initial], n_buckets=config.n_buckets,
                                            statistic=config.statistic)
        rho_star = space_stats.best_ratio(buckets).rho
        rho0 = space.flops0 / space.params0
        log.info("search: rho* = %.4g FLOPs/param (%.3f x the original's %.4g); refining to +-%.0f%%", rho_star,
                 rho_star / rho0, rho0, 100 * config.delta)
        refined = evaluate_round("refined", 1, regime.refined(rho_star, config.delta),
                                 config.n_refined or config.n_samples)

        samples = initial + refined
        e_init, e_ref = [r["error"] for r in initial], [r["error"] for r in refined]
        comparison = space_stats.compare_edfs(e_ref, e_init)
        comparison_normalized = space_stats.compare_edfs(
            e_ref, e_init, space_stats.flops_normalized_weights([r["flops"] for r in refined], config.flops_bins),
            space_stats.flops_normalized_weights([r["flops"] for r in initial], config.flops_bins))
        # how well each space's best could be estimated from this many samples (RegNet's bootstrap)
        comparison["bootstrap_min"] = {"initial": space_stats.bootstrap_min(e_init, seed=config.seed),
                                       "refined": space_stats.bootstrap_min(e_ref, seed=config.seed)}
        best = min(samples, key=lambda r: (r["error"], r["round"] != "refined", r["index"]))
        log.info("search: mean error initial %.4f, refined %.4f; refined EDF %s the initial; best %.4f (%s #%d)",
                 comparison["mean_error_initial"], comparison["mean_error_refined"],
                 "dominates" if comparison["dominates"] else "does not dominate", best["error"], best["round"],
                 best["index"])
        settings = {k: getattr(config, k) for k in ("n_samples", "n_refined", "band", "n_buckets", "statistic",
                                                    "delta", "flops_bins", "workers", "seed")}
        settings["keep_ratios"] = list(config.keep_ratios)
        settings["evaluator"] = config.evaluator.describe() if hasattr(config.evaluator, "describe") \
            else repr(config.evaluator)
        result = SearchResult(samples, regime.as_dict(), rho0, rho_star, [b.as_dict() for b in buckets], comparison,
                              comparison_normalized, best, settings, time.perf_counter() - started)
        if config.out_dir and distributed_rank_and_size()[0] == 0:
            for path in result.write(config.out_dir):
                log.info("search: wrote %s", path)
        self.result = result
        best_widths = [best["widths"][name] for name in space.names]
        return space.plan(best_widths)
