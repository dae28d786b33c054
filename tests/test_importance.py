"""Each importance criterion on small fixtures: a channel made dead (or redundant) ranks last in its
group, data-driven criteria get their data through compile, and none of them touches the model."""
import copy

import numpy as np
import pytest
import torch

import fxprune
from fixtures import ConvChain, Residual, example_input
from fxprune.compiler import _analyse
from fxprune.errors import ConfigError
from fxprune.importance import ImportanceData, resolve_importance

DEAD = 5  # the channel of body.1 (16 -> 24 conv + BN) each test makes unimportant


def unit_scores(model, importance, data=None, param="body.1.0.weight"):
    """Scores of the units along dim 0 of `param`, in channel order."""
    gm, groups = _analyse(model, (example_input(),), set(), ())
    scores = resolve_importance(importance).score(gm, groups, data)
    return scores[groups.units_of(groups.param_slices[param][0])]


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def chain_with_dead_channel():
    torch.manual_seed(0)
    model = ConvChain().eval()
    with torch.no_grad():
        conv, bn = model.body[1][0], model.body[1][1]
        conv.weight[DEAD] = 0
        conv.bias.zero_() if conv.bias is not None else None
        bn.weight[DEAD] = 0
        bn.bias[DEAD] = 0
        model.body[2][0].weight[:, DEAD] = 0  # its consumer reads nothing from it either
    return model


@pytest.mark.parametrize("name", ["l1", "l2", "bn", "taylor"])
def test_dead_channel_ranks_last(name):
    model = chain_with_dead_channel()
    scores = unit_scores(model, name, ImportanceData(batches()))
    assert len(scores) == 24
    assert np.argmin(scores) == DEAD
    assert scores[DEAD] < 0.5 * np.sort(scores)[1]


def test_bn_scale_reads_gamma_only():
    torch.manual_seed(0)
    model = ConvChain().eval()
    with torch.no_grad():
        model.body[1][1].weight.fill_(1.0)
        model.body[1][1].weight[DEAD] = 0.01  # the conv weights are untouched: only gamma says "dead"
    scores = unit_scores(model, "bn")
    assert np.argmin(scores) == DEAD
    assert scores[(DEAD + 1) % 24] == pytest.approx(1.0)


def test_bn_scale_falls_back_to_l1_without_norm_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3)).eval()
    gm, groups = _analyse(model, (example_input(),), set(), ())
    bn = resolve_importance("bn").score(gm, groups)
    l1 = resolve_importance("l1").score(gm, groups)
    assert np.allclose(bn, l1)


def test_fpgm_ranks_the_filter_at_the_median_last():
    torch.manual_seed(0)
    model = ConvChain().eval()
    with torch.no_grad():
        w = model.body[1][0].weight
        others = torch.cat([w[:DEAD], w[DEAD + 1:]])
        w[DEAD] = others.mean(0)  # the filter every other filter is closest to on average: replaceable
    scores = unit_scores(model, "fpgm")
    assert np.argmin(scores) == DEAD


def test_fpgm_sums_producers_of_a_residual_group():
    torch.manual_seed(0)
    model = Residual().eval()
    gm, groups = _analyse(model, (example_input(),), set(), ())
    scores = resolve_importance("fpgm").score(gm, groups)
    stem = groups.units_of(groups.param_slices["stem.0.weight"][0])
    # three producers write the residual stream (stem, b1's and b2's last convs): each unit sums three
    # positive distance sums, more than the stem's alone
    w = model.stem[0].weight.detach().double().flatten(1)
    assert np.all(scores[stem] > torch.cdist(w, w).sum(1).numpy() + 1e-9)


def test_taylor_needs_data_and_targets():
    with pytest.raises(ConfigError, match="needs calibration data"):
        fxprune.compile(ConvChain().eval(), 0.5, example_inputs=(example_input(),), importance="taylor")
    with pytest.raises(ConfigError, match="targets"):
        fxprune.compile(ConvChain().eval(), 0.5, example_inputs=(example_input(),), importance="taylor",
                        data=[torch.randn(4, 3, 8, 8)])


