"""The pass contract: what every step of `compile` reads, what it produces, and the checks between steps.

A pass is an object with a `name`, the `requires` and `produces` fields of CompileState it reads and
writes, and `run(state) -> state`. The state travels explicitly (never a global): each pass returns a
new CompileState. `run_passes` runs a list of passes in order; before a pass it checks that what the
pass requires was produced, after it that what it promised is there, and, when FXPRUNE_VERIFY=1 (the
test suite sets it), that the state is well formed: the graphs lint, an analysis pass left the graph as
it found it, group sizes agree with the weights, scores are finite and one per unit, the plan keeps
every frozen unit and leaves no tensor dim empty. A failed check names the pass and the passes before it.

The passes themselves (Trace, AnalyseChannels, ...) are thin: each wraps the component that does the
work (ChannelGroupAnalysis, an Importance, an allocation, PruneRewrite, verify_pruned)."""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx

from .budget import LABELS, Budget
from .cost import CostContext, CostModel, build_cost_model
from .errors import BudgetError, FxPruneError, PassCheckError
from .importance import Importance, ImportanceData
from .ir import ChannelGroups, ChannelMap, PrunePlan
from .shape_prop import propagate_shapes
from .tracing import trace_model
from .latency import build_latency_model
from .verify import check_graph, check_groups, debug_checks_enabled, graph_fingerprint, verify_pruned


log = logging.getLogger("fxprune")

# MeetMeasuredLatency: how close (relative to the budget) a measured latency ratio must come, and how
# many times the allocation is refitted and redone to get there
LATENCY_TOLERANCE, LATENCY_ROUNDS = 0.025, 3


@dataclass(frozen=True)
class CompileState:
    """Everything the passes of one compile read and write; each pass returns a new one."""

    inputs: Tuple[Any, ...]
    model: Optional[torch.nn.Module] = None            # the private copy that is traced
    gm: Optional[torch.fx.GraphModule] = None           # the traced graph, every node with its shape
    groups: Optional[ChannelGroups] = None              # the channel groups (the pruning IR)
    cost: Optional[CostModel] = None                    # FLOPs and params as functions of the kept units
    scores: Optional[np.ndarray] = None                 # importance of every unit
    plan: Optional[PrunePlan] = None                    # which units stay
    pruned: Optional[torch.fx.GraphModule] = None       # the new, smaller GraphModule
    verification: Optional[Dict[str, Any]] = None       # pruned == masked original, in float64
    output_shifts: Optional[Dict[str, torch.Tensor]] = None  # bias compensation added, by module (float64)
    results: Dict[str, Any] = field(default_factory=dict)   # JSON-able results for the report, by pass
    seconds: Dict[str, float] = field(default_factory=dict)  # wall time of every pass


class CompilerPass:
    """Base of the pipeline's passes. `changes_graph`: False for passes that only read `gm` (checked)."""

    name = "pass"
    requires: Tuple[str, ...] = ()
    produces: Tuple[str, ...] = ()
    changes_graph = False

    def run(self, state: CompileState) -> CompileState:  # pragma: no cover - every pass overrides it
        raise NotImplementedError


def run_passes(passes: Sequence[CompilerPass], state: CompileState, checks: Optional[bool] = None) -> CompileState:
    """Run `passes` in order on `state`; see the module docstring for the checks."""
    checks = debug_checks_enabled() if checks is None else checks
    done: List[str] = []
    for p in passes:
        missing = [f for f in p.requires if getattr(state, f) is None]
        if missing:
            raise PassCheckError(f"pass {p.name} requires {', '.join(missing)}, which no pass before it produced "
                                 f"(passes run: {', '.join(done) or 'none'})")
        before = graph_fingerprint(state.gm) if checks and state.gm is not None and not p.changes_graph else None
        start = time.perf_counter()
        state = p.run(state)
        state = dataclasses.replace(state, seconds={**state.seconds, p.name: time.perf_counter() - start})
        missing = [f for f in p.produces if getattr(state, f) is None]
        if missing:
            raise PassCheckError(f"pass {p.name} did not produce {', '.join(missing)} (passes run before it: "
                                 f"{', '.join(done) or 'none'})")
        if checks:
            try:
                check_state(state, before)
            except FxPruneError as exc:
                raise PassCheckError(f"well-formedness check failed after pass {p.name} (passes run before it: "
                                     f"{', '.join(done) or 'none'}): {exc}") from exc
        done.append(p.name)
    return state


