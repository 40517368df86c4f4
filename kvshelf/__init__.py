"""kvshelf: store, tier, compress and reuse the KV cache of LLM prompts."""

from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.config import KVShelfConfig, load_config
from kvshelf.errors import ConfigError, KVShelfError, ModelNotFoundError, PromptError, UnsupportedModelError
from kvshelf.integrations.hf import CachedGenerator, GenerationResult
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.memory import MemoryBackend

__version__ = "0.1.0"

__all__ = [
    "CacheEngine",
    "CachedGenerator",
    "ConfigError",
    "GenerationResult",
    "KVShelfConfig",
    "KVShelfError",
    "MemoryBackend",
    "ModelFingerprint",
    "ModelNotFoundError",
    "ModelRunner",
    "PromptError",
    "UnsupportedModelError",
    "load_config",
]
