"""Shared by the importance passes: adding a per-parameter quantity into per-unit scores."""
from __future__ import annotations

import math
from typing import Dict, Iterator, Tuple

import numpy as np
import torch

from fxprune.ir import ChannelGroups


def position_sums(tensor: torch.Tensor, dims: Dict[int, np.ndarray]) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """For each channel-sliced dim of a parameter: (elements, the tensor summed over every other dim),
    i.e. one value per position along that dim."""
    tensor = tensor.contiguous()
    for dim, elements in dims.items():
        n = tensor.shape[dim]
        before = math.prod(tensor.shape[:dim])
        after = tensor.numel() // max(before * n, 1)
        # Both reductions run along whole rows of the flattened tensor ([before, n * after] summed over
        # its rows, then [n, after] over its columns). Summing a short trailing dim on its own (a conv's
        # 3x3 kernel) first is several times slower: 0.94 against 0.19 ms on a 512x512x3x3 weight.
        rows = tensor.reshape(before, n * after).sum(0) if before > 1 else tensor.reshape(n * after)
        per_position = rows.view(n, after).sum(1) if after > 1 else rows
        yield elements, per_position.double().cpu().numpy().reshape(-1)


def add_to_units(scores: np.ndarray, groups: ChannelGroups, elements: np.ndarray, values: np.ndarray) -> None:
    """scores[unit of each element] += value (units spanning several elements sum them)."""
    np.add.at(scores, groups.units_of(elements), values)


def owner(gm: torch.nn.Module, param_name: str) -> Tuple[torch.nn.Module, str]:
    """The module holding a parameter and the parameter's local name."""
    module_name, _, local = param_name.rpartition(".")
    return gm.get_submodule(module_name), local
