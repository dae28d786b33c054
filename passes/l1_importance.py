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

from fxprune.fxutil import ScratchBuffer
from fxprune.importance import Importance, register_importance
from fxprune.ir import ChannelGroups
from .importance_common import UnitSums, position_sums


@register_importance
class L1Importance(Importance):
    name = "l1"
    power = 1

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data=None) -> np.ndarray:
        params = dict(gm.named_parameters())
        sums = UnitSums(groups)
        scratch = ScratchBuffer()
        vectors = []  # 1-d parameters (norm affines, biases): each position is its own sum, done in one go
        with torch.no_grad():
            for name, dims in groups.param_slices.items():
                if name not in params:
                    continue
                weight = params[name]  # read under no_grad: no detach needed
                if weight.ndim == 1:
                    vectors.append((weight, dims[0]))
                    continue
                magnitude = torch.abs(weight, out=scratch.like(weight.shape, weight.dtype, weight.device))
                if self.power != 1:
                    magnitude = magnitude.double() ** self.power
                for elements, per_position in position_sums(magnitude, dims):
                    sums.add(elements, per_position)  # a new tensor: the scratch is reused next
            if vectors:
                magnitude = torch.cat([w.cpu() for w, _ in vectors]).double().abs_() ** self.power
                sums.add(np.concatenate([e for _, e in vectors]), magnitude)
        scores = sums.add_into(np.zeros(groups.n_units))
        return scores ** (1.0 / self.power)


@register_importance
class L2Importance(L1Importance):
    name = "l2"
    power = 2
