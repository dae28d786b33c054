"""Differential tests on one fixture per coupling pattern: pruned == masked original (float64)."""
# The fixtures have 4-16 channels: they are compiled with round_to=1 so coupling is tested channel by
# channel (the default round_to="auto" also steps one channel at a time on groups this narrow).
import copy

import pytest
import torch
from torch import nn

import fxprune
from fixtures import FIXTURES, BlockingOp, ConvChain, example_input


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


OUTPUT = "graph output"
# The specification of the dependency analysis on each fixture: every channel group as (its coupled
# source spaces, its size in channel units, what freezes it or None). A unit can span several positions:
# the same position in every attention head, conv group, GroupNorm group or shuffle group.
EXPECTED_GROUPS = {
    "ConvChain": [(("body_0_0",), 16, None), (("body_1_0",), 24, None), (("body_2_0",), 32, None),
                  (("head_fc",), 5, OUTPUT)],
    # the stem and both blocks' last layers write one residual stream
    "Residual": [(("stem_0", "b1_1", "b2_1"), 16, None), (("b1_0_0",), 24, None), (("b2_0_0",), 8, None),
                 (("head_fc",), 5, OUTPUT)],
    # cat lays its inputs side by side: each keeps its own group
    "Concat": [(("a_0",), 12, None), (("b_0",), 20, None), (("fuse_0",), 16, None), (("head_fc",), 5, OUTPUT)],
    "SplitChunk": [(("stem_0",), 24, None), (("left_0",), 10, None), (("right_0",), 14, None),
                   (("head_fc",), 5, OUTPUT)],
    # depthwise convs create no channels of their own: they follow the expand conv
    "Depthwise": [(("expand_0",), 24, None), (("project_0",), 16, None), (("head_fc",), 5, OUTPUT)],
    # groups=4: the same in-group position of all 4 groups is one unit (32 / 4 and 16 / 4)
    "GroupedConv": [(("a_0",), 8, None), (("g_0",), 4, None), (("b_0",), 24, None), (("head_fc",), 5, OUTPUT)],
    "FlattenLinear": [(("conv_0",), 12, None), (("fc1",), 32, None), (("fc2",), 5, OUTPUT)],
    # the residual stream (embedding and MLP output) in 4 heads of 8 positions; the MLP's hidden width
    "AttentionHeads": [(("embed", "mlp_2"), 8, None), (("mlp_0",), 64, None), (("head",), 5, OUTPUT)],
    # the split into (heads, head width) makes each head a unit: q, k and v of one head go together
    "HeadReshape": [(("embed", "proj"), 24, None), (("qkv",), 3, None), (("head",), 5, OUTPUT)],
    "BlockingOp": [(("a_0",), 16, "blocked by %cumsum"), (("b_0",), 16, None), (("head_fc",), 5, OUTPUT)],
    # one conv called twice: its input and output are the same channels
    "SharedWeights": [(("stem_0", "shared", "shared_1"), 16, None), (("head_fc",), 5, OUTPUT)],
    "FunctionalParams": [(("conv2d",), 12, None), (("conv2d_1",), 20, None), (("linear",), 5, OUTPUT)],
    # the residual add joins the stem with fc2 (through the permutes and the layer scale)
    "ChannelsLast": [(("stem", "fc2"), 16, None), (("fc1",), 64, None), (("head_fc",), 5, OUTPUT)],
    # the shuffle's view into (2, 8) makes position p of both halves one unit
    "ChannelShuffle": [(("a_0",), 8, None), (("b_0",), 16, None), (("head_fc",), 5, OUTPUT)],
    # the excite conv's output gates the feature map channel by channel
    "SqueezeExcite": [(("a_0", "excite"), 24, None), (("squeeze",), 8, None), (("head_fc",), 5, OUTPUT)],
    "GroupNormNet": [(("a",), 4, None), (("b_0",), 12, None), (("head_fc",), 5, OUTPUT)],
}


