"""Budget(latency=...): per-layer tables, their interpolation, the allocation against them, the
measured closed loop, and the onnxruntime target's disk cache.

A synthetic target stands in for a machine where exact numbers are needed: a conv or linear layer
costs its multiply-accumulates with both widths rounded up to blocks of 8 (a blocked kernel), and a
whole model costs the sum over its layers plus work the tables do not see (a fixed overhead), so the
tables alone mispredict and the closed loop has something to correct."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import BudgetError, ConfigError
from fxprune.latency import LatencyTable, LayerSpec, TableInterpolator, width_grid


def blocked(width: int) -> int:
    return 8 * math.ceil(width / 8)


def layer_cost(spec: LayerSpec, in_width: int, out_width: int, batch: int) -> float:
    if spec.op == "conv":
        spatial = math.prod(spec.input_shape[2:]) / math.prod(spec.stride)
        per_out = 1 if spec.depthwise else blocked(in_width)
        return 1e-9 * batch * spatial * blocked(out_width) * per_out * math.prod(spec.kernel)
    tokens = math.prod(spec.input_shape[1:-1]) if len(spec.input_shape) > 2 else 1
    return 1e-9 * batch * tokens * blocked(in_width) * blocked(out_width)


class SyntheticTarget:
    key = "synthetic-blocked-8"
    cost = staticmethod(layer_cost)

    def __init__(self, overhead: float = 0.25, batch_size: int = 1):
        self.overhead, self.batch_size = overhead, batch_size
        self.layer_calls, self.model_calls = [], 0

    def layer_seconds(self, spec, widths):
        self.layer_calls.append(spec)
        return [self.cost(spec, i, o, self.batch_size) for i, o in widths]

    def model_seconds(self, models, inputs):
        self.model_calls += 1
        return {name: self.layers_of(model, inputs) * (1 + self.overhead) if name == "dense" else
                self.layers_of(model, inputs) + self.overhead * self.layers_of(models["dense"], inputs)
                for name, model in models.items()}

    def layers_of(self, model, inputs) -> float:
        total, hooks = [0.0], []

        def hook(module, args, out):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                depthwise = module.groups > 1
                spec = LayerSpec("conv", tuple(x.shape), module.out_channels, module.kernel_size, module.stride,
                                 module.padding, module.dilation, depthwise)
                total[0] += self.cost(spec, x.shape[1], module.out_channels, self.batch_size)
            else:
                spec = LayerSpec("linear", tuple(x.shape), module.out_features)
                total[0] += self.cost(spec, x.shape[-1], module.out_features, self.batch_size)

        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hooks.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(*inputs)
        for h in hooks:
            h.remove()
        return total[0]


class WideNet(nn.Module):
    """Layers 64-128 wide (widths move in steps of 8), a residual pair, a depthwise conv, repeated
    layer shapes (which share a table) and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(64, 128, 1), nn.BatchNorm2d(128), nn.ReLU(),
                                                  nn.Conv2d(128, 128, 3, padding=1, groups=128), nn.ReLU(),
                                                  nn.Conv2d(128, 64, 1), nn.BatchNorm2d(64)) for _ in range(2))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


def example():
    return (torch.randn(1, 3, 16, 16),)


def test_width_grid_is_aligned_and_ends_at_full_width():
    assert width_grid(256) == [32, 64, 128, 192, 256]
    assert width_grid(128) == [16, 32, 48, 64, 80, 96, 112, 128]   # at most 8 auto widths: all of them
    assert width_grid(16) == [2, 4, 6, 8, 10, 12, 14, 16]   # narrow: every round_to="auto" width
    assert all(w % 8 == 0 for w in width_grid(200)) and width_grid(200)[-1] == 200


def test_bilinear_interpolation_is_exact_for_a_cost_in_times_out():
    spec = LayerSpec("linear", (1, 64), 96)
    ins, outs = width_grid(64), width_grid(96)
    table = LatencyTable(spec, ins, outs, np.array([[i * o for o in outs] for i in ins], dtype=float))
    interpolate = TableInterpolator([table, table])
    x_in, x_out = np.array([40.0, 64.0]), np.array([20.0, 96.0])
    assert interpolate(x_in, x_out) == pytest.approx(40 * 20 + 64 * 96)


