"""The importance interface: a score per channel unit (higher = more important).

An importance sees the traced GraphModule and the ChannelGroups. Scores of units are compared within
their group (allocation normalises them per group), so a criterion only has to rank channels of the
same group consistently. Later criteria that need data receive it through their own constructor."""
from __future__ import annotations

from typing import Dict, Type

import numpy as np
import torch.fx

from .errors import ConfigError
from .ir import ChannelGroups


class Importance:
    name = "base"

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


_REGISTRY: Dict[str, Type[Importance]] = {}


def register_importance(cls: Type[Importance]) -> Type[Importance]:
    _REGISTRY[cls.name] = cls
    return cls


def resolve_importance(importance) -> Importance:
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str):
        import fxprune.passes.l1_importance  # noqa: F401  (registers "l1", "l2")
        if importance in _REGISTRY:
            return _REGISTRY[importance]()
        raise ConfigError(f"unknown importance {importance!r}; choose one of {sorted(_REGISTRY)} or pass an Importance instance")
    raise ConfigError(f"importance must be a name or an fxprune Importance, got {type(importance).__name__}")
