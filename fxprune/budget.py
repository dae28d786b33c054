"""The user's budget: fractions of the original FLOPs, parameters and/or measured latency to keep."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

from .errors import BudgetError


@dataclass(frozen=True)
class Budget:
    """Fractions in (0, 1] of the original cost to keep. Any of them may be given; all must hold.

    `Budget(flops=0.5)` keeps half the FLOPs; `Budget(flops=0.5, params=0.4)` must meet both.
    `Budget(latency=0.5, target=OnnxRuntimeTarget(batch_size=1, threads=1))` halves the latency measured
    on that target (fxprune.export.latency_target): per-layer tables are measured there (and cached),
    and the result is timed against the dense model until it lands on the budget."""

    flops: Optional[float] = None
    params: Optional[float] = None
    latency: Optional[float] = None
    target: Any = field(default=None, compare=False)

    def __post_init__(self):
        if self.flops is None and self.params is None and self.latency is None:
            raise BudgetError("Budget() needs flops=..., params=..., latency=... or several (fractions in (0, 1] "
                              "to keep)")
        for name in MEASURES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check_fraction(value, f"Budget.{name}"))
        if self.latency is not None and self.target is None:
            raise BudgetError("Budget(latency=...) needs target=...: where the latency is measured, e.g. "
                              "fxprune.export.latency_target.OnnxRuntimeTarget(batch_size=1, threads=1)")
        if self.target is not None and not all(hasattr(self.target, a) for a in ("key", "layer_seconds",
                                                                                  "model_seconds")):
            raise BudgetError(f"Budget.target must have key, layer_seconds and model_seconds (see fxprune.latency); "
                              f"got {type(self.target).__name__}")

    def constraints(self) -> Dict[str, float]:
        """{measure: fraction} of every cost the budget bounds ("flops", "params", "latency")."""
        return {name: getattr(self, name) for name in MEASURES if getattr(self, name) is not None}


MEASURES = ("flops", "params", "latency")

# round_to="auto": a group moves in steps of up to AUTO_ALIGN channels, but never so coarsely that it has
# fewer than AUTO_MIN_CHOICES widths to choose from: a 32-channel group moves 4 at a time, a 16-channel one
# 2, and a unit already 8 channels wide (an attention head) 1 unit. A group of WIDE_CHANNELS or more moves
# WIDE_ALIGN at a time: onnxruntime's blocked convolutions work on 16 channels with AVX-512 (8 with AVX2), and
# at half the FLOPs resnet50 in steps of 8 ran 8 % slower per FLOP than in steps of 16 on an AVX-512 CPU
# (benchmarks/latency.py). 8 choices for narrow groups measured best of 4/8/16 for the CIFAR ResNet-20's
# accuracy (benchmarks/defaults_cifar.py).
AUTO_ALIGN, AUTO_MIN_CHOICES = 8, 8
WIDE_CHANNELS, WIDE_ALIGN = 64, 16


def auto_step(size: int, channels_per_unit: int = 1) -> int:
    """The step, in units, of round_to="auto" for a group of `size` units each `channels_per_unit` wide."""
    step = 1
    while 2 * step * channels_per_unit <= AUTO_ALIGN and size / (2 * step) >= AUTO_MIN_CHOICES:
        step *= 2
    if size * channels_per_unit >= WIDE_CHANNELS:
        step = max(step, WIDE_ALIGN // channels_per_unit)
    return step
LABELS = {"flops": "FLOPs", "params": "params", "latency": "latency"}


def _check_fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BudgetError(f"{what} must be a number in (0, 1], the fraction to keep; got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or not (0.0 < value <= 1.0):
        raise BudgetError(f"{what} must be in (0, 1] (the fraction of the original to keep); got {value!r}")
    return value


def as_budget(budget: Union[float, Budget]) -> Budget:
    """Accept a bare float (fraction of FLOPs to keep) or a Budget."""
    if isinstance(budget, Budget):
        return budget
    return Budget(flops=_check_fraction(budget, "budget"))
