"""One tiny module per coupling pattern. Each documents the coupling it exercises."""
import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Head(nn.Module):
    def __init__(self, c, classes=5):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


class ConvChain(nn.Module):
    """conv-bn-relu chain: each conv's out channels couple with the next conv's in channels."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(cbr(3, 16), cbr(16, 24), cbr(24, 32))
        self.head = Head(32)

    def forward(self, x):
        return self.head(self.body(x))


class Residual(nn.Module):
    """identity add: the stem, both block outputs and the head input are one group."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.b1 = nn.Sequential(cbr(16, 24), nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.b2 = nn.Sequential(cbr(16, 8), nn.Conv2d(8, 16, 3, padding=1))
        self.head = Head(16)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = x + self.b2(x)
        return self.head(x)


class Concat(nn.Module):
    """cat: the consumer's input channels come from two groups, at offsets."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 12), cbr(3, 20)
        self.fuse = cbr(32, 16)
        self.head = Head(16)

    def forward(self, x):
        return self.head(self.fuse(torch.cat([self.a(x), self.b(x)], dim=1)))


class SplitChunk(nn.Module):
    """chunk: one producer's channels split into two consumers; split sizes must be rewritten."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 24)
        self.left, self.right = cbr(12, 10), cbr(12, 14)
        self.head = Head(24)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        c, d = torch.split(self.left(a), [4, 6], dim=1)
        return self.head(torch.cat([c, d, self.right(b)], dim=1))


class Depthwise(nn.Module):
    """depthwise conv: in = out channel by channel, groups must follow the kept count."""

    def __init__(self):
        super().__init__()
        self.expand = cbr(3, 24, k=1)
        self.dw = cbr(24, 24, groups=24)
        self.dw_mult = nn.Conv2d(24, 48, 3, padding=1, groups=24)  # channel multiplier 2
        self.project = cbr(48, 16, k=1)
        self.head = Head(16)

    def forward(self, x):
        return self.head(self.project(self.dw_mult(self.dw(self.expand(x)))))


class GroupedConv(nn.Module):
    """grouped conv (groups=4): every group keeps the same in-group positions."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 32, k=1)
        self.g = cbr(32, 16, groups=4)
        self.b = cbr(16, 24, k=1)
        self.head = Head(24)

    def forward(self, x):
        return self.head(self.b(self.g(self.a(x))))


class FlattenLinear(nn.Module):
    """flatten -> linear: one conv channel is H*W linear input features."""

    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 12)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc1 = nn.Linear(12 * 9, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.pool(self.conv(x)).flatten(1))))


class AttentionHeads(nn.Module):
    """nn.MultiheadAttention on tokens with a residual stream, LayerNorm and an MLP; a class token
    and position embedding are parameters used directly."""

    def __init__(self, dim=32, heads=4, tokens=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x[:, 0])


class HeadReshape(nn.Module):
    """explicit multi-head attention with reshape into (heads, head_dim) and literal sizes."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.reshape(b, n, self.heads, self.hd).transpose(1, 2)
        k = k.reshape(b, n, self.heads, self.hd).transpose(1, 2)
        v = v.reshape(b, n, self.heads, self.hd).transpose(1, 2)
        a = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, n, c)
        return self.head((x + self.proj(o)).mean(1))


class BlockingOp(nn.Module):
    """cumsum over channels has no rule: the channels it touches are frozen, the rest still prune."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 16)
        self.head = Head(16)

    def forward(self, x):
        y = self.a(x)
        return self.head(self.b(torch.cumsum(y, dim=1)))


class SharedWeights(nn.Module):
    """one conv module called twice: both calls slice the same weight, so their channels couple."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.head = Head(16)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.shared(torch.relu(self.shared(x))))


class FunctionalParams(nn.Module):
    """parameters used directly: F.conv2d(x, self.weight), a per-channel scale, F.linear."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 3, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(12) * 0.1)
        self.scale = nn.Parameter(torch.rand(1, 12, 1, 1) + 0.5)
        self.w2 = nn.Parameter(torch.randn(20, 12, 1, 1) * 0.2)
        self.fc_w = nn.Parameter(torch.randn(5, 20) * 0.2)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.weight, self.bias, padding=1)) * self.scale
        x = F.relu(F.conv2d(x, self.w2))
        return F.linear(x.mean((2, 3)), self.fc_w)


class ChannelsLast(nn.Module):
    """ConvNeXt block: depthwise conv, permute to channels-last, LayerNorm, MLP, layer scale, permute back."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = Head(dim)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(y))))
        return self.head(x + y.permute(0, 3, 1, 2))


class ChannelShuffle(nn.Module):
    """ShuffleNet: view into (groups, C/groups), transpose, view back; sizes computed from x.size()."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 16, k=1)
        self.head = Head(16)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(self.b(x))


class SqueezeExcite(nn.Module):
    """SE: pooled channels gate the feature map with a broadcasting multiply."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 24)
        self.squeeze, self.excite = nn.Conv2d(24, 8, 1), nn.Conv2d(8, 24, 1)
        self.head = Head(24)

    def forward(self, x):
        x = self.a(x)
        s = torch.sigmoid(self.excite(F.silu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(x * s)


class GroupNormNet(nn.Module):
    """GroupNorm(4 groups): each group keeps the same positions and normalises over its kept channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.b = cbr(16, 12)
        self.head = Head(12)

    def forward(self, x):
        return self.head(self.b(F.relu(self.gn(self.a(x)))))


FIXTURES = {
    cls.__name__: cls
    for cls in [ConvChain, Residual, Concat, SplitChunk, Depthwise, GroupedConv, FlattenLinear, AttentionHeads,
                HeadReshape, BlockingOp, SharedWeights, FunctionalParams, ChannelsLast, ChannelShuffle, SqueezeExcite,
                GroupNormNet]
}


def example_input(batch=2):
    return torch.randn(batch, 3, 8, 8)
