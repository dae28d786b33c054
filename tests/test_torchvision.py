"""Differential tests on a representative torchvision set, and the cost model against FlopCounterMode.

Inputs are smaller than ImageNet's to keep CI fast; benchmarks/zoo.py runs all 80 models at 224."""
import numpy as np
import pytest
import torch

import fxprune

torchvision = pytest.importorskip("torchvision")

# name -> (constructor kwargs, input size)
MODELS = {
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "densenet121": ({}, 64),
    "convnext_tiny": ({}, 64),
    "regnet_y_400mf": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "squeezenet1_0": ({}, 64),
    "googlenet": ({"init_weights": False, "aux_logits": False}, 64),
    "vit_b_16": ({"image_size": 64}, 64),
    "swin_t": ({}, 64),
    "maxvit_t": ({}, 224),
}


def build(name):
    torch.manual_seed(0)
    kwargs, size = MODELS[name]
    return torchvision.models.get_model(name, **kwargs).eval(), torch.randn(1, 3, size, size)


@pytest.mark.parametrize("name", [n for n in MODELS if n != "maxvit_t"])
def test_torchvision_model_prunes_verified_to_budget(name):
    model, x = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = fxprune.compile(model, 0.5, example_inputs=(x,))
    report = pruned.meta["fxprune"]
    assert report["verification"]["passed"]
    assert abs(report["flops"]["ratio"] - 0.5) <= 0.02 * 0.5, report["flops"]
    assert pruned(x).shape == model(x).shape
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the rewrite really shrank tensors: fewer parameters than the original
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_pruned_vit_runs_at_another_batch_size():
    """Shape literals were rewritten, but the batch dim stays dynamic."""
    model, x = build("vit_b_16")
    pruned = fxprune.compile(model, 0.5, example_inputs=(x,), verify=False)
    assert pruned(torch.randn(3, 3, 64, 64)).shape == (3, 1000)


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16", "swin_t", "densenet121", "mobilenet_v3_small", "maxvit_t",
                                  "regnet_y_400mf", "shufflenet_v2_x0_5", "convnext_tiny"])
def test_cost_model_agrees_with_flop_counter(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fxprune.compiler import _analyse
    from fxprune.cost import build_cost_model

    model, x = build(name)
    gm, groups = _analyse(model, (x,), set(), ())
    ours = build_cost_model(gm, groups).flops(np.ones(groups.n_units, dtype=bool))
    counter = FlopCounterMode(display=False)
    # requires_grad keeps nn.MultiheadAttention off its fused fast path, and the math SDPA backend
    # makes attention visible as bmm: FlopCounterMode does not count CPU flash attention.
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(x.clone().requires_grad_(True))
    theirs = counter.get_total_flops()
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
