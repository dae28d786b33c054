"""Pictures of a pruning report: what the channel groups are, where they sit in the graph and how much
of each was cut.

Everything here reads the plain-JSON report at `pruned.meta["fxprune"]` (or a saved report.json), never
the model, so a report can be drawn on a machine without the weights:

    pruning_graph(report)             -> networkx.DiGraph of the traced graph with widths, groups, colours
    write_html(report, "m.html")      -> one self-contained interactive page (inline SVG, CSS and JS)
    write_svg(report, "m.svg")        -> the same drawing as a static SVG file
    write_width_chart(report, "m.png")-> matplotlib bar chart of each layer's width, dense vs pruned
    visualize(pruned, "out/")         -> all three

The drawing is a layered top-to-bottom DAG laid out here in Python (longest-path layers, the main path
as a straight spine with branches placed beside it, long edges routed along side lanes), because graphviz
is not a dependency and a browser-side layout library would need the network or a vendored copy.
"""
from __future__ import annotations

import colorsys
import html
import importlib.resources
import json
import logging
import math
import os
import re
import string
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import networkx as nx

from ..report import human_count

__all__ = ["pruning_graph", "group_colours", "write_html", "write_svg", "write_width_chart", "visualize"]

log = logging.getLogger("fxprune")

PathLike = Union[str, "os.PathLike[str]"]

# Nodes that belong to no group or to several (a concat of many groups) are drawn neutral: a group colour
# there would claim a coupling that does not exist.
NEUTRAL_FILL, NEUTRAL_STROKE = "#f1f3f5", "#7d8794"
IO_FILL, IO_STROKE = "#dfe4ea", "#4f5b69"
FROZEN_STROKE = "#b3261e"

# Geometry of the drawing, in SVG user units (px at zoom 1).
_NODE_H = 40
_V_GAP = 34           # between layers: long edges bend into their side lanes inside this gap
_H_GAP = 26           # between neighbouring boxes of one layer
_MIN_W, _MAX_W = 96, 360
_CHAR_W1, _CHAR_W2 = 6.7, 6.0   # average advance of the 11px monospace label / 10px sans second line
_LANE_MARGIN, _LANE_STEP = 16, 5
def _asset(name: str) -> str:
    """A file of the viewer (HTML template, CSS, JS), shipped as package data in fxprune/apps/viewer/."""
    return importlib.resources.files("fxprune.apps").joinpath("viewer", name).read_text(encoding="utf-8")


_LABEL_FONT = "'DejaVu Sans Mono',Menlo,Consolas,monospace"
_TEXT_FONT = "'DejaVu Sans','Segoe UI',Helvetica,Arial,sans-serif"

# Module kinds the width chart shows as layers (they create a width; norms and activations only repeat it).
_LAYER_KINDS = re.compile(r"^(Lazy)?(Conv|ConvTranspose)\d?d$|^(Lazy)?Linear$|^MultiheadAttention$|^Bilinear$")
# A module-name component that numbers a repeated block: layer1.0, denselayer3, encoder_layer_5, Mixed_5b.
_NUMBERED = re.compile(r"\d+[a-z]?$")
_BIG_BLOCK = 40       # module calls; bigger blocks are split into their own repeated blocks if they have some


# ----------------------------------------------------------------------------------------------- input

def _as_report(obj: Any) -> Dict[str, Any]:
    """The report dict from a report, a pruned GraphModule, or the path of a saved report.json."""
    if isinstance(obj, (str, os.PathLike)):
        with open(obj, encoding="utf-8") as f:
            obj = json.load(f)
    meta = getattr(obj, "meta", None)
    if not isinstance(obj, Mapping) and isinstance(meta, Mapping) and "fxprune" in meta:
        obj = meta["fxprune"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected an fxprune report (dict), a GraphModule with .meta['fxprune'] or a "
                        f"report.json path, got {type(obj).__name__}")
    if "graph" not in obj or "groups" not in obj:
        raise ValueError("this fxprune report has no 'graph'/'groups' entries (written by an older fxprune?); "
                         "re-run fxprune.compile to get a report that can be drawn")
    return dict(obj)


# --------------------------------------------------------------------------------------------- colours

def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in rgb)


