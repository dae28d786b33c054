"""One error hierarchy: every message names the problem, the node (with the user's source line
when fx recorded it) and what to do about it."""
from __future__ import annotations

from typing import Optional

import torch.fx


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class UnsupportedModelError(FxPruneError):
    """The model cannot be traced or analysed (data-dependent control flow, unknown structure)."""


class ExampleInputsError(FxPruneError):
    """example_inputs do not fit the model (wrong type, shape or dtype)."""


class BudgetError(FxPruneError):
    """The budget is malformed, or cannot be met with the channels that may be pruned."""


class NoPrunableChannelsError(BudgetError):
    """Every channel group is frozen (graph outputs, ignored modules, ops without a rule)."""


class ConfigError(FxPruneError):
    """A compile option is invalid (e.g. `ignore` names a module that does not exist)."""


class DataError(FxPruneError):
    """Calibration or training batches do not fit the model or the loss (shape, dtype, label range)."""


class LoadError(FxPruneError):
    """fxprune.load cannot read the file: missing, truncated, or not written by fxprune.save."""


class PassCheckError(FxPruneError):
    """A pass broke the pass contract or left an ill-formed state (FXPRUNE_VERIFY=1 checks): a bug in fxprune
    or in a custom pass. The message names the pass and the passes run before it."""


class VerificationError(FxPruneError):
    """Internal error: the pruned model does not compute what the masked original computes.

    This is a bug in fxprune; the message names the first node that diverges and its groups."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch appends long notes after it)."""
    return (str(exc).strip().splitlines() or [""])[0]


def describe_node(node: Optional[torch.fx.Node]) -> str:
    """`%name (op target)` plus the user's source line when fx recorded one."""
    if node is None:
        return "<no node>"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    text = f"%{node.name} ({node.op} {target})"
    line = user_source_line(node)
    if line:
        text += f" at {line}"
    return text


def user_source_line(node: torch.fx.Node) -> str:
    """The last `File ..., line ...` entry of the node's recorded stack trace, if any."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    return lines[-1] if lines else ""
