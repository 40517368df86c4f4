"""Chunk keys: a chain of strong hashes over token chunks, rooted in the model fingerprint and tenant salt.

Key i commits to every token of chunks 0..i, so a hit on key i means the whole prefix up to chunk i matches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvshelf.storage.expect import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

DIGEST_SIZE = 16  # 128-bit keys: collisions are not a practical concern at any cache size.
__all__ = ["DIGEST_SIZE", "MAX_CHUNK_SIZE", "MIN_CHUNK_SIZE", "ChunkKey", "chain_root", "chunk_keys"]


@dataclass(frozen=True)
class ChunkKey:
    digest: bytes
    start: int  # first token of the chunk in the prompt
    end: int  # one past the last token

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def hex(self) -> str:
        return self.digest.hex()


def chain_root(fingerprint_digest: bytes, salt: str | bytes | None = None) -> bytes:
    salt_bytes = salt.encode() if isinstance(salt, str) else (salt or b"")
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"kvshelf-root")
    h.update(fingerprint_digest)
    h.update(len(salt_bytes).to_bytes(4, "little"))
    h.update(salt_bytes)
    return h.digest()


def chunk_keys(
    tokens: Sequence[int] | np.ndarray,
    chunk_size: int,
    root: bytes,
    *,
    include_unfull_chunk: bool = True,
) -> list[ChunkKey]:
    """Keys for each chunk of `tokens`; the trailing unfull (partial) chunk gets a key too when `include_unfull_chunk`."""
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"tokens must be a flat sequence of ids, got shape {ids.shape}")
    keys: list[ChunkKey] = []
    prev = root
    n = len(ids)
    stop = n if include_unfull_chunk else n - n % chunk_size
    for start in range(0, stop, chunk_size):
        end = min(start + chunk_size, n)
        h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"kvshelf-chunk")
        h.update(prev)
        # The length is hashed so a partial chunk never collides with a full chunk that extends it.
        h.update((end - start).to_bytes(4, "little"))
        h.update(ids[start:end].astype("<i8").tobytes())
        prev = h.digest()
        keys.append(ChunkKey(prev, start, end))
    return keys
