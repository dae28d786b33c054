"""AOFP end to end on small networks: dead filters go first, the user's model is never trained, the
result passes the core's differential verification. (The search state machine itself is tested
against a synthetic oracle in test_aofp_search.py.)"""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ConfigError

DEAD = [1, 4, 6, 9, 12, 13]


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class ResidualNet(nn.Module):
    """A residual stream (stem + two blocks' outputs) is one group: AOFP masks it at every add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
                                    for _ in range(2))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


def data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def with_dead_filters():
    torch.manual_seed(0)
    net = TwoConv().eval()
    with torch.no_grad():
        for t in (net.c1.weight, net.c1.bias, net.b1.weight, net.b1.bias):
            t[DEAD] = 0
    return net


def run(net, budget=0.75, **options):
    config = fxprune.AOFP(**{**dict(theta=0.01, iters_per_half=4, warmup_iters=0, max_epochs=10, seed=0), **options})
    pruned = fxprune.compile(net, budget, example_inputs=(torch.randn(1, 3, 8, 8),), importance=config, data=data(),
                             round_to=1)
    return pruned, config


def test_dead_filters_are_pruned_first_and_nothing_else():
    net = with_dead_filters()
    before = copy.deepcopy(net.state_dict())
    pruned, config = run(net)
    report = pruned.meta["fxprune"]
    kept = report["modules"]["c1"]["out"]
    removed = sorted(set(range(16)) - set(kept))
    assert removed and set(removed) <= set(DEAD)                  # only dead filters went
    moves = [e for e in report["importance"]["history"] if e["kind"] == "move"]
    assert moves and all(set(e["pruned"]) <= set(DEAD) for e in moves if e["group"] == 0)
    assert report["importance"]["steps"] > 0 and report["budget"]["met"]
    json.dumps(report)                                             # the report, results included, is plain data
    assert not hasattr(config, "last_run")                         # and nothing is left on the config
    assert 0.6 < report["flops"]["ratio"] <= 0.75                  # stops at the move that meets the target
    assert report["verification"]["passed"]                       # rewrite == masked trained model
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the user's model untrained


def test_same_seed_same_result():
    a, _ = run(with_dead_filters())
    b, _ = run(with_dead_filters())
    assert a.meta["fxprune"]["modules"] == b.meta["fxprune"]["modules"]
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(a(x), b(x))


def test_flops_aware_thresholds_follow_channel_flops(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="fxprune"):
        pruned, config = run(with_dead_filters(), flops_aware=True)
    assert pruned.meta["fxprune"]["verification"]["passed"]
    line = next(r.getMessage() for r in caplog.records if "FLOPs-aware" in r.getMessage())
    scales = [float(v) for v in line.split("[")[1].rstrip("]").split(",")]
    assert np.mean(scales) == pytest.approx(1.0) and len(set(scales)) > 1


@pytest.mark.parametrize("score_bn", ["base_stats", "batch", "eval"])
def test_residual_stream_is_searched_as_one_group(score_bn):
    torch.manual_seed(0)
    pruned, config = run(ResidualNet().eval(), budget=0.8, score_bn=score_bn, theta=0.5)
    report = pruned.meta["fxprune"]
    assert report["verification"]["passed"] and report["flops"]["ratio"] <= 0.8
    stream = [len(report["modules"].get(m, {}).get("out", range(16))) for m in ("stem.0", "blocks.0.3", "blocks.1.3")]
    assert len(set(stream)) == 1  # coupled widths moved together


def test_aofp_needs_training_data_and_a_flops_budget():
    with pytest.raises(ConfigError, match="needs calibration data"):
        fxprune.compile(TwoConv().eval(), 0.5, example_inputs=(torch.randn(1, 3, 8, 8),), importance=fxprune.AOFP())
    with pytest.raises(ConfigError, match="FLOPs"):
        fxprune.compile(TwoConv().eval(), fxprune.Budget(params=0.5), example_inputs=(torch.randn(1, 3, 8, 8),),
                        importance=fxprune.AOFP(), data=data())
    with pytest.raises(ConfigError, match="score_bn"):
        fxprune.AOFP(score_bn="nope")
