"""fxprune: structured pruning of PyTorch models as a torch.fx compiler pipeline."""
from .budget import Budget
from .compiler import analyze, apply_plan, compile, cost_of
from .errors import (BudgetError, ConfigError, ExampleInputsError, FxPruneError, NoPrunableChannelsError,
                     UnsupportedModelError, VerificationError)
from .importance import Importance
from .ir import ChannelGroup, ChannelGroups, PrunePlan
from .report import report_json
from .serialize import load, save

__all__ = ["compile", "analyze", "apply_plan", "cost_of", "save", "load", "Budget", "Importance", "ChannelGroup", "ChannelGroups", "PrunePlan", "report_json",
           "FxPruneError", "UnsupportedModelError", "ExampleInputsError", "BudgetError", "NoPrunableChannelsError",
           "ConfigError", "VerificationError"]
__version__ = "0.1.0"
