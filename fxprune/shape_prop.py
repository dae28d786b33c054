"""Shape propagation: every node's shape and dtype on the example inputs.

Runs the traced graph once, on the meta device where every op has a meta kernel (falling back to real
tensors otherwise), and records for every node a frozen `TensorSpec` (or a tuple of them) in
`node.meta["fxprune.value"]`. Wrong example inputs fail here, with the node that could not run.
Layers and ops whose output shape the op registry knows (`meta_shape`) are not interpreted: on meta
their kernels are Python decompositions that cost more than a conv."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.fx

from .errors import ExampleInputsError, describe_node
from .ops import REGISTRY
from .tracing import VALUE_KEY, _structural_copy, spec_of, torch_layer_type


class ShapePropagation(torch.fx.Interpreter):
    """Analysis pass: records `node.meta["fxprune.value"]`; leaves the graph unchanged."""

    failed_node: Optional[torch.fx.Node] = None

    def __init__(self, module: torch.nn.Module, graph: torch.fx.Graph, meta: bool):
        # meta values cost no memory: freeing them after their last use only costs the bookkeeping
        super().__init__(module, garbage_collect_values=not meta, graph=graph)
        self.meta = meta

    def run_node(self, n: torch.fx.Node) -> Any:
        self.failed_node = n
        result = self.known_shape(n) if self.meta and n.op in ("call_module", "call_function", "call_method") else None
        if result is None:
            result = super().run_node(n)
        n.meta[VALUE_KEY] = spec_of(result)
        return result

    def known_shape(self, n: torch.fx.Node) -> Any:
        entry = REGISTRY.lookup(n, self.submodules)
        if entry is None or entry.meta_shape is None:
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return entry.meta_shape(n, args, kwargs, self.submodules[n.target] if n.op == "call_module" else None)


def _needs_no_weights(module: torch.nn.Module) -> bool:
    """Layers whose shape rule never reads their weights (norms, activations, conv, linear): shape
    propagation gives them no meta copies."""
    entry = REGISTRY.for_module_type(type(module)) if torch_layer_type(module) is not None else None
    return entry is not None and entry.meta_shape_without_weights


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Tuple[Any, ...]) -> Any:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [p for p in placeholders if not p.args]  # a placeholder with args has a default value
    if not len(required) <= len(example_inputs) <= len(placeholders):
        raise ExampleInputsError(
            f"the model takes {len(placeholders)} input(s) ({', '.join(p.name for p in placeholders)}) but "
            f"example_inputs has {len(example_inputs)}"
        )
    try:  # shapes only: on the meta device no kernel computes anything
        with torch.no_grad():
            return ShapePropagation(_meta_weights(gm), gm.graph, meta=True).run(*[_to_meta(x) for x in example_inputs])
    except Exception:
        pass  # an op without a meta kernel, or inputs that do not fit: the real run tells which
    interpreter = ShapePropagation(gm, gm.graph, meta=False)
    try:
        with torch.no_grad():
            return interpreter.run(*example_inputs)
    except Exception as exc:
        # fx appends its own "While executing ..." text to the message; keep the first line only
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ExampleInputsError(
            f"the model failed on example_inputs at {describe_node(interpreter.failed_node)}: "
            f"{type(exc).__name__}: {first_line}\n  check the shape and dtype of example_inputs (the model takes "
            f"{len(placeholders)} input(s): {', '.join(p.name for p in placeholders)})"
        ) from None


def _to_meta(x: Any) -> Any:
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def _meta_weights(gm: torch.fx.GraphModule) -> torch.nn.Module:
    """The module tree over meta-device weights where the interpretation reads weights: modules the
    graph calls whose shape no rule knows without them (and everything inside them), and the holders of
    get_attr targets. Only those and the modules on the way to them are copied; the rest are shared,
    as the interpreter never runs them (their meta_shape answers every call)."""
    modules = dict(gm.named_modules())
    meta_modules = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and not _needs_no_weights(modules[node.target]):
            meta_modules.update(name for name, _ in modules[node.target].named_modules(prefix=node.target))
        elif node.op == "get_attr":
            meta_modules.add(node.target.rpartition(".")[0])
    on_path = {name.rsplit(".", i)[0] for name in meta_modules for i in range(name.count(".") + 1)}
    # a plain Module holding gm's attributes: copying the GraphModule itself would regenerate its code
    root = torch.nn.Module()
    root.__dict__.update(_parameters=gm._parameters, _buffers=gm._buffers, _modules=gm._modules)
    return _copy_on_path(root, "", meta_modules, on_path)


def _copy_on_path(module: torch.nn.Module, name: str, meta_modules: set, on_path: set) -> torch.nn.Module:
    new = _structural_copy(module, recurse=False)
    children = {k: (f"{name}.{k}" if name else k, v) for k, v in module._modules.items()}
    new.__dict__["_modules"] = {k: (_copy_on_path(v, child, meta_modules, on_path) if child in on_path else v)
                                for k, (child, v) in children.items()}
    if name in meta_modules:
        new.__dict__["_parameters"] = {k: (torch.nn.Parameter(_to_meta(v), v.requires_grad) if v is not None else None)
                                       for k, v in module._parameters.items()}
        new.__dict__["_buffers"] = {k: (_to_meta(v) if v is not None else None) for k, v in module._buffers.items()}
    return new