def test_taylor_leaves_the_model_untouched_even_when_weights_are_frozen():
    model = chain_with_dead_channel()
    for p in model.body[0].parameters():
        p.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    unit_scores(model, "taylor", ImportanceData(batches()))
    assert all(p.grad is None for p in model.parameters())
    assert all(not p.requires_grad for p in model.body[0].parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_taylor_uses_the_given_loss():
    model = chain_with_dead_channel()
    calls = []

    def loss_fn(output, target):
        calls.append(output.shape)
        return torch.nn.functional.cross_entropy(output, target)

    unit_scores(model, fxprune.TaylorImportance(n_batches=3), ImportanceData(batches(5), loss_fn))
    assert len(calls) == 3


def test_random_is_seeded():
    model = ConvChain().eval()
    a = unit_scores(model, fxprune.RandomImportance(seed=1))
    b = unit_scores(model, fxprune.RandomImportance(seed=1))
    c = unit_scores(model, fxprune.RandomImportance(seed=2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("name", ["l1", "l2", "bn", "taylor", "fpgm", "random"])
def test_every_criterion_compiles_verified(name):
    model = chain_with_dead_channel()
    pruned = fxprune.compile(model, 0.6, example_inputs=(example_input(),), importance=name, data=batches(),
                             round_to=1)
    report = pruned.meta["fxprune"]
    assert report["verification"]["passed"] and report["flops"]["ratio"] <= 0.6
    assert report["options"]["importance"] == name
    if name != "random":
        assert DEAD not in report["modules"]["body.1.0"]["out"]


def test_importance_names_lists_every_builtin():
    assert {"l1", "l2", "bn", "taylor", "fpgm", "random"} <= set(fxprune.importance_names())


@pytest.mark.parametrize("shape", [(7,), (6, 5), (8, 4, 3, 3), (8, 1, 3, 3), (5, 6, 1, 1), (4, 3, 2, 5, 2), (1, 9, 2)])
def test_position_sums_are_the_sums_over_every_other_dim(shape):
    from fxprune.passes.importance_common import position_sums
    torch.manual_seed(0)
    tensor = torch.randn(shape)
    elements = {dim: np.arange(size) for dim, size in enumerate(shape)}
    for (dim, want), (got_elements, got) in zip(elements.items(), position_sums(tensor, elements)):
        other = [d for d in range(len(shape)) if d != dim]
        reference = tensor.double().sum(dim=other) if other else tensor.double()
        assert got_elements is want
        assert got.shape == (shape[dim],)
        np.testing.assert_allclose(got, reference.numpy(), rtol=1e-5, atol=1e-5)
        # never a view of the input, which the L1 pass reuses as scratch for the next parameter
        assert got.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
    # a transposed (non-contiguous) tensor sums the same
    t = tensor.transpose(0, -1)
    dims = {0: np.arange(t.shape[0])}
    np.testing.assert_allclose(next(position_sums(t, dims))[1], t.double().sum(dim=list(range(1, t.ndim))).numpy()
                               if t.ndim > 1 else t.double().numpy(), rtol=1e-5, atol=1e-5)


class _OneInputColumn(torch.nn.Module):
    """Weights of every layout the L1 pass reads: 4-d, [n, 1] (its position sums are its values), 2-d,
    1-d; the [n, 1] one comes after a larger one, so it is read from reused scratch memory."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.gate = torch.nn.Linear(1, 6)
        self.norm = torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        y = self.conv(x) * torch.sigmoid(self.gate(x.mean((1, 2, 3))[:, None]))[:, :, None, None]
        return self.head(torch.relu(self.norm(y)).mean((2, 3)))


@pytest.mark.parametrize("power", [1, 2])
def test_l1_and_l2_equal_the_norm_of_every_slice_a_unit_owns(power):
    torch.manual_seed(0)
    model = _OneInputColumn().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(-1, 1)
        model.norm.bias.uniform_(-1, 1)
    gm, groups = _analyse(model, (torch.randn(2, 3, 4, 4),), set(), ())
    scores = resolve_importance("l1" if power == 1 else "l2").score(gm, groups)
    params = dict(gm.named_parameters())
    want = np.zeros(groups.n_units)
    for name, dims in groups.param_slices.items():
        if name not in params:  # buffers (running statistics) are not weights
            continue
        weight = params[name].detach().double().abs() ** power
        for dim, elements in dims.items():
            other = [d for d in range(weight.ndim) if d != dim]
            per_position = weight.sum(dim=other) if other else weight
            for element, value in zip(elements, per_position.tolist()):
                want[groups.units_of(np.array([element]))[0]] += value
    np.testing.assert_allclose(scores, want ** (1 / power), rtol=1e-6)
    assert list(groups.param_slices).index("gate.weight") > list(groups.param_slices).index("conv.weight")
    assert 0 in groups.param_slices["gate.weight"]
