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


def damaged(data, good: bytes) -> bytes:
    """`good` with one hostile change drawn by hypothesis (`data`: st.data()): a flipped bit, a truncation,
    an overwrite or trailing bytes."""
    from hypothesis import strategies as st

    pos = data.draw(st.integers(0, len(good) - 1))
    kind = data.draw(st.sampled_from(["flip", "truncate", "overwrite", "extend"]))
    if kind == "flip":
        return good[:pos] + bytes([good[pos] ^ (1 << data.draw(st.integers(0, 7)))]) + good[pos + 1 :]
    if kind == "truncate":
        return good[:pos]
    if kind == "overwrite":
        extra = data.draw(st.binary(min_size=1, max_size=16))
        return good[:pos] + extra + good[pos + len(extra) :]
    return good + data.draw(st.binary(min_size=1, max_size=16))
