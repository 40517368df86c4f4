"""Generation with KV reuse on HF models: CachedGenerator and its prefill strategies (plain, layerwise,
blend), each returning one PrefillOutcome."""

from kvshelf.generation.generator import CachedGenerator, GenerationResult
from kvshelf.generation.outcome import PrefillOutcome, PrefillRequest, PrefillStrategy

__all__ = ["CachedGenerator", "GenerationResult", "PrefillOutcome", "PrefillRequest", "PrefillStrategy"]
