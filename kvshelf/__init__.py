"""kvshelf: store, tier, compress and reuse the KV cache of LLM prompts.

The names below load on first use, so that `import kvshelf.codecs` (codec worker processes, the vLLM
connector) does not pull in transformers and the model code.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CacheEngine": "kvshelf.cache.engine",
    "CachedGenerator": "kvshelf.generation",
    "ConfigError": "kvshelf.errors",
    "GenerationResult": "kvshelf.generation",
    "KVShelfConfig": "kvshelf.config",
    "KVShelfError": "kvshelf.errors",
    "MemoryBackend": "kvshelf.storage.memory",
    "ModelFingerprint": "kvshelf.cache.fingerprint",
    "ModelNotFoundError": "kvshelf.errors",
    "ModelRunner": "kvshelf.model.runner",
    "PromptError": "kvshelf.errors",
    "UnsupportedModelError": "kvshelf.errors",
    "load_config": "kvshelf.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvshelf' has no attribute {name!r}")
