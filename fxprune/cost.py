"""Cost model: FLOPs and parameters of the traced graph as functions of which units are kept.

Convention: FLOPs = 2 x multiply-accumulates of conv, linear, matmul/einsum and attention, the
convention of `torch.utils.flop_counter.FlopCounterMode`; elementwise ops, norms and pooling are not
counted. Params = elements of every nn.Parameter (buffers excluded).

Every cost is a sum of terms `coef * prod(size_i)` where each size is a constant or the number of
kept positions of a channel vector, so the cost of any plan is exact and cheap to evaluate
(allocation evaluates it many times)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Union

import numpy as np
import torch
import torch.fx

from .fxutil import bind_arguments, einsum_subscripts, get_attr
from .ir import ChannelGroups, ChannelMap
from .tracing import TensorSpec, value_spec

Factor = Union[int, np.ndarray]  # a constant size, or the unit of every position of a channel dim


@dataclass
class Term:
    coef: float
    factors: List[Factor]
    node: str


class CostModel:
    def __init__(self, flops_terms: List[Term], param_terms: List[Term], n_units: int):
        self.flops_terms = flops_terms
        self.param_terms = param_terms
        self.n_units = n_units
        self._flops = _VectorisedTerms(flops_terms)
        self._params = _VectorisedTerms(param_terms)

    def flops(self, keep_unit: np.ndarray) -> float:
        return self._flops(keep_unit)

    def params(self, keep_unit: np.ndarray) -> float:
        return self._params(keep_unit)

    def unit_cost(self, which: str = "flops") -> np.ndarray:
        """d cost / d unit at full width: what removing one unit alone would save."""
        cost = np.zeros(self.n_units)
        for term in (self.flops_terms if which == "flops" else self.param_terms):
            sizes = [f if isinstance(f, int) else len(f) for f in term.factors]
            for i, f in enumerate(term.factors):
                if isinstance(f, int):
                    continue
                others = term.coef * math.prod(s for j, s in enumerate(sizes) if j != i)
                np.add.at(cost, f, others)
        return cost


class _VectorisedTerms:
    """sum_t coef_t * prod_i size_ti in a few numpy calls: allocation evaluates it hundreds of times.

    Every channel factor's positions are laid end to end in one index array; kept counts per factor
    come from one `np.add.reduceat`, and per-term products from one `np.multiply.reduceat`."""

    def __init__(self, terms: List[Term]):
        self.coef = np.array([t.coef for t in terms], dtype=np.float64)
        sizes, channel_slots, indices, starts = [], [], [], []
        term_starts, offset = [], 0
        for term in terms:
            term_starts.append(len(sizes))
            for f in term.factors or [1]:
                if isinstance(f, int):
                    sizes.append(float(f))
                else:
                    channel_slots.append(len(sizes))
                    sizes.append(0.0)
                    starts.append(offset)
                    indices.append(np.asarray(f, dtype=np.int64))
                    offset += len(f)
        self.sizes = np.array(sizes, dtype=np.float64)
        self.channel_slots = np.array(channel_slots, dtype=np.int64)
        self.indices = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        self.starts = np.array(starts, dtype=np.int64)
        self.term_starts = np.array(term_starts, dtype=np.int64)
        self.empty = np.array([len(f) == 0 for t in terms for f in (t.factors or [1]) if not isinstance(f, int)])

    def __call__(self, keep_unit: np.ndarray) -> float:
        if not len(self.coef):
            return 0.0
        sizes = self.sizes.copy()
        if len(self.channel_slots):
            counts = np.add.reduceat(keep_unit[self.indices].astype(np.float64), self.starts) if len(self.indices) \
                else np.zeros(len(self.channel_slots))
            counts[self.empty] = 0.0  # reduceat returns the element at a start for empty segments
            sizes[self.channel_slots] = counts
        return float(np.dot(self.coef, np.multiply.reduceat(sizes, self.term_starts)))


def build_cost_model(gm: torch.fx.GraphModule, groups: ChannelGroups) -> CostModel:
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters())

    def dim_factor(elements, size: int) -> Factor:
        return int(size) if elements is None else groups.units_of(elements)

    def weight_factors(name: str) -> List[Factor]:
        shape = get_attr(gm, name).shape
        sliced = groups.param_slices.get(name, {})
        return [dim_factor(sliced.get(d), s) for d, s in enumerate(shape)]

    def leading_factors(node: torch.fx.Node, spec: TensorSpec) -> List[Factor]:
        """A linear layer's output dims before the feature dim (tokens; channels in token mixing)."""
        m = groups.maps.get(node.name)
        return [dim_factor(m.dims[d] if isinstance(m, ChannelMap) else None, spec.shape[d]) for d in range(spec.ndim - 1)]

    flops: List[Term] = []
    for node in gm.graph.nodes:
        spec = value_spec(node)
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, torch.nn.modules.conv._ConvNd) and isinstance(spec, TensorSpec):
                # the conv rule keeps channels on dim 1 only: batch and spatial sizes are constants
                coef = 2.0 * math.prod(spec.shape) / spec.shape[1]
                flops.append(Term(coef, weight_factors(node.target + ".weight"), node.name))
            elif isinstance(module, torch.nn.Linear) and isinstance(spec, TensorSpec):
                flops.append(Term(2.0, leading_factors(node, spec) + weight_factors(node.target + ".weight"), node.name))
            elif isinstance(module, torch.nn.MultiheadAttention):
                flops.extend(_attention_terms(node, groups, weight_factors, node.target + ".in_proj_weight",
                                              node.target + ".out_proj.weight", value_spec(node.args[0]), None))
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            if node.target in (torch.nn.functional.linear,) and isinstance(spec, TensorSpec):
                w = bind_arguments(node).get("weight")
                if isinstance(w, torch.fx.Node) and w.op == "get_attr":
                    flops.append(Term(2.0, leading_factors(node, spec) + weight_factors(w.target), node.name))
            elif node.target in (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d):
                w = bind_arguments(node).get("weight")
                if isinstance(w, torch.fx.Node) and w.op == "get_attr":
                    flops.append(Term(2.0 * math.prod(spec.shape) / spec.shape[1], weight_factors(w.target), node.name))
            elif name == "shifted_window_attention":
                kw = dict(zip(["input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size"], node.args))
                kw.update(node.kwargs)
                flops.extend(_attention_terms(node, groups, weight_factors, kw["qkv_weight"].target,
                                              kw["proj_weight"].target, value_spec(kw["input"]), kw["window_size"]))
            elif node.target in (torch.matmul, torch.bmm, torch.mm) or name in ("matmul", "einsum"):
                flops.extend(_contraction_terms(node, groups))
        elif node.op == "call_method" and node.target == "matmul":
            flops.extend(_contraction_terms(node, groups))

    param_terms = [Term(1.0, weight_factors(name), name) for name in params]
    return CostModel(flops, param_terms, groups.n_units)


