"""Shared by the importance passes: adding a per-parameter quantity into per-unit scores."""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np
import torch

from fxprune.ir import ChannelGroups


def position_sums(tensor: torch.Tensor, dims: Dict[int, np.ndarray]) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """For each channel-sliced dim of a parameter: (elements, the tensor summed over every other dim),
    i.e. one value per position along that dim."""
    # sum the dims no channel slices first (a conv's kernel), once for all sliced dims
    free = [d for d in range(tensor.ndim) if d not in dims and tensor.shape[d] > 1]
    if free and free == list(range(free[0], tensor.ndim)):
        tensor = tensor.flatten(free[0]).sum(-1)  # trailing block (a conv kernel): one contiguous reduction
    elif free:
        tensor = tensor.sum(dim=free, keepdim=True)
    for dim, elements in dims.items():
        other = [d for d in range(tensor.ndim) if d != dim]
        per_position = (tensor.sum(dim=other) if other else tensor).double().cpu().numpy().reshape(-1)
        yield elements, per_position


def add_to_units(scores: np.ndarray, groups: ChannelGroups, elements: np.ndarray, values: np.ndarray) -> None:
    """scores[unit of each element] += value (units spanning several elements sum them)."""
    np.add.at(scores, groups.units_of(elements), values)


def owner(gm: torch.nn.Module, param_name: str) -> Tuple[torch.nn.Module, str]:
    """The module holding a parameter and the parameter's local name."""
    module_name, _, local = param_name.rpartition(".")
    return gm.get_submodule(module_name), local
