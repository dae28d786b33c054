"""Shape and layout ops: size queries, indexing, view/reshape/flatten, permute, expand, cat, split,
pad, roll.

Reshapes map channels through blocks of dims with equal products; splitting a channel dim into
(heads, head width) makes each head one unit; other splits (channel shuffle) make position p of
every group one unit, so every group keeps the same size.
Shape literals that carry a channel dim (view sizes, split sizes) are recomputed by the rewrite."""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx
from torch import nn

from fxprune.errors import describe_node
from fxprune.fxutil import argument, declare_signature, first_input
from fxprune.ir import ChannelCount, ChannelMap
from fxprune.tracing import TensorSpec, value_spec
from .registry import OpEntry, register


# ----------------------------------------------------------------------------- metadata
def size(a, node: torch.fx.Node) -> Any:
    """x.size() / x.size(d): a channel dim's size is a ChannelCount (it changes when pruned)."""
    m = a.tensor_map(node.args[0])
    if m is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    counts = tuple(ChannelCount(e) if e is not None else None for e in m.dims)
    return counts if dim is None else counts[dim]


register(OpEntry("size", size), methods=["size"])
register(OpEntry("dim", lambda a, node: None), methods=["dim"])


def attribute(a, node: torch.fx.Node) -> Any:
    """getattr(x, "shape") and other metadata reads."""
    m = a.tensor_map(node.args[0])
    if node.args[1] == "shape" and m is not None:
        return tuple(ChannelCount(e) if e is not None else None for e in m.dims)
    if node.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda"):
        return None
    return a.opaque(node, f"no channel rule for attribute .{node.args[1]}")


register(OpEntry("getattr", attribute), functions=[getattr])
register(OpEntry("numel/element_size/is_floating_point", lambda a, node: None),
         methods=["numel", "nelement", "element_size", "is_floating_point", "get_device", "stride"])


def factory(a, node: torch.fx.Node) -> Any:
    """torch.arange(n), torch.ones(b, n), x.new_zeros(...): a new tensor with no channels. A size given
    by a channel count is frozen by the dispatcher (this entry does not accept counts). `ones_like(x)`
    has x's channels: the same value in every position, so it is sliced with x."""
    if node.target in _LIKE:
        return a.tensor_map(first_input(node))
    return a.untracked_like(value_spec(node))


_LIKE = (torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like)


register(OpEntry("tensor factories", factory),
         functions=[torch.arange, torch.ones, torch.zeros, torch.empty, torch.full, torch.eye, torch.rand, torch.randn,
                    torch.randint, torch.tensor, torch.as_tensor, *_LIKE],
         methods=["new_ones", "new_zeros", "new_empty", "new_full", "new_tensor"])


# ----------------------------------------------------------------------------- indexing
def getitem(a, node: torch.fx.Node) -> Any:
    source, index = node.args
    value = a.map_of(source)
    if isinstance(value, (tuple, list)):
        return value[index]
    if isinstance(value, ChannelMap):
        return _tensor_index(a, node, value, index)
    return None if not isinstance(value_spec(node), TensorSpec) else a.untracked_like(value_spec(node))