def test_every_fixture_has_a_group_specification():
    assert set(EXPECTED_GROUPS) == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_groups_match_the_specification(name):
    groups = fxprune.analyze(FIXTURES[name]().eval(), (example_input(),))
    got = []
    for g in groups.groups:
        reason = g.frozen_reasons[0] if g.frozen_reasons else None
        got.append((tuple(g.spaces), g.size, reason))
        assert (g.n_frozen == g.size) == (reason is not None), g  # these fixtures freeze whole groups or none
    expected = EXPECTED_GROUPS[name]
    assert [(spaces, size) for spaces, size, _ in got] == [(spaces, size) for spaces, size, _ in expected]
    for (_, _, reason), (_, _, want) in zip(got, expected):
        assert (reason is None and want is None) or (want is not None and reason is not None and want in reason), \
            (reason, want)


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("budget", [0.7, 0.4])
def test_fixture_prunes_and_verifies(name, budget):
    torch.manual_seed(0)
    model = FIXTURES[name]().eval()
    before = state(model)
    x = example_input()
    pruned = fxprune.compile(model, budget, example_inputs=(x,), round_to=1)
    report = pruned.meta["fxprune"]
    assert report["verification"]["passed"]
    assert report["flops"]["ratio"] <= budget + 1e-9
    assert report["flops"]["after"] < report["flops"]["before"]
    assert pruned(x).shape == model(x).shape
    assert_same_state(before, model)
    n_params = sum(p.numel() for p in pruned.parameters())
    assert n_params < sum(p.numel() for p in model.parameters())


def test_conv_chain_against_hand_masked_model():
    """Independent of fxprune's verifier: zero the removed channels by hand from the report."""
    torch.manual_seed(1)
    model = ConvChain().eval()
    x = example_input().double()
    pruned = fxprune.compile(model, 0.5, example_inputs=(x.float(),), round_to=1)
    modules = pruned.meta["fxprune"]["modules"]
    masked = copy.deepcopy(model).double()
    with torch.no_grad():
        for i in range(3):
            kept = modules[f"body.{i}.0"]["out"]
            drop = sorted(set(range(masked.body[i][0].out_channels)) - set(kept))
            assert drop, "the fixture should lose channels in every layer at budget 0.5"
            # a removed channel reads as zero downstream: zero its BN output (weight and bias)
            masked.body[i][1].weight[drop] = 0
            masked.body[i][1].bias[drop] = 0
    expected = masked(x)
    got = copy.deepcopy(pruned).double()(x)
    assert torch.allclose(expected, got, atol=1e-10, rtol=0)


def test_verifier_catches_a_wrong_rewrite():
    """The verifier is not vacuous: a rewrite against a different plan than the reference fails."""
    from fxprune.compiler import _analyse
    from fxprune.cost import build_cost_model
    from fxprune.ir import PrunePlan
    from fxprune.passes.global_allocation import GlobalAllocation
    from fxprune.passes.l1_importance import L1Importance
    from fxprune.passes.rewrite import PruneRewrite
    from fxprune.verify import verify_pruned

    model = ConvChain().eval()
    x = example_input()
    gm, groups = _analyse(model, (x,), set(), ())
    cost = build_cost_model(gm, groups)
    plan = GlobalAllocation(fxprune.Budget(flops=0.5)).run(groups, cost, L1Importance().score(gm, groups))
    pruned = PruneRewrite(groups, plan)(gm).graph_module
    verify_pruned(gm, pruned, groups, plan, (x,))  # consistent: passes
    other = plan.keep_unit.copy()
    group = next(g for g in groups.groups if plan.kept_in_group(groups, g) < g.size)
    kept = group.units[plan.keep_unit[group.units]]
    dropped = group.units[~plan.keep_unit[group.units]]
    other[kept[0]], other[dropped[0]] = False, True  # same sizes, different channels
    with pytest.raises(fxprune.VerificationError, match="first divergence"):
        verify_pruned(gm, pruned, groups, PrunePlan(other), (x,))


def test_blocking_op_freezes_its_channels_and_names_the_node():
    model = BlockingOp().eval()
    groups = fxprune.analyze(model, (example_input(),))
    blocked = [g for g in groups.groups if not g.prunable]
    reasons = " ".join(r for g in blocked for r in g.frozen_reasons)
    assert "cumsum" in reasons and "no channel rule" in reasons
    assert any("a_0" in g.spaces for g in blocked)
    pruned = fxprune.compile(model, 0.8, example_inputs=(example_input(),), round_to=1)
    report = pruned.meta["fxprune"]
    assert report["modules"]["b.0"]["out"]  # the unblocked conv still prunes
    assert "a.0" not in report["modules"] or "out" not in report["modules"]["a.0"]


