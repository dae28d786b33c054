"""fxprune.compile: the pipeline as one readable function, each step a named pass."""
from __future__ import annotations

import copy
import difflib
import fnmatch
import logging
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx

from .budget import Budget, as_budget
from .cost import build_cost_model
from .errors import BudgetError, ConfigError, UnsupportedModelError
from .importance import Importance, ImportanceData, resolve_importance
from .ir import ChannelGroups, PrunePlan
from .report import build_report, module_slices as _module_slices
from .shape_prop import propagate_shapes
from .tracing import check_capture, normalise_example_inputs, private_eval_copy, trace_model
from .verify import check_graph, check_groups, debug_checks_enabled, graph_fingerprint, verify_pruned


log = logging.getLogger("fxprune")


def compile(model: torch.nn.Module, budget: Union[float, Budget], *, example_inputs,
            importance: Union[str, Importance] = "l1", ignore: Iterable[Any] = (), round_to: int = 8,
            min_channels: int = 1, verify: bool = True, allocation: Any = "global",
            leaf_modules: Sequence[Any] = (), data: Optional[Iterable[Any]] = None,
            loss_fn: Optional[Callable] = None) -> torch.fx.GraphModule:
    """Prune `model` structurally to `budget` and return a new, smaller torch.fx.GraphModule.

    budget: fraction of the original FLOPs to keep, in (0, 1], or Budget(flops=..., params=...).
    example_inputs: a tensor or tuple of tensors the model accepts (shapes are specialised to them,
        except the batch dim).
    importance: "l1", "l2" or an fxprune Importance. allocation: "global" (one ranking of normalised
        importance), "global_per_flop" (the same divided by each channel's FLOPs), "uniform", or
        fxprune.SpaceSearch(evaluator=...) (search a network pruning space; the importance then only
        decides which channels a width keeps; the report gets a "search" section).
    ignore: modules (objects of `model`) or qualified-name patterns (fnmatch) whose output channels
        stay. round_to / min_channels: kept widths are multiples of round_to and at least min_channels
        (the default 8 keeps CPU/GPU kernels on their fast paths: odd widths made a pruned MobileNetV2
        slower than the dense one in onnxruntime; use 1 for the finest granularity).
    verify: check in float64 that the result equals the original with the removed channels zeroed.
    leaf_modules: module types or names fx should not trace into (their channels are frozen).
    data, loss_fn: calibration batches (`x` or `(x, y)`) and loss(output, target) for importances that
        need data ("taylor"; default loss cross-entropy). Weight-based importances ignore them.

    The model is never modified; the result is in eval mode and carries a report at
    `result.meta["fxprune"]`."""
    _check_model(model)
    budget = as_budget(budget)
    round_to, min_channels = _positive_int(round_to, "round_to"), _positive_int(min_channels, "min_channels")
    allocation_pass = _allocation(allocation)
    inputs = normalise_example_inputs(example_inputs)
    ignore_names = resolve_ignore(model, ignore)
    scorer = resolve_importance(importance)
    if scorer.requires_data and data is None:
        raise ConfigError(f"importance {scorer.name!r} needs calibration data: pass data=<iterable of (x, y) "
                          f"batches> (e.g. a DataLoader over a few hundred training images)")
    seconds: Dict[str, float] = {}
    clock = time.perf_counter()

    source = copy.deepcopy(model) if scorer.trains_model else model         # training never touches the user's
    gm, groups = _analyse(source, inputs, ignore_names, leaf_modules)       # trace, shapes, channel groups
    cost = build_cost_model(gm, groups)                                     # FLOPs/params per kept unit
    log.info("analysed: %d nodes, %d channel groups (%d prunable), %.2fs", len(gm.graph.nodes),
             len(groups.groups), sum(g.prunable for g in groups.groups), time.perf_counter() - clock)
    _check_budget_measurable(groups, cost, budget)                          # something to take a fraction of
    _freeze(groups, scorer.excluded_groups(gm, groups))                    # groups the criterion keeps whole
    calibration = ImportanceData(data, loss_fn)
    if scorer.decides_widths:                                               # AOFP: masks learnt while training
        plan = scorer.plan(gm, groups, cost, budget, calibration)
    else:
        scores = scorer.score(gm, groups, calibration)                      # importance of every unit
        plan = _bind(allocation_pass, budget, round_to, min_channels, gm).run(groups, cost, scores)  # what stays
    budget_status = _check_budget_met(plan, cost, budget, scorer)           # never a silent miss
    seconds["analyse_and_plan"] = time.perf_counter() - clock
    log.info("planned with %s%s, %.2fs", scorer.name,
             "" if scorer.decides_widths else f" importance and {getattr(allocation, 'name', allocation)} allocation", seconds["analyse_and_plan"])

    importance_label = scorer.name if isinstance(importance, str) else repr(scorer)  # with its settings
    options = {"importance": importance_label, "allocation": getattr(allocation, "name", allocation),
               "round_to": round_to, "min_channels": min_channels, "ignore": sorted(ignore_names)}
    pruned = _rewrite_and_report(gm, groups, plan, cost, inputs, budget, options, verify, seconds)
    pruned.meta["fxprune"]["budget"].update(budget_status)
    if getattr(allocation, "last_result", None) is not None:                # a search: what it measured
        pruned.meta["fxprune"]["search"] = allocation.last_result.summary()
    return pruned


