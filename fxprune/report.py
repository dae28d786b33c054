"""The report attached to every pruned model at `pruned.meta["fxprune"]`: plain Python data
(dicts, lists, numbers, strings), so `json.dumps(report)` works as is."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import numpy as np
import torch.fx

from .budget import Budget
from .cost import CostModel
from .ir import ChannelGroups, ChannelMap, PrunePlan, distinct_values, once_per_array
from .tracing import VALUE_KEY, TensorSpec


def build_report(gm: torch.fx.GraphModule, groups: ChannelGroups, plan: PrunePlan, cost: CostModel, budget: Budget,
                 options: Dict[str, Any], verification: Optional[Dict[str, Any]],
                 seconds: Dict[str, float]) -> Dict[str, Any]:
    full = np.ones(groups.n_units, dtype=bool)
    keep = plan.keep_unit
    flops0, flops1 = cost.flops(full), cost.flops(keep)
    params0, params1 = cost.params(full), cost.params(keep)
    report = {
        "format": "fxprune.report/1",
        "budget": {"flops": budget.flops, "params": budget.params, "latency": budget.latency,
                   "target": None if budget.target is None else str(budget.target.key)},
        "options": options,
        "flops": {"before": flops0, "after": flops1, "ratio": flops1 / flops0 if flops0 else 1.0,
                  "convention": "2 x MACs of conv/linear/matmul/attention (as FlopCounterMode)"},
        "params": {"before": params0, "after": params1, "ratio": params1 / params0 if params0 else 1.0},
        "groups": [
            {"id": g.id, "name": g.name, "size": g.size, "kept": plan.kept_in_group(groups, g),
             "frozen": g.n_frozen, "blocked": not g.prunable, "reasons": list(g.frozen_reasons),
             "spaces": list(g.spaces), "members": [[n, d] for n, d in g.members],
             "params": [[p, d] for p, d in g.params]}
            for g in groups.groups
        ],
        "modules": module_slices(groups, keep),
        "outputs": output_slices(gm, groups, keep),
        "graph": _graph_nodes(gm, groups, keep),
        "verification": verification,
        "seconds": seconds,
    }
    return report


def module_slices(groups: ChannelGroups, keep: np.ndarray) -> Dict[str, Any]:
    """Per module whose parameters were sliced: kept indices of each sliced param dim, plus
    `out`/`in` (dims 0 and 1 of its weight) for the common case."""
    modules: Dict[str, Any] = {}
    kept_positions = groups.kept_lookup(keep)
    # one list per channel array: a conv's output channels are also its BN's four parameters' channels
    kept_list = once_per_array(lambda elements: kept_positions(elements).tolist())
    for name, dims in sorted(groups.param_slices.items()):
        module, _, local = name.rpartition(".")
        entry = modules.setdefault(module, {"params": {}})
        kept = {int(d): kept_list(e) for d, e in dims.items()}
        if all(len(v) == len(dims[d]) for d, v in kept.items()):
            continue
        entry["params"][local] = {str(d): v for d, v in kept.items()}
        if local in ("weight", "in_proj_weight"):
            if 0 in kept:
                entry["out"] = kept[0]
            if 1 in kept:
                entry["in"] = kept[1]
    return {m: e for m, e in modules.items() if e["params"]}


def output_slices(gm: torch.fx.GraphModule, groups: ChannelGroups, keep: np.ndarray) -> Dict[str, Any]:
    """Per model output that lost channels (compile(keep_outputs=False)): its path in the output
    structure ("logits", "0", "" for a lone tensor) -> {dim: kept positions of the original}."""
    kept_positions, slices = groups.kept_lookup(keep), {}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for path, node in _output_leaves(output.args[0], ""):
        m = groups.maps.get(node.name)
        if not isinstance(m, ChannelMap):
            continue
        dims = {str(d): kept_positions(m.dims[d]).tolist() for d in m.tracked()
                if len(kept_positions(m.dims[d])) < len(m.dims[d])}
        if dims:
            slices[path] = dims
    return slices


def _output_leaves(arg: Any, path: str):
    """(path, node) of every node in an output structure (nested tuples, lists and dicts)."""
    if isinstance(arg, torch.fx.Node):
        yield path, arg
    elif isinstance(arg, (tuple, list)):
        for i, a in enumerate(arg):
            yield from _output_leaves(a, f"{path}.{i}" if path else str(i))
    elif isinstance(arg, dict):
        for k, a in arg.items():
            yield from _output_leaves(a, f"{path}.{k}" if path else str(k))


def _graph_nodes(gm: torch.fx.GraphModule, groups: ChannelGroups, keep: np.ndarray) -> List[Dict[str, Any]]:
    """The traced graph as plain data (what tools/viz draws without the model): per node its op, a
    readable kind, inputs, shape, and for every channel dim it carries the width before and after
    pruning and the groups those channels belong to."""
    nodes, widths, modules = [], _channel_widths(groups, keep), dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            kind = type(modules[node.target]).__name__
        elif node.op == "call_function":
            kind = getattr(node.target, "__name__", str(node.target))
        else:
            kind = str(node.target) if node.op == "call_method" else node.op
        spec = node.meta.get(VALUE_KEY)
        entry = {"name": node.name, "op": node.op, "kind": kind,
                 "target": node.target if isinstance(node.target, str) else kind,
                 "inputs": [n.name for n in node.all_input_nodes],
                 "shape": list(spec.shape) if isinstance(spec, TensorSpec) else None, "channels": []}
        channel_map = groups.maps.get(node.name)
        if isinstance(channel_map, ChannelMap):
            for dim in channel_map.tracked():
                entry["channels"].append({"dim": dim, **widths(channel_map.dims[dim])})
        nodes.append(entry)
    return nodes


def _channel_widths(groups: ChannelGroups, keep: np.ndarray):
    """elements -> {"before", "after", "groups"} (a fresh dict each call, computed once per array)."""
    def widths(elements: np.ndarray) -> Dict[str, Any]:
        units = groups.units_of(elements)
        return {"before": int(len(units)), "after": int(keep[units].sum()),
                "groups": distinct_values(groups.unit_group[units])}
    shared = once_per_array(widths)

    def fresh(elements: np.ndarray) -> Dict[str, Any]:
        w = shared(elements)
        return {**w, "groups": list(w["groups"])}
    return fresh


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def report_json(pruned: torch.fx.GraphModule, indent: int = 2) -> str:
    return json.dumps(pruned.meta["fxprune"], indent=indent)