def check_state(state: CompileState, fingerprint_before: Optional[str] = None) -> None:
    """The invariants every state between passes satisfies; raises FxPruneError naming the first broken one."""
    for gm, what in ((state.gm, "the traced graph"), (state.pruned, "the pruned graph")):
        if gm is not None:
            check_graph(gm, what)
    if fingerprint_before is not None and graph_fingerprint(state.gm) != fingerprint_before:
        raise FxPruneError("an analysis pass modified the traced graph")
    if state.groups is not None and state.gm is not None:
        check_groups(state.gm, state.groups)
    n_units = state.groups.n_units if state.groups is not None else None
    if state.scores is not None:
        scores = np.asarray(state.scores)
        if scores.shape != (n_units,):
            raise FxPruneError(f"scores have shape {scores.shape}, expected one per unit ({n_units})")
        if not np.isfinite(scores).all():
            raise FxPruneError(f"{int((~np.isfinite(scores)).sum())} scores are not finite")
    if state.plan is not None:
        check_plan(state.plan, state.groups)


def check_plan(plan: PrunePlan, groups: ChannelGroups) -> None:
    keep = plan.keep_unit
    if keep.shape != (groups.n_units,) or keep.dtype != bool:
        raise FxPruneError(f"the plan has {keep.shape} {keep.dtype} keep flags, expected one bool per unit")
    dropped_frozen = np.nonzero(groups.unit_frozen & ~keep)[0]
    if len(dropped_frozen):
        raise FxPruneError(f"the plan removes {len(dropped_frozen)} frozen unit(s), e.g. unit {dropped_frozen[0]}")
    for name, value in groups.maps.items():
        for m in value if isinstance(value, tuple) else (value,):
            if isinstance(m, ChannelMap):
                for d in m.tracked():
                    if len(m.dims[d]) and not keep[groups.units_of(m.dims[d])].any():
                        raise FxPruneError(f"the plan removes every channel of %{name} dim {d}")


# ------------------------------------------------------------------------------------------- passes
class Trace(CompilerPass):
    """torch.fx graph of the private copy's forward, with every node's shape on the example inputs."""

    name, requires, produces, changes_graph = "trace", ("model",), ("gm",), True

    def __init__(self, leaf_modules: Sequence[Any] = ()):
        self.leaf_modules = leaf_modules

    def run(self, state: CompileState) -> CompileState:
        gm = trace_model(state.model, self.leaf_modules, example_inputs=state.inputs)
        propagate_shapes(gm, state.inputs)
        return dataclasses.replace(state, gm=gm)


class AnalyseChannels(CompilerPass):
    """ChannelGroupAnalysis: which channels must be removed together."""

    name, requires, produces = "analyse_channels", ("gm",), ("groups",)

    def __init__(self, ignore_names: Sequence[str] = (), keep_outputs: bool = True):
        self.ignore_names, self.keep_outputs = ignore_names, keep_outputs

    def run(self, state: CompileState) -> CompileState:
        from fxprune.passes.dependency import ChannelGroupAnalysis
        analysis = ChannelGroupAnalysis(self.ignore_names, self.keep_outputs)
        return dataclasses.replace(state, groups=analysis.run(state.gm))


class CountCost(CompilerPass):
    """The cost model: FLOPs and parameters as exact functions of the kept units."""

    name, requires, produces = "count_cost", ("gm", "groups"), ("cost",)

    def run(self, state: CompileState) -> CompileState:
        return dataclasses.replace(state, cost=build_cost_model(state.gm, state.groups))


class MeasureLatency(CompilerPass):
    """Latency tables of every conv and linear layer on the budget's target (from its disk cache where
    measured before): the cost model then also prices latency (fxprune/latency.py)."""

    name, requires, produces = "measure_latency", ("gm", "groups", "cost"), ("cost",)

    def __init__(self, target: Any):
        self.target = target

    def run(self, state: CompileState) -> CompileState:
        model = build_latency_model(state.gm, CostContext(state.gm, state.groups), self.target)
        if not model.layers:
            raise BudgetError("a latency budget needs conv or linear layers to measure; this model has none fxprune "
                              "can time on its own. Use Budget(flops=...) instead.")
        return dataclasses.replace(state, cost=state.cost.add_latency(model))


