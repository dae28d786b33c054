"""Importances from calibration activations, for language models and anything else with linear or
conv consumers: WandaImportance ("wanda") and FluctuationImportance ("flap").

Both read the inputs of every layer whose input features a group slices (a Linear's last dim, a
conv's channels: the consumer's weight columns), over the calibration batches:
  - wanda (Wanda-sp, Sun et al. 2023, as structured in An et al. 2024): position j scores
    ||X_j||_2 * sum_i |W_ij|, the weight magnitude scaled by the activation that multiplies it;
  - flap (FLAP, An et al. 2024, "WIFV"): position j scores Var(X_j) * ||W_:j||_2^2, how much the
    layer's output fluctuates because of input j.
FLAP's other half, bias compensation, works with any importance: compile(bias_compensation=True)
measures the same statistics (input_means) and the BiasCompensation pass folds them into biases.
A unit's score sums its positions over every consumer; a group with no consumer layer falls back to
L1 so it still ranks. The model runs in eval mode; nothing is trained."""
from __future__ import annotations

import logging
from typing import Dict

import numpy as np
import torch
import torch.fx

from fxprune.importance import Importance, ImportanceData, register_importance
from fxprune.ir import ChannelGroups
from fxprune.tracing import torch_layer_type
from .importance_common import add_to_units, owner
from .l1_importance import L1Importance

log = logging.getLogger("fxprune")



class InputStatistics:
    """Per consumer weight: count, sum and sum of squares of each input feature, in float64."""

    def __init__(self, gm: torch.fx.GraphModule, groups: ChannelGroups):
        self.consumers: Dict[str, torch.nn.Module] = {}
        for name, dims in groups.param_slices.items():
            module, local = owner(gm, name)
            if local == "weight" and 1 in dims and torch_layer_type(module) in (
                    torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d):
                self.consumers[name] = module
        self.n: Dict[str, float] = {n: 0.0 for n in self.consumers}
        self.sum: Dict[str, torch.Tensor] = {}
        self.sumsq: Dict[str, torch.Tensor] = {}

    def collect(self, gm: torch.fx.GraphModule, data: ImportanceData, n_batches: int) -> int:
        hooks = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.consumers.items()]
        count = 0
        try:
            with torch.no_grad():
                for inputs, _ in data.iter_batches(n_batches):
                    with data.batch(count, inputs):
                        gm(*inputs)
                    count += 1
        finally:
            for h in hooks:
                h.remove()
        return count

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().double()
            features = x.movedim(1, -1) if not isinstance(module, torch.nn.Linear) else x
            features = features.reshape(-1, features.shape[-1])
            self.n[name] += features.shape[0]
            self.sum[name] = self.sum.get(name, 0) + features.sum(0)
            self.sumsq[name] = self.sumsq.get(name, 0) + (features * features).sum(0)
        return hook

    def mean(self, name: str) -> torch.Tensor:
        return self.sum[name] / max(self.n[name], 1.0)

    def norm(self, name: str) -> torch.Tensor:
        return self.sumsq[name].sqrt()

    def variance(self, name: str) -> torch.Tensor:
        return (self.sumsq[name] / max(self.n[name], 1.0) - self.mean(name) ** 2).clamp_min(0)


class _ActivationImportance(Importance):
    requires_data = True

    def __init__(self, n_batches: int = 32):
        self.n_batches = n_batches

    def position_scores(self, weight: torch.Tensor, stats: InputStatistics, name: str) -> torch.Tensor:
        raise NotImplementedError

    def score_with_results(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data: ImportanceData = None):
        stats = InputStatistics(gm, groups)
        n = stats.collect(gm, data or ImportanceData(), self.n_batches)
        scores, scored = np.zeros(groups.n_units), np.zeros(groups.n_units, dtype=bool)
        for name in stats.consumers:
            if name not in stats.sum:     # a consumer the calibration never reached
                continue
            weight = stats.consumers[name].weight.detach().double()
            per_position = self.position_scores(weight.reshape(weight.shape[0], weight.shape[1], -1), stats, name)
            elements = groups.param_slices[name][1]
            add_to_units(scores, groups, elements, per_position.numpy())
            scored[groups.units_of(elements)] = True
        fallback = L1Importance().score(gm, groups)
        for g in groups.groups:           # groups no consumer reads (a model output): rank by L1
            if not scored[g.units].any():
                scores[g.units] = fallback[g.units]
        log.info("%s importance from %d calibration batches over %d layers' inputs", self.name, n, len(stats.sum))
        return scores, {"calibration_batches": n}

    def score(self, gm, groups, data=None) -> np.ndarray:
        return self.score_with_results(gm, groups, data)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_batches={self.n_batches})"


@register_importance
class WandaImportance(_ActivationImportance):
    name = "wanda"

    def position_scores(self, weight, stats, name):
        # sum_i |W_ij| (kernel positions too) * ||X_j||
        return weight.abs().sum(dim=(0, 2)) * stats.norm(name)


@register_importance
class FluctuationImportance(_ActivationImportance):
    name = "flap"

    def position_scores(self, weight, stats, name):
        return (weight * weight).sum(dim=(0, 2)) * stats.variance(name)


def input_means(gm: torch.fx.GraphModule, groups: ChannelGroups, data: ImportanceData,
                n_batches: int = 32) -> Dict[str, torch.Tensor]:
    """Per linear layer whose inputs a group slices: the mean of each input feature over the
    calibration batches (a conv is left out: its zero padding would read zeros, not means)."""
    stats = InputStatistics(gm, groups)
    stats.consumers = {n: m for n, m in stats.consumers.items() if isinstance(m, torch.nn.Linear)}
    n = stats.collect(gm, data, n_batches)
    log.info("bias compensation: input means of %d linear layers from %d calibration batches", len(stats.sum), n)
    return {name: stats.mean(name) for name in stats.sum}


def compensation_terms(original: torch.nn.Module, keep_positions, means: Dict[str, torch.Tensor],
                       groups: ChannelGroups) -> Dict[str, torch.Tensor]:
    """Per linear layer's weight that lost inputs: W[:, removed] @ mean[removed], the bias shift that
    keeps the layer's output mean when those inputs go (at the original output width)."""
    shifts = {}
    for name, mean in means.items():
        elements = groups.param_slices[name][1]
        kept = keep_positions(elements)
        if len(kept) == len(elements):
            continue
        removed = np.setdiff1d(np.arange(len(elements)), kept)
        module, _ = owner(original, name)
        w = module.weight.detach().double()
        index = torch.as_tensor(removed)
        shifts[name] = w[:, index] @ mean[index]
    return shifts
