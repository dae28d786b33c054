"""SCOP end to end: on a task where some channels carry the label and others label-free noise, the
noise channels rank lowest; the result verifies; residual streams stay whole by default; the user's
model (BatchNorm statistics included) is untouched."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fixtures import Residual, example_input
from fxprune.compiler import _analyse
from fxprune.errors import ConfigError
from fxprune.importance import ImportanceData

SIGNAL, NOISE = [0, 1, 2, 3], [4, 5, 6, 7]


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def task(n_batches=30, seed=0):
    """Input channel 0 carries the label; channels 1 and 2 are label-free noise."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        y = torch.randint(0, 2, (32,), generator=g)
        x = torch.randn(32, 3, 6, 6, generator=g)
        x[:, 0] += (2 * y - 1).float().view(-1, 1, 1) * 1.5
        batches.append((x, y))
    return batches


def trained_probe():
    """Signal channels read input 0 (with both signs, so ReLU keeps the label for either class);
    noise channels read inputs 1 and 2. The classifier is trained; the convolution is fixed."""
    torch.manual_seed(0)
    model = Probe()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.zero_()
        for i, c in enumerate(SIGNAL):
            model.conv.weight[c, 0] = 1.0 if i % 2 == 0 else -1.0
        for i, c in enumerate(NOISE):
            model.conv.weight[c, 1 + i % 2] = 1.0 if i < 2 else -1.0
    model.train()
    optimizer = torch.optim.Adam(list(model.fc.parameters()) + list(model.bn.parameters()), lr=0.05)
    for _ in range(3):
        for x, y in task():
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("score_form", ["official", "paper"])
def test_noise_channels_rank_lowest(score_form):
    model = trained_probe()
    gm, groups = _analyse(model, (torch.randn(1, 3, 6, 6),), set(), ())
    scop = fxprune.SCOP(epochs=4, score_form=score_form, seed=0)
    scores, results = scop.score_with_results(gm, groups, ImportanceData(task()))
    per_channel = scores[groups.units_of(groups.param_slices["conv.weight"][0])]
    assert per_channel[NOISE].max() < per_channel[SIGNAL].min(), per_channel
    beta = np.array(next(iter(results["factors"].values())))
    assert beta[SIGNAL].mean() > 0.7 and beta[SIGNAL].mean() > beta[NOISE].mean() + 0.2, beta


def test_saturated_factors_are_counted_and_warned_about(caplog):
    import logging
    model = trained_probe()
    gm, groups = _analyse(model, (torch.randn(1, 3, 6, 6),), set(), ())
    with caplog.at_level(logging.INFO, logger="fxprune"):
        _, hot = fxprune.SCOP(epochs=4, lr=0.5, seed=0).score_with_results(gm, groups, ImportanceData(task()))
    beta = np.array(next(iter(hot["factors"].values())))
    assert hot["saturated"] == pytest.approx((beta >= 1 - 1e-6).mean()) and hot["saturated"] > 0.25
    assert any("saturated" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    _, cold = fxprune.SCOP(epochs=1, lr=1e-4, seed=0).score_with_results(gm, groups, ImportanceData(task()))
    cold_beta = np.array(next(iter(cold["factors"].values())))
    assert cold["saturated"] == 0.0 and cold["below_half"] == pytest.approx((cold_beta < 0.5).mean())


def test_compile_with_scop_prunes_the_noise_and_verifies():
    model = trained_probe()
    before = copy.deepcopy(model.state_dict())
    pruned = fxprune.compile(model, 0.6, example_inputs=(torch.randn(1, 3, 6, 6),), importance=fxprune.SCOP(epochs=4),
                             data=task(), round_to=1, allocation="uniform")
    report = pruned.meta["fxprune"]
    assert report["verification"]["passed"]
    kept = report["modules"]["conv"]["out"]
    assert set(SIGNAL) <= set(kept)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats too


def test_residual_streams_stay_whole_unless_scope_all():
    torch.manual_seed(0)
    model = Residual().eval()
    data = [(example_input(8), torch.randint(0, 5, (8,))) for _ in range(3)]
    pruned = fxprune.compile(model, 0.7, example_inputs=(example_input(),), importance=fxprune.SCOP(epochs=1),
                             data=data, round_to=1)
    groups = pruned.meta["fxprune"]["groups"]
    stream = [g for g in groups if len(g["spaces"]) > 1]
    assert stream and all(g["kept"] == g["size"] and any("SCOP" in r for r in g["reasons"]) for g in stream)
    assert pruned.meta["fxprune"]["flops"]["ratio"] <= 0.7
    everything = fxprune.compile(model, 0.7, example_inputs=(example_input(),), data=data, round_to=1,
                                 importance=fxprune.SCOP(epochs=1, scope="all"))
    assert any(g["kept"] < g["size"] for g in everything.meta["fxprune"]["groups"] if len(g["spaces"]) > 1)
    hybrid_config = fxprune.SCOP(epochs=1, scope="l1_streams")
    hybrid = fxprune.compile(model, 0.7, example_inputs=(example_input(),), data=data, round_to=1,
                             importance=hybrid_config, allocation="uniform")
    report = hybrid.meta["fxprune"]
    assert report["verification"]["passed"]
    streams = {g["id"] for g in report["groups"] if len(g["spaces"]) > 1}
    assert any(g["kept"] < g["size"] for g in report["groups"] if g["id"] in streams)  # pruned, by L1
    stream_names = {g["name"] for g in report["groups"] if g["id"] in streams}
    factors = report["importance"]["factors"]
    assert factors and not stream_names & set(factors)                              # no factors trained there
    settings = dict(vars(hybrid_config))                                              # the config holds no results:
    again = fxprune.compile(model, 0.7, example_inputs=(example_input(),), data=data, round_to=1,
                            importance=hybrid_config, allocation="uniform")           # reused, it gives the same
    assert vars(hybrid_config) == settings and again.meta["fxprune"]["importance"]["factors"] == factors


def test_bad_options_and_missing_data():
    with pytest.raises(ConfigError):
        fxprune.SCOP(score_form="nope")
    with pytest.raises(ConfigError):
        fxprune.SCOP(scope="nope")
    with pytest.raises(ConfigError, match="unknown|choose|knockoff"):
        fxprune.SCOP(knockoff="nope")
    with pytest.raises(ConfigError, match="needs calibration data"):
        fxprune.compile(Probe().eval(), 0.5, example_inputs=(torch.randn(1, 3, 6, 6),), importance=fxprune.SCOP())