class Score(CompilerPass):
    """The criterion's importance of every unit; groups the criterion keeps whole are frozen first."""

    name, requires, produces = "score", ("gm", "groups"), ("scores",)

    def __init__(self, criterion: Importance, data: ImportanceData):
        self.criterion, self.data = criterion, data

    def run(self, state: CompileState) -> CompileState:
        groups = _with_frozen(state.groups, self.criterion.excluded_groups(state.gm, state.groups))
        scores, results = self.criterion.score_with_results(state.gm, groups, self.data)
        return dataclasses.replace(state, groups=groups, scores=scores, results=_add(state.results, "importance", results))


class PlanWhileTraining(CompilerPass):
    """A criterion that decides the widths itself while training (AOFP): the plan, without scores."""

    name, requires, produces = "plan_while_training", ("gm", "groups", "cost"), ("plan",)

    def __init__(self, criterion: Importance, data: ImportanceData, budget: Budget):
        self.criterion, self.data, self.budget = criterion, data, budget

    def run(self, state: CompileState) -> CompileState:
        _check_budget_measurable(state.groups, state.cost, self.budget)
        plan, results = self.criterion.plan_with_results(state.gm, state.groups, state.cost, self.budget, self.data)
        missed = _missed(plan, state.cost, self.budget)
        if missed:  # training decided the widths: keep the result, but never as if the budget were met
            warnings.warn(f"fxprune: {self.criterion.name} stopped above the budget: it keeps {', '.join(missed)}; "
                          f"the report records budget.met = False", stacklevel=4)
        results = {**results, "budget_met": not missed}
        return dataclasses.replace(state, plan=plan, results=_add(state.results, "importance", results))


class Allocate(CompilerPass):
    """The allocation: which units stay so that the budget is met."""

    name, requires, produces = "allocate", ("groups", "cost", "scores"), ("plan",)

    def __init__(self, allocation: Any, budget: Budget, round_to: int, min_channels: int):
        self.allocation, self.budget, self.round_to, self.min_channels = allocation, budget, round_to, min_channels

    def run(self, state: CompileState) -> CompileState:
        _check_budget_measurable(state.groups, state.cost, self.budget)
        bound = self._bind(self.round_to, state.gm)
        try:
            plan = bound.run(state.groups, state.cost, state.scores)
        except BudgetError as exc:
            if self.round_to != "auto":
                raise
            # "auto" steps are a preference for aligned widths; when they cannot reach the budget
            # (a group whose smallest aligned width is still too costly), one-channel steps may
            log.warning("fxprune: round_to=\"auto\" cannot meet the budget (%s); allocating in one-channel "
                        "steps (round_to=1)", str(exc).splitlines()[0])
            bound = self._bind(1, state.gm)
            plan = bound.run(state.groups, state.cost, state.scores)
        missed = _missed(plan, state.cost, self.budget)
        if missed:  # the allocation passes guarantee the budget: this is a bug, never a silent miss
            raise BudgetError(f"fxprune internal error: the allocation returned a plan that keeps {', '.join(missed)}; "
                              f"please report it")
        results = state.results
        if getattr(bound, "result", None) is not None:  # a search: every sample it measured, rho*, the best
            results = _add(results, "search", bound.result.as_dict())
        return dataclasses.replace(state, plan=plan, results=results)

    def _bind(self, round_to: Any, gm: torch.fx.GraphModule) -> Any:
        if hasattr(self.allocation, "bind"):  # a search also needs the graph, to build its candidates
            return self.allocation.bind(self.budget, round_to, self.min_channels, gm)
        return self.allocation(self.budget, round_to, self.min_channels)


class PlanFromReport(CompilerPass):
    """The plan a saved report describes (apply_plan, load)."""

    name, requires, produces = "plan_from_report", ("groups",), ("plan",)

    def __init__(self, report: Dict[str, Any]):
        self.report = report

    def run(self, state: CompileState) -> CompileState:
        from .compiler import plan_from_report
        return dataclasses.replace(state, plan=plan_from_report(state.groups, self.report))


class Rewrite(CompilerPass):
    """PruneRewrite: the new, physically smaller GraphModule; the traced graph is not touched."""

    name, requires, produces = "rewrite", ("gm", "groups", "plan"), ("pruned",)

    def run(self, state: CompileState) -> CompileState:
        from fxprune.passes.rewrite import PruneRewrite
        return dataclasses.replace(state, pruned=PruneRewrite(state.groups, state.plan)(state.gm).graph_module)