def test_analyze_table_is_readable():
    table = str(fxprune.analyze(ConvChain(), (example_input(),)))
    assert "body_0_0" in table and "prunable" in table and "graph output" in table


def test_report_is_plain_json():
    import json
    pruned = fxprune.compile(ConvChain(), 0.5, example_inputs=(example_input(),), round_to=1)
    text = fxprune.report_json(pruned)
    data = json.loads(text)
    assert data["flops"]["ratio"] <= 0.5
    entry = data["modules"]["body.1.0"]
    assert len(entry["out"]) == pruned.get_submodule("body.1.0").out_channels
    assert len(entry["in"]) == pruned.get_submodule("body.1.0").in_channels
    assert all(g["size"] >= g["kept"] >= 1 for g in data["groups"])


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_makes_kept_widths_multiples(round_to):
    pruned = fxprune.compile(ConvChain(), 0.5, example_inputs=(example_input(),), round_to=round_to)
    for g in pruned.meta["fxprune"]["groups"]:
        if not g["blocked"] and g["size"] >= round_to:
            assert g["kept"] % round_to == 0 or g["kept"] == g["size"], g


def test_min_channels_is_respected():
    pruned = fxprune.compile(ConvChain(), 0.3, example_inputs=(example_input(),), min_channels=6, round_to=1)
    for g in pruned.meta["fxprune"]["groups"]:
        assert g["kept"] >= min(6, g["size"])


def test_ignore_keeps_a_modules_output_channels():
    model = ConvChain()
    pruned = fxprune.compile(model, 0.5, example_inputs=(example_input(),), ignore=["body.1.0"], round_to=1)
    assert pruned.get_submodule("body.1.0").out_channels == 24
    pruned2 = fxprune.compile(model, 0.5, example_inputs=(example_input(),), ignore=[model.body[1][0]], round_to=1)
    assert pruned2.get_submodule("body.1.0").out_channels == 24


def test_params_budget_and_both():
    model = ConvChain()
    p = fxprune.compile(model, fxprune.Budget(params=0.5), example_inputs=(example_input(),), round_to=1)
    assert p.meta["fxprune"]["params"]["ratio"] <= 0.5
    p = fxprune.compile(model, fxprune.Budget(flops=0.6, params=0.4), example_inputs=(example_input(),), round_to=1)
    assert p.meta["fxprune"]["params"]["ratio"] <= 0.4 and p.meta["fxprune"]["flops"]["ratio"] <= 0.6


