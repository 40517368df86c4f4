"""Where kvshelf keeps what it computes once (converted models, calibrations, costs, fingerprints)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$KVSHELF_CACHE_DIR, else $XDG_CACHE_HOME/kvshelf, else ~/.cache/kvshelf."""
    if env := os.environ.get("KVSHELF_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "kvshelf"
