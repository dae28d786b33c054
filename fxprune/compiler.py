"""fxprune.compile: the pipeline as one readable function, each step a named pass (fxprune/pipeline.py)."""
from __future__ import annotations

import copy
import difflib
import fnmatch
import logging
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx

from .budget import Budget, as_budget
from .errors import ConfigError, UnsupportedModelError
from .importance import Importance, ImportanceData, resolve_importance
from .ir import ChannelGroups, PrunePlan
from .pipeline import (Allocate, AnalyseChannels, BiasCompensation, CompileState, CountCost,
                       MeasureLatency, MeetMeasuredLatency,
                       PlanFromReport, PlanWhileTraining, Rewrite, Score, Trace, Verify, run_passes)
from .report import build_report, module_slices as _module_slices
from .tracing import check_capture, eval_mode, normalise_example_inputs, private_eval_copy


log = logging.getLogger("fxprune")


def compile(model: torch.nn.Module, budget: Union[float, Budget], *, example_inputs,
            importance: Union[str, Importance] = "l1", ignore: Iterable[Any] = (),
            round_to: Union[int, str] = "auto",
            min_channels: int = 1, verify: bool = True, allocation: Any = "global", keep_outputs: bool = True,
            leaf_modules: Sequence[Any] = (), data: Optional[Iterable[Any]] = None,
            loss_fn: Optional[Callable] = None, bias_compensation: Union[bool, int] = False) -> torch.fx.GraphModule:
    """Prune `model` structurally to `budget` and return a new, smaller torch.fx.GraphModule.

    budget: fraction of the original FLOPs to keep, in (0, 1], or Budget(flops=..., params=...,
        latency=..., target=...) (latency: see fxprune.Budget and fxprune/latency.py).
    example_inputs: a tensor or tuple of tensors the model accepts (shapes are specialised to them,
        except the batch dim).
    importance: "l1", "l2" or an fxprune Importance. allocation: "global" (one ranking of normalised
        importance), "global_per_flop" (the same divided by each channel's FLOPs), "uniform", or
        fxprune.SpaceSearch(evaluator=...) (search a network pruning space; the importance then only
        decides which channels a width keeps; the report gets a "search" section).
    ignore: modules (objects of `model`) or qualified-name patterns (fnmatch) whose output channels
        stay. round_to / min_channels: kept widths are multiples of round_to and at least min_channels.
        "auto" (default) picks per group: steps of up to 8 channels (kernels work on blocks of 8 or 16;
        odd widths made a pruned MobileNetV2 slower than the dense one in onnxruntime) but at least 8
        widths to choose from, so a layer 64 or more wide moves 8 channels at a time and a 16-wide one 2.
        An int applies to every group (1: the finest granularity).
    keep_outputs: the model's outputs keep their size (default). False lets their channels go too: the
        hidden size of a transformer whose output is its hidden state (BertModel, LlamaModel); the result's
        outputs are then narrower and the report's "outputs" entry says which positions they keep. (In a
        model whose output is logits, the hidden size is an inner width and prunes anyway; to keep it,
        ignore the embedding, e.g. ignore=["*embed_tokens"].)
    verify: check in float64 that the result equals the original with the removed channels zeroed.
    leaf_modules: module types or names fx should not trace into (their channels are frozen).
    data, loss_fn: calibration batches (`x` or `(x, y)`) and loss(output, target) for importances that
        need data ("taylor", "wanda", "flap"; default loss cross-entropy). Weight-based importances ignore them.
    bias_compensation: FLAP's recovery without retraining (needs data): every linear layer that loses
        inputs adds what they contributed on average over the calibration data to its bias (created
        if absent); verification then compares against the masked original with those means. True
        measures the means on 32 calibration batches, an integer on that many.

    The model is never modified; the result is in eval mode and carries a report at
    `result.meta["fxprune"]`."""
    _check_model(model)
    budget = as_budget(budget)
    round_to = round_to if round_to == "auto" else _positive_int(round_to, "round_to (or \"auto\")")
    min_channels = _positive_int(min_channels, "min_channels")
    allocation_pass = _allocation(allocation)
    inputs = normalise_example_inputs(example_inputs)
    ignore_names = resolve_ignore(model, ignore)
    scorer = resolve_importance(importance)
    if (scorer.requires_data or bias_compensation) and data is None:
        needs = "bias_compensation" if not scorer.requires_data else f"importance {scorer.name!r}"
        raise ConfigError(f"{needs} needs calibration data: pass data=<iterable of (x, y) "
                          f"batches> (e.g. a DataLoader over a few hundred training images)")
    calibration = ImportanceData(data, loss_fn)
    if budget.latency is not None and (scorer.decides_widths or not isinstance(allocation, str)):
        raise ConfigError(f"a latency budget needs an allocation that reads the cost model (\"global\", "
                          f"\"uniform\"); {scorer.name if scorer.decides_widths else allocation!r} plans by FLOPs")
    source = copy.deepcopy(model) if scorer.trains_model else model          # training never touches the user's
    allocate, latency = Allocate(allocation_pass, budget, round_to, min_channels), budget.latency
    compensation_batches = (32 if bias_compensation is True else
                            _positive_int(bias_compensation, "bias_compensation (True or a number of batches)")
                            if bias_compensation is not False else 0)
    rebuild = [Rewrite(), *([BiasCompensation(calibration, compensation_batches)] if compensation_batches else [])]
    passes = [
        Trace(leaf_modules),                                                 # fx graph of a private copy, with shapes
        AnalyseChannels(ignore_names, keep_outputs),                         # which channels must go together
        CountCost(),                                                         # FLOPs/params per kept unit
        *([MeasureLatency(budget.target)] if latency else []),               # latency tables on the target
        *([PlanWhileTraining(scorer, calibration, budget)] if scorer.decides_widths else [  # AOFP: masks learnt
            Score(scorer, calibration),                                      # importance of every unit
            allocate]),                                                      # which units stay
        *rebuild,                                                            # the new, smaller GraphModule
        *([MeetMeasuredLatency(allocate, rebuild, budget)] if latency else []),  # timed; refit and redo until met
        *([Verify()] if verify else []),                                     # pruned == masked original
    ]
    state = run_passes(passes, CompileState(inputs=inputs, model=private_eval_copy(source)))
    importance_label = scorer.name if isinstance(importance, str) else repr(scorer)  # with its settings
    options = {"importance": importance_label, "allocation": getattr(allocation, "name", allocation),
               "round_to": round_to, "min_channels": min_channels, "ignore": sorted(ignore_names),
               "keep_outputs": keep_outputs, "bias_compensation": bias_compensation}
    return _with_report(state, budget, options)


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
    analysis = AnalyseChannels(set(report["options"].get("ignore", ())), report["options"].get("keep_outputs", True))
    passes = [Trace(leaf_modules), analysis, CountCost(),
              PlanFromReport(report), Rewrite(), *([Verify()] if verify else [])]
    state = run_passes(passes, CompileState(inputs=inputs, model=private_eval_copy(model)))
    recorded = {k: report["budget"].get(k) for k in ("flops", "params") if report["budget"].get(k) is not None}
    budget = Budget(**(recorded or {"flops": report["flops"]["ratio"]}))  # a latency budget: what it kept
    return _with_report(state, budget, dict(report["options"]))


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


