"""A tiny, deterministic network pruning space search: imported by test_space_search.py and run by
it under torchrun (2 processes, gloo) to check that distributed evaluation changes nothing.

    torchrun --standalone --nproc_per_node=2 tests/space_search_job.py OUT.json"""
from __future__ import annotations

import json
import sys

import torch
from torch import nn

import fxprune


class TinyResNet(nn.Module):
    """conv stem, one residual block, a strided conv, pool, linear: five channel groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        x = self.down(x)
        return self.head(x.mean((2, 3)))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyResNet().eval()


def make_data(n_batches: int, seed: int, batch: int = 16):
    """Labels are a fixed function of the input (its mean colour), so short training helps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 3, 8, 8, generator=g)
        y = x.mean((2, 3)).argmax(1) + (x[:, 0].mean((1, 2)) > 0).long()
        out.append((x, y.clamp(max=3)))
    return out


def make_search(**options) -> fxprune.SpaceSearch:
    evaluator = fxprune.ProxyEvaluator(make_data(6, 1), make_data(3, 2), steps=4, lr=0.05, recalibrate_batches=2)
    return fxprune.SpaceSearch(evaluator=evaluator, **{"n_samples": 8, "n_refined": 6, "n_buckets": 3,
                                                       "band": 0.1, "seed": 3, **options})


def run(**options):
    torch.set_num_threads(1)  # the same reduction order in every process
    search = make_search(**options)
    pruned = fxprune.compile(make_model(), 0.5, example_inputs=torch.randn(1, 3, 8, 8), allocation=search,
                             round_to=1)
    return pruned, pruned.meta["fxprune"]["search"]


if __name__ == "__main__":
    pruned, result = run()
    import torch.distributed as dist
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"result": result, "world_size": dist.get_world_size(),
                       "kept": pruned.meta["fxprune"]["flops"]["ratio"]}, f)
    dist.destroy_process_group()
