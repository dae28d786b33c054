"""L1Importance (and L2): magnitude of every weight slice a channel unit owns.

A unit's score sums, over every parameter sliced by it (the producing conv/linear rows, BN/LN
affine entries, and the consuming layers' input columns), the L1 (L2: squared L2, then sqrt) norm of
the slice at the unit's positions. Summing over the whole group rather than the producer alone makes
channels that are tiny on one side and large on the other rank sensibly (Torch-Pruning's group
norm does the same). Buffers (BN running statistics) are not weights and are ignored."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx

from fxprune.importance import Importance, register_importance
from fxprune.ir import ChannelGroups


@register_importance
class L1Importance(Importance):
    name = "l1"
    power = 1

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups) -> np.ndarray:
        params = dict(gm.named_parameters())
        scores = np.zeros(groups.n_units)
        with torch.no_grad():
            for name, dims in groups.param_slices.items():
                if name not in params:
                    continue
                magnitude = params[name].detach().abs()
                if self.power != 1:
                    magnitude = magnitude.double() ** self.power
                # sum the dims no channel slices first (a conv's kernel), once for all sliced dims
                free = [d for d in range(magnitude.ndim) if d not in dims and magnitude.shape[d] > 1]
                if free and free == list(range(free[0], magnitude.ndim)):
                    # trailing block (a conv kernel): one contiguous reduction is ~3x faster
                    magnitude = magnitude.flatten(free[0]).sum(-1)
                elif free:
                    magnitude = magnitude.sum(dim=free, keepdim=True)
                for dim, elements in dims.items():
                    other = [d for d in range(magnitude.ndim) if d != dim]
                    per_position = (magnitude.sum(dim=other) if other else magnitude).double().cpu().numpy()
                    np.add.at(scores, groups.units_of(elements), per_position.reshape(-1))
        return scores ** (1.0 / self.power)


@register_importance
class L2Importance(L1Importance):
    name = "l2"
    power = 2
