"""Prune torchvision's ResNet-18 to half its FLOPs, check it, and look at what was cut.

    python examples/prune_resnet.py
"""
import torch
import torchvision

import fxprune

model = torchvision.models.resnet18()  # random weights: nothing is downloaded
x = torch.randn(1, 3, 224, 224)

print(fxprune.analyze(model, (x,)))  # the channel groups: what must be pruned together

pruned = fxprune.compile(model, 0.5, example_inputs=(x,))  # wide layers keep multiples of 8 channels
report = pruned.meta["fxprune"]
print(f"FLOPs kept {report['flops']['ratio']:.1%}, params kept {report['params']['ratio']:.1%}")
print("layer1.0.conv1 keeps output channels", report["modules"]["layer1.0.conv1"]["out"][:8], "...")
print("verification:", report["verification"])
print(pruned(x).shape)
