"""Attention: nn.MultiheadAttention and torchvision's Swin window attention (with patch merging).

Every head keeps the same positions (position p of every head is one unit), so `num_heads` stays
valid. Attention scales q.k by head_dim**-0.5 with head_dim read from the pruned width; the rewrite
folds sqrt(new/old) into the q projection (AttentionHeads.fold_scale), so the pruned model equals the
zero-masked original exactly and stays closer to the unpruned one."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxprune.errors import describe_node
from fxprune.fxutil import bind_arguments, declare_signature, is_get_attr, signature
from fxprune.ir import ChannelMap
from fxprune.tracing import TensorSpec, value_spec
from .registry import REGISTRY, OpEntry, op_fact, register


@dataclass(frozen=True, eq=False)
class AttentionHeads:
    """The embedding channels `elements` are split into `num_heads` heads; `q_weight`/`q_bias` are
    the parameters whose first rows are the q projection (scaled when the head width changes)."""

    num_heads: int
    elements: np.ndarray = field(repr=False)
    q_weight: str
    q_bias: Optional[str]
    fold_scale: bool


def heads_coupled(a, e: np.ndarray, num_heads: int) -> np.ndarray:
    """Position p of every head is one unit, so that every head keeps the same size."""
    grid = e.reshape(num_heads, -1)
    a.es.union(grid.reshape(-1), np.tile(grid[0], num_heads))
    return grid[0]


def fold_attention_scale(rw, node: torch.fx.Node, fact: AttentionHeads, tensors: Dict[str, torch.Tensor]) -> None:
    if not fact.fold_scale:
        return
    old, new = len(fact.elements), len(rw.kept(fact.elements))
    if new == old or fact.q_weight not in tensors:
        return
    factor = math.sqrt(new / old)
    for name in (fact.q_weight, fact.q_bias):
        if name is not None and name in tensors:
            tensors[name][:new] *= factor


def _attention_flops(cost, node: torch.fx.Node, in_w: str, out_w: str, x_spec: TensorSpec, window):
    """Projections (tokens x weight) plus the two L x L x E products of every attention window."""
    fact = op_fact(node)
    e_factor = cost.units_of(fact.elements) if isinstance(fact, AttentionHeads) else int(x_spec.shape[-1])
    if window is None:  # nn.MultiheadAttention, batch_first or not: tokens = L * N
        tokens = math.prod(x_spec.shape[:-1])
        seq = x_spec.shape[-2] if len(x_spec.shape) == 3 else 1
        attn_coef = 2.0 * 2 * (tokens // seq) * seq * seq
    else:  # Swin: (B, H, W, C), padded to whole windows
        b, h, w = x_spec.shape[:3]
        ph, pw = math.ceil(h / window[0]) * window[0], math.ceil(w / window[1]) * window[1]
        tokens = b * ph * pw
        attn_coef = 2.0 * 2 * tokens * window[0] * window[1]
    return [(2.0 * tokens, cost.weight_factors(in_w)), (2.0 * tokens, cost.weight_factors(out_w)),
            (attn_coef, [e_factor])]


# ----------------------------------------------------------------------------- nn.MultiheadAttention
def multihead_attention(a, node: torch.fx.Node) -> Any:
    module = a.module(node)
    bound = signature(type(module).forward).bind(module, *node.args, **node.kwargs).arguments
    q, k, v = bound["query"], bound["key"], bound["value"]
    maps = [a.tensor_map(t) for t in (q, k, v)]
    if (not module._qkv_same_embed_dim or module.bias_k is not None or any(m is None for m in maps)
            or any(d != m.ndim - 1 for m in maps for d in m.tracked())):
        return a.opaque(node, "MultiheadAttention with separate k/v dims, bias_kv or channels off the last dim")
    e = maps[0].dims[-1]
    if e is None:
        e = a.new_elements(node, module.embed_dim, "attention embedding")
        a.es.freeze(e, f"blocked by {describe_node(node)}: its input channels are not tracked")
    for other in maps[1:]:
        if other.dims[-1] is not None and other.dims[-1] is not e:
            a.es.union(e, other.dims[-1])
    heads_coupled(a, e, module.num_heads)
    t = node.target
    a.record_param(t + ".in_proj_weight", 1, e)
    a.record_param(t + ".in_proj_weight", 0, np.tile(e, 3))
    if module.in_proj_bias is not None:
        a.record_param(t + ".in_proj_bias", 0, np.tile(e, 3))
    a.record_param(t + ".out_proj.weight", 0, e)
    a.record_param(t + ".out_proj.weight", 1, e)
    if module.out_proj.bias is not None:
        a.record_param(t + ".out_proj.bias", 0, e)
    a.set_fact(node, AttentionHeads(module.num_heads, e, t + ".in_proj_weight",
                                    t + ".in_proj_bias" if module.in_proj_bias is not None else None, True))
    out = maps[0].replace(maps[0].ndim - 1, e)
    spec = value_spec(node)
    return tuple([out] + [a.untracked_like(s) for s in spec[1:]]) if isinstance(spec, tuple) else out


def _resize_multihead_attention(module, rw, node) -> None:
    e = module.in_proj_weight.shape[1]
    module.embed_dim = module.kdim = module.vdim = e
    module.head_dim = e // module.num_heads
    module.out_proj.in_features = module.out_proj.out_features = e


def _multihead_attention_meta(node: torch.fx.Node, args: tuple, kwargs: dict, module: nn.Module) -> Any:
    # the output has the query's shape; interpreting the module on meta costs ~4 ms
    if kwargs.get("need_weights") is False and args and isinstance(args[0], torch.Tensor):
        return (args[0], None)
    return None


def _multihead_attention_flops(cost, node: torch.fx.Node):
    return _attention_flops(cost, node, node.target + ".in_proj_weight", node.target + ".out_proj.weight",
                            value_spec(node.args[0]), None)


register(OpEntry("MultiheadAttention", multihead_attention, resize_module=_resize_multihead_attention,
                 adjust_tensors=fold_attention_scale, flops=_multihead_attention_flops,
                 meta_shape=_multihead_attention_meta),
         modules=[nn.MultiheadAttention])


# ----------------------------------------------------------------------------- torchvision Swin
def shifted_window_attention(a, node: torch.fx.Node) -> Any:
    bound = bind_arguments(node)
    m = a.tensor_map(bound["input"])
    weights = [bound.get(n) for n in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias")]
    if m is None or any(w is not None and not is_get_attr(w) for w in weights) or m.tracked() not in ([], [m.ndim - 1]):
        return a.opaque(node, "window attention with computed weights or channels off the last dim")
    e = m.dims[-1]
    if e is None:
        return a.opaque(node, "window attention on untracked channels")
    heads_coupled(a, e, bound["num_heads"])
    qkv_w, proj_w, qkv_b, proj_b = weights
    a.record_param(qkv_w.target, 1, e)
    a.record_param(qkv_w.target, 0, np.tile(e, 3))
    a.record_param(proj_w.target, 0, e)
    a.record_param(proj_w.target, 1, e)
    if qkv_b is not None:
        a.record_param(qkv_b.target, 0, np.tile(e, 3))
    if proj_b is not None:
        a.record_param(proj_b.target, 0, e)
    # Swin v1 scales q by head_dim**-0.5 computed from the pruned C; v2 uses cosine attention
    # (F.normalize per head), which ignores zeroed positions and needs no correction.
    a.set_fact(node, AttentionHeads(bound["num_heads"], e, qkv_w.target, qkv_b.target if qkv_b is not None else None,
                                    bound.get("logit_scale") is None))
    return m


def _shifted_window_attention_flops(cost, node: torch.fx.Node):
    bound = bind_arguments(node)
    return _attention_flops(cost, node, bound["qkv_weight"].target, bound["proj_weight"].target,
                            value_spec(bound["input"]), bound["window_size"])


def patch_merging_pad(a, node: torch.fx.Node) -> Any:
    """torchvision Swin: concatenates 4 spatial phases along the last (channel) dim."""
    m = a.tensor_map(node.args[0])
    if m is None or m.tracked() not in ([], [m.ndim - 1]):
        return a.opaque(node, "patch merging with channels off the last dim")
    e = m.dims[-1]
    return m if e is None else m.replace(m.ndim - 1, np.tile(e, 4))


REGISTRY.register_from("torchvision.models.swin_transformer", {
    "shifted_window_attention": OpEntry("torchvision shifted_window_attention", shifted_window_attention,
                                        adjust_tensors=fold_attention_scale, flops=_shifted_window_attention_flops),
    "_patch_merging_pad": OpEntry("torchvision _patch_merging_pad", patch_merging_pad),
})


# ----------------------------------------------------------------------------- F.scaled_dot_product_attention
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
declare_signature([F.scaled_dot_product_attention], _SDPA_PARAMETERS,
                  {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})


@dataclass(frozen=True)
class SDPAScale:
    """The scale this attention had before pruning (1/sqrt of its query width): the rewrite passes it
    explicitly, since the default is read from the pruned width."""

    scale: float


def scaled_dot_product_attention(a, node: torch.fx.Node) -> Any:
    """softmax(q·kᵀ · scale) · v over (batch, heads, tokens, width): q and k's widths meet position by
    position, v's width is the output's; batch and head dims meet in all three. Softmax runs over k's
    tokens, which must carry no channels."""
    bound = bind_arguments(node)
    q, k, v, mask = bound["query"], bound["key"], bound["value"], bound.get("attn_mask")
    maps = [a.tensor_map(t) for t in (q, k, v)]
    specs = [value_spec(t) for t in (q, k, v)]
    if any(m is None for m in maps) or any(s.ndim != 4 for s in specs):
        return a.opaque(node, "attention on inputs that are not (batch, heads, tokens, width)")
    if maps[1].dims[2] is not None or maps[2].dims[2] is not None:
        return a.opaque(node, "attention whose key/value tokens carry channels (softmax over channels)")
    mask_spec = value_spec(mask) if isinstance(mask, torch.fx.Node) else None
    mask_map = a.map_of(mask) if isinstance(mask_spec, TensorSpec) else None
    mask_heads = mask_spec.ndim - 3 if isinstance(mask_spec, TensorSpec) and mask_spec.ndim >= 3 else None
    if isinstance(mask_map, ChannelMap) and any(e is not None for d, e in enumerate(mask_map.dims) if d != mask_heads):
        return a.opaque(node, "attention mask that carries channels on its token dims")
    if isinstance(bound.get("scale"), torch.fx.Node):
        return a.opaque(node, "attention scale computed in the graph")
    letters = {"b": [(q, 0), (k, 0), (v, 0)], "h": [(q, 1), (k, 1), (v, 1)], "e": [(q, 3), (k, 3)]}
    if mask_heads is not None:
        # a mask broadcast against (batch, heads, L, S) with a bias per head (Swin's and T5's relative
        # position bias): its head dim meets the heads, and freezes them unless it is sliced with them
        letters["h"].append((mask, mask_heads))
    grouped = bool(bound.get("enable_gqa")) and specs[0].shape[1] != specs[1].shape[1]
    if grouped:  # q's heads meet the mask's here; k and v's heads below, by group
        letters["h"] = [(q, 1)] + letters["h"][3:]
    out = {}
    for letter, operands in letters.items():
        entries = [(t, d, a.tensor_map(t).dims[d], value_spec(t).shape[d]) for t, d in operands]
        out[letter] = a.couple(node, entries, max(size for *_, size in entries), "attends")
    if grouped:
        out["h"] = _couple_query_groups(a, node, q, k, v)
    if bound.get("scale") is None and out["e"] is not None:
        a.set_fact(node, SDPAScale(float(specs[0].shape[-1]) ** -0.5))
    return ChannelMap((out["b"], out["h"], maps[0].dims[2], maps[2].dims[3]))


def _couple_query_groups(a, node: torch.fx.Node, q, k, v) -> Optional[np.ndarray]:
    """Grouped-query attention (enable_gqa): query head h reads key/value head h // G. A key/value head
    and the G query heads that share it are one unit; the output has the query heads."""
    heads, kv_heads = value_spec(q).shape[1], value_spec(k).shape[1]
    if heads % kv_heads:
        a.opaque(node, "grouped-query attention whose query heads are not a multiple of its key/value heads")
        return None
    eq, ek, ev = (a.tensor_map(t).dims[1] for t in (q, k, v))
    by_group = eq.reshape(kv_heads, heads // kv_heads) if eq is not None else None
    for g in range(heads // kv_heads):
        a.couple(node, [(q, 1, by_group[:, g] if by_group is not None else None, kv_heads),
                        (k, 1, ek, kv_heads), (v, 1, ev, kv_heads)], kv_heads, "attends")
    return eq


def _keep_sdpa_scale(rw, node: torch.fx.Node, new: torch.fx.Node) -> None:
    fact = op_fact(node)
    if isinstance(fact, SDPAScale):
        position = _SDPA_PARAMETERS.index("scale")
        if len(node.args) > position:
            new.args = (*new.args[:position], fact.scale, *new.args[position + 1:])
        else:
            new.kwargs = {**new.kwargs, "scale": fact.scale}


def _sdpa_flops(cost, node: torch.fx.Node):
    """q·kᵀ and attention·v: 2 x (batch x heads x L x S) x (query width + value width)."""
    bound = bind_arguments(node)
    q, v = bound["query"], bound["value"]
    q_shape, v_shape = value_spec(q).shape, value_spec(v).shape  # (*batch, L, E) and (*batch, S, Ev)
    qm, vm = cost.groups.maps.get(q.name), cost.groups.maps.get(v.name)
    e = cost.dim_factor(qm.dims[-1] if isinstance(qm, ChannelMap) else None, q_shape[-1])
    ev = cost.dim_factor(vm.dims[-1] if isinstance(vm, ChannelMap) else None, v_shape[-1])
    coef = 2.0 * math.prod(q_shape[:-1]) * v_shape[-2]
    return [(coef, [e]), (coef, [ev])]


register(OpEntry("F.scaled_dot_product_attention", scaled_dot_product_attention, rewrite_args=_keep_sdpa_scale,
                 flops=_sdpa_flops), functions=[F.scaled_dot_product_attention])