def test_default_round_to_follows_each_groups_width():
    """round_to="auto": groups of 64 channels or more move 16 at a time (AVX-512 kernels' blocks), narrow
    ones finely (>= 8 choices), and a unit that spans 8 channels (a head) one unit at a time."""
    from fxprune.compiler import _analyse
    from fxprune.passes.allocation_common import group_round_to

    wide = nn.Sequential(nn.Conv2d(3, 256, 1), nn.ReLU(), nn.Conv2d(256, 64, 1), nn.ReLU(), nn.Conv2d(64, 16, 1),
                         nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    _, groups = _analyse(wide, (example_input(),), set(), ())
    steps = {g.name: group_round_to(groups, g, "auto") for g in groups.groups}
    assert steps == {"_0": 16, "_2": 16, "_4": 2, "_6": 1}
    _, heads = _analyse(FIXTURES["HeadReshape"]().eval(), (example_input(),), set(), ())
    (qkv,) = [g for g in heads.groups if g.name == "qkv"]  # 3 heads of 8 channels: one head at a time
    assert group_round_to(heads, qkv, "auto") == 1
    pruned = fxprune.compile(wide, 0.5, example_inputs=(example_input(),))
    assert pruned.meta["fxprune"]["options"]["round_to"] == "auto"
    kept = {g["name"]: g["kept"] for g in pruned.meta["fxprune"]["groups"]}
    assert kept["_0"] % 16 == 0 and kept["_2"] % 16 == 0 and kept["_4"] % 2 == 0 and kept["_0"] < 256


def test_allowed_kept_counts_are_the_full_size_then_every_multiple_of_the_step_down_to_the_floor():
    from types import SimpleNamespace
    from fxprune.passes.allocation_common import allowed_kept_counts
    for size in range(0, 40):
        for n_frozen in range(0, 6):
            for round_to in range(1, 10):
                for min_channels in range(0, 8):
                    counts = allowed_kept_counts(SimpleNamespace(size=size), n_frozen, round_to, min_channels)
                    floor = max(min_channels, 1, n_frozen)
                    step = round_to if 1 < round_to <= size else 1
                    expected = [size] + [k for k in range(size - 1, 0, -1) if k % step == 0 and k >= floor]
                    assert counts == (expected if size > floor else [size]), (size, n_frozen, round_to, min_channels)


def _analysed_with_costs(name):
    from fxprune.pipeline import AnalyseChannels, CompileState, CountCost, Trace, run_passes
    from fxprune.tracing import private_eval_copy
    state = CompileState(inputs=(example_input(),), model=private_eval_copy(FIXTURES[name]().eval()))
    return run_passes([Trace(), AnalyseChannels(), CountCost()], state)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_unit_cost_sums_each_factors_coefficient_times_the_other_factors(name):
    """The vectorised unit_cost against its definition, term by term (FLOPs and params)."""
    import math
    import numpy as np
    state = _analysed_with_costs(name)
    cost = state.cost
    for which, terms in (("flops", cost.flops_terms), ("params", cost.param_terms)):
        expected = np.zeros(cost.n_units)
        for term in terms:
            sizes = [f if isinstance(f, int) else len(f) for f in term.factors]
            for i, f in enumerate(term.factors):
                if not isinstance(f, int):
                    np.add.at(expected, f, term.coef * math.prod(s for j, s in enumerate(sizes) if j != i))
        assert np.array_equal(cost.unit_cost(which), expected), which


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_removal_orders_and_normalised_scores_follow_each_group(name):
    """Computed for all groups (bincounts; one call for the orders) against the definition group by group:
    scores over the group's mean; removable units least important first, ties in position order."""
    import numpy as np
    from fxprune.passes.allocation_common import (normalised_importance, protected_per_group, protected_units,
                                                  removal_orders)
    groups = _analysed_with_costs(name).groups
    rng = np.random.default_rng(0)
    # few values (many ties: the orders take the stable sort) and distinct ones (the unstable sort's own order)
    for scores in (rng.integers(0, 4, groups.n_units).astype(float), rng.random(groups.n_units)):
        norm = normalised_importance(groups, scores)
        protected = protected_units(groups, norm)
        orders, n_protected = removal_orders(groups, protected, norm), protected_per_group(groups, protected)
        assert len(orders) == len(groups.groups)
        for g in groups.groups:
            mean = scores[g.units].mean()
            np.testing.assert_allclose(norm[g.units], scores[g.units] / mean if mean > 0 else 1.0, rtol=1e-12)
            removable = g.units[~protected[g.units]]
            assert orders[g.id].tolist() == removable[np.argsort(norm[removable], kind="stable")].tolist()
            assert n_protected[g.id] == protected[g.units].sum()


def test_stable_argsort_is_numpys_stable_sort():
    """With ties, NaNs, infinities and negative zeros, at the lengths groups have."""
    import numpy as np
    from fxprune.passes.allocation_common import stable_argsort
    rng = np.random.default_rng(1)
    for n in (0, 1, 2, 7, 64, 3072):
        for values in (rng.random(n), rng.integers(0, 3, n).astype(float), np.zeros(n),
                       rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0], n), np.arange(n, 0, -1) * 1.0):
            assert stable_argsort(values).tolist() == np.argsort(values, kind="stable").tolist(), (n, values[:8])


