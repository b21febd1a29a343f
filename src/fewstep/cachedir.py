"""Where fewstep keeps what it computes once and reuses (references, autotune choices)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$FEWSTEP_CACHE``, else ``$XDG_CACHE_HOME/fewstep``, else ``~/.cache/fewstep``."""
    if os.environ.get("FEWSTEP_CACHE"):
        return Path(os.environ["FEWSTEP_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fewstep"
