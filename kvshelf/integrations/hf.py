"""Compatibility alias: generation moved to `kvshelf.generation` (issue #14)."""

from kvshelf.generation import CachedGenerator, GenerationResult

__all__ = ["CachedGenerator", "GenerationResult"]
