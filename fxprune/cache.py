"""Where fxprune keeps what it computes once and reuses across processes (latency tables, decoded
datasets, the native kernels): $FXPRUNE_CACHE, else $XDG_CACHE_HOME/fxprune, else ~/.cache/fxprune."""
from __future__ import annotations

import os

CACHE_ENV = "FXPRUNE_CACHE"


def cache_dir(*parts: str) -> str:
    """The cache folder, or the path `parts` name inside it (nothing is created)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "fxprune")
    return os.path.join(os.path.expanduser(root), *parts)
