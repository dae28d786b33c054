"""Prune, save, reload, export to ONNX and time in onnxruntime: the end-to-end path in a few lines.

    python examples/save_export_benchmark.py            # about 30 s on 2 cores
"""
import logging
import tempfile

import torch
import torchvision

import fxprune
from fxprune.export.benchmark import benchmark_onnxruntime
from fxprune.apps.visualize import visualize

logging.basicConfig(level=logging.INFO, format="[fxprune] %(message)s")
model = torchvision.models.mobilenet_v2().eval()
x = torch.randn(1, 3, 224, 224)
pruned = fxprune.compile(model, 0.5, example_inputs=(x,))        # round_to="auto": aligned widths where wide

with tempfile.TemporaryDirectory() as out:
    fxprune.save(pruned, f"{out}/pruned.pt")
    reloaded = fxprune.load(f"{out}/pruned.pt")                  # no original class needed
    assert torch.equal(reloaded(x), pruned(x))
    print("views:", visualize(pruned, out, name="mobilenet_v2"))
    result = benchmark_onnxruntime({"dense": model, "pruned": reloaded}, (x,), name="mobilenet_v2",
                                   batch_sizes=(1,), runs=20, onnx_dir=out)
    print(result.table())