class MeetMeasuredLatency(CompilerPass):
    """Time the pruned model against the dense one on the target and refit the latency model on every
    measurement so far (one timing is noisy; the fit pools them). While the refitted prediction for the
    current plan is more than LATENCY_TOLERANCE (relative) off the budget, allocate and rewrite again,
    at most LATENCY_ROUNDS times. The result is the round whose refitted prediction is closest to the
    budget from below: choosing by the single measurements would favour whichever round was timed
    luckily fast. Every round goes into the report."""

    name = "meet_latency"
    requires = ("gm", "groups", "cost", "scores", "plan", "pruned")
    produces = ("pruned",)

    def __init__(self, allocate: "Allocate", rebuild: Sequence[CompilerPass], budget: Budget):
        self.allocate, self.rebuild, self.budget = allocate, rebuild, budget

    def run(self, state: CompileState) -> CompileState:
        model, want = state.cost.latency_model, self.budget.latency
        rounds: List[Tuple[CompileState, Dict[str, float]]] = []

        def prediction(st: CompileState) -> float:   # the cost model reads the latest fit
            return st.cost.latency(st.plan.keep_unit) / st.cost.dense()["latency"]

        for k in range(LATENCY_ROUNDS + 1):
            seconds = self.budget.target.model_seconds({"dense": state.gm, "pruned": state.pruned}, state.inputs)
            measured = seconds["pruned"] / seconds["dense"]
            tables_ratio = state.cost.latency_tables_ratio(state.plan.keep_unit)
            predicted = prediction(state)
            rounds.append((state, {"predicted_ratio": predicted, "measured_ratio": measured, "tables_ratio": tables_ratio,
                                   "dense_ms": 1e3 * seconds["dense"], "pruned_ms": 1e3 * seconds["pruned"]}))
            model.fit(tables_ratio, measured)
            log.info("latency round %d: predicted %.1f%%, measured %.1f%% of the dense model's %.2f ms (budget %.1f%%; "
                     "refitted prediction %.1f%%)", k + 1, 100 * predicted, 100 * measured, 1e3 * seconds["dense"],
                     100 * want, 100 * prediction(state))
            if abs(prediction(state) - want) <= LATENCY_TOLERANCE * want or k == LATENCY_ROUNDS:
                break
            try:
                planned = self.allocate.run(state)
            except BudgetError as exc:  # refitted, the budget is out of reach: keep the rounds so far
                log.info("latency round %d: %s", k + 2, exc)
                break
            if np.array_equal(planned.plan.keep_unit, state.plan.keep_unit):
                break                   # the refit changes nothing the granularity can express
            state = planned
            for p in self.rebuild:      # the rewrite (and bias compensation) of the new plan
                state = p.run(state)
        for st, r in rounds:
            r["refitted_ratio"] = prediction(st)
        below = [r for r in rounds if r[1]["refitted_ratio"] <= want * (1 + LATENCY_TOLERANCE)]
        state, chosen = (max(below, key=lambda r: r[1]["refitted_ratio"]) if below else
                         min(rounds, key=lambda r: r[1]["refitted_ratio"]))
        met = chosen["refitted_ratio"] <= want * (1 + LATENCY_TOLERANCE)
        results = {**model.as_dict(), **chosen, "budget": want, "met": met, "rounds": [r for _, r in rounds]}
        if not met:
            warnings.warn(f"fxprune: the pruned model is estimated at {chosen['refitted_ratio']:.1%} of the dense latency "
                          f"(measured {chosen['measured_ratio']:.1%}) for a budget of {want:.1%} after {len(rounds)} "
                          f"rounds; the report's latency.rounds has every measurement", stacklevel=4)
        return dataclasses.replace(state, results=_add(state.results, "latency", results))


