"""fxprune.compile: the pipeline as one readable function, each step a named pass."""
from __future__ import annotations

import difflib
import fnmatch
import logging
import time
from typing import Any, Dict, Iterable, Sequence, Tuple, Union

import torch
import torch.fx

from .budget import Budget, as_budget
from .cost import build_cost_model
from .errors import ConfigError, UnsupportedModelError
from .importance import Importance, resolve_importance
from .ir import ChannelGroups
from .report import build_report
from .tracing import normalise_example_inputs, private_eval_copy, propagate_shapes, trace_model
from .verify import check_graph, check_groups, debug_checks_enabled, graph_fingerprint, verify_pruned


log = logging.getLogger("fxprune")


def compile(model: torch.nn.Module, budget: Union[float, Budget], *, example_inputs,
            importance: Union[str, Importance] = "l1", ignore: Iterable[Any] = (), round_to: int = 1,
            min_channels: int = 1, verify: bool = True, allocation: str = "global",
            leaf_modules: Sequence[Any] = ()) -> torch.fx.GraphModule:
    """Prune `model` structurally to `budget` and return a new, smaller torch.fx.GraphModule.

    budget: fraction of the original FLOPs to keep, in (0, 1], or Budget(flops=..., params=...).
    example_inputs: a tensor or tuple of tensors the model accepts (shapes are specialised to them,
        except the batch dim).
    importance: "l1", "l2" or an fxprune Importance. allocation: "global" or "uniform".
    ignore: modules (objects of `model`) or qualified-name patterns (fnmatch) whose output channels
        stay. round_to / min_channels: kept widths are multiples of round_to and at least min_channels.
    verify: check in float64 that the result equals the original with the removed channels zeroed.
    leaf_modules: module types or names fx should not trace into (their channels are frozen).

    The model is never modified; the result is in eval mode and carries a report at
    `result.meta["fxprune"]`."""
    _check_model(model)
    budget = as_budget(budget)
    round_to, min_channels = _positive_int(round_to, "round_to"), _positive_int(min_channels, "min_channels")
    allocation_pass = _allocation(allocation)
    inputs = normalise_example_inputs(example_inputs)
    ignore_names = resolve_ignore(model, ignore)
    scorer = resolve_importance(importance)
    seconds: Dict[str, float] = {}
    clock = time.perf_counter()

    gm, groups = _analyse(model, inputs, ignore_names, leaf_modules)        # trace, shapes, channel groups
    cost = build_cost_model(gm, groups)                                     # FLOPs/params per kept unit
    log.info("analysed: %d nodes, %d channel groups (%d prunable), %.2fs", len(gm.graph.nodes),
             len(groups.groups), sum(g.prunable for g in groups.groups), time.perf_counter() - clock)
    scores = scorer.score(gm, groups)                                       # importance of every unit
    plan = allocation_pass(budget, round_to, min_channels).run(groups, cost, scores)  # what stays
    seconds["analyse_and_plan"] = time.perf_counter() - clock
    log.info("planned with %s importance and %s allocation, %.2fs", scorer.name, allocation,
             seconds["analyse_and_plan"])

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
    options = {"importance": scorer.name, "allocation": allocation, "round_to": round_to,
               "min_channels": min_channels, "ignore": sorted(ignore_names)}
    report = build_report(groups, plan, cost, budget, options, verification, seconds)
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


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _allocation(name: str):
    from fxprune.passes.global_allocation import GlobalAllocation
    from fxprune.passes.uniform_allocation import UniformAllocation
    table = {"global": GlobalAllocation, "uniform": UniformAllocation}
    if name not in table:
        raise ConfigError(f"unknown allocation {name!r}; choose one of {sorted(table)}")
    return table[name]


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
