"""Capture of forwards plain torch.fx cannot trace: Python control flow on shapes resolved on the
example inputs (concrete_tracer.py), keyword example inputs, decorated forwards, options that are
not tensors. Each pruned model must still equal the masked original, and the batch size stays free."""
import collections
import functools
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

X = torch.randn(2, 3, 13, 13)


class ShapeControlFlow(nn.Module):
    """timm's "same" padding, input checks, len() and int(sqrt(N)) on token counts, a loop over dims,
    torch.ones with sizes read from the input, finfo of the input's dtype."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        height, width = x.shape[-2:]
        if height % 2 == 1:  # pad odd inputs to even
            x = F.pad(x, (0, 1, 0, 1))
        assert x.shape[1] == 3, "expects RGB"
        x = self.conv1(x)
        side = int(math.sqrt(x.shape[-1] * x.shape[-2]))
        for _ in range(len(x.shape) - 4):
            x = x * 2
        x = self.conv2(x).relu()
        b = x.shape[0]
        mask = torch.ones(b, 1, side, side, dtype=x.dtype) * torch.finfo(x.dtype).eps
        x = (x + mask).reshape(b, x.shape[1], side * side).mean(-1)
        return self.fc(x)


def test_shape_control_flow_resolves_on_the_example_and_keeps_the_batch_free():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(ShapeControlFlow())  # what plain fx says
    model = ShapeControlFlow().eval()
    groups = {g.name: g for g in fxprune.analyze(model, (X,)).groups}
    assert groups["conv1"].prunable and groups["conv2"].prunable
    pruned = fxprune.compile(model, 0.5, example_inputs=(X,), round_to=1)
    assert pruned.meta["fxprune"]["verification"]["passed"]
    assert pruned(torch.randn(5, 3, 13, 13)).shape == (5, 10)  # the batch size was not fixed


class BranchOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[1] == 8 and y.mean() > 0:  # the second test reads tensor data
            y = y * 2
        return y


def test_branch_on_tensor_data_is_refused_at_the_users_line():
    with pytest.raises(fxprune.UnsupportedModelError) as info:
        fxprune.compile(BranchOnData().eval(), 0.5, example_inputs=(X,))
    message = str(info.value)
    assert "test_capture.py" in message and "y.mean() > 0" in message and "tensor values" in message


def _decorated(forward):
    """A decorator that takes *args, **kwargs, as Hugging Face wraps its forwards."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        kwargs.setdefault("scale", 1.0)
        return forward(self, *args, **kwargs)
    return wrapper


class KeywordModel(nn.Module):
    """A forward with many optional keyword parameters, an option that is not a tensor, and a
    decorator: the graph takes exactly the example's tensors, under their names."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(20, 16), nn.Linear(16, 32), nn.Linear(32, 4)

    @_decorated
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=True, scale=None,
                return_dict=None):
        if use_cache:
            raise RuntimeError("a cache cannot be traced")
        x = self.embed(input_ids) * scale
        if attention_mask is not None:
            x = x * attention_mask[..., None]
        out = self.head(F.gelu(self.mix(x))).mean(1)
        return {"logits": out} if return_dict is not False else (out,)


def test_keyword_example_inputs_and_decorated_forward():
    ids, mask = torch.randint(0, 20, (2, 6)), torch.ones(2, 6)
    model = KeywordModel().eval()
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    pruned = fxprune.compile(model, 0.7, example_inputs=inputs, round_to=1)
    assert pruned.meta["fxprune"]["verification"]["passed"]
    assert [n.target for n in pruned.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    expected = model(input_ids=ids, attention_mask=mask, use_cache=False)["logits"]
    assert pruned(input_ids=ids, attention_mask=mask)["logits"].shape == expected.shape
    with pytest.raises(fxprune.ExampleInputsError, match="names"):
        fxprune.compile(model, 0.7, example_inputs={0: ids})


class _GlobalGate(nn.Module):
    """A function a library wrapped in a module object at import time (as transformers' hub kernels do
    with apply_rotary_pos_emb): called by the forward, held by no module of the model."""

    def forward(self, x, gate):
        return x * torch.sigmoid(gate)


GLOBAL_GATE = _GlobalGate()
GLOBAL_LINEAR = nn.Linear(8, 8)


class CallsAnUnheldModule(nn.Module):
    def __init__(self, unheld):
        super().__init__()
        self.unheld = [unheld]   # a list: not registered as a submodule
        self.up = nn.Linear(8, 16)
        self.gate = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.unheld[0](self.up(x), self.gate(x)) if self.unheld[0] is GLOBAL_GATE
                         else self.up(self.unheld[0](x)))


def test_a_module_the_model_does_not_hold_is_traced_through_and_its_channels_prune():
    model = CallsAnUnheldModule(GLOBAL_GATE).eval()
    x = torch.randn(2, 8)
    pruned = fxprune.compile(model, 0.5, example_inputs=(x,), round_to=1)
    assert pruned.meta["fxprune"]["verification"]["passed"]
    assert pruned.down.in_features < 16    # the gated product is understood, not frozen as an opaque call


def test_an_unheld_module_with_weights_is_refused_by_name():
    model = CallsAnUnheldModule(GLOBAL_LINEAR).eval()
    with pytest.raises(fxprune.UnsupportedModelError, match="Linear that is not a submodule"):
        fxprune.compile(model, 0.5, example_inputs=(torch.randn(2, 8),))


class CachesInForward(nn.Module):
    """LeViT's pattern: a value computed in forward is cached in a dict the module holds (per device)."""

    def __init__(self, shape_branch: bool):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3), nn.Linear(16, 10)
        self.scale = nn.Parameter(torch.ones(16))
        self.cache, self.seen, self.shape_branch = {}, [], shape_branch

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.scale.view(1, -1, 1, 1)
        self.seen.append(key)
        y = self.conv(x) * self.cache[key]
        if self.shape_branch and y.shape[-1] > 1:   # needs the trace with values
            y = y.relu()
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("shape_branch", [False, True])
def test_tracing_leaves_the_containers_of_the_users_modules_alone(shape_branch):
    model = CachesInForward(shape_branch).eval()
    pruned = fxprune.compile(model, 0.5, example_inputs=(X,), round_to=1)
    assert model.cache == {} and model.seen == []          # no proxy (or value) left in the user's model
    assert pruned.meta["fxprune"]["verification"]["passed"]
    assert model(X).shape == (2, 10) and list(model.cache) == ["cpu"]