def _tensor_index(a, node: torch.fx.Node, m: ChannelMap, index) -> Any:
    """x[...]: ints, full slices, and step-1 slices of channel dims (a fused qkv's q part) are
    understood, and so are integer index tensors on other dims (a relative position bias gathered
    from its table, `table[:, idx]`); anything else freezes them."""
    index = index if isinstance(index, tuple) else (index,)
    gather = gathered_dims(index, m.ndim)
    if gather is not None:
        first, n_indexed, n_added = gather
        indices = [a.tensor_map(i) for i in index if isinstance(i, torch.fx.Node)]
        for e in [*m.dims[first:first + n_indexed], *(e for i in indices if i is not None for e in i.dims)]:
            if e is not None:  # the positions picked, or how many: neither may change with the plan
                a.es.freeze(e, f"blocked by {describe_node(node)}: indexing a channel dim by a tensor, or by "
                               f"a tensor with channels")
        return ChannelMap(m.dims[:first] + (None,) * n_added + m.dims[first + n_indexed:])
    if any(isinstance(i, torch.fx.Node) or (not isinstance(i, (int, slice, type(None), type(Ellipsis)))) for i in index):
        return a.opaque(node, "tensor indexing by a tensor or list")
    out, d = [], 0
    for i in _expanded_index(index, m.ndim):
        if i is None:
            out.append(None)
            continue
        e = m.dims[d]
        if isinstance(i, slice) and i == slice(None):
            out.append(e)
        elif e is not None and isinstance(i, slice) and i.step in (None, 1):
            start, stop, _ = i.indices(len(e))
            out.append(e[start:max(start, stop)])  # the same channels: the rewrite moves the bounds
        elif e is not None:
            a.es.freeze(e, f"blocked by {describe_node(node)}: indexing a channel dim")
            if isinstance(i, slice):
                out.append(None)
        elif isinstance(i, slice):
            out.append(None)
        d += 1
    return ChannelMap(tuple(out))


def gathered_dims(index: tuple, ndim: int) -> Optional[Tuple[int, int, int]]:
    """For an index of full slices and integer index tensors side by side (`x[:, idx]`, `x[..., i, j]`):
    (the first dim they index, how many dims they index, how many dims their broadcast shape puts in
    those dims' place). None for any other index."""
    expanded = _expanded_index(index, ndim)
    tensors = [k for k, i in enumerate(expanded) if isinstance(i, torch.fx.Node)]
    if not tensors or tensors != list(range(tensors[0], tensors[-1] + 1)) or \
            any(not isinstance(i, torch.fx.Node) and i != slice(None) for i in expanded):
        return None
    specs = [value_spec(expanded[k]) for k in tensors]
    if any(not isinstance(s, TensorSpec) or s.dtype not in (torch.int64, torch.int32) for s in specs):
        return None  # boolean masks select by data
    return tensors[0], len(tensors), len(torch.broadcast_shapes(*(s.shape for s in specs)))


def gathered_dim_source(index: tuple, ndim: int, dim: int) -> Optional[int]:
    """The dim of x that dim `dim` of x[index] comes from (see gathered_dims), or None."""
    gather = gathered_dims(index if isinstance(index, tuple) else (index,), ndim)
    if gather is None:
        return None
    first, n_indexed, n_added = gather
    if dim < first:
        return dim
    return dim - n_added + n_indexed if dim >= first + n_added else None


