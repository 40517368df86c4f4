"""The one place where a configuration becomes a running shelf, for every runtime (see shelf.py)."""

from kvshelf.assembly.runtimes import RUNTIMES, check_runtime
from kvshelf.assembly.shelf import (
    Owned,
    Shelf,
    build_engine,
    codec_calibration,
    min_cached_tokens,
    open_engine,
    open_shelf,
    tier_calibration,
)

__all__ = [
    "RUNTIMES",
    "Owned",
    "Shelf",
    "build_engine",
    "check_runtime",
    "codec_calibration",
    "min_cached_tokens",
    "open_engine",
    "open_shelf",
    "tier_calibration",
]
