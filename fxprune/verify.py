"""Verification: the pruned model against its specification, the masked original.

The masked original (DESIGN.md, "Reference semantics") is the original graph in float64 where every
pruned channel is zero wherever it is read: each node's output is masked along its channel dims,
every parameter slice of a pruned channel is zeroed (so attention's internal q/k/v positions vanish
too), and ops that reduce over channels (LayerNorm, GroupNorm) run their registry entry's `reference`:
the op over the kept channels only. `pruned(x) == masked(x)` in float64 tests the dependency analysis and the rewrite together.

Also here: the invariant checks that run after every pass in the tests and with FXPRUNE_VERIFY=1."""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.fx
from torch.fx.node import map_aggregate

from .errors import FxPruneError, VerificationError, describe_node
from .fxutil import get_attr
from .ir import ChannelGroups, ChannelMap, PrunePlan
from .ops import REGISTRY, op_fact
from .tracing import TensorSpec, value_spec


def debug_checks_enabled() -> bool:
    return os.environ.get("FXPRUNE_VERIFY", "") not in ("", "0")


@dataclass(frozen=True)
class VerificationResult:
    max_abs_error: float
    reference_scale: float
    tolerance: float
    n_trials: int

    def as_dict(self) -> Dict[str, Any]:
        return {"passed": True, "max_abs_error": self.max_abs_error, "reference_scale": self.reference_scale,
                "tolerance": self.tolerance, "trials": self.n_trials, "dtype": "float64"}


