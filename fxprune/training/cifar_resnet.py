"""The CIFAR ResNet family (He et al., 2016, Sec. 4.2) and its checkpoint format.

Depth 6n+2: a 3x3 stem conv with 16 channels, then 3 stages of n basic blocks with 16, 32 and 64
channels (the 2nd and 3rd stages halve the resolution in their first block), global average pooling
and a linear classifier. ResNet-20 has n=3, ResNet-56 n=9. Shortcuts that change shape are a 1x1
conv + BatchNorm ("option B"), which gives structured pruning real channel groups to cut across
residual additions. Parameter names follow torchvision's ResNet (conv1, bn1,
layerK.I.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}, fc), identical to the reference
architecture of the shared checkpoints (../shared/models/cifar_resnet.py), so those load as they are.

Checkpoint format: one torch.save'd dict {"state_dict", "depth", "test_acc" (a fraction, 0-1), any
further plain fields such as "epochs"}, readable with torch.load(weights_only=True)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import FxPruneError

PathLike = Union[str, "os.PathLike[str]"]
STAGES = ((16, 1), (32, 2), (64, 2))  # (channels, stride of the stage's first block)
RESERVED_KEYS = ("state_dict", "depth", "test_acc")


class CheckpointError(FxPruneError, ValueError):
    """A file is not a CIFAR ResNet checkpoint of the format above, or does not fit the architecture."""


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual addition; a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # None rather than nn.Identity keeps the module tree identical to the reference; the test in
        # forward is on a module attribute, fixed at trace time, so torch.fx traces it.
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-`depth` for 32x32 inputs; `depth` = 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...)."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        self.depth, self.num_classes = depth, num_classes
        blocks_per_stage = _blocks_per_stage(depth)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_channels = 16
        for k, (channels, stride) in enumerate(STAGES, start=1):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_channels, channels, stride if i == 0 else 1))
                in_channels = channels
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _blocks_per_stage(depth: Any) -> int:
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), not {depth!r}")
    return (depth - 2) // 6


def cifar_resnet(depth: int = 20, num_classes: int = 10) -> CifarResNet:
    """A randomly initialised CIFAR ResNet-`depth` (PyTorch's default initialisation)."""
    return CifarResNet(depth, num_classes)


def load_cifar_resnet(path: PathLike) -> Tuple[CifarResNet, Dict[str, Any]]:
    """Read a checkpoint: (the model, in eval mode, on the CPU; every other field of the file, e.g.
    {"depth": 20, "test_acc": 0.8394, "epochs": 12}). The file is read with weights_only=True, so it
    can run no code. Raises CheckpointError if it is not such a checkpoint, FileNotFoundError if absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding arbitrary objects
        raise CheckpointError(f"{path} is not a CIFAR ResNet checkpoint: torch.load(weights_only=True) "
                              f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict) \
            or "depth" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a CIFAR ResNet checkpoint: expected a dict with 'state_dict' "
                              f"and 'depth' (as save_cifar_resnet writes), found {found}")
    state_dict, depth = checkpoint["state_dict"], checkpoint["depth"]
    fc = state_dict.get("fc.weight")
    if not isinstance(fc, torch.Tensor) or fc.dim() != 2:
        raise CheckpointError(f"{path}: state_dict has no 2-d 'fc.weight'; it is not a CIFAR ResNet's")
    try:
        model = cifar_resnet(int(depth), fc.shape[0])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    _check_state_dict(model, state_dict, f"{path} (depth {depth})", CheckpointError)
    model.load_state_dict(state_dict)
    info = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    return model.eval(), info


def save_cifar_resnet(model: nn.Module, path: PathLike, depth: int, test_acc: float, **extra: Any) -> None:
    """Write `model` (a CifarResNet of `depth`, its weights only) in the checkpoint format, with
    `test_acc` (top-1 as a fraction, 0-1) and `extra` plain fields (ints, floats, strings, lists,
    dicts of those: whatever torch.load(weights_only=True) reads back), e.g. epochs=160, seed=0.
    The file is written to a temporary name, read back, then renamed: an interrupted save leaves the
    previous file intact."""
    if not 0.0 <= float(test_acc) <= 1.0:
        raise ValueError(f"test_acc is a fraction in [0, 1], not {test_acc} (83.9% is 0.839)")
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra fields {clash} would overwrite the checkpoint's own")
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fc = state_dict.get("fc.weight")
    reference = cifar_resnet(depth, fc.shape[0] if fc is not None and fc.dim() == 2 else 10)
    _check_state_dict(reference, state_dict, f"model to save as depth {depth}", ValueError)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"state_dict": state_dict, "depth": depth, "test_acc": float(test_acc), **extra}, tmp)
        try:  # fail now, not when someone loads it, if an extra field is not plain data
            torch.load(tmp, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"extra fields must be plain data readable with weights_only=True ({e})") from e
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _check_state_dict(model: nn.Module, state_dict: Dict[str, Any], what: str, error: type) -> None:
    """Raise `error` naming the first differences if `state_dict` does not fit `model` exactly."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state_dict.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} != {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{name} {items[:4]}{' ...' if len(items) > 4 else ''}"
                 for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise error(f"{what} does not fit a CIFAR ResNet of that depth: " + "; ".join(parts)
                    + " (a pruned model is saved with fxprune.save instead)")
