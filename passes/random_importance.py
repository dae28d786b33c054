"""RandomImportance: seeded uniform random scores, the control every criterion must beat."""
from __future__ import annotations

import numpy as np
import torch.fx

from fxprune.importance import Importance, register_importance
from fxprune.ir import ChannelGroups


@register_importance
class RandomImportance(Importance):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data=None) -> np.ndarray:
        return np.random.default_rng(self.seed).random(groups.n_units)

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed})"
