"""What a read expects of a stored chunk, known before a single byte of it is decoded.

The cache engine knows the model (layers, KV heads, head dim, dtype, fingerprint) and how many tokens a
key covers, so it knows the exact shape of the KV it asks for. Byte tiers check a stored object's header
against that before any decoding, and size their reads by it (an object larger than the largest
possible encoding of that shape is refused before it is read). The tier stack's verbs take only a key,
so the engine hands its expectation down in a context variable around each read (`expecting`); a read
made outside any expectation (tests, tools) is held to `GENERIC` limits and returns chunks whose
fingerprint is unknown, which the engine never accepts. Code that runs a tier read on another thread
(a deadline, a pool) must carry the context along: `executor.submit(contextvars.copy_context().run, fn)`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# The chunk sizes kvshelf supports (tokens per chunk). Defined here, at the bottom of the layering, because
# stored objects are bounded by it; cache/keys.py re-exports them (storage never imports cache).
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 8192

MAX_HEADER_BYTES = 64 * 1024
MAX_POSITION = 1 << 31


@dataclass(frozen=True)
class Expected:
    """The chunk a read asks for. `num_tokens` / `position` / `fingerprint` None: any, within limits."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str | None = None
    num_tokens: int | None = None
    max_tokens: int = MAX_CHUNK_SIZE
    position: int | None = None
    fingerprint: bytes | None = None

    @property
    def exact(self) -> bool:
        return self.num_tokens is not None

    def largest_shape(self) -> tuple[int, ...]:
        tokens = self.num_tokens if self.num_tokens is not None else self.max_tokens
        return (self.num_layers, 2, self.num_kv_heads, tokens, self.head_dim)


@dataclass(frozen=True)
class Limits:
    """Bounds on any header when nothing more is known: generous, but finite."""

    max_layers: int = 512
    max_kv_heads: int = 256
    max_head_dim: int = 1024
    max_tokens: int = MAX_CHUNK_SIZE
    max_values: int = 1 << 28  # 1 GiB of fp32 KV per chunk
    max_object_bytes: int = 1 << 30


GENERIC = Limits()

_current: contextvars.ContextVar[Expected | None] = contextvars.ContextVar("kvshelf_expected", default=None)


@contextmanager
def expecting(expected: Expected | None) -> Iterator[None]:
    """Reads of byte tiers inside this block check objects against `expected`."""
    token = _current.set(expected)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Expected | None:
    return _current.get()
