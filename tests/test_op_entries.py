"""One fixture per registry entry added with docs/adding-an-op.md: the groups it must produce, and a
pruned model equal to the masked original."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

X = torch.randn(2, 3, 12, 12)


@pytest.fixture(autouse=True)
def same_weights_whatever_ran_before():
    """Which channels L1 removes depends on the random weights: seed each test so it does not depend on
    the tests that ran before it."""
    torch.manual_seed(0)


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


# ------------------------------------------------------------------ RMSNorm, stack/unbind, torch._assert
class Tokens(nn.Module):
    """Patch embedding to (batch, tokens, dim), the layout transformers' norms and MLPs see."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)

    def forward(self, x):
        return self.embed(x).flatten(2).transpose(1, 2)


class RMSNormMLP(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.tokens, self.functional = Tokens(), functional
        self.norm = nn.RMSNorm(16)
        self.weight = nn.Parameter(torch.rand(16) + 0.5)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, x):
        x = self.tokens(x)
        h = F.rms_norm(x, (16,), self.weight) if self.functional else self.norm(x)
        return self.head((x + self.fc2(F.silu(self.fc1(h)))).mean(1))


def test_rms_norm_normalises_over_the_kept_hidden_channels():
    for functional in (False, True):
        model = RMSNormMLP(functional).eval()
        assert groups_by_layer(model) == {"tokens_embed": (True, []), "fc1": (True, []), "head": (False, [
            "graph output (the model's outputs keep their size)"])}
        modules = prune_and_check(model)  # the masked original runs RMSNorm over the kept channels only
        assert ("" if functional else "norm") in modules and "tokens.embed" in modules


class HandWrittenRMSNorm(nn.Module):
    """RMSNorm as Hugging Face writes it (x.pow(2).mean(-1)): a mean over the hidden channels."""

    def __init__(self, dim=16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))


class OnePlusWeightRMSNorm(HandWrittenRMSNorm):
    """Gemma's variant: the scale is computed from the parameter (1 + weight), position by position."""

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + 1e-6)) * (1.0 + self.weight.float())


class HandWrittenRMSNormMLP(nn.Module):
    def __init__(self, norm=HandWrittenRMSNorm):
        super().__init__()
        self.tokens, self.norm = Tokens(), norm()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        x = self.tokens(x)
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))   # the hidden state is the output


@pytest.mark.parametrize("norm", [HandWrittenRMSNorm, OnePlusWeightRMSNorm])
def test_mean_over_channels_averages_the_kept_ones_and_outputs_shrink_on_request(norm):
    model = HandWrittenRMSNormMLP(norm).eval()
    assert groups_by_layer(model) == {"tokens_embed": (False, ["graph output (the model's outputs keep their size)"]),
                                      "fc1": (True, [])}
    pruned = fxprune.compile(model, 0.5, example_inputs=(X,), round_to=1, keep_outputs=False)
    report = pruned.meta["fxprune"]
    # the masked original averages over the kept hidden channels, as the pruned mean does
    assert report["verification"]["passed"] and report["flops"]["ratio"] <= 0.5
    hidden = report["outputs"][""]["2"]
    assert 0 < len(hidden) < 16 and pruned.norm.weight.shape == (len(hidden),)
    assert pruned(X).shape == (2, 9, len(hidden))


class FusedProjectionSlices(nn.Module):
    """One projection whose output is cut by slices of the channel dim (Phi-3's fused gate/up MLP)."""

    def __init__(self):
        super().__init__()
        self.tokens, self.fused, self.down, self.head = Tokens(), nn.Linear(16, 48), nn.Linear(20, 16), nn.Linear(16, 5)

    def forward(self, x):
        x = self.tokens(x)
        fused = self.fused(x)
        gate, up, extra = fused[..., :20], fused[:, :, 20:40], fused[..., -8:]
        return self.head((x + self.down(F.silu(gate) * up) + extra.sum(-1, keepdim=True)).mean(1))


