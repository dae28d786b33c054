"""fxprune: structured pruning of PyTorch models as a torch.fx compiler pipeline."""
from .budget import Budget
from .compiler import analyze, apply_plan, compile, cost_of
from .errors import (BudgetError, ConfigError, DataError, ExampleInputsError, FxPruneError, LoadError,
                     NoPrunableChannelsError, PassCheckError, UnsupportedModelError, VerificationError)
from .importance import Importance, ImportanceData, importance_names
from .passes.activation_importance import FluctuationImportance, WandaImportance
from .passes.aofp import AOFP
from .passes.bn_scale_importance import BNScaleImportance
from .passes.fpgm_importance import FPGMImportance
from .passes.l1_importance import L1Importance, L2Importance
from .passes.random_importance import RandomImportance
from .passes.scop import SCOP
from .passes.space_search import SearchResult, SpaceSearch
from .passes.taylor_importance import TaylorImportance
from .ir import ChannelGroup, ChannelGroups, PrunePlan
from .report import report_json
from .serialize import load, save

# Training and search helpers live above the compiler core: imported on first use, so that
# `import fxprune` stays light (no training loop, data reader or plotting code).
_LAZY = {"finetune": "fxprune.training.finetune", "evaluate": "fxprune.training.finetune",
         "FinetuneConfig": "fxprune.training.finetune", "recalibrate_bn": "fxprune.training.finetune",
         "ProxyEvaluator": "fxprune.search.proxy_eval"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fxprune' has no attribute {name!r}")

__all__ = [
    "compile", "analyze", "apply_plan", "cost_of", "save", "load", "report_json", "Budget",
    "finetune", "evaluate", "FinetuneConfig", "recalibrate_bn", "AOFP", "SCOP",
    "SpaceSearch", "SearchResult", "ProxyEvaluator",
    "Importance", "ImportanceData", "importance_names", "L1Importance", "L2Importance", "BNScaleImportance",
    "TaylorImportance", "FPGMImportance", "RandomImportance", "WandaImportance", "FluctuationImportance", "ChannelGroup", "ChannelGroups", "PrunePlan",
    "FxPruneError", "UnsupportedModelError", "ExampleInputsError", "BudgetError", "NoPrunableChannelsError",
    "ConfigError", "DataError", "LoadError", "PassCheckError", "VerificationError",
]
__version__ = "0.1.0"
