"""L1Importance (and L2): magnitude of every weight slice a channel unit owns.

A unit's score sums, over every parameter sliced by it (the producing conv/linear rows, BN/LN
affine entries, and the consuming layers' input columns), the L1 (L2: squared L2, then sqrt) norm of
the slice at the unit's positions. Summing over the whole group rather than the producer alone makes
channels that are tiny on one side and large on the other rank sensibly (Torch-Pruning's group
norm does the same). Buffers (BN running statistics) are not weights and are ignored."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.fx

from fxprune.fxutil import ScratchBuffer
from fxprune.importance import Importance, register_importance
from fxprune.ir import ChannelGroups
from fxprune.native import MagnitudeSums
from .importance_common import UnitSums, position_sums


@register_importance
class L1Importance(Importance):
    name = "l1"
    power = 1

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups, data=None) -> np.ndarray:
        params = dict(gm.named_parameters())
        sums = UnitSums(groups)
        weights = [(params[name], dims) for name, dims in groups.param_slices.items() if name in params]
        with torch.no_grad():  # parameters read under no_grad: no detach needed
            tensors = [(w, dims) for w, dims in weights if w.ndim > 1]
            for (_, dims), per_dim in zip(tensors, self._magnitude_sums(tensors)):
                for dim, elements in dims.items():
                    sums.add(elements, per_dim[dim])
            # 1-d parameters (norm affines, biases): each position is its own sum, done in one go
            vectors = [(w, dims[0]) for w, dims in weights if w.ndim == 1]
            if vectors:
                magnitude = torch.cat([w.cpu() for w, _ in vectors]).double().abs_() ** self.power
                sums.add(np.concatenate([e for _, e in vectors]), magnitude)
        scores = sums.add_into(np.zeros(groups.n_units))
        return scores ** (1.0 / self.power)

    def _magnitude_sums(self, tensors: List[Tuple[torch.Tensor, Dict[int, np.ndarray]]]) -> List[Dict[int, torch.Tensor]]:
        """Per tensor, {dim: sum of |w|**power over every other dim}: the native kernels' one read of each
        weight where they apply (fxprune/native), torch's ops for the rest."""
        batch, native = MagnitudeSums(self.power), []
        for w, dims in tensors:
            native.append(batch.add(w, list(dims)))
        native_sums = iter(batch.run() or ())     # None: the call failed (out of memory)
        scratch, out = ScratchBuffer(), []
        for (w, dims), is_native in zip(tensors, native):
            found = next(native_sums, None) if is_native else None
            if found is None:
                magnitude = torch.abs(w, out=scratch.like(w.shape, w.dtype, w.device))
                if self.power != 1:
                    magnitude = magnitude.double() ** self.power
                elif magnitude.dtype in (torch.float16, torch.bfloat16):
                    magnitude = magnitude.float()  # summed in float, as the kernels do: a half sum keeps 3 digits
                # new tensors: the scratch is reused next
                found = {dim: per_position for dim, (_, per_position) in zip(dims, position_sums(magnitude, dims))}
            out.append(found)
        return out


@register_importance
class L2Importance(L1Importance):
    name = "l2"
    power = 2