def test_slices_of_a_channel_dim_keep_their_channels_and_move_their_bounds():
    model = FusedProjectionSlices().eval()
    groups = fxprune.analyze(model, (X,))
    fused = [g for g in groups.groups if "fused" in g.spaces]
    # gate and up are multiplied position by position (20 units for 40 channels), the extra 8 sum away
    assert [(g.size, g.prunable) for g in fused] == [(28, True)]
    modules = prune_and_check(model)
    assert len(modules["fused"]["out"]) < 48


class StackUnbind(nn.Module):
    """q, k, v projections stacked and unbound again (a common qkv layout): the three must keep the same
    positions; unbinding along the stacked dim gives each back."""

    def __init__(self):
        super().__init__()
        self.tokens = Tokens()
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)
        self.out = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.tokens(x)
        q, k, v = torch.stack([self.q(x), self.k(x), self.v(x)], dim=0).unbind(0)
        return self.head(self.out(q * k + v).mean(1))


def test_stack_couples_its_inputs_and_unbind_splits_them_again():
    model = StackUnbind().eval()
    groups = {g.name: g for g in fxprune.analyze(model, (X,)).groups}
    assert set(groups["q"].spaces) == {"q", "k", "v"} and groups["q"].prunable
    assert len(prune_and_check(model)["q"]["out"]) < 8


class CatAfterEmptyCache(nn.Module):
    """A cache that starts as a legacy empty 1-D tensor (Hugging Face's DynamicLayer): torch.cat skips it."""

    def __init__(self):
        super().__init__()
        self.tokens = Tokens()
        self.proj = nn.Linear(16, 12)
        self.register_buffer("cache", torch.tensor([]))
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.cat([self.cache, self.proj(self.tokens(x))], dim=-2)
        return self.head(y.mean(1))


def test_cat_skips_a_legacy_empty_tensor():
    model = CatAfterEmptyCache().eval()
    assert groups_by_layer(model)["proj"][0]
    assert len(prune_and_check(model)["proj"]["out"]) < 12


class ShapeChecks(nn.Module):
    """timm-style input checks: torch._assert on the spatial size passes through; one on the channel
    count would fail after pruning, so the channels it reads are frozen."""

    def __init__(self, check_channels: bool):
        super().__init__()
        self.check_channels = check_channels
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 8, 3)

    def forward(self, x):
        torch._assert(x.shape[2] == 12, "input height must be 12")
        h = F.relu(self.conv1(x))
        if self.check_channels:
            torch._assert(h.shape[1] == 16, "conv1 must give 16 channels")
        return self.conv3(F.relu(self.conv2(h)))


def test_torch_assert_on_shapes_traces_and_freezes_only_a_checked_channel_count():
    free = groups_by_layer(ShapeChecks(False).eval())
    assert free["conv1"] == (True, []) and free["conv2"] == (True, [])
    assert not any("_assert" in b for b in fxprune.analyze(ShapeChecks(False).eval(), (X,)).blocked_ops)
    checked = groups_by_layer(ShapeChecks(True).eval())
    assert not checked["conv1"][0] and "channel count read by %_assert" in checked["conv1"][1][0]
    assert checked["conv2"] == (True, [])
    prune_and_check(ShapeChecks(True).eval())