def test_latency_budget_meets_the_measured_ratio_and_reports_every_round():
    target = SyntheticTarget(overhead=0.25)
    model = WideNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.compile(model, fxprune.Budget(latency=0.5, target=target), example_inputs=example())
    report = pruned.meta["fxprune"]["latency"]
    # the tables alone miss the overhead: the first round lands off, the refit corrects it (to what
    # the granularity of this small net allows: steps of 8 channels)
    assert report["rounds"][0]["measured_ratio"] > 0.55
    assert 2 <= len(report["rounds"]) <= 4
    assert 0.47 <= report["measured_ratio"] <= 0.5 * 1.025, report["rounds"]
    assert report["refitted_ratio"] == pytest.approx(report["measured_ratio"], abs=0.005)
    assert report["slope"] == pytest.approx(0.8, abs=0.05)   # 1 / (1 + overhead) of the latency follows the tables
    # the same measurement from outside, and the model computes what the masked original does
    measured = target.model_seconds({"dense": model, "pruned": pruned}, example())
    assert measured["pruned"] / measured["dense"] == pytest.approx(report["measured_ratio"], rel=1e-9)
    assert pruned.meta["fxprune"]["verification"]["passed"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_layers_of_one_shape_share_a_table():
    target = SyntheticTarget()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxprune.compile(WideNet().eval(), fxprune.Budget(latency=0.6, target=target), example_inputs=example(),
                        verify=False)
    # stem, expand, depthwise, project, head: the two blocks' layers are timed once
    assert len(target.layer_calls) == len(set(target.layer_calls)) == 5


def test_latency_and_flops_budgets_hold_together():
    target = SyntheticTarget(overhead=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.compile(WideNet().eval(), fxprune.Budget(latency=0.8, flops=0.4, target=target),
                                 example_inputs=example(), verify=False)
    report = pruned.meta["fxprune"]
    assert report["flops"]["ratio"] <= 0.4 + 1e-9
    assert report["latency"]["measured_ratio"] <= 0.8


def test_latency_budget_errors_say_what_to_pass():
    with pytest.raises(BudgetError, match="target="):
        fxprune.Budget(latency=0.5)
    with pytest.raises(BudgetError, match="layer_seconds"):
        fxprune.Budget(latency=0.5, target=object())
    with pytest.raises(ConfigError, match="latency budget"):
        fxprune.compile(WideNet().eval(), fxprune.Budget(latency=0.5, target=SyntheticTarget()),
                        example_inputs=example(), allocation=fxprune.SpaceSearch(evaluator=lambda m: 0.0))


def test_onnxruntime_tables_are_cached_on_disk(tmp_path):
    pytest.importorskip("onnxruntime")
    from fxprune.export.latency_target import OnnxRuntimeTarget
    spec = LayerSpec("conv", (1, 16, 8, 8), 16, (3, 3), (1, 1), (1, 1), (1, 1))
    widths = [(8, 8), (16, 16)]
    first = OnnxRuntimeTarget(threads=1, layer_runs=3, cache_dir=str(tmp_path))
    seconds = first.layer_seconds(spec, widths)
    assert first.measured == 2 and all(s > 0 for s in seconds)
    again = OnnxRuntimeTarget(threads=1, layer_runs=3, cache_dir=str(tmp_path))
    assert again.layer_seconds(spec, widths) == seconds and again.measured == 0 and again.cached == 2
    other_batch = OnnxRuntimeTarget(batch_size=4, threads=1, layer_runs=3, cache_dir=str(tmp_path))
    assert other_batch.key != first.key
    other_batch.layer_seconds(spec, widths[:1])
    assert other_batch.measured == 1


def test_onnxruntime_target_times_a_real_compile(tmp_path):
    pytest.importorskip("onnxruntime")
    from fxprune.export.latency_target import OnnxRuntimeTarget
    target = OnnxRuntimeTarget(threads=1, layer_runs=3, model_runs=5, cache_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.compile(WideNet().eval(), fxprune.Budget(latency=0.5, target=target),
                                 example_inputs=example(), verify=False)
    report = pruned.meta["fxprune"]
    latency = report["latency"]
    assert report["budget"]["latency"] == 0.5 and report["budget"]["target"] == target.key
    assert 1 <= len(latency["rounds"]) <= 4 and latency["layers"] == 8 and latency["tables"] == 5
    assert all(r["dense_ms"] > 0 and r["pruned_ms"] > 0 for r in latency["rounds"])
    assert target.measured > 0


def test_torch_target_times_layers_and_models_and_caches_its_tables(tmp_path):
    from fxprune.export.latency_target import TorchTarget
    target = TorchTarget("cpu", batch_size=2, layer_runs=3, model_runs=2, model_rounds=3, cache_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a loose budget: on a busy CPU small layers are dominated by per-call overhead
        pruned = fxprune.compile(WideNet().eval(), fxprune.Budget(latency=0.95, target=target),
                                 example_inputs=(torch.randn(1, 3, 32, 32),), verify=False)
    latency = pruned.meta["fxprune"]["latency"]
    assert latency["target"] == target.key and "torch" in target.key and "batch2" in target.key
    assert all(r["dense_ms"] > 0 and r["pruned_ms"] > 0 for r in latency["rounds"])
    assert target.measured > 0
    again = TorchTarget("cpu", batch_size=2, layer_runs=3, cache_dir=str(tmp_path))
    spec = LayerSpec("conv", (1, 16, 8, 8), 16, (3, 3), (1, 1), (1, 1), (1, 1))
    fresh = again.layer_seconds(spec, [(8, 8)])
    assert again.measured == 1 and again.layer_seconds(spec, [(8, 8)]) == fresh and again.cached == 1


def test_torch_target_refuses_cuda_without_a_gpu():
    from fxprune.export.latency_target import TorchTarget
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        TorchTarget("cuda")


class TinyAttention(nn.Module):
    """Heads whose attention matmuls (no weights, no table) cost as much as the projections."""

    def __init__(self, dim=64, heads=8):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 10)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.head(self.proj(y).mean(1))


def test_ops_without_a_table_are_priced_at_the_tables_seconds_per_flop():
    target = SyntheticTarget(overhead=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.compile(TinyAttention().eval(), fxprune.Budget(latency=0.6, target=target),
                                 example_inputs=(torch.randn(1, 128, 64),), verify=False)
    latency = pruned.meta["fxprune"]["latency"]
    # 128 tokens: q.k^T and .v cost 2 x 128 x 128 x 64 MACs against the projections' 128 x 64 x 256
    assert latency["untimed_share"] == pytest.approx(2 * 128 / (2 * 128 + 256 + 10 / 128 * 64 / 64), rel=0.1)
    assert latency["tables"] == 3


def test_a_whole_model_measurement_is_the_median_over_fresh_sessions(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from fxprune.export import benchmark
    from fxprune.export.benchmark import LatencyStats
    from fxprune.export.latency_target import OnnxRuntimeTarget
    session_ms = iter([10.0, 30.0, 11.0])      # one session an outlier: the median ignores it
    calls = []

    def fake_measure(files, shapes, *, batch_sizes, max_seconds, min_seconds, **_):
        calls.append((max_seconds, min_seconds))
        ms = next(session_ms)
        return {name: {batch_sizes[0]: LatencyStats.of([ms / 1e3])} for name in files}

    monkeypatch.setattr(benchmark, "measure_latency", fake_measure)
    target = OnnxRuntimeTarget(threads=1, model_min_seconds=6.0, model_max_seconds=30.0, cache_dir=str(tmp_path))
    seconds = target.model_seconds({"dense": WideNet().eval()}, example())
    assert seconds["dense"] == pytest.approx(0.011) and calls == [(10.0, 2.0)] * 3
    with pytest.raises(ValueError, match="model_sessions"):
        OnnxRuntimeTarget(model_sessions=0)


def off_block_cost(spec: LayerSpec, in_width: int, out_width: int, batch: int) -> float:
    """layer_cost, where a width off the 8-channel blocking falls back to a slower kernel (1.6x)."""
    def penalty(width: int) -> float:
        return 1.0 if width % 8 == 0 else 1.6
    return layer_cost(spec, in_width, out_width, batch) * penalty(in_width) * penalty(out_width)


class OffBlockTarget(SyntheticTarget):
    """Narrow layers as onnxruntime runs them: 10 channels can cost more than 16."""
    key = "synthetic-off-block"
    cost = staticmethod(off_block_cost)


class NarrowNet(nn.Module):
    """ResNet-20's shape in small: 16 then 32 channels, residual pairs."""

    def __init__(self):
        super().__init__()
        def pair(c):
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                 nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage1 = nn.ModuleList([pair(16), pair(16)])
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.stage2 = nn.ModuleList([pair(32), pair(32)])
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.stage1:
            x = torch.relu(x + block(x))
        x = self.down(x)
        for block in self.stage2:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


def test_a_latency_budget_keeps_more_flops_than_any_flops_budget_of_no_more_latency():
    # Latency is not monotone along the removal order here (10 channels cost more than 16). The
    # allocation must still find the plan a FLOPs budget would give at that latency and spend what is
    # left of the budget: never keep fewer FLOPs than a FLOPs-budget result of no more latency.
    target = OffBlockTarget(overhead=0.0)
    model = NarrowNet().eval()
    x = (torch.randn(1, 3, 16, 16),)

    def latency(pruned):
        seconds = target.model_seconds({"dense": model, "pruned": pruned}, x)
        return seconds["pruned"] / seconds["dense"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_latency = fxprune.compile(model, fxprune.Budget(latency=0.5, target=target), example_inputs=x, verify=False)
        by_flops = [fxprune.compile(model, f, example_inputs=x, verify=False) for f in np.arange(0.05, 0.62, 0.05)]
    reached = latency(by_latency)
    assert reached <= 0.5 * 1.02
    rivals = [p.meta["fxprune"]["flops"]["ratio"] for p in by_flops if latency(p) <= reached]
    assert rivals, "no FLOPs budget of the grid reaches the latency result's latency"
    assert by_latency.meta["fxprune"]["flops"]["ratio"] >= max(rivals) - 1e-9, (reached, rivals)
