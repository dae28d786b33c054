"""ONNX export of pruned models, the onnxruntime check, and the latency measurement's bookkeeping.
(Latency numbers themselves are measured by benchmarks/, never asserted here.)"""
import json

import numpy as np
import onnx
import pytest
import torch

import fxprune
from fxprune.export.benchmark import LatencyStats, benchmark_onnxruntime, measure_latency
from fxprune.export.onnx_export import OnnxMismatchError, compare_with_torch, export_onnx, physical_cores

torchvision = pytest.importorskip("torchvision")


def tiny_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=64, mlp_dim=128, num_classes=10).eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vit"])
def test_pruned_model_exports_and_matches_torch_in_onnxruntime(name, tmp_path):
    if name == "vit":
        model, x = tiny_vit(), torch.randn(1, 3, 32, 32)
        torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head: all logits 0
    else:
        torch.manual_seed(0)
        model, x = torchvision.models.get_model(name).eval(), torch.randn(1, 3, 64, 64)
    pruned = fxprune.compile(model, 0.5, example_inputs=(x,))
    path = export_onnx(pruned, (x,), str(tmp_path / "pruned.onnx"))
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):  # the batch dim is dynamic
        check = compare_with_torch(pruned, path, (x,), batch=batch)
        assert check.max_rel_error < 1e-4 and check.batch == batch
    # the exported graph is the pruned one: its weights are smaller than the dense export's
    dense_path = export_onnx(model, (x,), str(tmp_path / "dense.onnx"))
    assert _weight_count(proto) < _weight_count(onnx.load(dense_path))


def _weight_count(proto) -> int:
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


def test_cleanup_folds_the_shape_arithmetic(tmp_path):
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    raw = str(tmp_path / "raw.onnx")
    export_onnx(model, (x,), raw, cleanup=False)
    clean = export_onnx(model, (x,), str(tmp_path / "clean.onnx"))
    raw_nodes, clean_nodes = len(onnx.load(raw).graph.node), len(onnx.load(clean).graph.node)
    assert clean_nodes < raw_nodes
    compare_with_torch(model, clean, (x,))


def test_a_wrong_export_fails_loudly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 4))
    x = torch.randn(1, 3, 8, 8)
    path = export_onnx(model, (x,), str(tmp_path / "m.onnx"))
    with torch.no_grad():
        model[3].weight.mul_(1.01)  # torch now computes something else than the file
    with pytest.raises(OnnxMismatchError, match="relative"):
        compare_with_torch(model, path, (x,))


def test_latency_stats_and_interleaved_measurement(tmp_path):
    stats = LatencyStats.of([0.001, 0.002, 0.003, 0.004, 0.100])
    assert stats.median_ms == pytest.approx(3.0) and stats.max_ms == pytest.approx(100.0) and stats.runs == 5
    assert stats.p25_ms <= stats.median_ms <= stats.p75_ms

    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    large = torch.nn.Sequential(torch.nn.Conv2d(3, 256, 3), torch.nn.ReLU(), torch.nn.Conv2d(256, 256, 3))
    x = torch.randn(1, 3, 32, 32)
    files = {n: export_onnx(m, (x,), str(tmp_path / f"{n}.onnx")) for n, m in (("small", small), ("large", large))}
    result = measure_latency(files, [[1, 3, 32, 32]], batch_sizes=(1, 2), threads=1, warmup=1, runs=5)
    assert set(result) == {"small", "large"}
    for name in result:
        assert set(result[name]) == {1, 2} and all(s.runs == 5 for s in result[name].values())
    # 4 vs ~600 MFLOPs: the ordering is far outside any timing noise
    assert result["small"][2].median_ms < result["large"][2].median_ms


def test_benchmark_table_json_and_plot(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.compile(model, 0.5, example_inputs=(x,), verify=False)
    result = benchmark_onnxruntime({"dense": model, "pruned": pruned}, (x,), name="resnet18", batch_sizes=(1,),
                                   threads=1, warmup=1, runs=3, onnx_dir=str(tmp_path))
    assert (tmp_path / "dense.onnx").exists() and (tmp_path / "pruned.onnx").exists()
    table = result.table()
    assert "dense" in table and "pruned" in table and "b1 speed-up" in table
    result.write_json(str(tmp_path / "bench.json"))
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["pruned"]["flops"] == pruned.meta["fxprune"]["flops"]["after"]
    assert rows["dense"]["flops"] == pruned.meta["fxprune"]["flops"]["before"]  # cost_of == compile's count
    assert rows["pruned"]["onnx_bytes"] < rows["dense"]["onnx_bytes"]
    assert rows["pruned"]["onnxruntime_check"]["max_rel_error"] < 1e-4
    assert rows["dense"]["speedup"]["1"] == 1.0
    pytest.importorskip("matplotlib")
    result.plot(str(tmp_path / "speedup.png"))
    assert (tmp_path / "speedup.png").stat().st_size > 5000


def test_physical_cores_is_positive():
    assert 1 <= physical_cores() <= (torch.get_num_threads() + 256)


def test_export_leaves_every_layer_in_its_own_mode(tmp_path):
    """A model whose wrapper is in train mode but whose layers are in eval mode (a GraphModule built
    from eval layers) keeps them so: restoring with train(True) would switch BatchNorm to batch
    statistics."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    model.training = True
    export_onnx(model, (torch.randn(1, 3, 8, 8),), str(tmp_path / "m.onnx"))
    assert model.training and not model[1].training


class _PositionsFromArange(torch.nn.Module):
    """Computes, from no input at all, a value through an op the ONNX exporter cannot translate
    (torch.diff, as Hugging Face's packed-sequence mask does), then uses it with the input."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)

    def forward(self, x):
        positions = torch.arange(x.shape[-1] + 1, dtype=torch.float32) * 0 + torch.arange(7.0) ** 2
        batch_sized = torch.arange(x.shape[0], dtype=torch.float32)[:, None]    # must stay dynamic
        return self.proj(x) + torch.diff(positions)[:6] + batch_sized


def test_values_computed_from_no_input_are_folded_before_export(tmp_path):
    x = torch.randn(1, 6)
    gm = fxprune.compile(_PositionsFromArange().eval(), 1.0, example_inputs=(x,), verify=False)
    before = dict(gm.named_buffers())
    path = export_onnx(gm, (x,), str(tmp_path / "m.onnx"))
    assert dict(gm.named_buffers()).keys() == before.keys()     # the caller's module is untouched
    assert "Diff" not in {n.op_type for n in onnx.load(path).graph.node}
    assert compare_with_torch(gm, path, (x,), batch=3).max_rel_error < 1e-5   # another batch size


class _TracedAtOneBatch(torch.nn.Module):
    """Indexes a batch-1 table with arange(batch), as Hugging Face's mask code does: the graph runs only
    at the batch it was traced with."""

    def forward(self, x):
        return x + torch.ones(1, 6)[torch.arange(x.shape[0])]


def test_a_graph_that_runs_at_one_batch_exports_with_that_batch_fixed(tmp_path, caplog):
    x = torch.randn(1, 6)
    gm = fxprune.compile(_TracedAtOneBatch(), 1.0, example_inputs=(x,), verify=False)
    path = export_onnx(gm, (x,), str(tmp_path / "m.onnx"))
    assert "fixed batch" in caplog.text
    assert onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert compare_with_torch(gm, path, (x,)).batch == 1
