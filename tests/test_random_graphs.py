"""Differential tests on random graphs (DESIGN.md, "Tests").

A hypothesis strategy composes blocks into valid nn.Module graphs of three families:
- cnn (N, C, H, W): conv + BN/GN + activation, depthwise and grouped convs, residual adds (identity,
  in-place, 1x1 projection, a conv shared by two calls), concat (with and without the input), split /
  chunk / tensor_split into parts processed separately then concatenated, squeeze-excite, channel
  shuffle, a channels-last LayerNorm/MLP segment with layer scale, an NCHW layer scale, PReLU,
  upsample, F.conv2d, LayerNorm over (C, H, W), a channel-sum gate, a concat along H, F.pad then
  conv/crop/roll, ops without a channel rule (flip, channel slicing, CBAM channel mean/max), pooling;
  heads: GAP + linear, flatten + linear (H*W features per channel, NCHW or NHWC order), or a transformer
  tail (tokens -> pre-norm nn.MultiheadAttention -> mean -> linear);
- mlp (N, F): linear + LayerNorm/BatchNorm1d + activation, residual MLPs (F.layer_norm), concat of two linears;
- tokens (N, T, F): as mlp plus nn.MultiheadAttention blocks, hand-written attention (view into heads,
  matmul, softmax) and MLP-Mixer token mixing; heads: mean over tokens or flatten + linear.
Options vary the budget (0.3/0.5/0.7/0.9 of FLOPs and/or params), importance, allocation, round_to,
min_channels and `ignore`.

For each graph, `fxprune.compile(..., verify=True)` must succeed (BudgetError/NoPrunableChannelsError
only where the graph cannot reach the budget; a deterministic seed-list test checks that most graphs
do prune), meet the budget, leave the user's model untouched and keep the output shape. Beyond
fxprune's own verifier, this file checks independently:
- every tensor of the pruned model is the user's tensor sliced by the kept indices in the report,
- the pruned model runs on another batch size and agrees with itself there,
- FLOPs before/after measured with torch.utils.flop_counter.FlopCounterMode (graphs without
  nn.MultiheadAttention, which FlopCounterMode does not count on CPU) and parameter counts,
- for chains of conv/depthwise/grouped/residual/concat/pool blocks: the pruned output equals a float64
  reference built here by hand (the user's model with every conv block's removed output channels zeroed).

The generator is written against a small `chooser` interface, so the same code draws from hypothesis
(with shrinking) and from a seeded `random.Random` (the fixed seed-list test). A failing example prints
as its NetSpec (one line per block) and the model's repr.

A known fxprune bug found by this file goes into KNOWN_BUGS / KNOWN_COST_BUGS with a strict xfail test
holding a minimal reproducer; fixed ones stay at the end of the file as regression tests.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxprune

BUDGETS = (0.3, 0.5, 0.7, 0.9)
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid}
SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The graphs are tiny: intra-op threads only add overhead (10x on a loaded 2-core CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# =========================================================================== choosers
class HypothesisChooser:
    """Draws from hypothesis, so failing examples shrink."""

    def __init__(self, draw):
        self._draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self._draw(st.integers(lo, hi))

    def choice(self, options: Sequence[Any]) -> Any:
        return self._draw(st.sampled_from(list(options)))

    def boolean(self) -> bool:
        return self._draw(st.booleans())


class SeededChooser:
    """Draws from random.Random(seed): the deterministic seed-list test."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def choice(self, options: Sequence[Any]) -> Any:
        return self._rng.choice(list(options))

    def boolean(self) -> bool:
        return self._rng.random() < 0.5


# =========================================================================== specs
@dataclass(frozen=True)
class Block:
    kind: str
    args: Tuple[Tuple[str, Any], ...] = ()

    def __getitem__(self, key: str) -> Any:
        return dict(self.args)[key]

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(f'{k}={v!r}' for k, v in self.args)})"


def block(kind: str, **kwargs) -> Block:
    return Block(kind, tuple(kwargs.items()))


@dataclass(frozen=True)
class NetSpec:
    """A random model: input shape (without batch), a chain of blocks and a head."""

    family: str                  # "cnn" (N,C,H,W), "mlp" (N,F) or "tokens" (N,T,F)
    batch: int
    in_shape: Tuple[int, ...]
    blocks: Tuple[Block, ...]
    head: Block
    seed: int

    def kinds(self) -> List[str]:
        return [b.kind for b in self.blocks] + ["head:" + self.head.kind]

    def __repr__(self) -> str:
        lines = [f"NetSpec(family={self.family!r}, batch={self.batch}, in_shape={self.in_shape}, "
                 f"seed={self.seed}, blocks=("]
        lines += [f"    {b!r}," for b in self.blocks]
        lines.append(f"  ), head={self.head!r})")
        return "\n".join(lines)


@dataclass(frozen=True)
class Options:
    budget: float
    budget_kind: str        # "float" (a bare FLOPs fraction), "flops", "params" or "both"
    importance: str
    allocation: str
    round_to: int
    min_channels: int
    ignore_stem: bool

    def budget_arg(self):
        return {"float": self.budget, "flops": fxprune.Budget(flops=self.budget),
                "params": fxprune.Budget(params=self.budget),
                "both": fxprune.Budget(flops=self.budget, params=min(1.0, self.budget + 0.1))}[self.budget_kind]

    def kwargs(self) -> Dict[str, Any]:
        return dict(importance=self.importance, allocation=self.allocation, round_to=self.round_to,
                    min_channels=self.min_channels, ignore=["blocks.0"] if self.ignore_stem else [])


def divisors(n: int, lo: int = 1, hi: Optional[int] = None) -> List[int]:
    hi = n if hi is None else hi
    return [d for d in range(lo, hi + 1) if n % d == 0]


def draw_options(c) -> Options:
    return Options(budget=c.choice(BUDGETS), budget_kind=c.choice(["float", "float", "flops", "params", "both"]),
                   importance=c.choice(["l1", "l2"]), allocation=c.choice(["global", "uniform"]),
                   round_to=c.choice([1, 2]), min_channels=c.choice([1, 1, 2]),
                   ignore_stem=c.choice([False] * 11 + [True]))