def _attention_terms(node, groups, weight_factors, in_w: str, out_w: str, x_spec: TensorSpec, window) -> List[Term]:
    """Projections (tokens x weight) plus the two L x L x E products of every attention window."""
    e = groups.special.get(node.name, {}).get("elements")
    embed = x_spec.shape[-1]
    e_factor: Factor = groups.units_of(e) if e is not None else int(embed)
    if window is None:  # nn.MultiheadAttention, batch_first or not: tokens = L * N
        tokens = math.prod(x_spec.shape[:-1])
        seq = x_spec.shape[-2] if len(x_spec.shape) == 3 else 1
        batch = tokens // seq
        attn_coef = 2.0 * 2 * batch * seq * seq
    else:  # Swin: (B, H, W, C), padded to whole windows
        b, h, w = x_spec.shape[:3]
        ph, pw = math.ceil(h / window[0]) * window[0], math.ceil(w / window[1]) * window[1]
        tokens = b * ph * pw
        win = window[0] * window[1]
        attn_coef = 2.0 * 2 * tokens * win
    return [Term(2.0 * tokens, weight_factors(in_w), node.name), Term(2.0 * tokens, weight_factors(out_w), node.name),
            Term(attn_coef, [e_factor], node.name)]


def _contraction_terms(node, groups: ChannelGroups) -> List[Term]:
    """matmul/einsum: 2 x the product of every letter's size (tracked letters count kept positions)."""
    parsed = einsum_subscripts(node)
    if parsed is None:
        return []
    operands, subscripts = parsed
    sizes: Dict[str, Factor] = {}
    for op, sub in zip(operands, subscripts):
        spec, m = value_spec(op), groups.maps.get(op.name)
        for d, letter in enumerate(sub):
            e = m.dims[d] if isinstance(m, ChannelMap) else None
            if e is not None:
                sizes[letter] = groups.units_of(e)
            elif letter not in sizes or (isinstance(sizes[letter], int) and sizes[letter] == 1):
                sizes[letter] = int(spec.shape[d])
    return [Term(2.0, list(sizes.values()), node.name)]