@pytest.mark.parametrize("allocation", ["global", "global_per_flop", "uniform"])
def test_budget_one_keeps_everything(allocation):
    model = ConvChain()
    p = fxprune.compile(model, 1.0, example_inputs=(example_input(),), allocation=allocation)
    assert p.meta["fxprune"]["flops"]["ratio"] == 1.0
    assert all(g["kept"] == g["size"] for g in p.meta["fxprune"]["groups"])


def test_global_allocation_does_not_collapse_layers_when_importances_are_flat():
    """Random init gives every channel about the same L1 norm. Dividing by each channel's FLOPs (the
    opt-in "global_per_flop") then cuts high-resolution stages to one channel; the default must not."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    default = fxprune.compile(model, 0.5, example_inputs=(x,), verify=False, round_to=1)
    kept = [g["kept"] / g["size"] for g in default.meta["fxprune"]["groups"] if not g["blocked"]]
    assert min(kept) > 0.4
    per_flop = fxprune.compile(model, 0.5, example_inputs=(x,), verify=False, round_to=1,
                               allocation="global_per_flop")
    assert min(g["kept"] / g["size"] for g in per_flop.meta["fxprune"]["groups"] if not g["blocked"]) < 0.1


@pytest.mark.parametrize("allocation", ["global", "global_per_flop", "uniform"])
def test_allocations_meet_the_budget_closely(allocation):
    model = FIXTURES["Residual"]()
    p = fxprune.compile(model, 0.5, example_inputs=(torch.randn(1, 3, 16, 16),), allocation=allocation, round_to=1)
    ratio = p.meta["fxprune"]["flops"]["ratio"]
    assert 0.45 <= ratio <= 0.5


def test_uniform_keeps_the_same_ratio_everywhere():
    p = fxprune.compile(ConvChain(), 0.5, example_inputs=(example_input(),), allocation="uniform", round_to=1)
    ratios = [g["kept"] / g["size"] for g in p.meta["fxprune"]["groups"] if not g["blocked"]]
    assert max(ratios) - min(ratios) < 0.15


def test_l2_importance_ranks_a_dead_channel_last():
    model = ConvChain().eval()
    with torch.no_grad():
        model.body[0][0].weight[5] = 0  # a dead filter
        model.body[0][1].weight[5] = 0
        model.body[1][0].weight[:, 5] = 0
    for importance in ("l1", "l2"):
        p = fxprune.compile(model, 0.9, example_inputs=(example_input(),), importance=importance, round_to=1)
        assert 5 not in p.meta["fxprune"]["modules"]["body.0.0"]["out"]


@pytest.mark.parametrize("name", ["ConvChain", "AttentionHeads", "Residual"])
def test_result_is_independent_of_the_input_model(name):
    """No tensor of the result shares storage with the model: training the result (here: adding 1
    to every parameter and buffer) leaves the model as it was. Unpruned tensors (a frozen classifier's
    bias) were once handed over as views of the model's."""
    torch.manual_seed(0)
    model = FIXTURES[name]().eval()
    before = state(model)
    pruned = fxprune.compile(model, 0.5, example_inputs=(example_input(),), round_to=1)
    theirs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    ours = {t.untyped_storage().data_ptr() for t in list(pruned.parameters()) + list(pruned.buffers())}
    assert not theirs & ours
    with torch.no_grad():
        for t in list(pruned.parameters()) + [b for b in pruned.buffers() if b.is_floating_point()]:
            t.add_(1.0)
    assert_same_state(before, model)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_cost_tracker_equals_full_evaluation(name):
    """The incremental cost the greedy allocation uses prices every change as the full cost model does."""
    import numpy as np
    from fxprune.compiler import _analyse
    from fxprune.cost import build_cost_model

    gm, groups = _analyse(FIXTURES[name]().eval(), (example_input(),), set(), ())
    cost = build_cost_model(gm, groups)
    rng = np.random.default_rng(0)
    keep = rng.random(groups.n_units) < 0.7
    tracker = cost.tracker(keep)
    for _ in range(20):
        units = rng.choice(groups.n_units, size=rng.integers(1, 4), replace=True)
        kept = bool(rng.integers(2))
        trial = keep.copy()
        trial[units] = kept
        expected = {"flops": cost.flops(trial), "params": cost.params(trial)}
        assert tracker.if_changed(units, kept) == pytest.approx(expected, rel=1e-12)
        assert tracker.values == pytest.approx({"flops": cost.flops(keep), "params": cost.params(keep)}, rel=1e-12)
        tracker.change(units, kept)
        keep = trial
        assert np.array_equal(tracker.keep, keep)
        assert tracker.values == pytest.approx(expected, rel=1e-12)
    for kept in (True, False):      # pricing several sets at once gives exactly what pricing each gives
        sets = [rng.choice(groups.n_units, size=rng.integers(0, 6), replace=True) for _ in range(7)]
        assert tracker.if_changed_each(sets, kept) == [tracker.if_changed(units, kept) for units in sets]
    flops_only = cost.tracker(keep, ["flops"])       # an allocation prices only what its budget constrains
    units = np.arange(min(3, groups.n_units))
    trial = keep.copy()
    trial[units] = False
    assert flops_only.if_changed(units, False) == pytest.approx({"flops": cost.flops(trial)}, rel=1e-12)


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"])
def test_add_back_prices_candidates_in_windows_as_one_at_a_time(model_name, monkeypatch):
    """The global allocation returns chunks that still fit, pricing its candidates a window at a time:
    the plans must be those of pricing them one at a time (a window of 1), on every budget and step."""
    import numpy as np
    import torchvision
    from fxprune.compiler import _analyse
    from fxprune.cost import build_cost_model
    from fxprune.passes import global_allocation
    from fxprune.passes.l1_importance import L1Importance

    torch.manual_seed(0)
    gm, groups = _analyse(getattr(torchvision.models, model_name)().eval(), (torch.randn(1, 3, 64, 64),), set(), ())
    cost = build_cost_model(gm, groups)
    scores = L1Importance().score(gm, groups)
    plans = {}
    for window in (1, global_allocation._PRICING_WINDOW):
        monkeypatch.setattr(global_allocation, "_PRICING_WINDOW", window)
        for budget in (fxprune.Budget(flops=0.3), fxprune.Budget(flops=0.6), fxprune.Budget(params=0.5)):
            for round_to in (1, 8, "auto"):
                plan = global_allocation.GlobalAllocation(budget, round_to).run(groups, cost, scores)
                plans.setdefault((str(budget), round_to), []).append(plan.keep_unit)
    assert all(np.array_equal(one, windowed) for one, windowed in plans.values())


