"""The user's budget: fractions of the original FLOPs and/or parameters to keep."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

from .errors import BudgetError


@dataclass(frozen=True)
class Budget:
    """Fractions in (0, 1] of the original cost to keep. Either or both may be given.

    `Budget(flops=0.5)` keeps half the FLOPs; `Budget(flops=0.5, params=0.4)` must meet both."""

    flops: Optional[float] = None
    params: Optional[float] = None

    def __post_init__(self):
        if self.flops is None and self.params is None:
            raise BudgetError("Budget() needs flops=..., params=... or both (fractions in (0, 1] to keep)")
        for name in ("flops", "params"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check_fraction(value, f"Budget.{name}"))


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
