"""The storage interface every tier implements: a few verbs over chunk keys."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkMeta:
    """What a stored chunk claims to be; checked against the request before its KV is used."""

    fingerprint: bytes  # ModelFingerprint.digest() of the model that computed the KV
    num_tokens: int
    shape: tuple[int, ...]  # [layers, 2 (K, V), kv_heads, tokens, head_dim]
    dtype: torch.dtype


@dataclass(frozen=True)
class StoredChunk:
    meta: ChunkMeta
    kv: torch.Tensor  # CPU tensor of meta.shape and meta.dtype

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class StorageBackend(ABC):
    """A keyed store of chunks with a byte capacity. Implementations must be thread-safe."""

    name: str = "backend"

    @abstractmethod
    def put(self, key: bytes, chunk: StoredChunk) -> bool:
        """Store `chunk`; return False if it was not stored (too large, tier full or down)."""

    @abstractmethod
    def get(self, key: bytes) -> StoredChunk | None:
        """The chunk under `key`, or None on a miss."""

    @abstractmethod
    def contains(self, key: bytes) -> bool: ...

    @abstractmethod
    def delete(self, key: bytes) -> None: ...

    @abstractmethod
    def clear(self) -> None: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    def __len__(self) -> int:
        raise NotImplementedError