class MaskedOriginal(torch.fx.Interpreter):
    """Runs the original graph with pruned channels zeroed wherever they are read."""

    def __init__(self, gm: torch.fx.GraphModule, groups: ChannelGroups, keep_unit: np.ndarray, record: bool = False,
                 output_shifts: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__(gm)
        self.groups, self.keep_unit, self.record = groups, keep_unit, record
        self.output_shifts = output_shifts or {}   # module -> added to its output (bias compensation)
        self.values: Dict[str, Any] = {}
        self._masks: Dict[bytes, torch.Tensor] = {}

    def kept_mask(self, elements: np.ndarray) -> Optional[torch.Tensor]:
        keep = self.keep_unit[self.groups.units_of(elements)]
        return None if keep.all() else torch.as_tensor(keep)

    def mask(self, value: Any, m: Any) -> Any:
        if isinstance(value, torch.Tensor) and isinstance(m, ChannelMap):
            for d in m.tracked():
                keep = self.kept_mask(m.dims[d])
                if keep is not None:
                    shape = [1] * value.ndim
                    shape[d] = -1
                    value = torch.where(keep.reshape(shape), value, torch.zeros((), dtype=value.dtype))
            return value
        if isinstance(value, (tuple, list)) and isinstance(m, tuple):
            return type(value)(self.mask(v, mm) for v, mm in zip(value, m))
        return value

    def kept_index(self, x: torch.fx.Node, dim: int) -> torch.Tensor:
        """Positions of node x's dim `dim` that survive pruning."""
        return torch.as_tensor(self.groups.kept_positions(self.groups.maps[x.name].dims[dim], self.keep_unit))

    def kept_only(self, value: Any, arg: Any) -> Any:
        """value (of the output structure `arg`) at the kept positions of its channel dims."""
        if isinstance(arg, torch.fx.Node):
            m = self.groups.maps.get(arg.name)
            if isinstance(value, torch.Tensor) and isinstance(m, ChannelMap):
                for d in m.tracked():
                    value = value.index_select(d, self.kept_index(arg, d))
            return value
        if isinstance(arg, (tuple, list)) and isinstance(value, (tuple, list)):
            items = [self.kept_only(v, a) for v, a in zip(value, arg)]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if isinstance(arg, dict) and isinstance(value, dict):
            return type(value)({k: self.kept_only(v, arg[k]) for k, v in value.items()})
        return value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_module(target, args, kwargs)
        shift = self.output_shifts.get(target)
        return out if shift is None else out + shift.to(out.dtype)

    def run_node(self, n: torch.fx.Node) -> Any:
        fact = op_fact(n)
        entry = REGISTRY.lookup(n, self.submodules) if fact is not None else None
        if entry is not None and entry.reference is not None:  # not zero-exact: the op over the kept channels
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                result = entry.reference(self, n, fact, args, kwargs)
        else:
            result = super().run_node(n)
        if n.op == "output":  # outputs that lost channels (keep_outputs=False) are compared where they keep them
            return self.kept_only(result, n.args[0])
        result = self.mask(result, self.groups.maps.get(n.name))
        if self.record:
            self.values[n.name] = result
        return result


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: Dict[str, Any] = {}

    def run_node(self, n):
        result = super().run_node(n)
        self.values[n.name] = result
        return result


def masked_model_copy(gm: torch.fx.GraphModule, groups: ChannelGroups, keep_unit: np.ndarray) -> torch.fx.GraphModule:
    """A float64 copy of the original with every parameter slice of a pruned channel zeroed."""
    masked = copy.deepcopy(gm).double()
    with torch.no_grad():
        for name, dims in groups.param_slices.items():
            tensor = get_attr(masked, name)
            for dim, elements in dims.items():
                pruned = np.nonzero(~keep_unit[groups.units_of(elements)])[0]
                if len(pruned):
                    tensor.index_fill_(dim, torch.as_tensor(pruned), 0.0)
    return masked


def verify_pruned(original: torch.fx.GraphModule, pruned: torch.fx.GraphModule, groups: ChannelGroups,
                  plan: PrunePlan, example_inputs: Tuple[Any, ...], trials: int = 1, seed: int = 0,
                  output_shifts: Optional[Dict[str, torch.Tensor]] = None) -> VerificationResult:
    """Raise VerificationError unless pruned(x) == masked_original(x) in float64 on random inputs.
    output_shifts: {module: tensor} added to those modules' outputs in the reference (bias compensation:
    the removed inputs read their calibration mean, not zero)."""
    masked = masked_model_copy(original, groups, plan.keep_unit)
    pruned64 = copy.deepcopy(pruned).double()
    generator = torch.Generator().manual_seed(seed)
    worst, scale_seen, tol_seen = 0.0, 0.0, 0.0
    # Random-init networks produce denormal float64 activations, which run up to 50x slower on CPU;
    # values below 1e-308 cannot matter at the tolerance below.
    with torch.no_grad(), _flush_denormals():
        for _ in range(trials):
            inputs = tuple(_random_like(x, generator) for x in example_inputs)
            ref = MaskedOriginal(masked, groups, plan.keep_unit, output_shifts=output_shifts).run(*inputs)
            try:
                got = pruned64(*inputs)
            except Exception:
                raise VerificationError(_localise(masked, pruned64, groups, plan, inputs, float("inf"), 0.0,
                                                  output_shifts)) from None
            err, scale = _max_error(ref, got)
            tol = 1e-7 * max(1.0, scale)
            worst, scale_seen, tol_seen = max(worst, err), max(scale_seen, scale), tol
            if not err <= tol:
                raise VerificationError(_localise(masked, pruned64, groups, plan, inputs, err, tol, output_shifts))
    return VerificationResult(worst, scale_seen, tol_seen, trials)


@contextlib.contextmanager
def _flush_denormals():
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _random_like(x: Any, generator: torch.Generator) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x


def _max_error(ref: Any, got: Any) -> Tuple[float, float]:
    refs, gots = [], []
    map_aggregate(ref, lambda t: refs.append(t) if isinstance(t, torch.Tensor) else None)
    map_aggregate(got, lambda t: gots.append(t) if isinstance(t, torch.Tensor) else None)
    if len(refs) != len(gots):
        return float("inf"), 0.0
    err, scale = 0.0, 0.0
    for r, g in zip(refs, gots):
        if r.shape != g.shape:
            return float("inf"), 0.0
        if r.numel():
            err = max(err, float((r.double() - g.double()).abs().max()))
            scale = max(scale, float(r.double().abs().max()))
    return err, scale


def _localise(masked, pruned64, groups, plan, inputs, err, tol, output_shifts=None) -> str:
    """Find the first node whose pruned value differs from the masked one at the kept positions."""
    reference = MaskedOriginal(masked, groups, plan.keep_unit, record=True, output_shifts=output_shifts)
    reference.run(*inputs)
    recorder = _Recorder(pruned64)
    try:
        recorder.run(*inputs)
    except Exception as exc:  # the pruned graph did not even run: report where
        failing = next((n for n in pruned64.graph.nodes if n.name not in recorder.values), None)
        return (f"fxprune internal error: the pruned model fails at {describe_node(failing)}: {type(exc).__name__}: "
                f"{exc}{_groups_of(groups, failing.name if failing else '')}")
    for node in masked.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node.name not in recorder.values:
            continue
        ref, got = reference.values.get(node.name), recorder.values[node.name]
        if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor):
            continue
        m = groups.maps.get(node.name)
        if isinstance(m, ChannelMap):
            for d in m.tracked():
                ref = ref.index_select(d, torch.as_tensor(groups.kept_positions(m.dims[d], plan.keep_unit)))
        if ref.shape != got.shape:
            return (f"fxprune internal error: {describe_node(node)} has shape {tuple(got.shape)} after pruning, "
                    f"expected {tuple(ref.shape)}{_groups_of(groups, node.name)}")
        ref, got = ref.double(), got.double()     # bool and integer values too
        node_err = float((ref - got).abs().max()) if ref.numel() else 0.0
        if node_err > 1e-7 * max(1.0, float(ref.abs().max()) if ref.numel() else 0.0):
            return (f"fxprune internal error: pruned model differs from the masked original (max error {err:.3g} > "
                    f"{tol:.3g}); first divergence at {describe_node(node)} (error {node_err:.3g})"
                    f"{_groups_of(groups, node.name)}")
    return f"fxprune internal error: pruned model differs from the masked original (max error {err:.3g} > {tol:.3g})"


