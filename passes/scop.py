"""SCOP (Scientific Control for reliable neural network Pruning, Tang et al., NeurIPS 2020) over
arbitrary channel groups.

A batch of real images and a batch of knockoffs (label-free look-alikes, passes/scop_knockoffs.py)
go through the same network side by side, [real ; knockoff] along the batch dim. At every producer
of a target group (a conv or linear writing the group's channels) the real half's output is mixed
with the knockoff half's, channel by channel, before normalisation:

    Z_real <- beta * Z_real + (1 - beta) * Z_knockoff,        beta in [0, 1], one per channel unit,

with one beta vector per group, shared by all of its producers. The knockoff half flows on
unmixed. The weights stay frozen; only the betas are trained (Adam, lr 0.004, betas (0.5, 0.9),
clamped to [0, 1] after every step) on the cross-entropy of the real half. A channel the network needs
for real data keeps beta near 1; one it can replace by knockoff features drifts towards 0.

Scores (higher = keep): "official" |gamma| (2 beta - 1), gamma = mean |BN weight| over the group's
producers (the official code's and the MindSpore port's formula); "paper" beta - (1 - beta).

Scope: "non_residual" (default, the paper's setup) trains and prunes only groups written by a single
producer; residual streams (several producers joined by adds) are excluded and stay whole. The
official code additionally prunes the last conv of each residual branch and scatters its output back
into a full-width zero tensor; fxprune does not rewrite that pattern, so under "non_residual" those
convs keep their output channels (their input channels are pruned with the inner group). "all" also
trains betas for residual groups. "l1_streams" (an fxprune extension) trains betas for the inner groups
only, as the paper does, and ranks the residual streams by L1 magnitude instead of keeping them whole:
on CIFAR ResNet-20 keeping the streams whole cost a point of accuracy at 50 % FLOPs whatever the
criterion (L1 inside blocks only 81.0 vs L1 everywhere 81.9), and betas trained on streams ranked them
worse than L1 (79.7-80.3 vs 81.9 at the same uniform rate). It measured 81.3 there: L1 still ranks the
inner groups better at the milder rate pruned streams allow (README, SCOP section).

Runs on a private copy of the traced graph (train-mode BN over the 2B batch changes running
statistics, as in the official code), so the model the rewrite slices is untouched: recalibrate BN
and fine-tune after pruning (fxprune.recalibrate_bn, fxprune.finetune)."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, Optional, Tuple

import numpy as np
import torch
import torch.fx
from torch import nn

from fxprune.errors import ConfigError
from fxprune.importance import Importance, ImportanceData
from fxprune.ir import ChannelGroups, ChannelMap
from fxprune.layers import batch_norm_after
from .l1_importance import L1Importance
from .scop_knockoffs import make_knockoff

SCOPES = ("non_residual", "all", "l1_streams")

log = logging.getLogger("fxprune")


@dataclass
class SCOP(Importance):
    """SCOP settings. knockoff: "shuffle" (default) | "gaussian" | "noise" | a callable
    (x, generator) -> knockoff; epochs: passes over `data` training the betas (steps caps them);
    score: "official" | "paper"; scope: "non_residual" | "all" | "l1_streams" (see the module doc)."""

    knockoff: Any = "shuffle"
    epochs: float = 1.0
    steps: Optional[int] = None
    lr: float = 0.004
    adam_betas: Tuple[float, float] = (0.5, 0.9)
    score_form: str = "official"
    scope: str = "non_residual"
    seed: int = 0
    log_every: int = 50
    name: str = field(default="scop", init=False)
    requires_data = True

    def __post_init__(self):
        if self.score_form not in ("official", "paper"):
            raise ConfigError(f"SCOP score_form must be 'official' or 'paper', got {self.score_form!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"SCOP scope must be one of {', '.join(map(repr, SCOPES))}, got {self.scope!r}")
        self.generator = make_knockoff(self.knockoff)

    def excluded_groups(self, gm, groups: ChannelGroups) -> Dict[int, str]:
        """Groups SCOP leaves whole (compile freezes them): residual streams under "non_residual"."""
        if self.scope != "non_residual":
            return {}
        return {g.id: "SCOP scope='non_residual': residual stream (several producers) kept whole"
                for g in _residual_streams(groups)}

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data: ImportanceData = None) -> np.ndarray:
        return self.score_with_results(gm, groups, data)[0]

    def score_with_results(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data: ImportanceData = None):
        """The scores, and for the report: the trained factors per group and how many saturated."""
        data = data or ImportanceData()
        excluded = self.excluded_groups(gm, groups)
        untrained = {g.id for g in _residual_streams(groups)} if self.scope == "l1_streams" else set()
        work = copy.deepcopy(gm)  # train-mode BN over [real; knockoff] must not touch the sliced model
        producers = self.producers(work, groups, excluded.keys() | untrained)
        if not producers:
            raise ConfigError("SCOP found no prunable group written by a conv or linear layer")
        betas = {gid: nn.Parameter(torch.full((groups.groups[gid].size,), 0.5)) for gid in
                 {p["group"] for p in producers.values()}}
        for p in work.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.Adam(list(betas.values()), lr=self.lr, betas=self.adam_betas)
        if getattr(self.generator, "needs_fit", False) and not getattr(self.generator, "fitted", True):
            self.generator.fit([x for x, _ in data.iter_batches(20)])
        rng = torch.Generator().manual_seed(self.seed)
        total = self.steps or max(1, int(round(self.epochs * _length(data.batches))))
        work.train()
        step, start = 0, time.perf_counter()
        log.info("SCOP: training %d factor vectors (%d channel units) for %d steps, knockoff %s", len(betas),
                 sum(b.numel() for b in betas.values()), total, type(self.generator).__name__)
        while step < total:
            for inputs, target in data.iter_batches(need_targets=True):
                x = inputs[0]
                with data.batch(step, inputs, target):
                    knockoff = self.generator(x, rng)
                    out = _Mixing(work, producers, betas, len(x)).run(torch.cat([x, knockoff]))
                    loss = data.loss(out[: len(x)], target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for b in betas.values():
                        b.clamp_(0.0, 1.0)
                step += 1
                if step % self.log_every == 0:
                    log.info("SCOP step %d/%d: loss %.3f, %.1f steps/s", step, total, loss.item(),
                             step / (time.perf_counter() - start))
                if step >= total:
                    break
        scores = self.scores(gm, groups, producers, betas)
        results = factor_statistics(betas)
        results["factors"] = {groups.groups[gid].name: [round(float(v), 6) for v in b.detach()]
                              for gid, b in sorted(betas.items())}
        results["steps"] = step
        if untrained:
            l1 = L1Importance().score(gm, groups)
            for gid in untrained:
                scores[groups.groups[gid].units] = l1[groups.groups[gid].units]
        return scores, results

    # --------------------------------------------------------------------------------------------
    def producers(self, gm, groups: ChannelGroups, excluded: Collection[int]) -> Dict[str, Dict[str, Any]]:
        """Per producer node (conv/linear writing a target group's channels): its group, the
        group-local unit of each output channel, and the BN right after it (if any)."""
        out: Dict[str, Dict[str, Any]] = {}
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            m = groups.maps.get(node.name)
            if not isinstance(m, ChannelMap):
                continue
            dim = 1 if isinstance(module, nn.Conv2d) else m.ndim - 1
            if m.dims[dim] is None:
                continue
            units = groups.units_of(m.dims[dim])
            gids = np.unique(groups.unit_group[units])
            if len(gids) != 1:
                continue
            group = groups.groups[int(gids[0])]
            if not group.prunable or group.id in excluded:
                continue
            bn = batch_norm_after(gm, node)
            out[node.name] = {"group": group.id, "local": torch.as_tensor(np.searchsorted(group.units, units)),
                              "dim": dim, "bn": bn}
        return out

    def scores(self, gm, groups: ChannelGroups, producers, betas) -> np.ndarray:
        """Unit scores: trained groups from their betas; every other group scores 1 (uniform)."""
        scores = np.ones(groups.n_units)
        gamma_sum = {gid: np.zeros(groups.groups[gid].size) for gid in betas}
        gamma_n = {gid: np.zeros(groups.groups[gid].size) for gid in betas}
        for name, p in producers.items():
            local = p["local"].numpy()
            # the BN is the private copy's; its weights were frozen, so gamma equals the model's
            bn = p["bn"]
            weight = bn.weight.detach().abs().numpy() if bn is not None and bn.weight is not None else \
                np.ones(len(local))
            np.add.at(gamma_sum[p["group"]], local, weight)
            np.add.at(gamma_n[p["group"]], local, 1)
        for gid, beta in betas.items():
            b = beta.detach().double().numpy()
            contrast = 2 * b - 1  # beta - beta_knockoff, with beta_knockoff = 1 - beta
            if self.score_form == "official":
                contrast = contrast * gamma_sum[gid] / np.maximum(gamma_n[gid], 1)
            # allocation normalises scores by the group mean: shift to positive keeping the order
            scores[groups.groups[gid].units] = contrast - contrast.min() + 1e-6
        return scores


def factor_statistics(betas: Dict[int, torch.Tensor], limit: float = 0.25) -> Dict[str, float]:
    """The share of factors saturated at 1 and below 0.5, warned about past `limit`. Factors clamped
    at 1 tie: their (2 beta - 1) is 1 for all of them, so among them the official score ranks by |gamma|
    alone and the paper score not at all. With shuffle knockoffs on CIFAR-10 ResNet-20, 390 steps left
    12-69 % of each group's factors at exactly 1 and almost none below 0.5."""
    every = torch.cat([b.detach().flatten() for b in betas.values()])
    saturated = float((every >= 1.0 - 1e-6).double().mean())
    below_half = float((every < 0.5).double().mean())
    log.info("SCOP: %.0f%% of the factors at 1, %.0f%% below 0.5", 100 * saturated, 100 * below_half)
    if saturated > limit:
        log.warning("SCOP: %.0f%% of the factors saturated at 1 and tie there (the official score then ranks "
                    "them by |BN gamma| alone): train the factors for fewer steps or with a lower lr", 100 * saturated)
    return {"saturated": saturated, "below_half": below_half}


class _Mixing(torch.fx.Interpreter):
    """Runs the graph on [real ; knockoff], mixing the real half's producer outputs with the
    knockoff half's by the group's beta, before the BN that follows."""

    def __init__(self, gm, producers, betas, n_real: int):
        super().__init__(gm)
        self.producers, self.betas, self.n_real = producers, betas, n_real

    def run_node(self, n):
        result = super().run_node(n)
        p = self.producers.get(n.name)
        if p is None:
            return result
        beta = self.betas[p["group"]][p["local"]]
        shape = [1] * result.ndim
        shape[p["dim"]] = -1
        beta = beta.reshape(shape)
        real, knockoff = result[: self.n_real], result[self.n_real:]
        return torch.cat([beta * real + (1 - beta) * knockoff, knockoff])


def _residual_streams(groups: ChannelGroups):
    """Prunable groups written by several producers joined by adds."""
    return [g for g in groups.groups if g.prunable and len(g.spaces) > 1]


def _length(batches) -> int:
    try:
        return len(batches)
    except TypeError:
        raise ConfigError("SCOP with epochs= needs data with a len(); pass steps= for an iterator") from None