def apply_plan(model: torch.nn.Module, report: Dict[str, Any], *, example_inputs, verify: bool = True,
               leaf_modules: Sequence[Any] = ()) -> torch.fx.GraphModule:
    """Prune `model` exactly as a saved report says (`pruned.meta["fxprune"]` or report.json of an
    earlier compile of the same architecture) and return the new GraphModule, with the weights of
    `model` sliced. Load a fine-tuned pruned state_dict into the result to restore a saved model.

    Raises ConfigError when the report does not fit this architecture."""
    _check_model(model)
    if not isinstance(report, dict) or report.get("format") != "fxprune.report/1":
        raise ConfigError("apply_plan needs an fxprune report (pruned.meta['fxprune'] or its report.json)")
    inputs = normalise_example_inputs(example_inputs)
    clock = time.perf_counter()
    gm, groups = _analyse(model, inputs, set(report["options"].get("ignore", ())), leaf_modules)
    plan = plan_from_report(groups, report)                                 # what the report kept
    cost = build_cost_model(gm, groups)
    seconds = {"analyse_and_plan": time.perf_counter() - clock}
    budget = Budget(**{k: report["budget"].get(k) for k in ("flops", "params") if report["budget"].get(k) is not None})
    return _rewrite_and_report(gm, groups, plan, cost, inputs, budget, dict(report["options"]), verify, seconds)


def plan_from_report(groups: ChannelGroups, report: Dict[str, Any]) -> PrunePlan:
    """The PrunePlan whose parameter slices are the report's `modules` entry."""
    keep = np.ones(groups.n_units, dtype=bool)
    modules = report.get("modules", {})
    known = set()
    for name, dims in groups.param_slices.items():
        module, _, local = name.rpartition(".")
        saved = modules.get(module, {}).get("params", {}).get(local)
        if saved is None:
            continue
        known.add(module)
        for dim, kept in saved.items():
            elements = dims.get(int(dim))
            if elements is None or (len(kept) and max(kept) >= len(elements)):
                raise ConfigError(f"the report does not fit this model: {name} dim {dim} "
                                  f"({'untracked' if elements is None else len(elements)} channels here)")
            removed = np.ones(len(elements), dtype=bool)
            removed[np.asarray(kept, dtype=np.int64)] = False
            keep[groups.units_of(elements[removed])] = False
    missing = sorted(set(modules) - known)
    if missing:
        raise ConfigError(f"the report does not fit this model: it prunes {', '.join(missing[:3])}, which this "
                          f"model has no prunable parameters for")
    plan = PrunePlan(keep)
    if _module_slices(groups, keep) != modules:
        raise ConfigError("the report does not fit this model: its channel groups differ (was it made from "
                          "another architecture, or with other leaf_modules?)")
    return plan