def _groups_of(groups: ChannelGroups, node_name: str) -> str:
    ids = sorted({g.id for g in groups.groups for (n, _) in g.members if n == node_name})
    return f"; channel groups involved: {ids}" if ids else ""


# --------------------------------------------------------------------------- invariant checks
def check_graph(gm: torch.fx.GraphModule, where: str) -> None:
    try:
        gm.graph.lint()
    except Exception as exc:
        raise FxPruneError(f"graph lint failed after {where}: {exc}") from exc


def graph_fingerprint(gm: torch.fx.GraphModule) -> str:
    return gm.code


def check_groups(gm: torch.fx.GraphModule, groups: ChannelGroups) -> None:
    """Group sizes agree with weight and tensor shapes."""
    named = dict(gm.named_parameters(remove_duplicate=False))
    named.update(dict(gm.named_buffers(remove_duplicate=False)))
    for name, dims in groups.param_slices.items():
        for d, elements in dims.items():
            if named[name].shape[d] != len(elements):
                raise FxPruneError(f"invariant: {name} dim {d} has size {named[name].shape[d]}, its channel map {len(elements)}")
    for node in gm.graph.nodes:
        m, spec = groups.maps.get(node.name), value_spec(node)
        for mm, ss in zip(m if isinstance(m, tuple) else (m,), spec if isinstance(spec, tuple) else (spec,)):
            if isinstance(mm, ChannelMap) and isinstance(ss, TensorSpec):
                if mm.ndim != ss.ndim or any(e is not None and len(e) != s for e, s in zip(mm.dims, ss.shape)):
                    raise FxPruneError(f"invariant: channel map of {describe_node(node)} does not fit shape {ss.shape}")
