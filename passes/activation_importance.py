"""Importances from calibration activations, for language models and anything else with linear or
conv consumers: WandaImportance ("wanda") and FluctuationImportance ("flap").

Both read the inputs of every layer whose input features a group slices (a Linear's last dim, a
conv's channels: the consumer's weight columns), over the calibration batches:
  - wanda (Wanda-sp, Sun et al. 2023, as structured in An et al. 2024): position j scores
    ||X_j||_2 * sum_i |W_ij|, the weight magnitude scaled by the activation that multiplies it;
  - flap (FLAP, An et al. 2024, "WIFV"): position j scores Var(X_j) * ||W_:j||_2^2, how much the
    layer's output fluctuates because of input j.
FLAP's other half, bias compensation, works with any importance: compile(bias_compensation=True)
measures the same statistics (compensation_shifts) and the BiasCompensation pass folds them into biases.
A unit's score sums its positions over every consumer; a group with no consumer layer falls back to
L1 so it still ranks. The model runs in eval mode; nothing is trained."""
from __future__ import annotations

import logging
from typing import Dict, Tuple

import numpy as np
import torch
import torch.fx

from fxprune.importance import Importance, ImportanceData, register_importance
from fxprune.ir import ChannelGroups
from fxprune.tracing import torch_layer_type
from .importance_common import add_to_units, owner
from .l1_importance import L1Importance

log = logging.getLogger("fxprune")



def consumer_layers(gm: torch.fx.GraphModule, groups: ChannelGroups) -> Dict[str, torch.nn.Module]:
    """Linear and conv layers whose input features a group slices, by weight name."""
    consumers: Dict[str, torch.nn.Module] = {}
    for name, dims in groups.param_slices.items():
        module, local = owner(gm, name)
        if local == "weight" and 1 in dims and torch_layer_type(module) in (
                torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d):
            consumers[name] = module
    return consumers


class InputStatistics:
    """Per consumer weight: count, sum and sum of squares of each input feature, in float64."""

    def __init__(self, consumers: Dict[str, torch.nn.Module]):
        self.consumers = consumers
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

    def mean_square(self, name: str) -> torch.Tensor:
        return self.sumsq[name] / max(self.n[name], 1.0)

    def variance(self, name: str) -> torch.Tensor:
        return (self.mean_square(name) - self.mean(name) ** 2).clamp_min(0)


class _ActivationImportance(Importance):
    requires_data = True

    def __init__(self, n_batches: int = 32):
        self.n_batches = n_batches

    def position_scores(self, weight: torch.Tensor, stats: InputStatistics, name: str) -> torch.Tensor:
        raise NotImplementedError

    def score_with_results(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data: ImportanceData = None):
        stats = InputStatistics(consumer_layers(gm, groups))
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


def compensation_shifts(gm: torch.fx.GraphModule, groups: ChannelGroups, keep_positions, data: ImportanceData,
                        n_batches: int = 32) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """FLAP's bias compensation, layer by layer as FLAP computes it: per linear layer that loses input
    features, W[:, removed] @ mean[removed] (float64, at the layer's original output width), the bias
    shift that keeps its output mean. Layers are taken in graph order, and each one's input means
    are measured with every earlier such layer already pruned (its removed inputs zeroed) and
    compensated: means from the dense model let every layer's error pile onto the next one's (a
    trained LM lost perplexity that way). A conv is left out: its zero padding would read zeros, not
    means. Keys are weight names ("layer.weight").

    Also returns, per layer, the share of the removed inputs' second moment that is their mean,
    sum_j ||W_:j||^2 mean_j^2 / sum_j ||W_:j||^2 E[x_j^2] over removed j: the most a constant can restore
    of what they carried (were the inputs uncorrelated). Near zero, compensation has little to give."""
    layers = {n: m for n, m in consumer_layers(gm, groups).items() if isinstance(m, torch.nn.Linear)}
    removed: Dict[str, torch.Tensor] = {}
    for name in layers:
        elements = groups.param_slices[name][1]
        gone = np.setdiff1d(np.arange(len(elements)), keep_positions(elements))
        if len(gone):
            removed[name] = torch.as_tensor(gone)
    order = {node.target: i for i, node in enumerate(gm.graph.nodes) if node.op == "call_module"}
    pending = sorted(removed, key=lambda n: order.get(n.rpartition(".")[0], len(order)))
    shifts: Dict[str, torch.Tensor] = {}
    mean_share: Dict[str, float] = {}
    hooks = []
    try:
        for name in pending:
            stats = InputStatistics({name: layers[name]})
            n = stats.collect(gm, data, n_batches)
            columns = layers[name].weight.detach().double()[:, removed[name]]
            mean = stats.mean(name)[removed[name]]
            shifts[name] = columns @ mean
            column_energy = (columns ** 2).sum(0)
            second_moment = (column_energy * stats.mean_square(name)[removed[name]]).sum()
            mean_share[name] = float((column_energy * mean ** 2).sum() / second_moment.clamp_min(1e-300))
            hooks += _pruned_and_compensated(layers[name], removed[name], shifts[name])
        log.info("bias compensation: %d linear layers, each from %d calibration batches", len(shifts),
                 n if pending else 0)
    finally:
        for hook in hooks:
            hook.remove()
    return shifts, mean_share


def _pruned_and_compensated(layer: torch.nn.Linear, removed: torch.Tensor, shift: torch.Tensor):
    """Hooks that make `layer` compute what its pruned, compensated version computes."""
    def drop_inputs(module, args):
        x = args[0].clone()
        x[..., removed] = 0
        return (x, *args[1:])

    def add_shift(module, args, out):
        return out + shift.to(out.dtype)

    return [layer.register_forward_pre_hook(drop_inputs), layer.register_forward_hook(add_shift)]