def _rewrite_and_report(gm, groups, plan, cost, inputs, budget, options, verify, seconds) -> torch.fx.GraphModule:
    """The shared tail of compile and apply_plan: rewrite, verify, attach the report."""
    from fxprune.passes.rewrite import PruneRewrite
    start = time.perf_counter()
    pruned = PruneRewrite(groups, plan)(gm).graph_module                     # new, smaller GraphModule
    if debug_checks_enabled():
        check_graph(pruned, "PruneRewrite")
    seconds["rewrite"] = time.perf_counter() - start
    log.info("rewrote the graph, %.2fs", seconds["rewrite"])

    verification = None
    if verify:                                                              # pruned == masked original
        start = time.perf_counter()
        verification = verify_pruned(gm, pruned, groups, plan, inputs).as_dict()
        seconds["verify"] = time.perf_counter() - start
        log.info("verified against the masked original in float64 (max error %.2g), %.2fs",
                 verification["max_abs_error"], seconds["verify"])
    report = build_report(gm, groups, plan, cost, budget, options, verification, seconds)
    log.info("kept %.1f%% of the FLOPs and %.1f%% of the parameters", 100 * report["flops"]["ratio"],
             100 * report["params"]["ratio"])
    pruned.meta["fxprune"] = report
    return pruned.eval()


def analyze(model: torch.nn.Module, example_inputs, *, ignore: Iterable[Any] = (),
            leaf_modules: Sequence[Any] = ()) -> ChannelGroups:
    """The channel groups of `model` (print it for a table). The model is not modified."""
    _check_model(model)
    inputs = normalise_example_inputs(example_inputs)
    _, groups = _analyse(model, inputs, resolve_ignore(model, ignore), leaf_modules)
    return groups


def cost_of(model: torch.nn.Module, example_inputs, *, leaf_modules: Sequence[Any] = ()) -> Dict[str, float]:
    """FLOPs and parameters of `model` on `example_inputs`, counted the way compile counts them (so
    any model, e.g. another tool's pruned result, compares with compile's report)."""
    _check_model(model)
    inputs = normalise_example_inputs(example_inputs)
    gm, groups = _analyse(model, inputs, set(), leaf_modules)
    cost = build_cost_model(gm, groups)
    full = np.ones(groups.n_units, dtype=bool)
    return {"flops": float(cost.flops(full)), "params": float(cost.params(full))}


def _analyse(model, inputs: Tuple[Any, ...], ignore_names, leaf_modules) -> Tuple[torch.fx.GraphModule, ChannelGroups]:
    from fxprune.passes.dependency import ChannelGroupAnalysis
    work = private_eval_copy(model)                       # never touch the user's model
    gm = trace_model(work, leaf_modules)                  # torch.fx graph of the forward
    propagate_shapes(gm, inputs)                          # every node's shape, on the example inputs
    before = graph_fingerprint(gm) if debug_checks_enabled() else None
    groups = ChannelGroupAnalysis(ignore_names).run(gm)   # which channels must go together
    if before is not None:
        check_graph(gm, "ChannelGroupAnalysis")
        if graph_fingerprint(gm) != before:
            raise AssertionError("ChannelGroupAnalysis modified the graph")
        check_groups(gm, groups)
    return gm, groups


def _freeze(groups: ChannelGroups, reasons: Dict[int, str]) -> None:
    for gid, reason in reasons.items():
        group = groups.groups[gid]
        groups.unit_frozen[group.units] = True
        group.n_frozen = group.size
        group.frozen_reasons.append(reason)


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_capture(model)