class SDPAttention(nn.Module):
    """timm/HF-style attention: qkv projection, heads split by reshape/permute, F.scaled_dot_product_attention
    (default scale, read from the head width), heads merged, output projection on a residual stream.
    channels_first: the tokens are the last dim (conv attention), so the split is (3, heads, width, tokens)."""

    def __init__(self, dim=24, heads=3, channels_first=False):
        super().__init__()
        self.heads, self.channels_first = heads, channels_first
        self.tokens = Tokens(dim)
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.tokens(x)
        b, n, c = x.shape
        if self.channels_first:
            qkv = self.qkv(x).transpose(1, 2).reshape(b, 3, self.heads, c // self.heads, n).permute(1, 0, 2, 4, 3)
        else:
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.head((x + self.proj(o)).mean(1))


def test_scaled_dot_product_attention_prunes_whole_heads():
    model = SDPAttention().eval()
    groups = fxprune.analyze(model, (X,))
    (qkv,) = [g for g in groups.groups if g.name == "qkv"]
    # the reshape packs q, k and v as (3, heads, 8): each head (its q, k and v) is one unit
    assert qkv.prunable and qkv.size == 3
    assert not any("scaled_dot_product_attention" in b for b in groups.blocked_ops)
    modules = prune_and_check(model)
    assert len(modules["qkv"]["out"]) in (24, 48)  # whole heads of 8 channels, in q, k and v


def test_scaled_dot_product_attention_prunes_head_width_and_keeps_its_scale():
    model = SDPAttention(channels_first=True).eval()
    groups = fxprune.analyze(model, (X,))
    (qkv,) = [g for g in groups.groups if g.name == "qkv"]
    # (3, heads, 8, tokens): position p of each of the 9 slices is one unit
    assert qkv.prunable and qkv.size == 8
    modules = prune_and_check(model)  # exact: the pruned call gets the original 1/sqrt(8) scale
    assert len(modules["qkv"]["out"]) < 72


class GroupedQueryAttention(nn.Module):
    """Llama-style GQA: 4 query heads share 2 key/value heads, either repeated by expand/reshape (Hugging
    Face's repeat_kv) or through F.scaled_dot_product_attention(enable_gqa=True)."""

    def __init__(self, native: bool, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.native, self.heads, self.kv_heads, self.hd = native, heads, kv_heads, dim // heads
        self.tokens = Tokens(dim)
        self.q = nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv_heads * self.hd), nn.Linear(dim, kv_heads * self.hd)
        self.o, self.head = nn.Linear(dim, dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.tokens(x)
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.hd).transpose(1, 2)
        k = self.k(x).view(b, n, -1, self.hd).transpose(1, 2)
        v = self.v(x).view(b, n, -1, self.hd).transpose(1, 2)
        if self.native:
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            rep = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, rep, n, self.hd).reshape(b, self.heads, n, self.hd)
            v = v[:, :, None].expand(b, self.kv_heads, rep, n, self.hd).reshape(b, self.heads, n, self.hd)
            o = F.scaled_dot_product_attention(q, k, v)
        return self.head((x + self.o(o.transpose(1, 2).reshape(b, n, -1))).mean(1))


def test_grouped_query_attention_moves_a_key_value_head_with_its_query_heads():
    for native in (False, True):
        model = GroupedQueryAttention(native).eval()
        groups = {g.name: g for g in fxprune.analyze(model, (X,)).groups}
        attention = groups["q"]
        # 2 units: a key/value head and the 2 query heads reading it
        assert set(attention.spaces) == {"q", "k", "v"} and attention.size == 2 and attention.prunable, native
        modules = prune_and_check(model)
        assert len(modules["q"]["out"]) == 2 * len(modules["k"]["out"]), native


class SqueezeExcite(nn.Module):
    """timm's SE and BatchNormAct2d: a BatchNorm2d subclass whose forward adds the activation (traced
    into, F.batch_norm), and a gate x * sigmoid(fc(mean(x))) over the same channels."""

    class BatchNormAct(nn.BatchNorm2d):
        def forward(self, x):
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
            return F.silu(x)

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3), self.BatchNormAct(16)
        self.reduce, self.expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.conv2, self.head = nn.Conv2d(16, 8, 3), nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.head(self.conv2(x * gate).mean((2, 3)))


def test_squeeze_excite_gate_and_norm_act_layer_prune_with_their_conv():
    model = SqueezeExcite().eval()
    groups = {g.name: g for g in fxprune.analyze(model, (X,)).groups}
    # the gate multiplies conv1's channels: conv1, its norm and the expand conv are one group
    assert set(groups["conv1"].spaces) == {"conv1", "expand"} and groups["conv1"].prunable
    assert groups["reduce"].prunable and groups["conv2"].prunable
    prune_and_check(model)