def _expanded_index(index: tuple, ndim: int) -> List[Any]:
    """The index with the Ellipsis spelt out and trailing full slices added (None: a new dim)."""
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: List[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (ndim - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (ndim - sum(1 for i in expanded if i is not None)))
    return expanded


def rewrite_getitem(rw, node: torch.fx.Node, new: torch.fx.Node) -> None:
    """A slice of a channel dim gets the bounds of its kept channels: kept positions stay in order, so
    those inside [start, stop) are again one run."""
    source, index = node.args
    m = rw.groups.maps.get(source.name)
    if not isinstance(m, ChannelMap) or not isinstance(index, (tuple, slice)):
        return
    expanded, d, changed = _expanded_index(index if isinstance(index, tuple) else (index,), m.ndim), 0, False
    for k, i in enumerate(expanded):
        if i is None:
            continue
        if isinstance(i, slice) and i != slice(None) and m.dims[d] is not None:
            kept = rw.kept(m.dims[d])
            start, stop, _ = i.indices(len(m.dims[d]))
            expanded[k] = slice(int(np.searchsorted(kept, start)), int(np.searchsorted(kept, max(start, stop))))
            changed = True
        d += 1
    if changed:
        new.args = (new.args[0], tuple(expanded))


# tuples of channel counts (x.shape) are indexed too: the count passes through
register(OpEntry("getitem", getitem, rewrite_args=rewrite_getitem, accepts_channel_counts=True),
         functions=[operator.getitem])


# ----------------------------------------------------------------------------- reshapes
def reshape(a, node: torch.fx.Node) -> Any:
    """view/reshape/flatten/squeeze: map channels through blocks of dims with equal products."""
    x = first_input(node)
    m = a.tensor_map(x)
    out_spec, in_spec = value_spec(node), value_spec(x)
    if m is None or not isinstance(out_spec, TensorSpec):
        return a.opaque(node, "reshape of an unknown value")
    out: List[Optional[np.ndarray]] = [None] * out_spec.ndim
    for in_dims, out_dims in _reshape_blocks(in_spec.shape, out_spec.shape):
        tracked = [d for d in in_dims if m.dims[d] is not None]
        if not tracked:
            continue
        if not out_dims:
            a.es.freeze(m.dims[tracked[0]], f"blocked by {describe_node(node)}: a channel dim of size 1 vanishes")
            continue
        if len(tracked) > 1:
            for d in tracked:
                a.es.freeze(m.dims[d], f"blocked by {describe_node(node)}: merges two channel dims")
            continue
        if len(in_dims) == 1 and len(out_dims) == 1:
            out[out_dims[0]] = m.dims[in_dims[0]]
            continue
        block_in = [in_spec.shape[d] for d in in_dims]
        grid = np.broadcast_to(
            m.dims[tracked[0]].reshape([-1 if d == tracked[0] else 1 for d in in_dims]), block_in
        ).reshape([out_spec.shape[d] for d in out_dims])
        varying = [ax for ax in range(grid.ndim) if grid.shape[ax] > 1 and np.any(np.diff(grid, axis=ax) != 0)]
        if not varying:  # every position is the same element: the last non-trivial dim carries it
            varying = [max(ax for ax in range(grid.ndim) if grid.shape[ax] > 1)]
        # One dim of the split carries the units; the dims outside it keep all their positions (the
        # same position in each is one unit, so the kept set stays a product set) and the dims inside
        # it move with it. A split whose innermost part is the last dim is (heads, head width), as in
        # attention: the head is the unit, so whole heads go and every head keeps its width (rotary
        # embeddings and the softmax scale see the original head width). Otherwise (channel shuffle's
        # (groups, width), conv attention's (heads, width, pixels)) the innermost part carries the units
        # and every group keeps the same size.
        carrier = varying[-2] if len(varying) > 1 and out_dims[varying[-1]] == out_spec.ndim - 1 else varying[-1]
        base = grid[tuple(slice(None) if ax == carrier else 0 for ax in range(grid.ndim))]
        if len(varying) > 1:
            shape = [grid.shape[ax] if ax == carrier else 1 for ax in range(grid.ndim)]
            a.es.union(grid.reshape(-1), np.broadcast_to(base.reshape(shape), grid.shape).reshape(-1))
        out[out_dims[carrier]] = np.ascontiguousarray(base)
    return ChannelMap(tuple(out))


def _reshape_blocks(in_shape: Sequence[int], out_shape: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Pair contiguous runs of input and output dims with equal products (size-1 dims alone)."""
    blocks, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1:
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1:
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            break
        in_dims, out_dims = [i], [j]
        p_in, p_out = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out:
                p_in *= in_shape[i]
                in_dims.append(i)
                i += 1
            else:
                p_out *= out_shape[j]
                out_dims.append(j)
                j += 1
        blocks.append((in_dims, out_dims))
    return blocks


def rewrite_size_arguments(rw, node: torch.fx.Node, new: torch.fx.Node) -> None:
    """view/reshape/expand sizes: every channel dim (a literal, or computed from a channel count)
    becomes its new literal size; batch and spatial sizes stay as traced."""
    spec, created = value_spec(node), []
    if node.op == "call_function":  # torch.reshape(x, shape)
        sizes, new_sizes, packed = node.args[1], new.args[1], True
    else:
        sizes, new_sizes = node.args[1:], new.args[1:]
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.fx.Node))
        sizes, new_sizes = (sizes[0], new_sizes[0]) if packed else (sizes, new_sizes)
    if isinstance(sizes, torch.fx.Node):
        # sizes computed as one tuple (`x.size()[:-1] + (nf,)`): read each size from it, so that the
        # channel dims can be replaced
        if not isinstance(value_spec(sizes), tuple) or len(value_spec(sizes)) != spec.ndim:
            return
        with new.graph.inserting_before(new):
            new_sizes = created = [new.graph.call_function(operator.getitem, (new_sizes, i)) for i in range(spec.ndim)]
        sizes = [sizes] * spec.ndim  # never a ChannelCount node itself: only tracked dims change
    sizes, new_sizes = list(sizes), list(new_sizes)
    if len(sizes) != spec.ndim:
        return
    m = rw.groups.maps.get(node.name)
    shape = rw.new_shape(spec.shape, m)
    out, changed = [], False
    for i, (s, new_s) in enumerate(zip(sizes, new_sizes)):
        tracked = isinstance(m, ChannelMap) and m.dims[i] is not None
        counts = isinstance(s, torch.fx.Node) and isinstance(rw.groups.maps.get(s.name), ChannelCount)
        if (tracked and not (isinstance(s, int) and s == -1)) or counts:
            out.append(shape[i] if tracked else spec.shape[i])
            changed = True
        else:
            out.append(new_s)
    if changed:
        new.args = (new.args[0], tuple(out)) if packed else (new.args[0], *out)
    for n in created:  # reads of the size tuple that were not needed
        if not n.users:
            new.graph.erase_node(n)


register(OpEntry("view/reshape", reshape, rewrite_args=rewrite_size_arguments, accepts_channel_counts=True),
         functions=[torch.reshape], methods=["view", "reshape"])


def reshape_as(a, node: torch.fx.Node) -> Any:
    """x.reshape_as(other): a reshape to other's shape, which other's channels set when the model runs,
    so each dim's channels must be other's (LeViT's `bn(x.flatten(0, 1)).reshape_as(x)`)."""
    out = reshape(a, node)
    other = a.tensor_map(node.args[1]) if len(node.args) > 1 else None
    if not isinstance(out, ChannelMap):
        return out
    for mine, theirs in zip(out.dims, other.dims if other is not None else (None,) * out.ndim):
        if mine is not None and theirs is not None:
            a.es.union(mine, theirs)
        elif mine is not None or theirs is not None:
            a.es.freeze(mine if mine is not None else theirs,
                        f"blocked by {describe_node(node)}: reshapes to the shape of %{node.args[1]}, whose channels "
                        f"there are not the reshaped ones")
    return out


register(OpEntry("reshape_as", reshape_as), methods=["reshape_as"])
register(OpEntry("flatten/squeeze/unsqueeze", reshape),
         functions=[torch.flatten, torch.squeeze, torch.unsqueeze],
         methods=["flatten", "squeeze", "unsqueeze", "unflatten"], modules=[nn.Flatten, nn.Unflatten])


def expand(a, node: torch.fx.Node) -> Any:
    m = a.tensor_map(node.args[0])
    spec = value_spec(node)
    if m is None or not isinstance(spec, TensorSpec):
        return a.opaque(node, "expand of an unknown value")
    return ChannelMap(tuple([None] * (spec.ndim - m.ndim) + list(m.dims)))


register(OpEntry("expand", expand, rewrite_args=rewrite_size_arguments, accepts_channel_counts=True),
         methods=["expand"])


# ----------------------------------------------------------------------------- layout
def permute(a, node: torch.fx.Node) -> Any:
    m = a.tensor_map(first_input(node))
    if m is None:
        return a.opaque(node, "permute of an unknown value")
    args = list(node.args[1:])
    if node.target == "t":
        order = list(range(m.ndim))[::-1]
    elif node.target in (torch.permute, "permute"):
        order = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if not args:
            order = list(node.kwargs.get("dims"))
    else:  # transpose / swapaxes
        if len(args) < 2:  # dims passed by name
            args = [v for k, v in node.kwargs.items() if k not in ("input", "self")]
        i, j = args[0] % m.ndim, args[1] % m.ndim
        order = list(range(m.ndim))
        order[i], order[j] = order[j], order[i]
    return ChannelMap(tuple(m.dims[d % m.ndim] for d in order))


register(OpEntry("permute/transpose", permute),
         functions=[torch.permute, torch.transpose, torch.swapaxes, torch.swapdims],
         methods=["permute", "transpose", "swapaxes", "swapdims", "t"])


# ----------------------------------------------------------------------------- cat and split
def cat(a, node: torch.fx.Node) -> Any:
    """Concatenation lays channel vectors side by side; the other dims must agree (unioned)."""
    tensors, dim = list(first_input(node)), argument(node, "dim", 0)
    spec = value_spec(node)
    if isinstance(spec, TensorSpec) and spec.ndim > 1:   # torch.cat skips legacy empty 1-D tensors (an empty cache)
        tensors = [t for t in tensors if not (isinstance(t, torch.fx.Node) and _legacy_empty(value_spec(t)))]
    maps = [a.tensor_map(t) if isinstance(t, torch.fx.Node) else None for t in tensors]
    if not isinstance(spec, TensorSpec) or any(m is None for m in maps):
        return a.opaque(node, "cat of unknown values")
    dim = dim % spec.ndim
    others: List[Optional[np.ndarray]] = [None] * spec.ndim
    for d in range(spec.ndim):
        if d != dim:
            entries = [(t, d, a.tensor_map(t).dims[d], value_spec(t).shape[d]) for t in tensors]
            others[d] = a.couple(node, entries, spec.shape[d], "joins", broadcasting=False)
    if all(m.dims[dim] is None for m in maps):
        cat_elements = None
    else:
        parts = []
        for t, m in zip(tensors, maps):
            if m.dims[dim] is not None:
                parts.append(m.dims[dim])
            else:
                fresh = a.new_elements(node, value_spec(t).shape[dim], f"cat input %{t.name}")
                a.es.freeze(fresh, f"constant segment of {describe_node(node)}")
                parts.append(fresh)
        cat_elements = np.concatenate(parts)
    return ChannelMap(tuple(cat_elements if d == dim else others[d] for d in range(spec.ndim)))


def _legacy_empty(spec: Any) -> bool:
    return isinstance(spec, TensorSpec) and tuple(spec.shape) == (0,)


register(OpEntry("cat", cat), functions=[torch.cat, torch.concat])
declare_signature([torch.cat, torch.concat], ("tensors", "dim"), {"dim": 0})


def _split_dim(node: torch.fx.Node, ndim: int) -> int:
    return node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) % ndim


def split(a, node: torch.fx.Node) -> Any:
    m = a.tensor_map(first_input(node))
    spec = value_spec(node)
    if m is None or not isinstance(spec, tuple):
        return a.opaque(node, "split of an unknown value")
    dim = _split_dim(node, m.ndim)
    outs, start = [], 0
    for part in spec:
        n = part.shape[dim]
        e = m.dims[dim]
        outs.append(m.replace(dim, None if e is None else e[start:start + n]))
        start += n
    return tuple(outs)


def rewrite_split(rw, node: torch.fx.Node, new: torch.fx.Node) -> None:
    """Split sizes become the kept width of each part (as an explicit torch.split)."""
    parts, x = rw.groups.maps.get(node.name), first_input(node)
    xm = rw.groups.maps.get(x.name)
    if not isinstance(parts, tuple) or not isinstance(xm, ChannelMap):
        return
    d = _split_dim(node, xm.ndim)
    if xm.dims[d] is None:
        return
    new.op, new.target = "call_function", torch.split
    new.args, new.kwargs = (new.args[0] if new.args else new.kwargs[_first_kwarg(new)],
                            [len(rw.kept(p.dims[d])) for p in parts], d), {}


def _first_kwarg(node: torch.fx.Node) -> str:
    return next(k for k in ("input", "tensor", "self") if k in node.kwargs)


register(OpEntry("split/chunk", split, rewrite_args=rewrite_split),
         functions=[torch.split, torch.chunk, torch.tensor_split], methods=["split", "chunk", "tensor_split"])


# ----------------------------------------------------------------------------- padding and rolling
def pad(a, node: torch.fx.Node) -> Any:
    return _pad(a, node, argument(node, "pad"))


def pad_module(a, node: torch.fx.Node) -> Any:
    """nn.ZeroPad2d, ReflectionPad1d, ...: their `padding` is F.pad's, (left, right, top, bottom, ...)."""
    return _pad(a, node, a.module(node).padding)


def _pad(a, node: torch.fx.Node, amounts: Any) -> Any:
    """Padding the trailing dims (last dim first) keeps the channels of any dim it leaves alone."""
    m = a.tensor_map(first_input(node))
    if m is None or not isinstance(amounts, (tuple, list)):
        return a.opaque(node, "pad with unknown arguments")
    padded = range(m.ndim - len(amounts) // 2, m.ndim)
    if any(m.dims[d] is not None and any(amounts[2 * (m.ndim - 1 - d) + k] != 0 for k in (0, 1)) for d in padded):
        return a.opaque(node, "padding a channel dim")
    return m


register(OpEntry("pad", pad), functions=[torch.nn.functional.pad])
register(OpEntry("padding layers", pad_module),
         modules=[nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                  nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                  nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d])


def roll(a, node: torch.fx.Node) -> Any:
    m = a.tensor_map(first_input(node))
    dims = argument(node, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if m is None or not dims or any(m.dims[d] is not None for d in dims):
        return a.opaque(node, "roll over a channel dim")
    return m


register(OpEntry("roll", roll), functions=[torch.roll])
declare_signature([torch.roll], ("input", "shifts", "dims"), {"dims": None})


# ----------------------------------------------------------------------------- stack and unbind
def stack(a, node: torch.fx.Node) -> Any:
    """stack: the inputs meet position by position (like cat's other dims); the new dim has no channels."""
    tensors, dim = list(first_input(node)), argument(node, "dim", 0, position=1)
    spec = value_spec(node)
    maps = [a.tensor_map(t) if isinstance(t, torch.fx.Node) else None for t in tensors]
    if not isinstance(spec, TensorSpec) or any(m is None for m in maps):
        return a.opaque(node, "stack of unknown values")
    dim = dim % spec.ndim
    ndim_in = spec.ndim - 1
    dims: List[Optional[np.ndarray]] = []
    for d in range(ndim_in):
        entries = [(t, d, a.tensor_map(t).dims[d], value_spec(t).shape[d]) for t in tensors]
        dims.append(a.couple(node, entries, value_spec(tensors[0]).shape[d], "stacks", broadcasting=False))
    dims.insert(dim, None)
    return ChannelMap(tuple(dims))


register(OpEntry("stack", stack), functions=[torch.stack])
declare_signature([torch.stack], ("tensors", "dim"), {"dim": 0})


def unbind(a, node: torch.fx.Node) -> Any:
    """unbind(dim): a tuple of slices without that dim, which must carry no channels."""
    m = a.tensor_map(first_input(node))
    spec = value_spec(node)
    dim = argument(node, "dim", 0, position=1)
    if m is None or not isinstance(spec, tuple):
        return a.opaque(node, "unbind of an unknown value")
    dim %= m.ndim
    if m.dims[dim] is not None:
        return a.opaque(node, "unbind along a channel dim")
    rest = ChannelMap(tuple(e for d, e in enumerate(m.dims) if d != dim))
    return tuple(rest for _ in spec)


register(OpEntry("unbind", unbind), functions=[torch.unbind], methods=["unbind"])
declare_signature([torch.unbind], ("input", "dim"), {"dim": 0})
