"""What fxprune knows about layers as modules, beyond one op's rule: which modules are normalisation
layers, the BatchNorm that reads a node's output, how parameters split for weight decay. One place for
each, so the criteria, the trainers and fine-tuning agree."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.fx
from torch import nn

from .errors import ConfigError

# Modules whose parameters are per-channel affine terms of a normalisation (BatchNorm, InstanceNorm via
# _NormBase, GroupNorm, LayerNorm, RMSNorm where torch has it).
NORM_LAYER_TYPES = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                     getattr(nn, "RMSNorm", None)) if t is not None)


def batch_norm_after(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[nn.Module]:
    """The BatchNorm module that is the only reader of `node`'s output (conv -> BN), or None."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        module = gm.get_submodule(users[0].target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module
    return None


def weight_decay_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: conv/linear (and other >= 2-D) weights with `weight_decay`, biases and
    normalisation affine parameters (and any 1-D parameter) with none; empty groups left out.

    Why no decay on those: weight decay regularises by shrinking the weights that multiply the inputs;
    a BN/LN scale is followed by nothing that renormalises it, so decaying it just shrinks a channel's
    output (and, after pruning, the surviving channels are exactly the ones whose scales matter), and
    biases/shifts have too few degrees of freedom to overfit. Decaying them costs accuracy in practice
    (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; the timm/torchvision recipes do the same)."""
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    seen = set()  # a parameter shared between modules must be in exactly one group
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, NORM_LAYER_TYPES) or name == "bias" or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # optimizers reject empty groups
