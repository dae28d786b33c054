"""ProxyEvaluator: a cheap, seeded estimate of how good a pruned subnetwork will be after full
fine-tuning, for searches that must rank many of them.

Right after pruning, accuracy collapses whatever was cut, and the BatchNorm running statistics no
longer describe the activations (ALGORITHMS.md 7). So the proxy re-estimates them, optionally takes a
few fine-tuning steps, and measures top-1 error on held-out data. Hold out part of the *training* set
for this (`fxprune.training.data.CIFAR10Loader(subset=indices)`): selecting subnetworks on the test set would
report a biased test accuracy for the winner."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

import torch

from ..errors import ConfigError
from ..training.finetune import FinetuneConfig, evaluate, finetune, recalibrate_bn

log = logging.getLogger("fxprune")


@dataclass
class ProxyEvaluator:
    """evaluator(model, seed) -> top-1 error on `val` after BN recalibration and `steps` SGD steps.

    train: (x, y) batches with len() for recalibration and the short fine-tune (a CIFAR10Loader with
        shuffle/augment; its order is fixed by its own seed and set_epoch, the fine-tune's randomness
        by `seed`). val: held-out (x, y) batches. recalibrate_batches: batches of `train` for the BN
        statistics (0: skip). steps: fine-tuning steps (0: recalibration only, the cheapest proxy).
    The model passed in is copied, never trained in place."""

    train: Iterable[Any]
    val: Iterable[Any]
    steps: int = 100
    lr: float = 0.01
    weight_decay: float = 5e-4
    recalibrate_batches: int = 20
    device: str = "cpu"

    def __post_init__(self):
        if self.steps < 0 or self.recalibrate_batches < 0:
            raise ConfigError("ProxyEvaluator: steps and recalibrate_batches must be >= 0")
        if self.steps and not hasattr(self.train, "__len__"):
            raise ConfigError("ProxyEvaluator: train must have len() (a DataLoader or CIFAR10Loader) to fine-tune")

    def __call__(self, model: torch.nn.Module, seed: int) -> float:
        model = copy.deepcopy(model)
        fxprune_log = logging.getLogger("fxprune")
        level = fxprune_log.level
        fxprune_log.setLevel(logging.WARNING)  # one line per sample comes from the search, not ten
        try:
            torch.manual_seed(seed)
            if self.recalibrate_batches:
                recalibrate_bn(model, self.train, self.recalibrate_batches, device=self.device)
            if self.steps:
                epochs = self.steps / len(self.train)
                finetune(model, self.train, FinetuneConfig(epochs=epochs, lr=self.lr, weight_decay=self.weight_decay,
                                                           schedule="cosine", seed=seed, log_every=0),
                         device=self.device)
            return 1.0 - evaluate(model, self.val, device=self.device)["top1"]
        finally:
            fxprune_log.setLevel(level)

    def describe(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "weight_decay": self.weight_decay,
                "recalibrate_batches": self.recalibrate_batches,
                "train_batches": len(self.train) if hasattr(self.train, "__len__") else None,
                "val_batches": len(self.val) if hasattr(self.val, "__len__") else None}


def cifar10_proxy_evaluator(*, val: int = 2000, steps: int = 30, lr: float = 0.01, recalibrate_batches: int = 10,
                            batch_size: int = 128, device: str = "cpu", path: Optional[str] = None,
                            seed: int = 0) -> ProxyEvaluator:
    """A ProxyEvaluator on CIFAR-10: `val` class-balanced training images held out for the error, the
    other training images (augmented, shuffled) for recalibration and the short fine-tune."""
    from ..training.data import CIFAR10Loader, balanced_subset, load_cifar10
    _, labels = load_cifar10(path, "train")
    held_out = balanced_subset(labels, val, seed=seed)
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    train = CIFAR10Loader("train", batch_size=batch_size, shuffle=True, augment=True, seed=300 + seed, subset=rest,
                          drop_last=True, path=path)
    held = CIFAR10Loader("train", batch_size=500, shuffle=False, augment=False, subset=held_out, path=path)
    return ProxyEvaluator(train, held, steps=steps, lr=lr, recalibrate_batches=recalibrate_batches, device=device)
