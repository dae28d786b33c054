"""BNScaleImportance: network slimming's criterion (Liu et al., 2017), |gamma| of the normalisation
layers a channel passes through.

A unit's score is the sum of |weight| over every BatchNorm (and GroupNorm/LayerNorm/InstanceNorm with
affine weights) entry its group slices: a residual stream's channel sums the gammas of every BN that
writes into it. A group with no normalisation layer has no gamma to read; it falls back to its L1
score (documented in the report as the importance name, not silently mixed: within one group every
unit is scored the same way, so the group's ranking stays consistent)."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx

from fxprune.importance import Importance, register_importance
from fxprune.ir import ChannelGroups
from fxprune.layers import NORM_LAYER_TYPES
from .importance_common import UnitSums, owner, position_sums
from .l1_importance import L1Importance



@register_importance
class BNScaleImportance(Importance):
    name = "bn"

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data=None) -> np.ndarray:
        params = dict(gm.named_parameters())
        sums = UnitSums(groups)
        has_gamma = np.zeros(groups.n_units, dtype=bool)
        with torch.no_grad():
            for name, dims in groups.param_slices.items():
                if name not in params:
                    continue
                module, local = owner(gm, name)
                if local != "weight" or not isinstance(module, NORM_LAYER_TYPES):
                    continue
                for elements, per_position in position_sums(params[name].detach().abs(), dims):
                    sums.add(elements, per_position)
                    has_gamma[groups.units_of(elements)] = True
        scores = sums.add_into(np.zeros(groups.n_units))
        fallback = L1Importance().score(gm, groups)
        for group in groups.groups:
            if not has_gamma[group.units].any():
                scores[group.units] = fallback[group.units]
        return scores