def draw_norm(c, ch: int, allow_gn: bool = True) -> Optional[str]:
    norms = [None, "bn", "bn", "bn_noaffine"] + (["gn"] if allow_gn and ch >= 2 else [])
    norm = c.choice(norms)
    if norm == "gn":
        return f"gn{c.choice(divisors(ch, 1, ch // 2 if ch >= 2 else 1))}"
    return norm


CNN_KINDS = ("conv", "dwconv", "gconv", "res", "res_inplace", "resproj", "shared_res", "concat", "split", "chunk3",
             "tensor_split", "se", "shuffle", "cl_mlp", "scale", "prelu", "updown", "flip", "cbam", "pool",
             "fconv", "ln_chw", "sum_gate", "hcat", "pad", "slice_channels")


# Blocks that freeze the channels around them (ops without a rule, token mixing): drawn less often
# so that most random graphs still have something to prune.
RARE_KINDS = ("flip", "cbam", "token_mix", "slice_channels")


def weighted(kinds: Sequence[str]) -> List[str]:
    return [k for k in kinds for _ in range(1 if k in RARE_KINDS else 3)]


def cnn_kinds(ch: int, hw: int, exclude: Sequence[str] = ()) -> List[str]:
    ok = {
        "split": ch >= 2, "tensor_split": ch >= 3, "chunk3": len(torch.arange(ch).chunk(3)) == 3,
        "gconv": bool(divisors(ch, 2, ch - 1)), "shuffle": ch % 2 == 0, "slice_channels": ch >= 4, "hcat": hw <= 8,
    }
    return [k for k in CNN_KINDS if ok.get(k, True) and k not in exclude]


