"""One fixture per registry entry added with docs/adding-an-op.md: the groups it must produce, and a
pruned model equal to the masked original."""
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

X = torch.randn(2, 3, 12, 12)


def groups_by_layer(model):
    """{producing layer: (prunable?, frozen reasons)} from fxprune.analyze."""
    return {g.name: (g.prunable, g.frozen_reasons) for g in fxprune.analyze(model, (X,)).groups}


def prune_and_check(model):
    pruned = fxprune.compile(model, 0.5, example_inputs=(X,), round_to=1)
    assert pruned.meta["fxprune"]["verification"]["passed"] and pruned.meta["fxprune"]["flops"]["ratio"] <= 0.5
    return pruned.meta["fxprune"]["modules"]


class FunctionalBatchNorm(nn.Module):
    """A custom norm layer's forward: F.batch_norm over its own buffers and affine parameters."""

    def __init__(self, training=False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 8, 3)
        self.weight, self.bias = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))
        self.register_buffer("mean", torch.randn(16))
        self.register_buffer("var", torch.rand(16) + 0.5)
        self.training_stats = training

    def forward(self, x):
        h = F.batch_norm(self.conv1(x), self.mean, self.var, self.weight, self.bias, training=self.training_stats)
        return self.conv2(F.relu(h))


def test_functional_batch_norm_prunes_with_its_conv():
    for training in (False, True):
        model = FunctionalBatchNorm(training).eval()
        assert groups_by_layer(model) == {"conv1": (True, []), "conv2": (False, [
            "graph output (the model's outputs keep their size)"])}
        modules = prune_and_check(model)
        assert set(modules[""]["params"]) == {"weight", "bias", "mean", "var"}


class FunctionalGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 8, 3)
        self.weight, self.bias = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.conv2(F.relu(F.group_norm(self.conv1(x), 4, self.weight, self.bias)))


def test_functional_group_norm_keeps_groups_equal_and_normalises_over_kept():
    model = FunctionalGroupNorm().eval()
    assert groups_by_layer(model)["conv1"] == (True, [])
    kept = prune_and_check(model)["conv1"]["out"]
    per_group = [sum(1 for c in kept if c // 4 == g) for g in range(4)]
    assert len(set(per_group)) == 1 and [c % 4 for c in kept[:per_group[0]]] == [c % 4 for c in kept[-per_group[0]:]]


class FunctionalInstanceNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 8, 3)
        self.weight, self.bias = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.conv2(F.relu(F.instance_norm(self.conv1(x), weight=self.weight, bias=self.bias)))


def test_functional_instance_norm_prunes_with_its_conv():
    model = FunctionalInstanceNorm().eval()
    assert groups_by_layer(model)["conv1"] == (True, [])
    assert set(prune_and_check(model)[""]["params"]) == {"weight", "bias"}