class TokenEmbedding(nn.Module):
    """A language model's front: token and position embeddings summed, an MLP written with HF's Conv1D
    (torch.addmm(bias, x, weight) with the weight stored (in, out)), sizes computed as one tuple."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(50, 16), nn.Embedding(8, 16)
        self.fc_weight, self.fc_bias = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(32))
        self.proj, self.head = nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        size_out = x.size()[:-1] + (32,)
        h = torch.addmm(self.fc_bias, x.view(-1, x.size(-1)), self.fc_weight).view(size_out)
        return self.head((x + self.proj(F.gelu(h))).mean(1))


def test_embeddings_and_addmm_weights_are_channel_spaces():
    ids = torch.randint(0, 50, (2, 8))
    model = TokenEmbedding().eval()
    groups = {g.name: g for g in fxprune.analyze(model, (ids,)).groups}
    assert set(groups["wte"].spaces) == {"wte", "wpe", "proj"} and groups["wte"].prunable
    assert groups["addmm"].prunable and groups["addmm"].size == 32
    pruned = fxprune.compile(model, 0.5, example_inputs=(ids,), round_to=1)
    modules = pruned.meta["fxprune"]["modules"]
    assert pruned.meta["fxprune"]["verification"]["passed"] and len(modules["wte"]["params"]["weight"]["1"]) < 16


class RelativePositionBias(nn.Module):
    """Swin/T5-style attention mask: a bias per head, looked up from an embedding of relative positions
    and added through attn_mask. Pruning a head must drop its bias too."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.heads = heads
        self.tokens = Tokens(dim)
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 5)
        self.bias = nn.Embedding(32, heads)

    def forward(self, x):
        x = self.tokens(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        positions = torch.arange(n)
        bias = self.bias((positions[:, None] - positions[None, :]).abs()).permute(2, 0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, c)
        return self.head((x + self.proj(o)).mean(1))


def test_attention_mask_with_a_bias_per_head_is_pruned_with_the_heads():
    model = RelativePositionBias().eval()
    groups = {g.name: g for g in fxprune.analyze(model, (X,)).groups}
    assert set(groups["qkv"].spaces) == {"qkv", "bias"} and groups["qkv"].size == 3 and groups["qkv"].prunable
    modules = prune_and_check(model)
    kept_heads = len(modules["qkv"]["out"]) // 24 if "qkv" in modules else 3
    kept_biases = len(modules["bias"]["params"]["weight"]["1"]) if "bias" in modules else 3
    assert kept_biases == kept_heads


@pytest.mark.parametrize("left, right", [
    (torch.randn(2, 3, 4), torch.randn(3, 1)),                  # broadcasting, one dtype
    (torch.randn(2, 3), 2),                                      # float tensor and int
    (torch.randn(2, 3), 0.5),                                    # float tensor and float
    (torch.arange(6).view(2, 3), 0.5),                           # int tensor and float: promotes
    (torch.arange(6).view(2, 3), torch.randn(3)),                # int and float tensors: promotes
    (torch.ones(2, 3, dtype=torch.bool), 1),                     # bool and int: promotes
    (torch.ones(2, 3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)),  # bool and bool (sub refuses)
    (torch.randn(2, 3, dtype=torch.float64), torch.randn(3)),   # two float dtypes
])
@pytest.mark.parametrize("op", ["add", "mul", "sub_method"])
def test_shape_propagation_of_arithmetic_matches_the_kernels(left, right, op):
    """add/sub/mul have a shape rule that skips their meta kernels: it must give what the kernels give,
    falling back to them wherever types promote."""
    from fxprune.shape_prop import propagate_shapes
    from fxprune.tracing import value_spec

    class Arithmetic(nn.Module):
        def __init__(self, other):
            super().__init__()
            self.other = other

        def forward(self, x):
            if op == "add":
                return x + self.other
            if op == "mul":
                return torch.mul(x, self.other)
            return x.sub(self.other)

    if isinstance(right, torch.Tensor):
        right = nn.Parameter(right, requires_grad=False) if right.is_floating_point() else right
    model = Arithmetic(right)
    if op == "sub_method" and left.dtype == torch.bool:   # the kernel refuses: the rule must not answer
        from fxprune.ops.elementwise import broadcast_meta
        node = next(n for n in torch.fx.symbolic_trace(model).graph.nodes if n.op == "call_method")
        meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t
        assert broadcast_meta(node, (meta(left), meta(right)), {}, None) is None
        return
    expected = model(left)
    gm = torch.fx.symbolic_trace(model)
    propagate_shapes(gm, (left,))
    node = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    assert value_spec(node).shape == tuple(expected.shape) and value_spec(node).dtype == expected.dtype


@pytest.mark.parametrize("layer, x", [
    (nn.Conv2d(4, 6, 3), torch.randn(2, 4, 9, 7)),
    (nn.Conv2d(4, 6, (3, 2), stride=(2, 3), padding=(1, 2), dilation=(2, 1)), torch.randn(1, 4, 11, 10)),
    (nn.Conv2d(4, 8, 3, padding="same", dilation=2, groups=4, padding_mode="reflect"), torch.randn(1, 4, 8, 8)),
    (nn.Conv2d(4, 6, 4, padding="same"), torch.randn(1, 4, 7, 6)),           # even kernel: asymmetric padding
    (nn.Conv2d(4, 6, 3, padding="valid", stride=2), torch.randn(3, 4, 8, 9)),
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), torch.randn(4, 5, 5)),  # unbatched
    (nn.Conv1d(3, 5, 5, stride=3, padding=2), torch.randn(2, 3, 17)),
    (nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), torch.randn(1, 2, 3, 9, 8)),
    (nn.Conv2d(4, 6, 3).double(), torch.randn(1, 4, 6, 6, dtype=torch.float64)),
    (nn.Linear(5, 3), torch.randn(2, 7, 5)),
    (nn.Linear(5, 3, bias=False), torch.randn(5)),
])
def test_shape_propagation_of_conv_and_linear_matches_the_layers(layer, x):
    """Conv and Linear modules have a shape rule that skips their meta kernels and meta weights: it
    must give what the layer gives."""
    from fxprune.ops import REGISTRY
    from fxprune.shape_prop import propagate_shapes
    from fxprune.tracing import value_spec
    expected = layer(x)
    gm = torch.fx.symbolic_trace(nn.Sequential(layer))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    ruled = REGISTRY.for_module_type(type(layer)).meta_shape(node, (x.to("meta"),), {}, layer)
    assert ruled is not None and ruled.shape == expected.shape and ruled.dtype == expected.dtype
    propagate_shapes(gm, (x,))
    assert value_spec(node).shape == tuple(expected.shape) and value_spec(node).dtype == expected.dtype


