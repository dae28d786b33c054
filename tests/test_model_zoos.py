"""Real models from the zoos users bring, built from code with random weights (nothing is downloaded):
each must compile, verify and prune heads, MLP widths or channels. Skipped when the library is absent;
.ci/run installs them. The full zoos are in benchmarks/coverage.py."""
import os
import sys

import pytest
import torch

import fxprune

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")


def compile_and_check(model, inputs, budget=0.5):
    pruned = fxprune.compile(model, budget, example_inputs=inputs, round_to=1)
    report = pruned.meta["fxprune"]
    assert report["verification"]["passed"] and report["flops"]["ratio"] <= budget
    return report


# timm models plain torch.fx cannot trace (shape checks, control flow on sizes) or whose layers
# decompose into functional calls (norm+act, SDPA, SE)
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "efficientvit_m0", "convit_tiny", "mobilevitv2_050",
                                  "efficientnet_lite0"])
def test_timm_model(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    report = compile_and_check(model, (torch.randn(1, 3, 224, 224),))
    units = sum(g["size"] for g in report["groups"])
    assert sum(g["frozen"] for g in report["groups"]) <= 0.25 * units


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5", "swin", "whisper_encoder"])
def test_transformers_model(name):
    pytest.importorskip("transformers")
    from coverage import build_transformers
    torch.manual_seed(0)
    model, inputs = build_transformers(name)
    report = compile_and_check(model, inputs, budget=0.75)
    heads = [g for g in report["groups"] if g["size"] <= 4 and g["frozen"] == 0]
    if name not in ("swin",):  # swin's tiny config has 2-head stages with a frozen window bias
        assert heads, "attention heads must be prunable"


def test_transformers_llama_prunes_grouped_query_heads_together():
    pytest.importorskip("transformers")
    from coverage import build_transformers
    model, inputs = build_transformers("llama")  # 4 query heads sharing 2 key/value heads
    groups = fxprune.analyze(model, inputs)
    attention = [g for g in groups.groups if any(s.endswith("k_proj") for s in g.spaces)]
    assert attention and all(g.size == 2 and g.prunable for g in attention)
    assert all({s.rsplit("_", 2)[-2] for s in g.spaces} == {"q", "k", "v"} for g in attention)


def test_transformers_hidden_size_prunes_on_request_and_tied_embeddings_stay_tied():
    transformers = pytest.importorskip("transformers")
    from coverage import build_transformers
    model, inputs = build_transformers("bert")  # the hidden state is BertModel's output: kept by default
    report = compile_and_check(model, inputs, budget=0.75)
    assert not report["outputs"]
    pruned = fxprune.compile(model, 0.75, example_inputs=inputs, round_to=1, keep_outputs=False)
    report = pruned.meta["fxprune"]
    assert report["verification"]["passed"]
    hidden = len(report["outputs"]["last_hidden_state"]["2"])
    assert hidden < model.config.hidden_size
    assert pruned.get_submodule("embeddings.word_embeddings").weight.shape[1] == hidden

    torch.manual_seed(0)  # a causal LM: the hidden size is inside (RMSNorm's mean averages the kept channels)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    lm = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 96, (2, 8))
    pruned = fxprune.compile(lm, 0.5, example_inputs={"input_ids": ids, "use_cache": False}, round_to=1)
    assert pruned.meta["fxprune"]["verification"]["passed"]
    embedding, head = pruned.get_submodule("model.embed_tokens").weight, pruned.get_submodule("lm_head").weight
    assert embedding.shape[1] < 32 and embedding is head
    assert pruned(input_ids=ids)["logits"].shape == (2, 8, 96)


def test_segmentation_model():
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large
    compile_and_check(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval(),
                      (torch.randn(1, 3, 96, 96),))


def test_ultralytics_yolo_from_yaml():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False).eval()  # built from its yaml: no weights
    compile_and_check(model, (torch.randn(1, 3, 96, 96),))


def test_detection_model_prunes_backbone_and_neck_keeps_post_processing():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    report = compile_and_check(model, (torch.randn(1, 3, 96, 96),))
    # post-processing (score thresholds, top-k, NMS) branches on data: it runs as one opaque call
    assert any("postprocess" in r for g in report["groups"] for r in g["reasons"])
    assert "backbone.features.0.0.0" in report["modules"]
