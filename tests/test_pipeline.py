"""The pass contract: requires/produces are enforced and a broken invariant after any pass is reported
with the pass and the passes before it (the test suite runs with FXPRUNE_VERIFY=1)."""
import dataclasses

import numpy as np
import pytest

import fxprune
from fixtures import ConvChain, example_input
from fxprune.pipeline import (AnalyseChannels, CompilerPass, CompileState, CountCost, PassCheckError, Trace,
                              run_passes)
from fxprune.tracing import private_eval_copy


def start():
    return CompileState(inputs=(example_input(),), model=private_eval_copy(ConvChain().eval()))


class NaNImportance(fxprune.Importance):
    name = "nan"

    def score(self, gm, groups, data=None):
        scores = np.ones(groups.n_units)
        scores[0] = np.nan
        return scores


class DropsFrozenUnits:
    """An allocation that removes everything, frozen units included."""

    def __init__(self, budget, round_to, min_channels):
        pass

    def run(self, groups, cost, scores):
        return fxprune.PrunePlan(np.zeros(groups.n_units, dtype=bool))


class RenamesANode(CompilerPass):
    name, requires, produces = "renames_a_node", ("gm",), ()

    def run(self, state):
        next(n for n in state.gm.graph.nodes if n.op == "call_module").name = "renamed"
        state.gm.recompile()
        return state


def test_compile_runs_the_passes_in_order_and_times_each():
    pruned = fxprune.compile(ConvChain(), 0.5, example_inputs=(example_input(),), round_to=1)
    seconds = pruned.meta["fxprune"]["seconds"]
    assert [k for k in seconds if k != "analyse_and_plan"] == ["trace", "analyse_channels", "count_cost", "score",
                                                               "allocate", "rewrite", "verify"]


def test_non_finite_scores_are_caught_after_the_score_pass():
    with pytest.raises(PassCheckError, match=r"after pass score \(passes run before it: trace, analyse_channels, "
                                             r"count_cost\).*not finite"):
        fxprune.compile(ConvChain(), 0.5, example_inputs=(example_input(),), importance=NaNImportance(), round_to=1)


def test_a_plan_that_removes_frozen_units_is_caught(monkeypatch):
    from fxprune import compiler
    original = compiler._allocation
    monkeypatch.setattr(compiler, "_allocation", lambda name: DropsFrozenUnits if name == "drop" else original(name))
    with pytest.raises(PassCheckError, match=r"after pass allocate.*removes \d+ frozen unit"):
        fxprune.compile(ConvChain(), 0.5, example_inputs=(example_input(),), allocation="drop", round_to=1)


def test_an_analysis_pass_that_changes_the_graph_is_caught():
    with pytest.raises(PassCheckError, match="after pass renames_a_node .*trace, analyse_channels.*modified"):
        run_passes([Trace(), AnalyseChannels(), RenamesANode()], start(), checks=True)


def test_a_pass_whose_inputs_were_not_produced_is_refused():
    with pytest.raises(PassCheckError, match="count_cost requires groups, which no pass before it produced "
                                             r"\(passes run: trace\)"):
        run_passes([Trace(), CountCost()], start())


def test_a_pass_that_does_not_produce_what_it_promised_is_refused():
    class Forgets(CompilerPass):
        name, requires, produces = "forgets", ("gm",), ("groups",)

        def run(self, state):
            return state

    with pytest.raises(PassCheckError, match="forgets did not produce groups"):
        run_passes([Trace(), Forgets()], start())


def test_checks_are_off_unless_asked_for():
    state = run_passes([Trace(), AnalyseChannels(), RenamesANode()], start(), checks=False)
    assert state.groups is not None and list(state.seconds) == ["trace", "analyse_channels", "renames_a_node"]
    assert dataclasses.is_dataclass(state)


def test_compile_keeps_nothing_alive_but_its_result():
    """The traced module, its graph and the analysis die with the compile: a cache that held them would
    grow with every compile (and each traced module adds a class to nn.Module's subclasses)."""
    import gc
    import torch
    model, x = ConvChain().eval(), example_input()
    fxprune.compile(model, 0.5, example_inputs=(x,), verify=False)
    gc.collect()

    def graph_modules():
        return sum(isinstance(o, torch.fx.GraphModule) for o in gc.get_objects())

    before = graph_modules()
    kept = [fxprune.compile(model, 0.5, example_inputs=(x,), verify=False) for _ in range(3)]
    gc.collect()
    assert graph_modules() == before + len(kept)