def test_shape_rule_of_pooling_layers_matches_the_layers_on_random_configurations():
    """Pooling modules have a shape rule (their meta kernels are slow): on random sizes, kernels,
    strides, paddings, dilations and ceil_mode it gives the layer's shape, and it answers nothing
    where the layer refuses the input."""
    from fxprune.ops.reduction import _pool_meta
    rng = np.random.default_rng(0)
    answered = 0
    for _ in range(300):
        n = int(rng.integers(1, 4))
        kind = rng.choice(["max", "avg", "adaptive_avg"] + (["adaptive_max"] if n == 2 else []))
        sizes = tuple(int(v) for v in rng.integers(1, 12, n))
        x = torch.randn(2, 3, *sizes) if rng.random() < 0.7 else torch.randn(3, *sizes)
        if kind.startswith("adaptive"):
            out = tuple(None if rng.random() < 0.2 else int(v) for v in rng.integers(1, 6, n))
            out = out[0] if n == 1 else out
            if n == 1 and out is None:
                out = 3
            layer = {"adaptive_avg": [nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d][n - 1],
                     "adaptive_max": nn.AdaptiveMaxPool2d}[kind](out)
        else:
            k = tuple(int(v) for v in rng.integers(1, 5, n))
            options = dict(kernel_size=k, stride=tuple(int(v) for v in rng.integers(1, 4, n)),
                           padding=tuple(int(v) for v in rng.integers(0, 3, n)), ceil_mode=bool(rng.random() < 0.5))
            if kind == "max":
                layer = [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d][n - 1](
                    dilation=tuple(int(v) for v in rng.integers(1, 3, n)), **options)
            else:
                layer = [nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d][n - 1](**options)
        node = next(nd for nd in torch.fx.symbolic_trace(nn.Sequential(layer)).graph.nodes if nd.op == "call_module")
        ruled = _pool_meta(node, (x.to("meta"),), {}, layer)
        try:
            expected = layer(x)
        except RuntimeError:
            assert ruled is None, f"{layer} refuses {tuple(x.shape)} but the rule gives {ruled.shape}"
            continue
        if ruled is not None:
            answered += 1
            assert ruled.shape == expected.shape and ruled.dtype == expected.dtype, (layer, tuple(x.shape))
    assert answered > 150