def _check_budget_measurable(groups: ChannelGroups, cost, budget: Budget) -> None:
    """A budget is a fraction of something fxprune counted: with nothing counted, any plan would
    'meet' it while pruning nothing."""
    full = np.ones(groups.n_units, dtype=bool)
    for what, wanted, total in (("FLOPs", budget.flops, cost.flops(full)), ("parameters", budget.params, cost.params(full))):
        if wanted is not None and wanted < 1 and total <= 0:
            counted = "conv, linear, matmul/einsum and attention" if what == "FLOPs" else "nn.Parameter elements"
            raise BudgetError(
                f"the budget asks for {wanted:.0%} of the {what}, but fxprune counted no {what} in this model (it counts "
                f"{counted} it has a rule for).\n{groups.explain_frozen()}")


def _check_budget_met(plan: PrunePlan, cost, budget: Budget, scorer: Importance) -> Dict[str, Any]:
    """The plan keeps at most the budget. An allocation pass guarantees this; a criterion that decides
    widths while training (AOFP) may stop short, which is reported and warned about, never hidden."""
    full = np.ones(len(plan.keep_unit), dtype=bool)
    missed = []
    for what, wanted, before, after in (("FLOPs", budget.flops, cost.flops(full), cost.flops(plan.keep_unit)),
                                        ("params", budget.params, cost.params(full), cost.params(plan.keep_unit))):
        if wanted is not None and before > 0 and after > wanted * before * (1 + 1e-9):
            missed.append(f"{what} {after / before:.1%} (budget {wanted:.1%})")
    if missed and not scorer.decides_widths:
        raise BudgetError(f"fxprune internal error: the allocation returned a plan that keeps {', '.join(missed)}; "
                          f"please report it")
    if missed:
        warnings.warn(f"fxprune: {scorer.name} stopped above the budget: it keeps {', '.join(missed)}; the report "
                      f"records budget.met = False", stacklevel=3)
    return {"met": not missed}


def _allocation(name):
    from fxprune.passes.space_search import SpaceSearch
    if isinstance(name, SpaceSearch):
        return name
    from fxprune.passes.global_allocation import GlobalAllocation
    from fxprune.passes.uniform_allocation import UniformAllocation
    import functools
    table = {"global": GlobalAllocation, "global_per_flop": functools.partial(GlobalAllocation, per_cost=True),
             "uniform": UniformAllocation}
    if name not in table:
        raise ConfigError(f"unknown allocation {name!r}; choose one of {sorted(table)} or pass "
                          f"fxprune.SpaceSearch(evaluator=...)")
    return table[name]


def _bind(allocation_pass, budget: Budget, round_to: int, min_channels: int, gm: torch.fx.GraphModule):
    """The allocation pass for this budget; a search also needs the graph, to build its candidates."""
    if hasattr(allocation_pass, "bind"):
        return allocation_pass.bind(budget, round_to, min_channels, gm)
    return allocation_pass(budget, round_to, min_channels)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def resolve_ignore(model: torch.nn.Module, ignore: Iterable[Any]) -> set:
    """Qualified names of the ignored modules; unknown names are an error, with suggestions."""
    if isinstance(ignore, (str, torch.nn.Module)):
        ignore = [ignore]
    names = {id(m): n for n, m in model.named_modules()}
    all_names = [n for n in names.values() if n]
    resolved = set()
    for entry in ignore:
        if isinstance(entry, torch.nn.Module):
            if id(entry) not in names:
                raise ConfigError(f"ignore: module {type(entry).__name__} is not part of the model")
            resolved.add(names[id(entry)])
        elif isinstance(entry, str):
            matches = [n for n in all_names if fnmatch.fnmatchcase(n, entry)]
            if not matches:
                close = difflib.get_close_matches(entry, all_names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"ignore: no module named {entry!r} in {type(model).__name__}{hint}")
            resolved.update(matches)
        else:
            raise ConfigError(f"ignore entries must be modules or name patterns, got {type(entry).__name__}")
    # an ignored container ignores everything inside it
    return {n for n in all_names if any(n == r or n.startswith(r + ".") for r in resolved)}