class ReadsBuffersAndWeights(nn.Module):
    """Tensors read by the forward itself (get_attr nodes): a non-persistent buffer (Hugging Face's
    position_ids, rotary inv_freq), a persistent one, and the weight of a layer that is also called."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
        self.head = nn.Linear(16, 10)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)
        self.register_buffer("shift", torch.tensor(0.5))

    def forward(self, x):
        y = self.block(x) * self.scale + self.shift
        return self.head(y.mean((2, 3))) + self.head.weight.sum(1)    # head: a module and a get_attr


def test_graph_modules_hold_what_fx_would_put_there_and_keep_buffers_non_persistent():
    """graph_module builds what torch.fx.GraphModule(attributes, graph) builds, and the traced and pruned
    modules keep the user's state_dict keys: a non-persistent buffer stays out of them."""
    from fxprune.tracing import _attributes_used, graph_module, private_eval_copy, trace_model
    model = ReadsBuffersAndWeights().eval()
    traced = trace_model(private_eval_copy(model))
    attributes, non_persistent = _attributes_used(traced, traced.graph)
    assert set(attributes) == {"block.0", "block.1", "scale", "shift", "head", "head.weight"}
    assert non_persistent == {"scale"}
    ours = graph_module(traced.graph, attributes, "Traced", non_persistent)
    theirs = torch.fx.GraphModule(attributes, traced.graph, "Traced")
    layers = [[(n, type(m).__name__, m.training) for n, m in gm.named_modules()] for gm in (ours, theirs)]
    assert layers[0] == layers[1] and len(layers[0]) == 5     # the root, block, block.0, block.1, head
    assert all(ours.get_submodule(name) is attributes[name] for name in ("block.0", "block.1", "head"))
    for table in ("named_parameters", "named_buffers"):
        assert [(n, id(t)) for n, t in getattr(ours, table)()] == [(n, id(t)) for n, t in getattr(theirs, table)()]
    assert set(theirs.state_dict()) - set(ours.state_dict()) == {"scale"}   # fx makes every buffer persistent
    assert set(traced.state_dict()) == set(model.state_dict())
    assert torch.equal(ours(X), model(X))

    pruned = fxprune.compile(model, 0.5, example_inputs=(X,), round_to=1)
    assert pruned.meta["fxprune"]["verification"]["passed"]
    assert set(pruned.state_dict()) == set(model.state_dict()) and "scale" in dict(pruned.named_buffers())
    assert pruned.get_submodule("block.0").out_channels < 16