class BiasCompensation(CompilerPass):
    """FLAP's recovery without retraining: each linear layer that lost inputs gets, added to its bias,
    what those inputs contributed on average over the calibration data (W[:, removed] @ mean[removed]),
    measured layer by layer with the earlier layers already pruned and compensated. The masked
    original it is verified against adds the same shifts."""

    name, requires, produces, changes_graph = "bias_compensation", ("gm", "groups", "plan", "pruned"), ("pruned", "output_shifts"), True

    def __init__(self, data: ImportanceData, n_batches: int = 32):
        self.data, self.n_batches = data, n_batches

    def run(self, state: CompileState) -> CompileState:
        from fxprune.passes.activation_importance import compensation_shifts
        kept_positions = state.groups.kept_lookup(state.plan.keep_unit)
        shifts, mean_share = compensation_shifts(state.gm, state.groups, kept_positions, self.data, self.n_batches)
        applied = {}
        with torch.no_grad():
            for name, shift in shifts.items():
                layer = name.rpartition(".")[0]
                rows = state.groups.param_slices[name].get(0)
                kept_rows = torch.as_tensor(kept_positions(rows)) if rows is not None else torch.arange(len(shift))
                module, original = state.pruned.get_submodule(layer), state.gm.get_submodule(layer)
                if module.bias is None:
                    module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype),
                                                     requires_grad=module.weight.requires_grad)
                module.bias += shift[kept_rows].to(module.bias.dtype)
                # The reference adds what the bias actually gained, rounding included (the shift in float64
                # would leave a rounding difference that the float64 check can see on trained models).
                before = original.bias.detach().double()[kept_rows] if original.bias is not None else 0.0
                applied[layer] = shift.clone()
                applied[layer][kept_rows] = module.bias.detach().double() - before
        return dataclasses.replace(state, output_shifts=applied, results=_add(
            state.results, "bias_compensation", {"layers": sorted(applied), "removed_inputs_mean_share": {
                name.rpartition(".")[0]: share for name, share in mean_share.items()}}))


class Verify(CompilerPass):
    """pruned(x) == masked original(x) in float64; raises VerificationError otherwise."""

    name, requires, produces = "verify", ("gm", "pruned", "groups", "plan"), ("verification",)

    def run(self, state: CompileState) -> CompileState:
        result = verify_pruned(state.gm, state.pruned, state.groups, state.plan, state.inputs,
                               output_shifts=state.output_shifts)
        return dataclasses.replace(state, verification=result.as_dict())


# ------------------------------------------------------------------------------------------- helpers
def _add(results: Dict[str, Any], key: str, value: Dict[str, Any]) -> Dict[str, Any]:
    return {**results, key: value} if value else results


def _with_frozen(groups: ChannelGroups, reasons: Dict[int, str]) -> ChannelGroups:
    """The groups with those the criterion keeps whole frozen (a copy: the analysis result stays as it was)."""
    if not reasons:
        return groups
    frozen = groups.unit_frozen.copy()
    new_groups = list(groups.groups)
    for gid, reason in reasons.items():
        g = groups.groups[gid]
        frozen[g.units] = True
        new_groups[gid] = dataclasses.replace(g, n_frozen=g.size, frozen_reasons=g.frozen_reasons + [reason])
    return dataclasses.replace(groups, unit_frozen=frozen, groups=new_groups)


def _check_budget_measurable(groups: ChannelGroups, cost: CostModel, budget: Budget) -> None:
    """A budget is a fraction of something fxprune counted: with nothing counted, any plan would
    'meet' it while pruning nothing."""
    dense = cost.dense()
    for name, wanted in budget.constraints().items():
        if wanted < 1 and dense[name] <= 0:
            counted = {"flops": "conv, linear, matmul/einsum and attention FLOPs",
                       "params": "nn.Parameter elements",
                       "latency": "the latency of conv and linear layers"}[name]
            raise BudgetError(
                f"the budget asks for {wanted:.0%} of the {LABELS[name]}, but fxprune counted no {LABELS[name]} in this model (it "
                f"counts {counted} it has a rule for).\n{groups.explain_frozen()}")


def _missed(plan: PrunePlan, cost: CostModel, budget: Budget) -> List[str]:
    """The budget constraints the plan keeps more than ("FLOPs 52.0% (budget 50.0%)"), if any (latency:
    as predicted; MeetMeasuredLatency checks the measurement)."""
    dense = cost.dense()
    missed = []
    for name, wanted in budget.constraints().items():
        after = cost.measure(name, plan.keep_unit)
        if dense[name] > 0 and after > wanted * dense[name] * (1 + 1e-9):
            missed.append(f"{LABELS[name]} {after / dense[name]:.1%} (budget {wanted:.1%})")
    return missed
