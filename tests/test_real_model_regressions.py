"""Regressions found on real timm and Hugging Face models, each rebuilt from a small module.

Every case once ended in a raw exception, a wrong model caught only by verification, or a compile that
reported success without pruning. Each test states what fxprune must do instead."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

X = torch.randn(1, 3, 16, 16)


def compile_small(model, x=X, **kwargs):
    kwargs.setdefault("round_to", 1)
    return fxprune.compile(model, 0.5, example_inputs=(x,), **kwargs)


def assert_pruned_and_equal(model, pruned, x=X):
    """Pruning happened, and the result runs (verification inside compile checked it exactly)."""
    report = pruned.meta["fxprune"]
    assert report["flops"]["ratio"] <= 0.5 + 1e-9
    assert report["budget"]["met"] is True
    assert report["verification"]["passed"]
    assert pruned(x).shape == model.eval()(x).shape


class ConvPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


# 1. torch.export graphs hold ATen ops: refusing them beats a silent "ok" that pruned nothing
def test_aten_graph_from_torch_export_is_refused_with_what_to_pass_instead():
    exported = torch.export.export(ConvPair().eval(), (X,)).module()
    with pytest.raises(fxprune.UnsupportedModelError, match=r"(?s)ATen-level.*torch\.export.*original nn\.Module"):
        compile_small(exported)


class NoFlops(nn.Module):
    """Nothing fxprune counts FLOPs for: a budget of 0.5 cannot be met by keeping everything."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 3, 1, 1))

    def forward(self, x):
        return F.relu(x * self.scale)


def test_budget_of_a_model_without_counted_flops_is_an_error_not_success():
    with pytest.raises(fxprune.BudgetError, match="counted no FLOPs"):
        compile_small(NoFlops())


# 2. keyword arguments (BEiT, EVA-02 call F.linear(x, weight=..., bias=...))
class KeywordLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.w = nn.Parameter(torch.randn(4, 16))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.add(input=F.relu(self.fc1(x)), other=self.fc1.bias)
        h = torch.transpose(h.unsqueeze(0), dim0=0, dim1=1).squeeze(1)
        return F.linear(input=h, weight=self.w, bias=self.b)


def test_functional_linear_with_keyword_arguments_is_pruned():
    model, x = KeywordLinear(), torch.randn(2, 8)
    pruned = compile_small(model, x)
    assert_pruned_and_equal(model, pruned, x)
    assert pruned.meta["fxprune"]["modules"]["fc1"]["out"] != list(range(16))


# 3. FasterNet: `self.forward = self.forward_slicing` in __init__
class PartialConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.part = dim // 4
        self.conv = nn.Conv2d(self.part, self.part, 3, padding=1, bias=False)
        self.forward = self.forward_split_cat

    def forward_split_cat(self, x):
        x1, x2 = torch.split(x, [self.part, x.shape[1] - self.part], dim=1)
        return torch.cat((self.conv(x1), x2), 1)


class ReboundForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = PartialConv(16)
        self.c1 = nn.Conv2d(16, 32, 1)
        self.c2 = nn.Conv2d(32, 8, 1)
        self.forward = self.forward_rebound

    def forward_rebound(self, x):
        return self.c2(F.relu(self.c1(self.mix(self.stem(x)))))


def test_forward_rebound_in_init_is_traced_on_the_private_copy():
    model = ReboundForward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = compile_small(model)
    assert_pruned_and_equal(model, pruned)
    assert model.forward.__self__ is model and model.mix.forward.__self__ is model.mix  # the user's model untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# 4. Wav2Vec2: torch.nn.utils.parametrizations.weight_norm
class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 16, 3, padding=1))
        self.c2 = nn.Conv2d(16, 16, 1)
        self.c3 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))


def test_weight_norm_layer_is_frozen_with_a_reason_and_the_rest_pruned():
    model = WeightNormed()
    pruned = compile_small(model)
    assert_pruned_and_equal(model, pruned)
    modules = pruned.meta["fxprune"]["modules"]
    assert "c2" in modules and "c1" not in modules  # c1's weight is computed: its channels stay
    groups = fxprune.analyze(model, (X,))
    assert any("computed weight" in b for b in groups.blocked_ops)


