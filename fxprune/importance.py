"""The importance interface: a score per channel unit (higher = more important).

An importance sees the traced GraphModule, the ChannelGroups and, when it needs them, calibration
data. Scores of units are compared within their group (allocation normalises them per group), so a
criterion only has to rank channels of the same group consistently.

Data reaches every criterion the same way, as an `ImportanceData` built by compile from its `data=`
and `loss_fn=` arguments: criteria that score from weights ignore it, criteria that need activations
or gradients (Taylor) read batches from it, and criteria that train (AOFP, SCOP) iterate it as their
training set. The traced GraphModule shares the user's parameter tensors: a criterion must never
write to them (use detached copies, e.g. torch.func.functional_call, to take gradients)."""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Type

import numpy as np
import torch
import torch.fx

from .errors import ConfigError, DataError, FxPruneError, first_line
from .ir import ChannelGroups


@dataclass
class ImportanceData:
    """Calibration (or training) data for an importance.

    batches: an iterable of inputs `x` or `(x, y)` pairs (a DataLoader, a list...); iterated afresh
        each time `iter_batches` is called. loss_fn(output, target) -> scalar tensor, default
        cross-entropy."""

    batches: Optional[Iterable[Any]] = None
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None

    def iter_batches(self, limit: Optional[int] = None, need_targets: bool = False) -> Iterator[Tuple[Any, Any]]:
        """(inputs tuple, target or None) pairs, at most `limit` of them."""
        if self.batches is None:
            raise ConfigError("this importance needs calibration data: pass data=<iterable of (x, y) batches> to "
                              "fxprune.compile (e.g. a DataLoader over a few hundred training images)")
        for batch in itertools.islice(self.batches, limit):
            if isinstance(batch, (tuple, list)) and len(batch) == 2:
                x, y = batch
            else:
                x, y = batch, None
            if need_targets and y is None:
                raise ConfigError("this importance needs targets: data must yield (x, y) pairs")
            yield (x if isinstance(x, tuple) else (x,)), y

    @contextlib.contextmanager
    def batch(self, index: int, inputs: Tuple[Any, ...], target: Any = None) -> Iterator[None]:
        """Run one batch through the model and the loss inside this: a batch that does not fit either
        becomes a DataError naming the batch and its shapes, not a raw error from inside torch."""
        try:
            yield
        except FxPruneError:
            raise
        except (RuntimeError, IndexError, ValueError, TypeError) as exc:
            shapes = ", ".join(_describe(x) for x in inputs)
            hint = ("batches must be shaped like example_inputs (any batch size)" if self.loss_fn is not None else
                    "batches must be shaped like example_inputs (any batch size); with the default cross-entropy "
                    "loss, targets are class indices (int64) in [0, number of model outputs)")
            raise DataError(f"calibration batch {index} does not fit the model or the loss: inputs {shapes}, "
                            f"target {_describe(target)}: {type(exc).__name__}: {first_line(exc)}\n  {hint}") from None

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, target)
        return torch.nn.functional.cross_entropy(output, target)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        text = f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
        if not x.is_floating_point() and x.numel():
            text += f" in [{int(x.min())}, {int(x.max())}]"
        return text
    return type(x).__name__


class Importance:
    """Base class. `requires_data`: compile refuses to run the criterion without data.
    `trains_model`: the criterion updates weights (compile gives it a private copy, never the user's).
    `decides_widths`: the criterion returns the whole plan from `plan(gm, groups, cost, budget, data)`
    (AOFP prunes while training) instead of scores for the allocation pass."""

    name = "base"
    requires_data = False
    trains_model = False
    decides_widths = False

    def score(self, gm: torch.fx.GraphModule, groups: ChannelGroups,
              data: Optional[ImportanceData] = None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def score_with_results(self, gm: torch.fx.GraphModule, groups: ChannelGroups,
                           data: Optional[ImportanceData] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
        """The scores and what the criterion measured on the way, JSON-able, for the report (SCOP's
        factors). Results travel with the compile, never on the criterion: one instance serves many."""
        return self.score(gm, groups, data), {}

    def plan_with_results(self, gm: torch.fx.GraphModule, groups: ChannelGroups, cost, budget,
                          data: Optional[ImportanceData]) -> Tuple[Any, Dict[str, Any]]:
        """For criteria that decide the widths themselves (decides_widths): the PrunePlan and results."""
        raise NotImplementedError(f"{type(self).__name__} does not decide widths")

    def excluded_groups(self, gm: torch.fx.GraphModule, groups: ChannelGroups) -> Dict[int, str]:
        """Groups this criterion keeps whole, with the reason (compile freezes them): SCOP leaves
        residual streams alone, as its paper does."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: Dict[str, Type[Importance]] = {}


def register_importance(cls: Type[Importance]) -> Type[Importance]:
    _REGISTRY[cls.name] = cls
    return cls


def importance_names() -> list:
    _load_builtin()
    return sorted(_REGISTRY)


def resolve_importance(importance) -> Importance:
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str):
        _load_builtin()
        if importance in _REGISTRY:
            return _REGISTRY[importance]()
        raise ConfigError(f"unknown importance {importance!r}; choose one of {sorted(_REGISTRY)} or pass an Importance instance")
    raise ConfigError(f"importance must be a name or an fxprune Importance, got {type(importance).__name__}")


def _load_builtin() -> None:
    # the criteria live in passes/ (one per file) and register themselves on import
    import fxprune.passes.activation_importance  # noqa: F401
    import fxprune.passes.bn_scale_importance  # noqa: F401
    import fxprune.passes.fpgm_importance  # noqa: F401
    import fxprune.passes.l1_importance  # noqa: F401
    import fxprune.passes.random_importance  # noqa: F401
    import fxprune.passes.taylor_importance  # noqa: F401
