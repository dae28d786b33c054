"""Contractions: matmul, bmm, mm, einsum (hand-written attention, token mixing).

A contracted letter's channels meet position by position (both operands drop the same ones); a
batch letter must carry the same channels in every operand. FLOPs are 2 x the product of every
letter's size, tracked letters counting their kept positions."""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx

from fxprune.fxutil import ADD_PRODUCT, einsum_subscripts
from fxprune.ir import ChannelMap
from fxprune.tracing import value_spec
from .registry import OpEntry, register


def contraction(a, node: torch.fx.Node) -> Any:
    parsed = einsum_subscripts(node)
    if parsed is None:
        return a.opaque(node, "matmul of vectors or einsum with ellipsis/implicit output")
    operands, subscripts = parsed
    by_letter: Dict[str, List[Tuple[torch.fx.Node, int, Optional[np.ndarray], int]]] = defaultdict(list)
    for op, sub in zip(operands, subscripts[:-1]):
        spec, m = value_spec(op), a.tensor_map(op)
        if m is None or len(sub) != spec.ndim or len(set(sub)) != len(sub):
            return a.opaque(node, "contraction with unsupported subscripts")
        for d, letter in enumerate(sub):
            by_letter[letter].append((op, d, m.dims[d], spec.shape[d]))
    letter_elements = {}
    for letter, entries in by_letter.items():
        if letter in subscripts[-1] and _only_in_weights(node, entries):
            # x @ W with W a weight used nowhere else: W's output dim is a new channel space, as a Linear's
            letter_elements[letter] = a.new_elements(node, entries[0][3], "matmul with a weight")
            for weight, d, _, _ in entries:
                a.record_param(weight.target, d, letter_elements[letter])
        else:
            letter_elements[letter] = a.couple(node, entries, max(size for _, _, _, size in entries), "contracts")
    out = ChannelMap(tuple(letter_elements.get(letter) for letter in subscripts[-1]))
    bias = node.args[0] if node.target in ADD_PRODUCT else None
    if isinstance(bias, torch.fx.Node):  # addmm's bias is added to the product, broadcasting
        spec, bias_spec, bias_map = value_spec(node), value_spec(bias), a.tensor_map(bias)
        dims = list(out.dims)
        for d in range(bias_spec.ndim):
            od = d + spec.ndim - bias_spec.ndim
            entries = [(node, od, out.dims[od], spec.shape[od]),
                       (bias, d, bias_map.dims[d] if bias_map is not None else None, bias_spec.shape[d])]
            dims[od] = a.couple(node, entries, spec.shape[od], "adds")
        out = ChannelMap(tuple(dims))
    return out


def _only_in_weights(node: torch.fx.Node, entries) -> bool:
    """Every operand with this letter is a parameter read once in the graph, with no channels there."""
    def read_once(op: torch.fx.Node) -> bool:
        return (op.op == "get_attr" and len(op.users) == 1
                and sum(1 for n in node.graph.nodes if n.op == "get_attr" and n.target == op.target) == 1)
    return all(e is None and read_once(op) for op, _, e, _ in entries)


def contraction_flops(cost, node: torch.fx.Node):
    parsed = einsum_subscripts(node)
    if parsed is None:
        return []
    operands, subscripts = parsed
    sizes: Dict[str, Any] = {}
    for op, sub in zip(operands, subscripts):
        spec, m = value_spec(op), cost.groups.maps.get(op.name)
        for d, letter in enumerate(sub):
            e = m.dims[d] if isinstance(m, ChannelMap) else None
            if e is not None:
                sizes[letter] = cost.units_of(e)
            elif letter not in sizes or (isinstance(sizes[letter], int) and sizes[letter] == 1):
                sizes[letter] = int(spec.shape[d])
    return [(2.0, list(sizes.values()))]


register(OpEntry("matmul/einsum", contraction, flops=contraction_flops),
         functions=[torch.matmul, torch.bmm, torch.mm, operator.matmul, torch.einsum, torch.addmm, torch.baddbmm],
         methods=["matmul", "addmm", "baddbmm"])