# 5. TResNet's BlurPool: F.conv2d(x, filt, groups=self.channels) with a fixed buffer filter
class BlurPool(nn.Module):
    def __init__(self, channels, groups_by_keyword=True):
        super().__init__()
        self.channels, self.by_keyword = channels, groups_by_keyword
        taps = torch.tensor([1.0, 2.0, 1.0])
        filt = taps[:, None] * taps[None, :]
        self.register_buffer("filt", (filt / filt.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        if self.by_keyword:
            return F.conv2d(x, self.filt, stride=2, padding=0, groups=self.channels)
        return F.conv2d(x, self.filt, None, 2, 0, 1, self.channels)


@pytest.mark.parametrize("by_keyword", [True, False])
def test_functional_depthwise_conv_gets_its_groups_rewritten(by_keyword):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), BlurPool(16, by_keyword), nn.Conv2d(16, 8, 3))
    pruned = compile_small(model)
    assert_pruned_and_equal(model, pruned)
    assert pruned.meta["fxprune"]["modules"]["0"]["out"] != list(range(16))


# 6. timm's ScaledStdConv2d: a Conv2d subclass that standardises its weight in forward
class StandardisedConv(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w * self.gain, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WithStandardisedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.std = StandardisedConv(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 16, 1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(F.relu(self.std(x)))))


@pytest.mark.parametrize("as_leaf", [False, True])
def test_conv_subclass_with_its_own_forward_does_not_take_the_conv_rule(as_leaf):
    model = WithStandardisedConv()
    pruned = compile_small(model, leaf_modules=(StandardisedConv,) if as_leaf else ())
    assert_pruned_and_equal(model, pruned)
    assert "std" not in pruned.meta["fxprune"]["modules"] and "c1" in pruned.meta["fxprune"]["modules"]


def test_conv_subclass_that_only_changes_init_keeps_the_conv_rule():
    class InitOnly(nn.Conv2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            nn.init.zeros_(self.bias)

    model = nn.Sequential(InitOnly(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3))
    pruned = compile_small(model, leaf_modules=(InitOnly,))
    assert_pruned_and_equal(model, pruned)
    assert pruned.meta["fxprune"]["modules"]["0"]["out"] != list(range(16))


def test_module_with_a_forward_hook_does_not_take_its_rule():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 3))
    model[0].register_forward_hook(lambda module, inputs, output: output * 2)
    groups = fxprune.analyze(model, (X,))
    assert any("forward hook" in b for b in groups.blocked_ops)


# 7. NF-ResNet: every conv computes its weight, so only the graph output makes a group
class AllComputedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.s1 = StandardisedConv(3, 16, 3, padding=1)
        self.s2 = StandardisedConv(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.s2(F.relu(self.s1(x))).mean((2, 3)))


def test_no_prunable_channels_error_names_the_ops_that_blocked_the_layers():
    with pytest.raises(fxprune.NoPrunableChannelsError) as info:
        compile_small(AllComputedWeights())
    message = str(info.value)
    assert "graph output" in message
    assert "%conv2d" in message and "computed weight" in message


def test_an_internal_rule_failure_is_an_fxprune_error_naming_the_node(monkeypatch):
    import dataclasses

    from fxprune.ops import REGISTRY

    def broken(analysis, node):
        raise IndexError("tuple index out of range")

    monkeypatch.setitem(REGISTRY.functions, F.relu, dataclasses.replace(REGISTRY.functions[F.relu], channels=broken))
    with pytest.raises(fxprune.UnsupportedModelError, match=r"(?s)could not analyse %.*relu.*leaf_modules"):
        compile_small(ConvPair())


# timm's ViT/DeiT: forward(x, attn_mask=None, is_causal=False) branches on its optional arguments
class OptionalArguments(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x, mask=None, double=False):
        h = F.relu(self.c1(x))
        if mask is not None:
            h = h * mask
        if double:
            h = h * 2
        return self.c2(h)


def test_forward_parameters_with_defaults_are_traced_at_their_defaults():
    model = OptionalArguments()
    pruned = compile_small(model)
    assert_pruned_and_equal(model, pruned)
    with pytest.raises(Exception, match="specialized"):  # the pruned model checks they keep that value
        pruned(X, torch.ones(1))