def _with_report(state: CompileState, budget: Budget, options: Dict[str, Any]) -> torch.fx.GraphModule:
    """The pruned model, in eval mode, with its report (plain data) at `meta["fxprune"]`."""
    seconds = dict(state.seconds)
    seconds["analyse_and_plan"] = sum(t for name, t in seconds.items() if name not in ("rewrite", "verify"))
    report = build_report(state.gm, state.groups, state.plan, state.cost, budget, options, state.verification, seconds)
    importance = state.results.get("importance", {})
    report["budget"]["met"] = importance.get("budget_met", True)
    for key, value in state.results.items():
        report[key] = value
    log.info("kept %.1f%% of the FLOPs and %.1f%% of the parameters (%s)", 100 * report["flops"]["ratio"],
             100 * report["params"]["ratio"], ", ".join(f"{k} {v:.2f}s" for k, v in state.seconds.items()))
    pruned = state.pruned
    pruned.meta["fxprune"] = report
    return eval_mode(pruned)


def analyze(model: torch.nn.Module, example_inputs, *, ignore: Iterable[Any] = (),
            leaf_modules: Sequence[Any] = (), keep_outputs: bool = True) -> ChannelGroups:
    """The channel groups of `model` (print it for a table). The model is not modified."""
    _check_model(model)
    inputs = normalise_example_inputs(example_inputs)
    _, groups = _analyse(model, inputs, resolve_ignore(model, ignore), leaf_modules, keep_outputs)
    return groups


def cost_of(model: torch.nn.Module, example_inputs, *, leaf_modules: Sequence[Any] = ()) -> Dict[str, float]:
    """FLOPs and parameters of `model` on `example_inputs`, counted the way compile counts them (so
    any model, e.g. another tool's pruned result, compares with compile's report)."""
    _check_model(model)
    passes = [Trace(leaf_modules), AnalyseChannels(), CountCost()]
    state = run_passes(passes, CompileState(inputs=normalise_example_inputs(example_inputs), model=private_eval_copy(model)))
    full = np.ones(state.groups.n_units, dtype=bool)
    return {"flops": float(state.cost.flops(full)), "params": float(state.cost.params(full))}


def _analyse(model, inputs: Tuple[Any, ...], ignore_names, leaf_modules,
             keep_outputs: bool = True) -> Tuple[torch.fx.GraphModule, ChannelGroups]:
    """The traced graph and its channel groups (the first two passes of compile)."""
    state = run_passes([Trace(leaf_modules), AnalyseChannels(ignore_names, keep_outputs)],
                       CompileState(inputs=inputs, model=private_eval_copy(model)))
    return state.gm, state.groups


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_capture(model)


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


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def resolve_ignore(model: torch.nn.Module, ignore: Iterable[Any]) -> set:
    """Qualified names of the ignored modules; unknown names are an error, with suggestions."""
    if isinstance(ignore, (str, torch.nn.Module)):
        ignore = [ignore]
    ignore = list(ignore)
    if not ignore:
        return set()
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