class NestedBlocks(nn.Module):
    """Functions called inside nested modules, a module called twice: nodes with deep module stacks."""

    def __init__(self, shape_branch: bool):
        super().__init__()
        self.shape_branch = shape_branch
        self.stem = nn.Conv2d(3, 8, 3)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        if self.shape_branch and x.shape[-1] > 1:     # needs the trace with values
            x = x * 2
        x = self.blocks(x) + self.blocks[0](x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("shape_branch", [False, True])
def test_traces_record_the_module_stacks_and_scopes_fx_records(shape_branch):
    """Both of fxprune's tracers copy fx's module stack and scope their own way (for speed): every node
    must get what torch.fx.Tracer gives it, as the same types, and no copy may be shared between nodes."""
    from fxprune.tracing import _Tracer, private_eval_copy, trace_model
    ours = trace_model(private_eval_copy(NestedBlocks(shape_branch).eval()), example_inputs=(X,))
    tracer = torch.fx.Tracer()
    theirs = tracer.trace(NestedBlocks(False).eval())
    expected = {n.name: n.meta.get("nn_module_stack") for n in theirs.nodes}
    stacks = {n.name: n.meta.get("nn_module_stack") for n in ours.graph.nodes if n.name in expected}
    assert len(stacks) == len(expected) and stacks == expected
    assert {type(s) for s in stacks.values()} == {type(s) for s in expected.values()} == {collections.OrderedDict,
                                                                                             type(None)}
    assert max(len(s or ()) for s in stacks.values()) == 3          # blocks, blocks.0 and blocks.0.0
    held = [id(s) for s in stacks.values() if s is not None]
    assert len(held) == len(set(held)) > 5
    ours_tracer = _Tracer()                                           # the scope each node was recorded in
    ours_tracer.trace(NestedBlocks(False).eval())
    assert ours_tracer.node_name_to_scope == tracer.node_name_to_scope
    assert ours_tracer.scope.module_path == "" and ours_tracer.scope.module_type is None


def _structure(graph: torch.fx.Graph) -> list:
    """Every node as what it does and how it is wired: op, target, arguments (nodes by name), users and
    inputs in the order fx records them."""
    return [(n.op, str(n.target), repr(n.args), repr(n.kwargs), type(n.args), type(n.kwargs),
             [u.name for u in n.users], [i.name for i in n.all_input_nodes]) for n in graph.nodes]


def _copied_by_fx(graph: torch.fx.Graph) -> torch.fx.Graph:
    """graph, node by node through fx's node_copy: every node made with its arguments, as fx makes them."""
    copied, env = torch.fx.Graph(), {}
    for node in graph.nodes:
        env[node] = copied.node_copy(node, env.__getitem__)
    return copied


@pytest.mark.parametrize("shape_branch", [False, True])
def test_traced_and_rewritten_graphs_are_wired_as_fx_wires_them(shape_branch):
    """Both tracers and the rewrite create each node first and assign its arguments after (skipping fx's
    scan for raw SymInts): the graphs must be the ones fx's own creation gives, users and inputs included."""
    from fxprune.tracing import private_eval_copy, trace_model
    ours = trace_model(private_eval_copy(NestedBlocks(shape_branch).eval()), example_inputs=(X,))
    assert _structure(ours.graph) == _structure(_copied_by_fx(ours.graph))
    if not shape_branch:
        assert _structure(ours.graph) == _structure(torch.fx.Tracer().trace(NestedBlocks(False).eval()))
    pruned = fxprune.compile(NestedBlocks(shape_branch).eval(), 1.0, example_inputs=(X,), round_to=1)
    assert _structure(pruned.graph) == _structure(_copied_by_fx(pruned.graph)) == _structure(ours.graph)


class Unpacks(nn.Module):
    """Unpacking proxies: a leaf's tuple output, a shape, nested unpacking, and a loop over a shape."""

    def __init__(self, shape_branch: bool):
        super().__init__()
        self.shape_branch = shape_branch
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        b, n, c = x.shape
        y, _ = self.attention(x, x, x, need_weights=False)
        (first, second), rest = x.split([1, 1, n - 2], 1)[:2], x.shape[-1]
        if self.shape_branch:
            for size in x.shape:                  # iteration that is not an unpacking: needs the values
                y = y + size
        return self.proj(y).reshape(b, n * c) + (first + second).sum() * rest


@pytest.mark.parametrize("shape_branch", [False, True])
def test_tracers_unpack_proxies_as_fx_does(shape_branch):
    """Both tracers unpack a proxy by reading the caller's bytecode once per function (fx disassembles it at
    every unpacking): the graph must be fx's, the counts right, and a plain iteration still go to the tracer."""
    from fxprune.tracing import private_eval_copy, trace_model
    x = torch.randn(2, 5, 8)
    model = Unpacks(shape_branch).eval()
    ours = trace_model(private_eval_copy(model), example_inputs=(x,))
    if not shape_branch:
        assert _structure(ours.graph) == _structure(torch.fx.Tracer().trace(Unpacks(False).eval()))
        with pytest.raises(torch.fx.proxy.TraceError, match="cannot be iterated"):
            torch.fx.symbolic_trace(Unpacks(True).eval())   # what plain fx says of the loop
    assert sum(n.target is operator.getitem for n in ours.graph.nodes) >= 5
    with torch.no_grad():
        assert torch.equal(ours(x), model(x))


def _containers(module: nn.Module) -> dict:
    return {name: id(value) for name, value in vars(module).items() if isinstance(value, (dict, list, set))}


def test_hooks_and_buffers_registered_on_the_pruned_model_or_during_compile_never_reach_the_users_model():
    """Every layer of the private copy the passes register their calibration hooks on, and of the pruned
    model, resized or not, owns its hook tables and buffer names."""
    from fxprune.tracing import private_eval_copy
    model = ReadsBuffersAndWeights().eval()
    user_layers = dict(model.named_modules())
    for name, layer in private_eval_copy(model).named_modules():
        assert not set(_containers(layer).values()) & set(_containers(user_layers[name]).values()), name
    data = [torch.randn(2, 3, 13, 13) for _ in range(2)]
    pruned = fxprune.compile(model, 0.5, example_inputs=(X,), importance="wanda", data=data, round_to=1)
    assert pruned.meta["fxprune"]["verification"]["passed"]
    for name, pruned_layer in pruned.named_modules():
        if name in user_layers:
            assert not set(_containers(pruned_layer).values()) & set(_containers(user_layers[name]).values()), name
    pruned.get_submodule("block.0").register_forward_hook(lambda *args: None)   # resized
    pruned.get_submodule("block.1").register_forward_pre_hook(lambda *args: None)   # copied as is
    pruned.get_submodule("head").register_buffer("extra", torch.zeros(1), persistent=False)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.modules())
    assert "extra" not in model.head._buffers and not model.head._non_persistent_buffers_set