def draw_cnn_block(c, kind: str, ch: int, hw: int, allow_gn: bool = True) -> Tuple[Block, int, int]:
    """One block of kind `kind` on `ch` channels and `hw` spatial size: (spec, out channels, out hw)."""
    act = lambda: c.choice(list(ACTS))  # noqa: E731
    if kind == "conv":
        out = c.integer(2, 12)
        k = c.choice([1, 3])
        stride = c.choice([1, 1, 2]) if hw >= 6 else 1
        return block("conv", out=out, k=k, stride=stride, norm=draw_norm(c, out, allow_gn),
                     act=c.choice(list(ACTS) + [None]), bias=c.boolean()), out, (hw + 2 * (k // 2) - k) // stride + 1
    if kind == "fconv":
        out = c.integer(2, 12)
        return block("fconv", out=out, bias=c.boolean()), out, hw
    if kind == "dwconv":
        mult = c.choice([1, 2]) if 2 * ch <= 16 else 1
        return block("dwconv", mult=mult, norm=draw_norm(c, ch * mult, allow_gn),
                     act=c.choice(list(ACTS) + [None])), ch * mult, hw
    if kind == "gconv":
        g = c.choice(divisors(ch, 2, ch - 1))
        out = g * c.integer(1, max(1, 12 // g))
        spec = block("gconv", groups=g, out=out, k=c.choice([1, 3]), norm=draw_norm(c, out, allow_gn), act=act())
        return spec, out, hw
    if kind in ("res", "res_inplace"):
        return block(kind, mid=c.integer(2, 12), norm=draw_norm(c, ch, allow_gn), act=act()), ch, hw
    if kind == "resproj":
        out = c.integer(2, 12)
        return block("resproj", out=out, mid=c.integer(2, 12), norm=draw_norm(c, out, allow_gn), act=act()), out, hw
    if kind == "shared_res":
        return block("shared_res", act=act()), ch, hw
    if kind == "concat":
        o1, o2 = c.integer(1, 8), c.integer(1, 8)
        dense = c.boolean() and ch + o1 + o2 <= 16
        spec = block("concat", o1=o1, o2=o2, dense=dense, dim=c.choice([1, -3]), act=act())
        return spec, o1 + o2 + (ch if dense else 0), hw
    if kind == "split":
        mode = c.choice(["chunk", "split"] if ch % 2 == 0 else ["split"])
        first = ch // 2 if mode == "chunk" else c.integer(1, ch - 1)
        left = c.choice([None, c.integer(1, 8)])       # None: the first part passes through (ShuffleNet v2)
        right = c.integer(1, 8)
        out = (first if left is None else left) + right
        return block("split", mode=mode, first=first, left=left, right=right, act=act()), out, hw
    if kind in ("chunk3", "tensor_split"):
        # three parts: the first passes through, the others get a conv; concatenated in another order
        if kind == "chunk3":
            sizes = [len(p) for p in torch.arange(ch).chunk(3)]
        else:
            a = c.integer(1, ch - 2)
            b = c.integer(a + 1, ch - 1)
            sizes = [a, b - a, ch - b]
        o1, o2 = c.integer(1, 6), c.integer(1, 6)
        return block(kind, sizes=tuple(sizes), o1=o1, o2=o2), sizes[0] + o1 + o2, hw
    if kind == "se":
        return block("se", squeeze=c.integer(1, max(1, ch // 2)), gate=c.choice(["sigmoid", "hardsigmoid"]),
                     pool=c.choice(["module", "mean"])), ch, hw
    if kind == "shuffle":
        return block("shuffle", groups=c.choice(divisors(ch, 2, ch // 2 if ch >= 4 else 2)),
                     sizes=c.choice(["size", "literal"])), ch, hw
    if kind == "cl_mlp":
        return block("cl_mlp", hidden=c.integer(2, 16), residual=c.boolean(), layer_scale=c.boolean()), ch, hw
    if kind == "scale":
        return block("scale", shift=c.boolean()), ch, hw
    if kind == "prelu":
        return block("prelu"), ch, hw
    if kind == "updown":
        return block("updown", mode=c.choice(["module", "functional"])), ch, hw
    if kind == "flip":
        return block("flip"), ch, hw
    if kind == "cbam":
        return block("cbam"), ch, hw
    if kind == "ln_chw":
        return block("ln_chw", affine=c.boolean()), ch, hw
    if kind == "sum_gate":
        return block("sum_gate"), ch, hw
    if kind == "hcat":
        o = c.integer(2, 12)
        return block("hcat", out=o), o, hw
    if kind == "pad":
        mode, then = c.choice(["constant", "reflect", "replicate"]), c.choice(["conv", "crop", "roll"])
        return block("pad", mode=mode, then=then), ch, hw
    if kind == "slice_channels":
        keep = c.integer(2, ch - 1)
        return block("slice_channels", keep=keep), keep, hw
    if kind == "pool":
        how = c.choice(["max2", "avg3"] if hw >= 4 else ["avg3"])
        return block("pool", how=how), ch, (hw // 2 if how == "max2" else hw)
    raise AssertionError(kind)


def draw_cnn_head(c, ch: int, heads: Sequence[str]) -> Block:
    kind = c.choice(list(heads))
    classes = c.integer(2, 5)
    if kind == "attn":
        return block("attn", heads=c.choice(divisors(ch, 1, min(ch, 4))), mlp=c.boolean(), classes=classes)
    return block(kind, classes=classes)


CNN_HEADS = ("gap", "gap_mean", "flatten", "flatten_cl", "attn")


def draw_cnn_spec(c, kinds: Sequence[str] = CNN_KINDS, heads: Sequence[str] = CNN_HEADS, max_blocks: int = 5,
                  exclude: Sequence[str] = (), allow_gn: bool = True) -> NetSpec:
    cin, hw0 = c.integer(1, 4), c.integer(6, 10)
    batch = c.choice([1, 2])
    stem_out = c.integer(4, 12)
    blocks = [block("conv", out=stem_out, k=3, stride=1, norm=draw_norm(c, stem_out, allow_gn),
                    act=c.choice(list(ACTS)), bias=c.boolean())]
    ch, hw = stem_out, hw0
    for _ in range(c.integer(1, max_blocks)):
        allowed = [k for k in cnn_kinds(ch, hw, exclude) if k in kinds]
        b, ch, hw = draw_cnn_block(c, c.choice(weighted(allowed)), ch, hw, allow_gn)
        blocks.append(b)
    head = draw_cnn_head(c, ch, [h for h in heads if h not in exclude])
    return NetSpec("cnn", batch, (cin, hw0, hw0), tuple(blocks), head, c.integer(0, 2**16))


TOKEN_KINDS = ("linear", "res_linear", "cat_linear", "attn_block", "manual_attn", "token_mix")


def draw_mlp_block(c, kind: str, f: int, family: str, tokens: int) -> Tuple[Block, int]:
    if kind == "linear":
        out = c.integer(2, 12)
        norms = [None, "ln", "ln_noaffine"] + (["bn"] if family == "mlp" else [])  # BatchNorm1d wants (N, C)
        return block("linear", out=out, norm=c.choice(norms), act=c.choice(list(ACTS) + [None])), out
    if kind == "res_linear":
        return block("res_linear", hidden=c.integer(2, 16), prenorm=c.choice([None, "module", "functional"]),
                     act=c.choice(list(ACTS))), f
    if kind == "cat_linear":
        o1, o2 = c.integer(1, 8), c.integer(1, 8)
        return block("cat_linear", o1=o1, o2=o2, act=c.choice(list(ACTS))), o1 + o2
    if kind == "attn_block":
        return block("attn_block", heads=c.choice(divisors(f, 1, min(f, 4))), mlp=c.choice([0, c.integer(2, 16)])), f
    if kind == "manual_attn":
        heads = c.choice([1, 2, 3])
        head_dim, out_reshape = c.integer(1, 4), c.choice(["-1", "literal", "shape"])
        return block("manual_attn", heads=heads, head_dim=head_dim, out_reshape=out_reshape), f
    if kind == "token_mix":
        return block("token_mix", residual=c.boolean(), tokens=tokens), f
    raise AssertionError(kind)


def draw_mlp_spec(c, family: str, exclude: Sequence[str] = ()) -> NetSpec:
    batch = c.choice([1, 2])
    fin = c.integer(2, 12)
    tokens = c.integer(2, 6)
    in_shape = (fin,) if family == "mlp" else (tokens, fin)
    stem = c.integer(4, 12)
    blocks = [block("linear", out=stem, norm=None, act=c.choice(list(ACTS)))]
    f = stem
    kinds = [k for k in TOKEN_KINDS if (family == "tokens" or k in ("linear", "res_linear", "cat_linear"))
             and k not in exclude]
    for _ in range(c.integer(1, 4)):
        b, f = draw_mlp_block(c, c.choice(weighted(kinds)), f, family, tokens)
        blocks.append(b)
    heads = ["token_mean", "token_flatten"] if family == "tokens" else ["linear_head"]
    head = block(c.choice([h for h in heads if h not in exclude]), classes=c.integer(2, 5))
    return NetSpec(family, batch, in_shape, tuple(blocks), head, c.integer(0, 2**16))


def draw_spec(c, exclude: Sequence[str] = ()) -> NetSpec:
    family = c.choice(["cnn", "cnn", "cnn", "mlp", "tokens"])
    if family == "cnn":
        return draw_cnn_spec(c, exclude=exclude)
    return draw_mlp_spec(c, family, exclude=exclude)


# =========================================================================== modules
def activation(name: Optional[str]) -> nn.Module:
    return ACTS[name]() if name else nn.Identity()


def norm2d(norm: Optional[str], c: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    if norm == "bn":
        return nn.BatchNorm2d(c)
    if norm == "bn_noaffine":
        return nn.BatchNorm2d(c, affine=False)
    return nn.GroupNorm(int(norm[2:]), c)


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, groups: int = 1, norm: Optional[str] = "bn",
                 act: Optional[str] = "relu", bias: bool = False, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias or norm is None)
        self.norm = norm2d(norm, cout)
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class Residual(nn.Module):
    """act(shortcut(x) + norm(conv(act(norm(conv(x)))))); shortcut is identity or a 1x1 projection."""

    def __init__(self, cin: int, cout: int, mid: int, norm: Optional[str], act: str, project: bool,
                 inplace: bool = False):
        super().__init__()
        self.conv1 = ConvNormAct(cin, mid, 3, norm="bn" if norm else None, act=act)
        self.conv2 = ConvNormAct(mid, cout, 3, norm=norm, act=None)
        self.shortcut = ConvNormAct(cin, cout, 1, norm="bn" if norm else None, act=None) if project else nn.Identity()
        self.act = activation(act)
        self.inplace = inplace

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        if self.inplace:
            y += x
            return self.act(y)
        return self.act(self.shortcut(x) + y)


class SharedResidual(nn.Module):
    """One conv called twice (shared weights): x + conv(act(conv(x)))."""

    def __init__(self, c: int, act: str):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = activation(act)

    def forward(self, x):
        return x + self.conv(self.act(self.conv(x)))


class Concat(nn.Module):
    def __init__(self, cin: int, o1: int, o2: int, dense: bool, dim: int, act: str):
        super().__init__()
        self.b1 = ConvNormAct(cin, o1, 1, act=act)
        self.b2 = ConvNormAct(cin, o2, 3, act=act)
        self.dense, self.dim = dense, dim

    def forward(self, x):
        if self.dense:
            return torch.cat([x, self.b1(x), self.b2(x)], dim=self.dim)
        return torch.cat([self.b1(x), self.b2(x)], dim=self.dim)


class SplitProcess(nn.Module):
    def __init__(self, cin: int, mode: str, first: int, left: Optional[int], right: int, act: str):
        super().__init__()
        self.mode, self.sizes = mode, [first, cin - first]
        self.left = ConvNormAct(first, left, 1, act=act) if left is not None else nn.Identity()
        self.right = ConvNormAct(cin - first, right, 3, act=act)

    def forward(self, x):
        if self.mode == "chunk":
            a, b = x.chunk(2, dim=1)
        else:
            a, b = torch.split(x, self.sizes, dim=1)
        return torch.cat([self.left(a), self.right(b)], dim=1)


class ThreeWaySplit(nn.Module):
    """x.chunk(3, dim=1) (uneven parts when 3 does not divide C) or torch.tensor_split at two indices."""

    def __init__(self, cin: int, mode: str, sizes: Tuple[int, int, int], o1: int, o2: int):
        super().__init__()
        self.mode, self.sizes = mode, sizes
        self.c1 = ConvNormAct(sizes[1], o1, 1, act="relu")
        self.c2 = ConvNormAct(sizes[2], o2, 3, act="silu")

    def forward(self, x):
        if self.mode == "chunk3":
            a, b, c = x.chunk(3, dim=1)
        else:
            a, b, c = torch.tensor_split(x, [self.sizes[0], self.sizes[0] + self.sizes[1]], dim=1)
        return torch.cat([self.c2(c), a, self.c1(b)], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, gate: str, pool: str):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "module" else None
        self.reduce = nn.Conv2d(c, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, c, 1)
        self.gate = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()

    def forward(self, x):
        s = self.pool(x) if self.pool is not None else x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(F.relu(self.reduce(s))))


class ChannelShuffle(nn.Module):
    def __init__(self, c: int, groups: int, sizes: str):
        super().__init__()
        self.c, self.groups, self.sizes = c, groups, sizes

    def forward(self, x):
        if self.sizes == "size":
            b, c, h, w = x.size()
            x = x.view(b, self.groups, c // self.groups, h, w)
            return x.transpose(1, 2).contiguous().view(b, c, h, w)
        g = self.groups
        x = x.view(x.shape[0], g, self.c // g, x.shape[2], x.shape[3])
        return x.transpose(1, 2).contiguous().view(x.shape[0], self.c, x.shape[3], x.shape[4])


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style: permute to NHWC, LayerNorm(C), Linear, GELU, Linear, layer scale, permute back."""

    def __init__(self, c: int, hidden: int, residual: bool, layer_scale: bool):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5) if layer_scale else None
        self.residual = residual

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        y = y.permute(0, 3, 1, 2)
        return x + y if self.residual else y


class LayerScale2d(nn.Module):
    """x * gamma (+ beta) with gamma of shape (C, 1, 1) and beta of shape (1, C, 1, 1)."""

    def __init__(self, c: int, shift: bool):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.beta = nn.Parameter(torch.randn(1, c, 1, 1)) if shift else None

    def forward(self, x):
        y = x * self.gamma
        return y + self.beta if self.beta is not None else y


class UpDown(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        up = self.up(x) if self.mode == "module" else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(up, 2)


class Flip(nn.Module):
    """An op without a channel rule: its channels must be frozen, never guessed."""

    def forward(self, x):
        return torch.flip(x, dims=[1]) + x


class SpatialAttention(nn.Module):
    """CBAM: mean and max over channels (not zero-exact: their inputs must stay unpruned)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(s))


class FunctionalConv(nn.Module):
    """F.conv2d with the module's own parameters (the functional_conv rule)."""

    def __init__(self, cin: int, cout: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) / (3 * cin ** 0.5))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1) if bias else None

    def forward(self, x):
        return F.relu(F.conv2d(x, self.weight, self.bias, padding=1))


class LayerNormCHW(nn.Module):
    """nn.LayerNorm over (C, H, W) of an NCHW tensor: reduces over the channel dim and more."""

    def __init__(self, c: int, hw: int, affine: bool):
        super().__init__()
        self.norm = nn.LayerNorm([c, hw, hw], elementwise_affine=affine)

    def forward(self, x):
        return self.norm(x)


class SumGate(nn.Module):
    """A sum over channels is exact over the kept ones (zeros add nothing)."""

    def forward(self, x):
        return x * torch.sigmoid(x.sum(1, keepdim=True))


class HeightCat(nn.Module):
    """Two convs concatenated along H (their channels couple), then pooled back to the input height."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.a, self.b = ConvNormAct(cin, cout, 3, act="relu"), ConvNormAct(cin, cout, 1, act="gelu")

    def forward(self, x):
        return F.avg_pool2d(torch.cat([self.a(x), self.b(x)], dim=2), (2, 1))


class PadThen(nn.Module):
    """F.pad on the spatial dims, then a valid conv, a crop (spatial slicing) or a roll."""

    def __init__(self, c: int, mode: str, then: str):
        super().__init__()
        self.mode, self.then = mode, then
        self.conv = nn.Conv2d(c, c, 3) if then == "conv" else None

    def forward(self, x):
        y = F.pad(x, (1, 1, 1, 1), mode=self.mode)
        if self.then == "conv":
            return self.conv(y)
        if self.then == "crop":
            return y[:, :, 1:-1, 1:-1] + x
        return torch.roll(y, shifts=(1, 1), dims=(2, 3))[:, :, 1:-1, 1:-1]


class SliceChannels(nn.Module):
    """x[:, :k]: indexing a channel dim has no rule here, so its channels must stay."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        return x[:, : self.keep]


class AttentionBlock(nn.Module):
    """Pre-norm transformer block on (N, T, C) tokens with nn.MultiheadAttention."""

    def __init__(self, c: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.mlp = None
        if mlp:
            self.norm2 = nn.LayerNorm(c)
            self.mlp = nn.Sequential(nn.Linear(c, mlp), nn.GELU(), nn.Linear(mlp, c))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class ManualAttention(nn.Module):
    """Hand-written multi-head attention: view into heads, matmul, softmax over keys, merge heads."""

    def __init__(self, c: int, heads: int, head_dim: int, out_reshape: str):
        super().__init__()
        self.heads, self.head_dim, self.out_reshape = heads, head_dim, out_reshape
        inner = heads * head_dim
        self.q, self.k, self.v = nn.Linear(c, inner), nn.Linear(c, inner), nn.Linear(c, inner)
        self.proj = nn.Linear(inner, c)
        self.scale = head_dim ** -0.5

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, -1).transpose(1, 2)
        a = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        y = (a @ v).transpose(1, 2)
        if self.out_reshape == "-1":
            y = y.reshape(b, t, -1)
        elif self.out_reshape == "literal":
            y = y.reshape(b, t, self.heads * self.head_dim)
        else:
            y = y.reshape(b, t, y.shape[2] * y.shape[3])
        return x + self.proj(y)


class TokenMix(nn.Module):
    """MLP-Mixer token mixing: a linear over the token dim (channels move to dim 1 meanwhile)."""

    def __init__(self, tokens: int, residual: bool):
        super().__init__()
        self.mix = nn.Linear(tokens, tokens)
        self.residual = residual

    def forward(self, x):
        y = self.mix(x.transpose(1, 2)).transpose(1, 2)
        return x + y if self.residual else y


class GapHead(nn.Module):
    def __init__(self, c: int, classes: int, pool: str):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "module" else None
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        if self.pool is None:
            return self.fc(x.mean((-2, -1)))
        return self.fc(torch.flatten(self.pool(x), 1))


class FlattenHead(nn.Module):
    """flatten -> linear: one channel is H*W features (consecutive in NCHW order, strided in NHWC)."""

    def __init__(self, c: int, hw: int, classes: int, channels_last: bool):
        super().__init__()
        self.fc = nn.Linear(c * hw * hw, classes)
        self.channels_last = channels_last

    def forward(self, x):
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        return self.fc(x.flatten(1))


class AttentionHead(nn.Module):
    """Spatial positions become tokens; a pre-norm attention block; mean over tokens; linear."""

    def __init__(self, c: int, heads: int, mlp: bool, classes: int):
        super().__init__()
        self.block = AttentionBlock(c, heads, 2 * c if mlp else 0)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return self.fc(self.block(tokens).mean(dim=1))


class LinearNormAct(nn.Module):
    def __init__(self, fin: int, out: int, norm: Optional[str], act: Optional[str]):
        super().__init__()
        self.fc = nn.Linear(fin, out)
        norms = {"ln": nn.LayerNorm, "bn": nn.BatchNorm1d,
                 "ln_noaffine": lambda n: nn.LayerNorm(n, elementwise_affine=False)}
        self.norm = norms[norm](out) if norm is not None else nn.Identity()
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.norm(self.fc(x)))


class ResidualLinear(nn.Module):
    def __init__(self, f: int, hidden: int, prenorm: Optional[str], act: str):
        super().__init__()
        self.prenorm = prenorm
        self.norm = nn.LayerNorm(f) if prenorm == "module" else nn.Identity()
        if prenorm == "functional":
            self.ln_weight, self.ln_bias = nn.Parameter(torch.rand(f) + 0.5), nn.Parameter(torch.randn(f) * 0.5)
        self.f = f
        self.fc1, self.act, self.fc2 = nn.Linear(f, hidden), activation(act), nn.Linear(hidden, f)

    def forward(self, x):
        y = self.norm(x)
        if self.prenorm == "functional":
            y = F.layer_norm(x, (self.f,), self.ln_weight, self.ln_bias)
        return x + self.fc2(self.act(self.fc1(y)))


class CatLinear(nn.Module):
    def __init__(self, f: int, o1: int, o2: int, act: str):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(f, o1), nn.Linear(f, o2), activation(act)

    def forward(self, x):
        return self.act(torch.cat([self.a(x), self.b(x)], dim=-1))


class TokenMeanHead(nn.Module):
    def __init__(self, f: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(f, classes)

    def forward(self, x):
        return self.fc(x.mean(dim=1))


class TokenFlattenHead(nn.Module):
    def __init__(self, f: int, tokens: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(f * tokens, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class RandomNet(nn.Module):
    """The model a NetSpec describes; its repr starts with the spec."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        layers: List[nn.Module] = []
        ch = spec.in_shape[0] if spec.family == "cnn" else spec.in_shape[-1]
        hw = spec.in_shape[1] if spec.family == "cnn" else 0
        for b in spec.blocks:
            layer, ch, hw = build_block(b, ch, hw)
            layers.append(layer)
        self.blocks = nn.ModuleList(layers)
        h = spec.head
        self.head = {
            "gap": lambda: GapHead(ch, h["classes"], "module"),
            "gap_mean": lambda: GapHead(ch, h["classes"], "mean"),
            "flatten": lambda: FlattenHead(ch, hw, h["classes"], channels_last=False),
            "flatten_cl": lambda: FlattenHead(ch, hw, h["classes"], channels_last=True),
            "attn": lambda: AttentionHead(ch, h["heads"], h["mlp"], h["classes"]),
            "linear_head": lambda: nn.Linear(ch, h["classes"]),
            "token_mean": lambda: TokenMeanHead(ch, h["classes"]),
            "token_flatten": lambda: TokenFlattenHead(ch, spec.in_shape[0], h["classes"]),
        }[h.kind]()
        randomise_statistics(self)
        self.eval()

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)

    def extra_repr(self) -> str:
        return repr(self.spec)

    def example_input(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.spec.seed + 1)
        return torch.randn((self.spec.batch,) + tuple(self.spec.in_shape), generator=g)


def build_block(b: Block, ch: int, hw: int) -> Tuple[nn.Module, int, int]:
    k = b.kind
    if k == "conv":
        hw_out = (hw + 2 * (b["k"] // 2) - b["k"]) // b["stride"] + 1
        return (ConvNormAct(ch, b["out"], b["k"], norm=b["norm"], act=b["act"], bias=b["bias"], stride=b["stride"]),
                b["out"], hw_out)
    if k == "fconv":
        return FunctionalConv(ch, b["out"], b["bias"]), b["out"], hw
    if k == "ln_chw":
        return LayerNormCHW(ch, hw, b["affine"]), ch, hw
    if k == "sum_gate":
        return SumGate(), ch, hw
    if k == "hcat":
        return HeightCat(ch, b["out"]), b["out"], hw
    if k == "pad":
        return PadThen(ch, b["mode"], b["then"]), ch, hw
    if k == "slice_channels":
        return SliceChannels(b["keep"]), b["keep"], hw
    if k == "dwconv":
        out = ch * b["mult"]
        return ConvNormAct(ch, out, 3, groups=ch, norm=b["norm"], act=b["act"]), out, hw
    if k == "gconv":
        return ConvNormAct(ch, b["out"], b["k"], groups=b["groups"], norm=b["norm"], act=b["act"]), b["out"], hw
    if k in ("res", "res_inplace"):
        return Residual(ch, ch, b["mid"], b["norm"], b["act"], project=False, inplace=k == "res_inplace"), ch, hw
    if k == "resproj":
        return Residual(ch, b["out"], b["mid"], b["norm"], b["act"], project=True), b["out"], hw
    if k == "shared_res":
        return SharedResidual(ch, b["act"]), ch, hw
    if k == "concat":
        out = b["o1"] + b["o2"] + (ch if b["dense"] else 0)
        return Concat(ch, b["o1"], b["o2"], b["dense"], b["dim"], b["act"]), out, hw
    if k == "split":
        out = (b["first"] if b["left"] is None else b["left"]) + b["right"]
        return SplitProcess(ch, b["mode"], b["first"], b["left"], b["right"], b["act"]), out, hw
    if k in ("chunk3", "tensor_split"):
        return ThreeWaySplit(ch, k, b["sizes"], b["o1"], b["o2"]), b["sizes"][0] + b["o1"] + b["o2"], hw
    if k == "se":
        return SqueezeExcite(ch, b["squeeze"], b["gate"], b["pool"]), ch, hw
    if k == "shuffle":
        return ChannelShuffle(ch, b["groups"], b["sizes"]), ch, hw
    if k == "cl_mlp":
        return ChannelsLastMLP(ch, b["hidden"], b["residual"], b["layer_scale"]), ch, hw
    if k == "scale":
        return LayerScale2d(ch, b["shift"]), ch, hw
    if k == "prelu":
        return nn.PReLU(ch), ch, hw
    if k == "updown":
        return UpDown(b["mode"]), ch, hw
    if k == "flip":
        return Flip(), ch, hw
    if k == "cbam":
        return SpatialAttention(), ch, hw
    if k == "pool":
        if b["how"] == "max2":
            return nn.MaxPool2d(2), ch, hw // 2
        return nn.AvgPool2d(3, stride=1, padding=1), ch, hw
    if k == "linear":
        return LinearNormAct(ch, b["out"], b["norm"], b["act"]), b["out"], hw
    if k == "res_linear":
        return ResidualLinear(ch, b["hidden"], b["prenorm"], b["act"]), ch, hw
    if k == "cat_linear":
        return CatLinear(ch, b["o1"], b["o2"], b["act"]), b["o1"] + b["o2"], hw
    if k == "attn_block":
        return AttentionBlock(ch, b["heads"], b["mlp"]), ch, hw
    if k == "manual_attn":
        return ManualAttention(ch, b["heads"], b["head_dim"], b["out_reshape"]), ch, hw
    if k == "token_mix":
        return TokenMix(b["tokens"], b["residual"]), ch, hw
    raise AssertionError(k)


def randomise_statistics(model: nn.Module) -> None:
    """Non-trivial BN statistics, norm affines and PReLU slopes, so shifts and biases matter downstream."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
            elif isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.normal_(0, 0.3)
                m.out_proj.bias.normal_(0, 0.3)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.5, 0.5)


# =========================================================================== checks
class Outcome:
    PRUNED, BUDGET = "pruned", "budget unreachable"


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: Dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "compile changed the model's state_dict keys"
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), f"compile modified the user's {k}"


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def has_attention_module(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def compile_and_check(spec: NetSpec, opts: Options) -> Tuple[str, Optional[torch.fx.GraphModule], "RandomNet"]:
    """Compile with verify=True and check what must hold of every result."""
    model = RandomNet(spec)
    x = model.example_input()
    before = snapshot(model)
    with torch.no_grad():
        y0 = model(x)
    budget = opts.budget_arg()
    try:
        pruned = fxprune.compile(model, budget, example_inputs=(x,), verify=True, **opts.kwargs())
    except fxprune.BudgetError:  # includes NoPrunableChannelsError
        assert_state_unchanged(model, before)
        return Outcome.BUDGET, None, model
    assert_state_unchanged(model, before)
    assert model.training is False

    report = pruned.meta["fxprune"]
    assert report["verification"]["passed"] is True
    assert report["verification"]["dtype"] == "float64"
    flops_budget = budget if isinstance(budget, float) else budget.flops
    if flops_budget is not None:
        assert report["flops"]["ratio"] <= flops_budget + 1e-6, report["flops"]
    if not isinstance(budget, float) and budget.params is not None:
        assert report["params"]["ratio"] <= budget.params + 1e-6, report["params"]
    assert report["flops"]["after"] <= report["flops"]["before"]
    assert not pruned.training
    with torch.no_grad():
        y1 = pruned(x)
    assert y1.shape == y0.shape and y1.dtype == y0.dtype
    assert torch.isfinite(y1).all()
    # shapes are specialised to example_inputs except the batch dim: another batch size still runs
    with torch.no_grad():
        y3 = pruned(torch.cat([x, x[:1]]))
    assert y3.shape == (y1.shape[0] + 1,) + y1.shape[1:]
    torch.testing.assert_close(y3[: y1.shape[0]], y1, rtol=1e-4, atol=1e-5)
    check_sliced_parameters(model, pruned, report)
    check_costs(model, pruned, report, x, flops_budget, spec)
    if opts.ignore_stem:
        first = "blocks.0.conv.weight" if spec.family == "cnn" else "blocks.0.fc.weight"
        assert pruned.get_parameter(first).shape[0] == model.get_parameter(first).shape[0], "ignored module was pruned"
    return Outcome.PRUNED, pruned, model


def check_sliced_parameters(model: nn.Module, pruned: torch.fx.GraphModule, report: Dict[str, Any]) -> None:
    """Every tensor of the pruned model is the user's tensor index_select-ed by the kept positions
    the report lists (attention's q rows additionally carry the folded head-size scale)."""
    original = model.state_dict()
    sliced: Dict[str, Dict[int, List[int]]] = {}
    for module_name, entry in report["modules"].items():
        for local, dims in entry["params"].items():
            sliced[f"{module_name}.{local}" if module_name else local] = {int(d): idx for d, idx in dims.items()}
        if "out" in entry:
            key = "in_proj_weight" if "in_proj_weight" in entry["params"] else "weight"
            assert entry["out"] == entry["params"][key]["0"]
    got = pruned.state_dict()
    assert set(sliced) <= set(got), set(sliced) - set(got)
    for name, tensor in got.items():
        assert name in original, f"pruned model has a tensor {name} the original does not"
        expected = original[name]
        for d, idx in sliced.get(name, {}).items():
            assert idx == sorted(set(idx)) and all(0 <= i < expected.shape[d] for i in idx), (name, d, idx)
            expected = expected.index_select(d, torch.as_tensor(idx, dtype=torch.long))
        assert tensor.shape == expected.shape, (name, tuple(tensor.shape), tuple(expected.shape))
        if name.endswith(("in_proj_weight", "in_proj_bias")):
            e, old_e = tensor.shape[0] // 3, original[name].shape[0] // 3
            torch.testing.assert_close(tensor[:e], expected[:e] * math.sqrt(e / old_e), rtol=1e-6, atol=1e-7)
            assert torch.equal(tensor[e:], expected[e:]), name
        else:
            assert torch.equal(tensor, expected), f"{name} is not the user's tensor sliced as the report says"


def check_costs(model: nn.Module, pruned: torch.fx.GraphModule, report: Dict[str, Any], x: torch.Tensor,
                budget: Optional[float], spec: Optional[NetSpec] = None) -> None:
    """The report's costs against independent counts: parameters by numel, FLOPs by FlopCounterMode
    (which counts nothing for nn.MultiheadAttention's fused CPU path, so those graphs are skipped)."""
    assert report["params"]["before"] == sum(p.numel() for p in model.parameters())
    assert report["params"]["after"] == sum(p.numel() for p in pruned.parameters())
    if has_attention_module(model):
        return
    before, after = count_flops(model, x), count_flops(pruned, x)
    assert report["flops"]["before"] == before
    if budget is not None:
        assert after <= (budget + 1e-6) * before, "the pruned model's measured FLOPs exceed the budget"
    if spec is not None and any(b.kind in KNOWN_COST_BUGS for b in spec.blocks):
        # known bug (see KNOWN_COST_BUGS): the report over-counts, so only its direction is checked
        assert report["flops"]["after"] >= after
        return
    assert report["flops"]["after"] == after


# =========================================================================== the property test
@dataclass(frozen=True)
class KnownBug:
    """A block combination that hits a known fxprune bug. Graphs containing it stay in the strategy
    but are filtered out of the property and seed-list tests; the bug is tracked by the strict xfail
    test `xfail_test` holding a minimal reproducer (when the bug is fixed, that test XPASSes and
    fails, and the entry here should be removed)."""

    xfail_test: str
    matches: Callable[[Block], bool]


# Empty: the three bugs this file found (a one-channel gate broadcast over C channels, LayerNorm
# without affine parameters, channels on a linear's leading dim in the cost model) are fixed and their
# reproducers are regression tests at the end of the file.
KNOWN_BUGS: Dict[str, KnownBug] = {}


def known_bug(spec: NetSpec) -> Optional[str]:
    for name, bug in KNOWN_BUGS.items():
        if any(bug.matches(b) for b in spec.blocks):
            return name
    return None


# Block kinds for which only the exact report["flops"]["after"] == FlopCounterMode check is skipped
# (everything else, verification included, still runs on them).
KNOWN_COST_BUGS: Dict[str, str] = {}


@st.composite
def any_specs(draw) -> NetSpec:
    return draw_spec(HypothesisChooser(draw))


def specs():
    """Random graphs, without the combinations of KNOWN_BUGS."""
    return any_specs().filter(lambda spec: known_bug(spec) is None)


@st.composite
def options(draw) -> Options:
    return draw_options(HypothesisChooser(draw))


@settings(max_examples=500, **SETTINGS)
@given(spec=specs(), opts=options())
def test_random_graph_compiles_and_verifies(spec: NetSpec, opts: Options):
    note(repr(RandomNet(spec)))
    outcome, _, _ = compile_and_check(spec, opts)
    event(f"{spec.family}: {outcome}")
    for kind in sorted(set(spec.kinds())):
        event(f"contains {kind}")


def test_most_random_graphs_prune():
    """Over a fixed seed list, at least 80% of random graphs reach their budget (BudgetError is the
    only acceptable exception), and every one that compiles passes every check."""
    outcomes, seed = [], 0
    while len(outcomes) < 200:
        c = SeededChooser(seed)
        spec, opts = draw_spec(c), draw_options(c)
        seed += 1
        if known_bug(spec) is None:
            outcomes.append(compile_and_check(spec, opts)[0])
    pruned = outcomes.count(Outcome.PRUNED)
    assert pruned >= 0.8 * len(outcomes), f"only {pruned}/{len(outcomes)} random graphs compiled"


def test_defaults_land_within_two_points_of_the_budget_or_say_why():
    """With the default options a result keeps at most the budget and at least budget - 2 points, or
    warns naming the smallest step that would not fit, and that step is larger than the shortfall."""
    import re
    import warnings
    checked, warned, seed = 0, 0, 0
    while checked < 60:
        c = SeededChooser(seed)
        spec = draw_spec(c)
        seed += 1
        if known_bug(spec) is not None:
            continue
        model = RandomNet(spec).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pruned = fxprune.compile(model, 0.5, example_inputs=(model.example_input(),), verify=False)
            except fxprune.BudgetError:
                continue
        checked += 1
        ratio = pruned.meta["fxprune"]["flops"]["ratio"]
        assert ratio <= 0.5 + 1e-9
        short = [str(w.message) for w in caught if "for a budget of" in str(w.message)]
        if 0.5 - ratio <= 0.02:
            assert not short, short
            continue
        warned += 1
        assert len(short) == 1, (spec, ratio)
        step = re.search(r"is ([0-9.]+)% of the FLOPs and does not fit", short[0])
        assert step and float(step.group(1)) / 100 > 0.5 - ratio - 1e-3, short[0]
    assert warned < checked / 2


# =========================================================================== hand-built reference
CHAIN_KINDS = ("conv", "dwconv", "gconv", "res", "resproj", "concat", "pool")


def hand_masked_reference(model: nn.Module, report: Dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """The user's model in float64 with the removed output channels of every conv block zeroed
    (after its norm and activation, i.e. wherever the block's output is read), and likewise for
    residual sums (coupled to their last conv's channels). Concat and pooling keep zeros zero."""
    ref = copy.deepcopy(model).double()

    def masker(conv_name: str):
        kept = report["modules"].get(conv_name, {}).get("out")

        def hook(module, inputs, output):
            if kept is None:
                return output
            mask = torch.zeros(output.shape[1], dtype=torch.bool)
            mask[kept] = True
            return torch.where(mask.view(1, -1, 1, 1), output, torch.zeros((), dtype=output.dtype))
        return hook

    for name, module in ref.named_modules():
        if isinstance(module, ConvNormAct):
            module.register_forward_hook(masker(f"{name}.conv"))
        elif isinstance(module, Residual):
            module.register_forward_hook(masker(f"{name}.conv2.conv"))
    with torch.no_grad():
        return ref(x.double())


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_conv_chains_match_hand_built_reference(data):
    c = HypothesisChooser(data.draw)
    spec = draw_cnn_spec(c, kinds=CHAIN_KINDS, heads=("gap", "flatten"), max_blocks=4, allow_gn=False)
    opts = draw_options(c)
    note(repr(spec))
    outcome, pruned, model = compile_and_check(spec, opts)
    if pruned is None:
        return
    report = pruned.meta["fxprune"]
    assert report["flops"]["ratio"] < 1.0 or opts.budget_kind == "params"
    x = torch.randn(model.example_input().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected = hand_masked_reference(model, report, x)
    with torch.no_grad():
        got = copy.deepcopy(pruned).double()(x)
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= 1e-9 * scale


# =========================================================================== known fxprune bugs
class SpatialGate(nn.Module):
    """Minimal reproducer: a one-channel gate broadcast over C channels (CBAM / spatial attention)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 1, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(self.gate(y))      # (N, 8, H, W) * (N, 1, H, W)
        return self.fc(y.mean((2, 3)))


def test_one_channel_gate_broadcast_over_channels_is_frozen_not_coupled():
    model = SpatialGate().eval()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    pruned = fxprune.compile(model, 0.5, example_inputs=(x,), verify=True, round_to=1)
    assert_state_unchanged(model, before)
    assert pruned.meta["fxprune"]["flops"]["ratio"] <= 0.5 + 1e-6
    assert pruned(x).shape == (2, 4)


class TokenMixer(nn.Module):
    """Minimal reproducer: MLP-Mixer token mixing puts the channels on a linear's leading dim."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 6)
        self.mix = nn.Linear(4, 4)             # over the 4 tokens; the 6 channels sit on dim 1
        self.head = nn.Linear(6, 3)

    def forward(self, x):                      # x: (N, 4 tokens, 8 features)
        y = self.mix(self.embed(x).transpose(1, 2)).transpose(1, 2)
        return self.head(y).sum(1)


def test_cost_model_counts_channels_on_a_linear_leading_dim():
    model = TokenMixer().eval()
    x = torch.randn(2, 4, 8)
    pruned = fxprune.compile(model, 0.5, example_inputs=(x,), verify=True, round_to=1)
    report = pruned.meta["fxprune"]
    assert report["flops"]["before"] == count_flops(model, x)
    assert report["flops"]["after"] == count_flops(pruned, x)


class NormalisedMLP(nn.Module):
    """Minimal reproducer: LayerNorm over a prunable channel dim, without elementwise_affine."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8, elementwise_affine=False)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def test_layer_norm_without_affine_gets_its_new_normalized_shape():
    model = NormalisedMLP().eval()
    x = torch.randn(2, 4)
    pruned = fxprune.compile(model, 0.5, example_inputs=(x,), verify=True, round_to=1)
    assert pruned(x).shape == (2, 3)