def test_auto_steps_fall_back_to_one_channel_when_they_cannot_meet_the_budget(caplog):
    """Two 64-channel groups move 16 at a time under round_to="auto", so they cannot go below 16 channels
    (9% of the FLOPs here); a 5% budget needs finer steps. "auto" is a preference, not a limit: compile
    falls back to one-channel steps and says so. round_to=16 asked for explicitly still refuses."""
    import logging

    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 10, 3, padding=1)).eval()
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        pruned = fxprune.compile(model, 0.05, example_inputs=(example_input(),))
    assert pruned.meta["fxprune"]["flops"]["ratio"] <= 0.05
    kept = sorted(g["kept"] for g in pruned.meta["fxprune"]["groups"] if g["size"] == 64)
    assert kept[0] < 16
    assert any("one-channel steps" in r.getMessage() for r in caplog.records)
    with pytest.raises(fxprune.BudgetError):
        fxprune.compile(model, 0.05, example_inputs=(example_input(),), round_to=16)


def test_kernel_gather_equals_two_index_selects():
    """The rewrite's one-pass gather of a conv weight cut on both channel dims (big kernels) is the
    two index_selects it replaces, and big enough 3x3 weights take it."""
    from fxprune.passes.rewrite import _gather_kernels, _gathers_kernels

    weight = torch.randn(96, 80, 3, 3)
    rows, columns = torch.tensor([0, 5, 7, 95]), torch.tensor([1, 2, 40, 79])
    assert _gathers_kernels(weight, [(0, rows), (1, columns)])
    assert not _gathers_kernels(weight[:, :, :1, :1].contiguous(), [(0, rows), (1, columns)])  # 1x1: two passes
    assert torch.equal(_gather_kernels(weight, rows, columns), weight.index_select(0, rows).index_select(1, columns))