def _palette(group_ids: Sequence[int]) -> Dict[int, Tuple[str, str]]:
    """(fill, stroke) per group id: golden-angle hue steps so that groups next to each other in the graph
    (consecutive ids) get far-apart hues, and three lightness/saturation rings so that 200+ groups still
    get distinct colours. Fills stay light enough for black text; strokes are the dark shade of the hue."""
    out: Dict[int, Tuple[str, str]] = {}
    seen = set()
    for i, gid in enumerate(sorted(group_ids)):
        hue = (0.07 + i * 0.6180339887498949) % 1.0
        light = (0.80, 0.71, 0.87)[i % 3]
        sat = (0.72, 0.55, 0.88)[(i // 3) % 3]
        fill = _hex(colorsys.hls_to_rgb(hue, light, sat))
        while fill in seen:          # exact clashes are possible after rounding to 8 bits: nudge the hue
            hue = (hue + 0.0037) % 1.0
            fill = _hex(colorsys.hls_to_rgb(hue, light, sat))
        seen.add(fill)
        out[gid] = (fill, _hex(colorsys.hls_to_rgb(hue, 0.32, min(1.0, sat + 0.08))))
    return out


def group_colours(report: Any) -> Dict[int, str]:
    """The fill colour of every channel group of `report` (group id -> "#rrggbb"), distinct per group;
    the same colours the HTML, SVG and width chart use."""
    report = _as_report(report)
    return {gid: fill for gid, (fill, _) in _palette([g["id"] for g in report["groups"]]).items()}


# ------------------------------------------------------------------------------------------ the graph

def pruning_graph(report: Any) -> nx.DiGraph:
    """The report's traced graph as a networkx.DiGraph, one node per fx node (keyed by node name, in graph
    order), an edge u -> v for every input u of v.

    Node attributes: order, op, kind, target, label (the module qualname for call_module/get_attr nodes,
    else the node name), shape, channels (as in the report), before / after (output width before and after
    pruning, of the widest channel dim; None when the node carries no channel dim), kept (after / before),
    groups (sorted group ids of its channels), group (the id when exactly one, else None), colour / stroke
    (group colour, neutral for none or several groups), frozen (one of its groups has frozen channels),
    blocked (one of its groups is not prunable at all), reasons (why, from those groups), reason (the
    reasons joined, or None), drawn (False for shape bookkeeping such as x.shape / eq / _assert and for
    constants without channels, which the drawings leave out) and block (the repeated block the node is
    collapsed into in the Blocks view, a module prefix such as "layer1.0" or
    "features.denseblock1.denselayer3", or None).

    Graph attributes: groups (id -> report group plus its colours), flops, params, budget, options."""
    report = _as_report(report)
    groups = {int(g["id"]): dict(g) for g in report["groups"]}
    for gid, (fill, stroke) in _palette(list(groups)).items():
        groups[gid]["fill"], groups[gid]["stroke"] = fill, stroke
    G = nx.DiGraph(groups=groups, flops=report.get("flops"), params=report.get("params"),
                   budget=report.get("budget"), options=report.get("options"))
    for i, n in enumerate(report["graph"]):
        channels = list(n.get("channels") or [])
        gids = sorted({int(g) for c in channels for g in c.get("groups", []) if int(g) in groups})
        primary = max(channels, key=lambda c: c["before"]) if channels else None
        before = int(primary["before"]) if primary else None
        after = int(primary["after"]) if primary else None
        stuck = [g for g in gids if groups[g].get("frozen", 0) > 0 or groups[g].get("blocked")]
        reasons: List[str] = []
        for g in stuck:
            for r in groups[g].get("reasons") or []:
                if r not in reasons:
                    reasons.append(r)
        single = gids[0] if len(gids) == 1 else None
        fill, stroke = (groups[single]["fill"], groups[single]["stroke"]) if single is not None else \
            (IO_FILL, IO_STROKE) if n["op"] in ("placeholder", "output") else (NEUTRAL_FILL, NEUTRAL_STROKE)
        target = n.get("target")
        label = target if n["op"] in ("call_module", "get_attr") and isinstance(target, str) else n["name"]
        G.add_node(n["name"], order=i, op=n["op"], kind=n.get("kind", n["op"]), target=target, label=label,
                   shape=n.get("shape"), channels=channels, before=before, after=after,
                   kept=(after / before) if before else None, groups=gids, group=single, colour=fill,
                   stroke=stroke, frozen=bool(stuck), blocked=any(groups[g].get("blocked") for g in gids),
                   reasons=reasons, reason="; ".join(reasons) if reasons else None)
    for n in report["graph"]:
        for inp in n.get("inputs", []):
            if inp in G and inp != n["name"]:
                G.add_edge(inp, n["name"])
    _mark_drawn(G)
    _assign_blocks(G)
    return G


def _ordered(G: nx.DiGraph) -> List[str]:
    return sorted(G.nodes, key=lambda v: G.nodes[v]["order"])


def _mark_drawn(G: nx.DiGraph) -> None:
    """drawn=False for what the drawings leave out as noise: shape bookkeeping (x.shape, getitem of a
    shape, eq, _assert, floordiv...: no tensor value, not between tensors) and constants (get_attr
    without channel dims, such as a relative-position index buffer). Tuple-valued ops between tensors (a
    MultiheadAttention module, torch.split) have no shape either but are drawn, since they carry data."""
    data = {v for v, d in G.nodes(data=True)
            if d["op"] in ("placeholder", "output", "call_module") or d["channels"]
            or (d["shape"] is not None and d["op"] != "get_attr")}
    for v, d in G.nodes(data=True):
        d["drawn"] = v in data or (any(u in data for u in G.predecessors(v))
                                   and any(w in data for w in G.successors(v)))


def _block_prefixes(G: nx.DiGraph, owned: Dict[str, str]) -> Dict[str, Optional[str]]:
    """Module path -> the repeated block it belongs to: its shallowest numbered prefix (layer1.0,
    denselayer3, encoder_layer_5, features.3, inception3a) that is not itself a container of repeated
    blocks (layer1, denseblock1, features). Paths without such a prefix map to None (drawn on their own).

    A container's numbered sub-modules run one after the other (each one's output reaches the next);
    numbered sub-modules that run side by side (branch1..4 of an inception or shufflenet block, or
    branch5x5_1 -> branch5x5_2 beside branch1x1) are parts of one block instead."""
    nodes_under: Dict[str, List[str]] = defaultdict(list)   # prefix -> graph nodes of modules under it
    for v, path in owned.items():
        parts = path.split(".")
        for i in range(1, len(parts)):
            nodes_under[".".join(parts[:i])].append(v)
    numbered: Dict[str, List[str]] = defaultdict(list)     # prefix -> its numbered sub-prefixes, in graph order
    for pre in sorted(nodes_under, key=lambda p: G.nodes[nodes_under[p][0]]["order"]):
        parent, _, last = pre.rpartition(".")
        if _NUMBERED.search(last):
            numbered[parent].append(pre)
    container: Dict[str, bool] = {}

    def is_container(pre: str) -> bool:
        if pre not in container:
            kids = numbered.get(pre, [])
            container[pre] = len(kids) >= 2 and all(_reaches(G, nodes_under[a], set(nodes_under[b]))
                                                     for a, b in zip(kids, kids[1:]))
        return container[pre]

    too_big: Dict[str, bool] = {}

    def is_too_big(pre: str) -> bool:
        # A big block with repeated blocks of its own (a maxvit stage: blocks.0.layers.0, .1) is split
        # into those; a small one (a mobilenet block with its conv.0 -> conv.1) stays whole.
        if pre not in too_big:
            too_big[pre] = len(nodes_under[pre]) > _BIG_BLOCK and any(
                q.startswith(pre + ".") and is_container(q) for q in nodes_under)
        return too_big[pre]

    result: Dict[str, Optional[str]] = {}
    for path in set(owned.values()):
        parts, block = path.split("."), None
        for i in range(1, len(parts)):
            pre = ".".join(parts[:i])
            if _NUMBERED.search(parts[i - 1]) and not is_container(pre) and not is_too_big(pre):
                block = pre
                break
        result[path] = block
    return result


def _reaches(G: nx.DiGraph, sources: List[str], targets: set) -> bool:
    """Whether a path leads from one of `sources` to one of `targets` (forward search, stops early)."""
    seen, stack = set(sources), list(sources)
    while stack:
        for w in G.successors(stack.pop()):
            if w in targets:
                return True
            if w not in seen:
                seen.add(w)
                stack.append(w)
    return False


def _assign_blocks(G: nx.DiGraph) -> None:
    """block attribute of every node. Module and parameter nodes take the block of their qualname. An
    add / cat / reshape has no qualname; in order of preference it joins
      1. the block all its inputs come from (the residual adds inside a transformer layer),
      2. else the block all its module users are in (a resnet residual add or a densenet concat: its
         inputs come from several blocks or the stem, and the block it feeds is the one that computes it),
      3. else the one block among its inputs (the first add of a transformer layer, whose other input is
         the layer's input from outside any block),
    where 2 and 3 ignore nodes outside any block (the stem, a top-level pooling)."""
    order = _ordered(G)
    owned = {v: G.nodes[v]["target"] for v in order if G.nodes[v]["op"] in ("call_module", "get_attr")
             and isinstance(G.nodes[v]["target"], str)}
    of_path = _block_prefixes(G, owned)
    # A parameter or constant outside any block (maxvit's _tensor_constant0) goes where its users are.
    block: Dict[str, Optional[str]] = {v: of_path[t] for v, t in owned.items()
                                       if of_path[t] or G.nodes[v]["op"] == "call_module"}
    for v in order:
        if G.nodes[v]["op"] in ("placeholder", "output"):
            block[v] = None
    # The block of the users: of the modules among them when there are some (the next add of a
    # transformer layer is a user too, but belongs to whichever block *its* users are in), else of the
    # blocks the function users lead to.
    backward: Dict[str, Optional[str]] = {}
    for v in reversed(order):
        if v not in block:
            users = [w for w in G.successors(v) if G.nodes[w]["drawn"]]
            modules = [w for w in users if w in block]
            keys = {block[w] for w in modules} if modules else {backward[w] for w in users}
            keys.discard(None)
            backward[v] = keys.pop() if len(keys) == 1 else None
    for v in order:
        if v not in block:
            keys = {block[u] for u in G.predecessors(v) if G.nodes[u]["drawn"]}
            known = keys - {None}
            block[v] = (next(iter(keys)) if len(keys) == 1 and None not in keys else backward[v] if backward[v]
                        else next(iter(known)) if len(known) == 1 else None)
        G.nodes[v]["block"] = block[v]


# ------------------------------------------------------------------------------------------ drawing

class _Box:
    """One drawn box: a graph node (detail view) or a collapsed block (blocks view)."""

    __slots__ = ("key", "label", "line2", "w", "x", "y", "layer", "fill", "stroke", "frozen", "blocked",
                 "segments", "groups", "cls", "members", "order", "pinned", "reason")

    def __init__(self, key: str, label: str, line2: str, fill: str, stroke: str, frozen: bool, blocked: bool,
                 segments: List[Tuple[str, float, float]], groups: List[int], cls: str, order: int,
                 members: Optional[List[str]] = None, pinned: bool = False, reason: Optional[str] = None) -> None:
        self.key, self.label, self.line2 = key, label, line2
        self.fill, self.stroke, self.frozen, self.blocked = fill, stroke, frozen, blocked
        self.segments, self.groups, self.cls, self.order = segments, groups, cls, order
        self.members, self.pinned, self.reason = members or [], pinned, reason
        self.w = max(_MIN_W, min(_MAX_W, max(len(label) * _CHAR_W1, len(line2) * _CHAR_W2) + 18))
        self.x = self.y = 0.0
        self.layer = 0


class _Drawing:
    """A laid-out view: boxes with positions, edge paths, cluster frames, and the overall extent."""

    def __init__(self, name: str, boxes: List[_Box], edges: List[Tuple[str, str, str, str]],
                 clusters: List[Tuple[str, float, float, float, float]]) -> None:
        self.name, self.boxes, self.edges, self.clusters = name, boxes, edges, clusters
        xs = [b.x - b.w / 2 for b in boxes] + [c[1] for c in clusters]
        xe = [b.x + b.w / 2 for b in boxes] + [c[1] + c[3] for c in clusters]
        self.x0, self.x1 = (min(xs) - 40, max(xe) + 40) if boxes else (0.0, 100.0)
        self.y0 = -24.0
        self.y1 = (max(b.y for b in boxes) + _NODE_H + 24) if boxes else 100.0
        lanes = [float(m) for _, _, d, _ in edges for m in re.findall(r"-?\d+(?:\.\d+)?", d)[0::2]]
        if lanes:          # side lanes can stick out of the boxes' extent
            self.x0, self.x1 = min(self.x0, min(lanes) - 20), max(self.x1, max(lanes) + 20)


def _fmt_shape(shape: Optional[Sequence[int]]) -> str:
    return "×".join(str(s) for s in shape) if shape else ""


def _pct(after: int, before: int) -> str:
    return f"{100.0 * after / before:.0f}%" if before else "-"


def _segments(G: nx.DiGraph, gids: Sequence[int]) -> List[Tuple[str, float, float]]:
    """Bottom bar of a box: one segment per group (colour, weight = group size, kept fraction)."""
    groups = G.graph["groups"]
    return [(groups[g]["stroke"], float(groups[g]["size"]),
             groups[g]["kept"] / groups[g]["size"] if groups[g]["size"] else 1.0) for g in gids]


def _node_box(G: nx.DiGraph, v: str) -> _Box:
    d = G.nodes[v]
    if d["op"] == "placeholder":
        line2 = "input" + (f" · {_fmt_shape(d['shape'])}" if d["shape"] else "")
    elif d["op"] == "output":
        line2 = "output" + (f" · {_fmt_shape(d['shape'])}" if d["shape"] else "")
    elif d["before"] is not None:
        line2 = f"{d['kind']} · {d['before']}→{d['after']} · {_pct(d['after'], d['before'])}"
    else:
        line2 = d["kind"] + (f" · {_fmt_shape(d['shape'])}" if d["shape"] else "")
    if d["frozen"]:
        line2 += " · blocked" if d["blocked"] else " · frozen"
    if d["group"] is not None:       # one group: the bar is this node's own kept fraction
        segs = [(d["stroke"], 1.0, d["kept"] if d["kept"] is not None else 1.0)]
    else:
        segs = _segments(G, d["groups"])
    cls = "io" if d["op"] in ("placeholder", "output") else "node"
    return _Box(v, d["label"], line2, d["colour"], d["stroke"], d["frozen"], d["blocked"], segs, d["groups"],
                cls, d["order"], pinned=d["op"] == "placeholder", reason=d["reason"])


def _block_box(G: nx.DiGraph, key: str, members: List[str]) -> _Box:
    """A collapsed block. Its colour and bar show the groups the block *creates* (groups named after one
    of its nodes: its convs' output channels), not every group flowing through it, which in a densenet
    layer would be dozens; its width is that of the node leaving the block."""
    groups = G.graph["groups"]
    mset = set(members)
    own = sorted({g for v in members for g in G.nodes[v]["groups"] if groups[g]["name"] in mset})
    leaving = [v for v in members if any(w not in mset for w in G.successors(v)) and G.nodes[v]["before"]]
    out = leaving[-1] if leaving else next((v for v in reversed(members) if G.nodes[v]["before"]), None)
    line2 = f"{len(members)} ops"
    if out is not None:
        b, a = G.nodes[out]["before"], G.nodes[out]["after"]
        line2 += f" · {b}→{a} · {_pct(a, b)}"
    stuck = [g for g in own if groups[g]["frozen"] > 0 or groups[g]["blocked"]]
    frozen = bool(stuck)
    if frozen:
        line2 += " · frozen"
    reason = "; ".join(dict.fromkeys(r for g in stuck for r in groups[g].get("reasons") or [])) or None
    fill, stroke = (groups[own[0]]["fill"], groups[own[0]]["stroke"]) if len(own) == 1 else \
        (NEUTRAL_FILL, NEUTRAL_STROKE)
    return _Box(key, key, line2, fill, stroke, frozen, any(groups[g]["blocked"] for g in own),
                _segments(G, own), own, "block", G.nodes[members[0]]["order"], members=members, reason=reason)


def _drawn_nodes(G: nx.DiGraph) -> List[str]:
    return [v for v in _ordered(G) if G.nodes[v]["drawn"]]


def _view_graph(G: nx.DiGraph, view: str) -> Tuple[List[_Box], List[Tuple[str, str]]]:
    """Boxes (in graph order) and deduplicated edges of one view over the tensor nodes of G."""
    nodes = _drawn_nodes(G)
    keep = set(nodes)
    if view == "detail":
        boxes = [_node_box(G, v) for v in nodes]
        edges = [(u, v) for u, v in G.edges if u in keep and v in keep]
        return boxes, sorted(set(edges), key=lambda e: (G.nodes[e[1]]["order"], G.nodes[e[0]]["order"]))
    # A block of one drawn node is drawn as that node; blocks that would close a cycle when collapsed
    # (a -> x -> a) are drawn expanded too.
    sizes: Dict[str, int] = defaultdict(int)
    for v in nodes:
        sizes[G.nodes[v]["block"]] += 1
    expanded = {key for key, n in sizes.items() if n == 1}
    while True:
        rep = {v: (G.nodes[v]["block"] if G.nodes[v]["block"] and G.nodes[v]["block"] not in expanded else v)
               for v in nodes}
        H = nx.DiGraph()
        H.add_nodes_from(rep.values())
        H.add_edges_from((rep[u], rep[v]) for u, v in G.edges if u in keep and v in keep and rep[u] != rep[v])
        try:
            cycle = nx.find_cycle(H)
        except nx.NetworkXNoCycle:
            break
        stuck = {n for e in cycle for n in e[:2] if n not in G}
        if not stuck:
            break
        expanded |= stuck
    members: Dict[str, List[str]] = defaultdict(list)
    for v in nodes:
        members[rep[v]].append(v)
    boxes = []
    for key, ms in members.items():
        boxes.append(_node_box(G, key) if ms == [key] else _block_box(G, key, ms))
    boxes.sort(key=lambda b: b.order)
    pos = {b.key: b.order for b in boxes}
    edges = sorted(H.edges, key=lambda e: (pos[e[1]], pos[e[0]]))
    return boxes, edges


def _layout(boxes: List[_Box], edges: List[Tuple[str, str]]) -> None:
    """Sets layer, x (centre) and y (top) of every box.

    Layers: longest path from the inputs (graph order is topological), parameters and constants pulled
    down to just above their first user. x: the graph is cut into vertical chains (a box and the
    successor one layer down it continues into), each chain drawn at one x so that the main path of a
    network is a straight spine, longest chains first; a chain goes as close as it can to the boxes it
    hangs off without overlapping a box already placed (so a downsample or attention branch sits beside
    the spine). This is a simple greedy cousin of Brandes-Koepf alignment; crossings stay low because
    branches are placed next to what they connect to."""
    by_key = {b.key: b for b in boxes}
    preds: Dict[str, List[str]] = defaultdict(list)
    succs: Dict[str, List[str]] = defaultdict(list)
    for u, v in edges:
        preds[v].append(u)
        succs[u].append(v)
    ordered = sorted(boxes, key=lambda b: b.order)
    for b in ordered:
        b.layer = max((by_key[u].layer + 1 for u in preds[b.key]), default=0)
    for b in reversed(ordered):                             # parameters and constants sit above their user
        if not preds[b.key] and succs[b.key] and not b.pinned:
            b.layer = max(0, min(by_key[w].layer for w in succs[b.key]) - 1)

    # Chains: up[v] = v's first predecessor one layer up; down[u] = the one of those v with the longest
    # continuation, so at a fork the long path (the spine) continues and the short branch starts anew.
    up: Dict[str, str] = {}
    for b in ordered:
        adjacent = [u for u in preds[b.key] if by_key[u].layer == b.layer - 1]
        if adjacent:
            up[b.key] = adjacent[0]
    below: Dict[str, List[str]] = defaultdict(list)
    for v, u in up.items():
        below[u].append(v)
    down: Dict[str, str] = {}
    length: Dict[str, int] = {}
    for b in sorted(boxes, key=lambda b: (-b.layer, -b.order)):
        cands = below[b.key]
        if cands:
            best = max(cands, key=lambda v: (length[v], -by_key[v].order))
            down[b.key] = best
        length[b.key] = 1 + (length[down[b.key]] if b.key in down else 0)
    heads = [b.key for b in ordered if b.key not in up or down.get(up[b.key]) != b.key]
    chains = []
    for h in heads:
        chain = [h]
        while chain[-1] in down:
            chain.append(down[chain[-1]])
        chains.append(chain)
    chains.sort(key=lambda c: (-len(c), by_key[c[0]].order))

    placed: Dict[int, List[Tuple[float, float]]] = defaultdict(list)     # layer -> [(left, right)]
    done: set = set()
    for chain in chains:
        width = max(by_key[v].w for v in chain)
        # Where it hangs off: the placed neighbours of its head (above) and of its tail (below), near
        # ones counting more than far ones.
        nbs = [(u, by_key[chain[0]].layer - by_key[u].layer) for u in preds[chain[0]] if u in done]
        nbs += [(w, by_key[w].layer - by_key[chain[-1]].layer) for w in succs[chain[-1]] if w in done]
        if not nbs:
            nbs = [(u, abs(by_key[u].layer - by_key[v].layer)) for v in chain
                   for u in preds[v] + succs[v] if u in done]
        if nbs:
            ws = [1.0 / max(1, span) ** 2 for _, span in nbs]
            want = sum(by_key[u].x * w for (u, _), w in zip(nbs, ws)) / sum(ws)
        else:
            want = 0.0
        blocked = sorted((left - width / 2 - _H_GAP, right + width / 2 + _H_GAP)
                         for v in chain for left, right in placed[by_key[v].layer])
        x = _nearest_free(want, blocked)
        for v in chain:
            b = by_key[v]
            b.x = x
            placed[b.layer].append((x - b.w / 2, x + b.w / 2))
            done.add(v)
    for b in boxes:
        b.y = b.layer * (_NODE_H + _V_GAP)


def _nearest_free(want: float, blocked: List[Tuple[float, float]]) -> float:
    """The point closest to `want` outside every (sorted) open interval in `blocked`."""
    merged: List[List[float]] = []
    for lo, hi in blocked:
        if merged and lo < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    for lo, hi in merged:
        if lo < want < hi:
            return lo if want - lo < hi - want else hi      # ties go right
    return want


def _route(boxes: List[_Box], edges: List[Tuple[str, str]]) -> List[Tuple[str, str, str, str]]:
    """SVG path of every edge: (source key, target key, path d, colour). Edges between adjacent layers
    are S-curves; a longer edge goes straight if no box is in the way, else it leaves its source into a
    vertical side lane and re-enters above its target. All long edges of one source share a lane (one
    tensor, one line, branching off to each consumer), and lanes whose layer spans overlap get separate
    tracks, like the arcs of a densenet's concatenations."""
    by_key = {b.key: b for b in boxes}
    per_layer: Dict[int, List[_Box]] = defaultdict(list)
    for b in boxes:
        per_layer[b.layer].append(b)
    step = _NODE_H + _V_GAP
    out: List[Tuple[str, str, str, str]] = []
    lane_edges: Dict[Tuple[str, str], List[str]] = defaultdict(list)

    def colour(b: _Box) -> str:
        return b.stroke if b.cls != "block" or len(b.groups) == 1 else NEUTRAL_STROKE

    for u, v in edges:
        s, t = by_key[u], by_key[v]
        sx, sy, tx, ty = s.x, s.y + _NODE_H, t.x, t.y
        if t.layer - s.layer <= 1:
            m = (sy + ty) / 2
            out.append((u, v, f"M{sx:.0f},{sy:.0f}C{sx:.0f},{m:.0f} {tx:.0f},{m:.0f} {tx:.0f},{ty:.0f}",
                        colour(s)))
            continue
        blocked = False
        for layer in range(s.layer + 1, t.layer):
            y0 = layer * step
            xa = sx + (tx - sx) * (y0 - sy) / (ty - sy)
            xb = sx + (tx - sx) * (y0 + _NODE_H - sy) / (ty - sy)
            lo, hi = min(xa, xb) - 8, max(xa, xb) + 8
            if any(b.x - b.w / 2 < hi and b.x + b.w / 2 > lo for b in per_layer[layer]):
                blocked = True
                break
        if not blocked:
            out.append((u, v, f"M{sx:.0f},{sy:.0f}L{tx:.0f},{ty:.0f}", colour(s)))
            continue
        inner = [b for layer in range(s.layer + 1, t.layer) for b in per_layer[layer]]
        left = min(b.x - b.w / 2 for b in inner)
        right = max(b.x + b.w / 2 for b in inner)
        side = "R" if (sx + tx) / 2 >= (left + right) / 2 else "L"
        lane_edges[(u, side)].append(v)

    # One lane per (source, side), spanning from the source to its farthest consumer on that side.
    spans = []
    for (u, side), targets in lane_edges.items():
        a, z = by_key[u].layer, max(by_key[v].layer for v in targets)
        spans.append((a, z, u, side, targets))
    spans.sort(key=lambda s: (s[0], -s[1]))
    track_end: Dict[str, List[int]] = {"R": [], "L": []}
    for a, z, u, side, targets in spans:
        ends = track_end[side]
        track = next((i for i, e in enumerate(ends) if e <= a), len(ends))
        if track == len(ends):
            ends.append(z)
        else:
            ends[track] = z
        inner = [b for layer in range(a + 1, z) for b in per_layer[layer]]
        if side == "R":
            lx = max(b.x + b.w / 2 for b in inner) + _LANE_MARGIN + track * _LANE_STEP
        else:
            lx = min(b.x - b.w / 2 for b in inner) - _LANE_MARGIN - track * _LANE_STEP
        s = by_key[u]
        sx, sy = s.x, s.y + _NODE_H
        for v in targets:
            t = by_key[v]
            tx, ty = t.x, t.y
            d = (f"M{sx:.0f},{sy:.0f}C{sx:.0f},{sy + _V_GAP * .7:.0f} {lx:.0f},{sy + _V_GAP * .3:.0f} "
                 f"{lx:.0f},{sy + _V_GAP:.0f}L{lx:.0f},{ty - _V_GAP:.0f}"
                 f"C{lx:.0f},{ty - _V_GAP * .3:.0f} {tx:.0f},{ty - _V_GAP * .7:.0f} {tx:.0f},{ty:.0f}")
            out.append((u, v, d, colour(s)))
    return out


def _clusters(G: nx.DiGraph, boxes: List[_Box]) -> List[Tuple[str, float, float, float, float]]:
    """Faint frames around the nodes of each repeated block in the detail view, labelled with its prefix."""
    members: Dict[str, List[_Box]] = defaultdict(list)
    for b in boxes:
        key = G.nodes[b.key]["block"] if b.key in G else None
        if key:
            members[key].append(b)
    frames = []
    for key, bs in members.items():
        if len(bs) < 2:
            continue
        x0 = min(b.x - b.w / 2 for b in bs) - 10
        x1 = max(b.x + b.w / 2 for b in bs) + 10
        y0 = min(b.y for b in bs) - 15
        y1 = max(b.y for b in bs) + _NODE_H + 6
        frames.append((key, x0, y0, x1 - x0, y1 - y0))
    return frames


def _drawing(G: nx.DiGraph, view: str) -> _Drawing:
    boxes, edges = _view_graph(G, view)
    _layout(boxes, edges)
    routed = _route(boxes, edges)
    return _Drawing(view, boxes, routed, _clusters(G, boxes) if view == "detail" else [])


# ------------------------------------------------------------------------------------------------ SVG

_SVG_CSS = string.Template(_asset("svg.css")).substitute(
    FROZEN_STROKE=FROZEN_STROKE, LABEL_FONT=_LABEL_FONT, TEXT_FONT=_TEXT_FONT)

_SVG_DEFS = (
    '<defs><pattern id="fx-hatch" patternUnits="userSpaceOnUse" width="7" height="7" '
    'patternTransform="rotate(45)"><rect width="3" height="7" fill="#000" fill-opacity=".13"/></pattern>'
    '<marker id="fx-arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" markerHeight="6" '
    'orient="auto-start-reverse"><path d="M0,0L8,4L0,8z" fill="#5f6b7a"/></marker></defs>')


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _box_svg(b: _Box, idx: str, tooltips: bool) -> str:
    h, w = _NODE_H, b.w
    cls = b.cls + (" frz" if b.frozen else "")
    parts = [f'<g class="{cls}" id="{idx}" data-k="{_esc(b.key)}" data-g="{" ".join(map(str, b.groups))}" '
             f'transform="translate({b.x:.1f},{b.y:.0f})">']
    if tooltips:
        tip = b.label if b.label == b.key else f"{b.label} ({b.key})"
        why = f"\n{'blocked' if b.blocked else 'frozen'}: {b.reason}" if b.frozen and b.reason else ""
        parts.append(f"<title>{_esc(tip)}\n{_esc(b.line2)}{_esc(why)}</title>")
    rx = 14 if b.cls == "io" else 5
    parts.append(f'<rect class="box" x="{-w / 2:.1f}" y="0" width="{w:.1f}" height="{h}" rx="{rx}" '
                 f'fill="{b.fill}" stroke="{b.stroke}"/>')
    if b.frozen:
        parts.append(f'<rect class="hatch" x="{-w / 2:.1f}" y="0" width="{w:.1f}" height="{h}" rx="{rx}"/>')
    # Long qualnames are squeezed to the box rather than cut, so the full name stays readable and findable.
    fit = w - 14
    squeeze = f' textLength="{fit:.0f}" lengthAdjust="spacingAndGlyphs"' if len(b.label) * _CHAR_W1 > fit else ""
    parts.append(f'<text class="l1" y="15"{squeeze}>{_esc(b.label)}</text>')
    squeeze = f' textLength="{fit:.0f}" lengthAdjust="spacingAndGlyphs"' if len(b.line2) * _CHAR_W2 > fit else ""
    parts.append(f'<text class="l2" y="28"{squeeze}>{_esc(b.line2)}</text>')
    if b.segments and b.cls != "io":     # kept-fraction bar: dark part = kept channels, per group
        bw, x = w - 16, -w / 2 + 8
        total = sum(s[1] for s in b.segments) or 1.0
        parts.append(f'<rect class="barbg" x="{x:.1f}" y="32" width="{bw:.1f}" height="4"/>')
        for colour, weight, frac in b.segments:
            sw = bw * weight / total
            if sw * frac >= 0.3:
                parts.append(f'<rect x="{x:.1f}" y="32" width="{sw * frac:.1f}" height="4" fill="{colour}"/>')
            x += sw
    parts.append("</g>")
    return "".join(parts)


def _view_svg(dr: _Drawing, prefix: str, tooltips: bool, on: bool = True) -> Tuple[str, Dict[str, str]]:
    """The <g> of one view, and box key -> DOM id. on: shown before any script runs (the page's CSS hides
    views without it, so a page with scripts off still shows its initial view)."""
    ids = {b.key: f"{prefix}{i}" for i, b in enumerate(dr.boxes)}
    out = [f'<g class="view{" on" if on else ""}" id="view-{dr.name}" data-view="{dr.name}">',
           '<g class="clusters">']
    for key, x, y, w, h in dr.clusters:
        out.append(f'<rect class="cluster" x="{x:.0f}" y="{y:.0f}" width="{w:.0f}" height="{h:.0f}" rx="8"/>'
                   f'<text class="clabel" x="{x + 6:.0f}" y="{y + 10:.0f}">{_esc(key)}</text>')
    out.append('</g><g class="edges">')
    for u, v, d, colour in dr.edges:
        out.append(f'<path class="edge" data-s="{ids[u]}" data-t="{ids[v]}" stroke="{colour}" d="{d}"/>')
    out.append('</g><g class="nodes">')
    out.extend(_box_svg(b, ids[b.key], tooltips) for b in dr.boxes)
    out.append("</g></g>")
    return "".join(out), ids


def _human(n: Optional[float]) -> str:
    return "-" if n is None else human_count(n)


def _cost_rows(report: Dict[str, Any]) -> List[Tuple[str, str, str, str]]:
    """(what, before, after, kept %) for the FLOPs and the parameters the report has."""
    rows = []
    for key, name in (("flops", "FLOPs"), ("params", "Params")):
        e = report.get(key) or {}
        if e:
            rows.append((name, _human(e.get("before")), _human(e.get("after")), f"{100 * e.get('ratio', 1.0):.1f}%"))
    return rows


def _summary_lines(report: Dict[str, Any]) -> List[str]:
    return [f"{name}: {before} → {after} ({kept})" for name, before, after, kept in _cost_rows(report)]


def write_svg(report: Any, path: PathLike, view: str = "detail", title: Optional[str] = None) -> Path:
    """Write the graph drawing as one standalone SVG file (no interaction; hovering a box in a browser
    shows its name and widths). view: "detail" (every tensor node) or "blocks" (repeated blocks
    collapsed). Returns the path."""
    report = _as_report(report)
    if view not in ("detail", "blocks"):
        raise ValueError(f"view must be 'detail' or 'blocks', got {view!r}")
    G = pruning_graph(report)
    dr = _drawing(G, view)
    body, _ = _view_svg(dr, "n", tooltips=True)
    frozen = [g for g in G.graph["groups"].values() if g.get("frozen", 0) > 0 or g.get("blocked")]
    header = [("hdr1", title or "fxprune pruning graph")] + [("hdr", t) for t in _summary_lines(report)] + [
        ("hdr", "fill = channel group · grey = no / several groups · hatched, red dashed = frozen channels · "
                "bottom bar = kept fraction")] + [
        ("hdrw", f"{'blocked' if g.get('blocked') else 'frozen'} {g['name']}: "
                 f"{'; '.join(g.get('reasons') or []) or '-'}") for g in frozen[:8]]
    if len(frozen) > 8:
        header.append(("hdrw", f"... and {len(frozen) - 8} more frozen groups"))
    hy = dr.y0 - 18 * len(header) - 8
    x0, y0 = dr.x0, hy - 22
    width, height = max(dr.x1 - x0, max(len(t) for _, t in header) * 6.9 + 30), dr.y1 - y0
    hdr = "".join(f'<text class="{cls}" x="{x0 + 12:.0f}" y="{hy + 18 * i:.0f}">{_esc(t)}</text>'
                  for i, (cls, t) in enumerate(header))
    svg = (f'<?xml version="1.0" encoding="UTF-8"?>\n'
           f'<svg xmlns="http://www.w3.org/2000/svg" class="fx" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="{x0:.0f} {y0:.0f} {width:.0f} {height:.0f}">\n'
           f"<style>{_SVG_CSS}</style>{_SVG_DEFS}"
           f'<rect x="{x0:.0f}" y="{y0:.0f}" width="{width:.0f}" height="{height:.0f}" fill="#fff"/>'
           f"{hdr}{body}</svg>\n")
    path = Path(path)
    path.write_text(svg, encoding="utf-8")
    log.info("visualize: wrote %s (%d nodes, %.0f KB)", path, len(dr.boxes), path.stat().st_size / 1024)
    return path


# ----------------------------------------------------------------------------------------------- HTML

_PAGE_CSS = _asset("page.css")

# The page script: pan/zoom of the inline SVG, view switch, hover tooltips, group highlighting, search.
# Written here rather than taken from a library, so the page needs no network and stays small.
_PAGE_JS = _asset("page.js")


def _page_data(G: nx.DiGraph, drawings: Dict[str, _Drawing], default_view: str) -> str:
    """The JSON the page script reads for tooltips and the legend: compact keys, only drawn nodes."""
    nodes = {}
    for v in _drawn_nodes(G):
        d = G.nodes[v]
        nodes[v] = {"l": d["label"], "op": d["op"], "k": d["kind"], "sh": d["shape"],
                    "ch": [[c["dim"], c["before"], c["after"]] for c in d["channels"]], "b": d["block"]}
    blocks = {b.key: {"m": b.members} for dr in drawings.values() for b in dr.boxes if b.cls == "block"}
    groups = {str(gid): {"name": g["name"], "size": g["size"], "kept": g["kept"], "frozen": g.get("frozen", 0),
                         "blocked": bool(g.get("blocked")), "reasons": list(g.get("reasons") or []),
                         "frz": bool(g.get("frozen", 0) > 0 or g.get("blocked")), "fill": g["fill"],
                         "stroke": g["stroke"]}
              for gid, g in G.graph["groups"].items()}
    text = json.dumps({"nodes": nodes, "blocks": blocks, "groups": groups, "defaultView": default_view},
                      separators=(",", ":"))
    # "</script>" or "<!--" in a name would end or confuse the <script> element; "<" only occurs in strings.
    return text.replace("<", "\\u003c")


def _group_rows(G: nx.DiGraph) -> Tuple[str, str]:
    """Side-panel HTML: the frozen groups with their reasons, and every group (colour, kept/size)."""
    frozen_rows, rows = [], []
    for gid, g in sorted(G.graph["groups"].items()):
        frz = g.get("frozen", 0) > 0 or bool(g.get("blocked"))
        kept, size = g["kept"], g["size"]
        why = ""
        if frz:
            head = "blocked" if g.get("blocked") else f"frozen {g.get('frozen', 0)}/{size}"
            why = f'<div class="why">{head}: {_esc("; ".join(g.get("reasons") or []) or "(no reason recorded)")}</div>'
        row = (f'<div class="grp" data-gid="{gid}"><span class="sw{" frz" if frz else ""}" '
               f'style="background-color:{g["fill"]};border-color:{g["stroke"]}"></span>'
               f'<div class="gn">{_esc(g["name"])}<div class="kb"><i style="width:{100 * kept / (size or 1):.0f}%;'
               f'background:{g["stroke"]}"></i></div>{why}</div>'
               f'<span class="gk">{kept}/{size} · {_pct(kept, size)}</span></div>')
        rows.append(row)
        if frz:
            frozen_rows.append(row)
    return "".join(frozen_rows), "".join(rows)


def write_html(report: Any, path: PathLike, title: Optional[str] = None, view: str = "auto") -> Path:
    """Write one self-contained interactive HTML page of the pruning graph (no network access: CSS, JS,
    data and drawing are inline).

    The page shows the layered graph as inline SVG, each channel group in its own colour (neutral: no group
    or several), frozen groups hatched with a red dashed border, and on every box its module qualname,
    kind, width before -> after and kept ratio, with a bar of the kept fraction. The side panel has the
    FLOPs/params summary, the frozen groups with their reasons, and every group (colour, kept/size).
    Interactions: mouse-wheel zoom at the pointer (Shift+wheel scrolls), drag to pan, Fit / Top / +/-
    buttons and keys (f, 0, +, -, arrows, PageUp/PageDown, Esc), hover for details and to light up the
    node's groups, click to pin, click a group in the legend to zoom to its nodes, search by name, and a
    Detail / Blocks switch (repeated blocks such as layer1.0 or features.denseblock1.denselayer3 collapsed
    into one box each). URL hash: #view=detail|blocks, &focus=<name>, &fit.

    view: initial view, "detail", "blocks", or "auto" (blocks when the detail view has more than 250
    boxes and collapsing removes at least a third of them). Returns the path."""
    report = _as_report(report)
    if view not in ("auto", "detail", "blocks"):
        raise ValueError(f"view must be 'auto', 'detail' or 'blocks', got {view!r}")
    G = pruning_graph(report)
    drawings = {name: _drawing(G, name) for name in ("detail", "blocks")}
    n_detail, n_blocks = len(drawings["detail"].boxes), len(drawings["blocks"].boxes)
    if view == "auto":
        view = "blocks" if n_detail > 250 and n_blocks < n_detail * 2 / 3 else "detail"
    title = title or "fxprune pruning graph"
    views = "".join(_view_svg(dr, name[0], tooltips=False, on=name == view)[0] for name, dr in drawings.items())
    frozen_rows, rows = _group_rows(G)
    n_groups = len(G.graph["groups"])
    n_frozen = sum(1 for g in G.graph["groups"].values() if g.get("frozen", 0) > 0 or g.get("blocked"))
    hidden = G.number_of_nodes() - len(_drawn_nodes(G))
    summary = [f"<tr><td>{name}</td><td>{before} → {after}</td><td class='r'>{kept}</td></tr>"
               for name, before, after, kept in _cost_rows(report)]
    budget = report.get("budget") or {}
    if isinstance(budget, dict):
        budget_s = ", ".join(f"{k} {v}" for k, v in budget.items() if v is not None and k != "met")
        budget_s += {True: " (met)", False: " (NOT met)"}.get(budget.get("met"), "")
    else:
        budget_s = str(budget)
    options = report.get("options") or {}
    opts = ", ".join(f"{k}={v}" for k, v in options.items() if v not in (None, [], ""))
    ver = report.get("verification")
    ver_s = ""
    if isinstance(ver, dict) and ver:
        ok = ver.get("passed", ver.get("ok"))
        ver_s = f"<tr><td>Verification</td><td colspan=2>{'passed' if ok else 'FAILED' if ok is False else _esc(ok)}</td></tr>"
    page = string.Template(_asset("page.html")).substitute(
        title=_esc(title), page_css=_PAGE_CSS, svg_css=_SVG_CSS, svg_defs=_SVG_DEFS, views=views,
        summary="".join(summary), budget=_esc(budget_s or "-"), verification=ver_s, n_groups=n_groups,
        n_frozen=n_frozen, n_detail=n_detail, n_blocks=n_blocks,
        hidden_note=f", {hidden} shape-only ops and constants not drawn" if hidden else "", options=_esc(opts),
        detail_checked=" checked" if view == "detail" else "", blocks_checked=" checked" if view == "blocks" else "",
        neutral_fill=NEUTRAL_FILL, neutral_stroke=NEUTRAL_STROKE,
        frozen_rows=frozen_rows or '<div class="help">none: every group can be pruned</div>', rows=rows,
        data=_page_data(G, drawings, view), page_js=_PAGE_JS)
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    log.info("visualize: wrote %s (%d nodes, %d blocks, %.0f KB)", path, n_detail, n_blocks,
             path.stat().st_size / 1024)
    return path


# ------------------------------------------------------------------------------------------ width chart

def _chart_rows(G: nx.DiGraph) -> List[Tuple[str, int, int, str, bool]]:
    """(label, before, after, colour, frozen) per layer, in graph order: conv / linear / attention modules,
    and other nodes that create a width of their own (a cat, a functional conv or matmul: output width
    unlike any input's). Norms, activations and adds only repeat a width and are left out."""
    rows = []
    for v in _ordered(G):
        d = G.nodes[v]
        before, after, colour = d["before"], d["after"], d["stroke"]
        frozen = d["frozen"]
        layer_like = d["op"] == "call_module" and bool(_LAYER_KINDS.match(str(d["kind"])))
        if before is None and layer_like:
            # MultiheadAttention returns a tuple (no channels of its own): its width is its output's.
            w = next((w for w in G.successors(v) if G.nodes[w]["before"] is not None), None)
            if w is None:
                continue
            before, after, colour, frozen = (G.nodes[w]["before"], G.nodes[w]["after"], G.nodes[w]["stroke"],
                                             G.nodes[w]["frozen"])
        if before is None or d["op"] in ("placeholder", "output", "get_attr"):
            continue
        if not layer_like:
            ins = [G.nodes[u]["before"] for u in G.predecessors(v) if G.nodes[u]["before"] is not None]
            if not ins or before in ins:
                continue
        rows.append((d["label"], before, after, colour, frozen))
    return rows


def write_width_chart(report: Any, path: PathLike, title: Optional[str] = None) -> Path:
    """Write a PNG bar chart (matplotlib, Agg backend) of every layer's output width, dense vs pruned:
    one horizontal bar pair per conv/linear/attention layer in graph order, the pruned bar in its group's
    colour (hatched when frozen) and labelled with the kept ratio. Long models wrap into side-by-side
    panels of at most 100 layers, so 50-200 layers stay readable. Needs matplotlib. Returns the path."""
    try:
        # The Agg canvas directly, not pyplot: no global backend switch in the caller's process.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:  # matplotlib is optional: only this chart needs it
        raise ImportError("write_width_chart needs matplotlib: pip install matplotlib") from e
    report = _as_report(report)
    G = pruning_graph(report)
    rows = _chart_rows(G)
    per_panel = 100
    n_panels = max(1, math.ceil(len(rows) / per_panel))
    per = max(1, math.ceil(len(rows) / n_panels)) if rows else 1
    longest = min(48, max((len(r[0]) for r in rows), default=10))
    panel_w = 4.6 + 0.07 * longest                    # bars plus the monospace layer names
    height = 2.0 + 0.17 * per
    fig = Figure(figsize=(max(9.0, panel_w * n_panels), height), dpi=110)   # no pyplot: no global state
    FigureCanvasAgg(fig)
    wmax = max((r[1] for r in rows), default=1)
    for p in range(n_panels):
        ax = fig.add_subplot(1, n_panels, p + 1)
        chunk = rows[p * per:(p + 1) * per]
        ys = list(range(len(chunk)))
        ax.barh([y - 0.2 for y in ys], [r[1] for r in chunk], height=0.38, color="#c9ced5", label="dense")
        bars = ax.barh([y + 0.2 for y in ys], [r[2] for r in chunk], height=0.38, color=[r[3] for r in chunk],
                       label="pruned")
        for bar, r in zip(bars, chunk):
            if r[4]:
                bar.set_hatch("////")
                bar.set_edgecolor(FROZEN_STROKE)
            ax.text(max(r[1], r[2]) + wmax * 0.01, bar.get_y() + bar.get_height() / 2,
                    _pct(r[2], r[1]), va="center", fontsize=5.5, color="#333")
        ax.set_yticks(ys)
        ax.set_yticklabels([r[0] if len(r[0]) <= 48 else "…" + r[0][-47:] for r in chunk], fontsize=6,
                           family="monospace")
        ax.set_ylim(len(chunk) - 0.5 if chunk else 0.5, -0.5)    # first layer at the top
        ax.set_xlim(0, wmax * 1.12)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("output channels", fontsize=8)
        ax.grid(axis="x", color="#e5e7ea", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    head = title or "Layer widths: dense vs pruned"
    extra = " · ".join(_summary_lines(report))
    fig.suptitle(f"{head}\n{extra}" if extra else head, fontsize=10, y=1 - 0.1 / height, va="top")
    fig.legend(handles=[Patch(color="#c9ced5", label="dense"), Patch(color="#6a8caf", label="pruned (group colour)"),
                        Patch(facecolor="#ffffff", edgecolor=FROZEN_STROKE, hatch="////", label="frozen")],
               loc="upper center", bbox_to_anchor=(0.5, 1 - 0.55 / height), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.85 / height))
    path = Path(path)
    fig.savefig(path, format="png")
    log.info("visualize: wrote %s (%d layers)", path, len(rows))
    return path


# ---------------------------------------------------------------------------------------------- all

def visualize(report_or_pruned: Any, out_dir: PathLike, name: str = "model", example_inputs=None) -> Dict[str, Path]:
    """Write `<name>.html`, `<name>.svg` and `<name>_widths.png` into out_dir (created if needed) from a
    report dict, a pruned GraphModule (its .meta["fxprune"]) or a report.json path; or from an unpruned
    model with `example_inputs` (its channel groups, nothing cut). The PNG is skipped with a warning
    when matplotlib is not installed. Returns {"html": path, "svg": path, "png": path} for the files
    written."""
    if example_inputs is not None:
        from ..compiler import compile  # a budget of 1.0 runs the analysis and keeps every channel
        report_or_pruned = compile(report_or_pruned, 1.0, example_inputs=example_inputs, verify=False)
    report = _as_report(report_or_pruned)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"html": write_html(report, out / f"{name}.html", title=f"{name}: fxprune pruning graph"),
               "svg": write_svg(report, out / f"{name}.svg", title=f"{name}: fxprune pruning graph")}
    try:
        written["png"] = write_width_chart(report, out / f"{name}_widths.png", title=f"{name}: layer widths")
    except ImportError as e:
        log.warning("visualize: skipped %s_widths.png: %s", name, e)
    return written
