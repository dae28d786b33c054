"""TaylorImportance: first-order Taylor estimate of the loss change when a channel is removed
(Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019).

Removing a channel sets every weight slice it owns to zero; to first order the loss changes by
sum over those weights of g * w (g = dL/dw). Per calibration batch, a unit's estimate is that sum
over every parameter slice of its group (producer rows, norm affine entries, consumer columns), and
its score is the mean over batches of the squared estimate (the paper's group form, its "FG" variant
summed over the whole coupled group). Gradients are taken with torch.func.functional_call on
detached copies of the weights, so the user's parameters (shared with the traced graph) get no .grad
and need not require grad. The model runs in eval mode (BN uses running statistics): pruning starts
from a trained network whose statistics are settled."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.fx

from fxprune.importance import Importance, ImportanceData, register_importance
from fxprune.ir import ChannelGroups
from .importance_common import UnitSums, position_sums

log = logging.getLogger("fxprune")


@register_importance
class TaylorImportance(Importance):
    name = "taylor"
    requires_data = True

    def __init__(self, n_batches: int = 16):
        self.n_batches = n_batches

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data: ImportanceData = None) -> np.ndarray:
        data = data or ImportanceData()
        names = [n for n, _ in gm.named_parameters() if n in groups.param_slices]
        weights = {n: p.detach().clone().requires_grad_(True) for n, p in gm.named_parameters() if n in names}
        scores = np.zeros(groups.n_units)
        n = 0
        for inputs, target in data.iter_batches(self.n_batches, need_targets=True):
            with data.batch(n, inputs, target):
                loss = data.loss(torch.func.functional_call(gm, weights, inputs), target)
            grads = torch.autograd.grad(loss, [weights[k] for k in names], allow_unused=True)
            sums = UnitSums(groups)
            with torch.no_grad():
                for name, grad in zip(names, grads):
                    if grad is None:
                        continue
                    for elements, per_position in position_sums(grad * weights[name], groups.param_slices[name]):
                        sums.add(elements, per_position)
            scores += sums.add_into(np.zeros(groups.n_units)) ** 2
            n += 1
        log.info("taylor importance from %d calibration batches", n)
        return scores / max(n, 1)

    def __repr__(self) -> str:
        return f"TaylorImportance(n_batches={self.n_batches})"
