"""FPGMImportance: filter pruning via geometric median (He et al., CVPR 2019).

A filter close to the geometric median of its layer's filters is the most replaceable: the others
can represent what it contributes. As in the paper's code, the distance to the geometric median is
approximated by the sum of Euclidean distances to every other filter of the same layer; a small sum
means redundant, so that sum is the score.

Over a channel group: every *producer* weight the group slices along its output dim (conv and linear
weights sliced on dim 0, attention in-projections) contributes its filters' distance sums; a unit sums
them over all producers writing into it (a residual stream sums every block's last conv). Consumer
columns and norm parameters are not filters and are not used. A group with no producer weight (e.g.
fed only by an unpruned input) gets equal scores."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx

from fxprune.importance import Importance, register_importance
from fxprune.ir import ChannelGroups
from .importance_common import add_to_units


@register_importance
class FPGMImportance(Importance):
    name = "fpgm"

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data=None) -> np.ndarray:
        params = dict(gm.named_parameters())
        scores = np.zeros(groups.n_units)
        with torch.no_grad():
            for name, dims in groups.param_slices.items():
                weight = params.get(name)
                if weight is None or weight.ndim < 2 or 0 not in dims:
                    continue
                filters = weight.detach().double().flatten(1)
                distance_sums = torch.cdist(filters, filters).sum(dim=1).numpy()
                add_to_units(scores, groups, dims[0], distance_sums)
        return scores