@pytest.mark.parametrize("layer, x", [
    (nn.Conv2d(4, 6, 3), torch.randn(1, 5, 9, 9)),       # wrong channel count
    (nn.Conv2d(4, 6, 5), torch.randn(1, 4, 3, 3)),       # smaller than the kernel
    (nn.Conv2d(4, 6, 3), torch.randn(1, 4, 6, 6, dtype=torch.float64)),  # dtype of the input, not the weight
    (nn.Linear(5, 3), torch.randn(2, 4)),
])
def test_shape_rules_of_conv_and_linear_leave_wrong_inputs_to_the_layer(layer, x):
    from fxprune.errors import ExampleInputsError
    from fxprune.shape_prop import propagate_shapes
    gm = torch.fx.symbolic_trace(nn.Sequential(layer))
    with pytest.raises(ExampleInputsError, match="%_0"):
        propagate_shapes(gm, (x,))


class BiasTableAttention(nn.Module):
    """LeViT/EfficientFormer-style attention: a table of biases per head and relative offset, gathered
    by an index buffer (`table[:, idx]`) and added to the logits; the linear layers are followed by a
    BatchNorm1d over the flattened tokens and `reshape_as` back."""

    def __init__(self, dim=24, heads=3, n=16):
        super().__init__()
        self.heads, self.scale, self.tokens = heads, (dim // heads) ** -0.5, Tokens(dim)
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 5)
        self.norm = nn.BatchNorm1d(3 * dim)
        self.table = nn.Parameter(torch.randn(heads, n))
        positions = torch.arange(n)
        self.register_buffer("idx", (positions[:, None] - positions[None, :]).abs())

    def forward(self, x):
        x = self.tokens(x)
        b, n, c = x.shape
        qkv = self.qkv(x)
        qkv = self.norm(qkv.flatten(0, 1)).reshape_as(qkv)
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.table[:, self.idx[:n, :n]]
        o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.head((x + self.proj(o)).mean(1))


def test_a_bias_table_gathered_by_index_prunes_with_its_heads_and_reshape_as_follows_its_shape():
    model = BiasTableAttention().eval()
    groups = fxprune.analyze(model, (X,))
    (qkv,) = [g for g in groups.groups if g.name == "qkv"]
    assert qkv.prunable and qkv.size == 3 and not groups.blocked_ops
    modules = prune_and_check(model)
    kept_heads = len(modules["qkv"]["out"]) // 24 if "qkv" in modules else 3
    assert kept_heads < 3 and len(modules[""]["params"]["table"]["0"]) == kept_heads