SEEN_WHILE_TRACED = []


class _Probe(nn.Module):
    """Records, while traced, whether fx's call and attribute hooks sit on nn.Module itself."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        from torch.fx import _symbolic_trace
        SEEN_WHILE_TRACED.append((torch.nn.Module.__call__ is not _symbolic_trace._orig_module_call,
                                  torch.nn.Module.__getattr__ is not _symbolic_trace._orig_module_getattr))
        return x * self.scale.view(1, -1, 1, 1)


class _Aliases(nn.Linear):
    """A class with a __getattr__ of its own (an alias for its weight)."""

    def __getattr__(self, name):
        return super().__getattr__("weight" if name == "kernel" else name)


class _CallsSuper(nn.Conv2d):
    """A class with a __call__ of its own that goes through nn.Module's."""

    def __call__(self, x):
        return super().__call__(x) * 2


class HookedModules(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.stem, self.probe = _CallsSuper(3, 8, 3) if variant == "own_call" else nn.Conv2d(3, 8, 3), _Probe()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(2)])
        self.head = _Aliases(8, 10) if variant == "own_getattr" else nn.Linear(8, 10)
        if variant == "bare_module":
            self.holder = nn.Module()
            self.holder.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        x = self.probe(self.stem(x))
        x = self.blocks(x) + self.blocks[0](x)
        y = self.head(x.mean((2, 3)))
        if isinstance(self.head, _Aliases):
            y = y + self.head.kernel.sum()
        return y + self.holder.bias if hasattr(self, "holder") else y


@pytest.mark.parametrize("variant", ["plain", "own_getattr", "own_call", "bare_module"])
def test_trace_hooks_leave_no_trace_and_give_fxs_graph(variant):
    """The tracers put fx's call and attribute hooks where assigning them updates no type slot (nn.Module's
    _call_impl, the model's own classes) unless a class of the model defines __getattr__ itself or the model
    holds a bare nn.Module: the graph must be fx's either way, and every hook gone after the trace."""
    from torch.fx import _symbolic_trace
    from fxprune.tracing import private_eval_copy, trace_model
    module_dict = dict(vars(torch.nn.Module))
    model = HookedModules(variant).eval()
    SEEN_WHILE_TRACED.clear()
    ours = trace_model(private_eval_copy(model), example_inputs=(X,))
    on_module = SEEN_WHILE_TRACED[0]
    assert on_module == (False, variant in ("own_getattr", "bare_module")), on_module
    assert _structure(ours.graph) == _structure(torch.fx.Tracer().trace(HookedModules(variant).eval()))
    assert dict(vars(torch.nn.Module)) == module_dict and _symbolic_trace._Patcher.__name__ == "_Patcher"
    assert not any("__getattr__" in vars(type(m)) for m in model.modules() if type(m) not in (_Aliases, nn.Module))
    with torch.no_grad():
        assert torch.equal(ours(X), model(X))
    pruned = fxprune.compile(model, 0.6, example_inputs=(X,), round_to=1)
    assert pruned.meta["fxprune"]["verification"]["passed"]
