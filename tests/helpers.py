"""Small builders shared by the storage tests."""

from __future__ import annotations

import torch

from kvshelf.storage.base import ChunkMeta, StoredChunk

FP = b"\x07" * 32


def make_chunk(tokens: int = 16, seed: int = 0, layers: int = 3, heads: int = 2, dim: int = 8) -> StoredChunk:
    g = torch.Generator().manual_seed(seed)
    shape = (layers, 2, heads, tokens, dim)
    return StoredChunk(ChunkMeta(FP, tokens, shape, torch.float32), torch.randn(shape, generator=g))


def key(i: int) -> bytes:
    return i.to_bytes(2, "big") * 8