class TokenGather(nn.Module):
    """Tokens picked by an index tensor (`x[:, idx]`, channels last) keep their channels; a channel dim
    picked by an index tensor (`y[:, sel]`, channels first) cannot be sliced and is frozen."""

    def __init__(self):
        super().__init__()
        self.tokens, self.fc1, self.fc2 = Tokens(16), nn.Linear(16, 24), nn.Linear(24, 5)
        self.conv = nn.Conv2d(3, 8, 3)
        self.register_buffer("keep", torch.tensor([0, 2, 5, 7, 8]))
        self.register_buffer("sel", torch.tensor([1, 3]))

    def forward(self, x):
        picked = self.fc1(self.tokens(x))[:, self.keep]
        side = self.conv(x)[:, self.sel].mean((1, 2, 3))
        return self.fc2(picked.relu()).mean(1) + side[:, None]


def test_indexing_tokens_by_a_tensor_keeps_the_channels_and_indexing_channels_freezes_them():
    groups = groups_by_layer(TokenGather().eval())
    assert groups["fc1"][0]
    assert not groups["conv"][0] and any("indexing a channel dim by a tensor" in r for r in groups["conv"][1])
    pruned = fxprune.compile(TokenGather().eval(), 0.8, example_inputs=(X,), round_to=1)  # the frozen conv is most
    report = pruned.meta["fxprune"]                                                      # of the FLOPs
    assert report["verification"]["passed"] and len(report["modules"]["fc1"]["out"]) < 24


class ExpandAsGate(nn.Module):
    """A per-channel gate expanded to the tensor it gates, then concatenated with it: the expanded gate's
    channels are the gated tensor's."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3), nn.Conv2d(32, 8, 3)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = self.conv1(x)
        gate = self.fc(y.mean((2, 3))).sigmoid()[:, :, None, None].expand_as(y)
        return self.conv2(torch.cat([y, gate], 1))


def test_expand_as_gives_the_expanded_tensor_the_channels_of_its_target():
    groups = {g.name: g for g in fxprune.analyze(ExpandAsGate().eval(), (X,)).groups}
    assert groups["conv1"].prunable and set(groups["conv1"].spaces) == {"conv1", "fc"}  # coupled by expand_as
    prune_and_check(ExpandAsGate().eval())


class PaddingLayers(nn.Module):
    """Padding modules (timm's "same" padding, CPUBone's ZeroPad2d) on spatial dims keep the channels;
    one that pads the channel dim (ConstantPad3d on a 4-D tensor) freezes them."""

    def __init__(self, layer):
        super().__init__()
        self.conv1, self.pad, self.conv2 = nn.Conv2d(3, 16, 3), layer, nn.Conv2d(16, 8, 3)
        self.conv3 = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.conv2(self.pad(self.conv1(x)).relu()[:, :16]) + self.conv3(x)[:, :, 1:-1, 1:-1].mean()


@pytest.mark.parametrize("layer", [nn.ZeroPad2d((1, 0, 2, 1)), nn.ReflectionPad2d(1), nn.ConstantPad2d(1, 0.5),
                                   nn.ReplicationPad2d((0, 1, 0, 1)), nn.CircularPad2d(1)])
def test_padding_layers_keep_the_channels_of_the_dims_they_do_not_pad(layer):
    model = PaddingLayers(layer).eval()
    assert groups_by_layer(model)["conv1"][0]
    modules = prune_and_check(model)
    assert len(modules["conv1"]["out"]) < 16


def test_a_padding_layer_on_the_channel_dim_freezes_it():
    prunable, reasons = groups_by_layer(PaddingLayers(nn.ConstantPad3d((0, 0, 0, 0, 0, 2), 0.0)).eval())["conv1"]
    assert not prunable and any("padding a channel dim" in r for r in reasons)
