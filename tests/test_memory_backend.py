import pytest
import torch

from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.memory import MemoryBackend


def chunk(nbytes: int) -> StoredChunk:
    kv = torch.zeros(nbytes // 4, dtype=torch.float32)
    return StoredChunk(ChunkMeta(b"f" * 32, 1, tuple(kv.shape), kv.dtype), kv)


def test_lru_eviction_by_bytes():
    tier = MemoryBackend(capacity_bytes=400)
    for i in range(4):
        assert tier.put(bytes([i]), chunk(100))
    assert tier.used_bytes == 400
    assert tier.get(bytes([0])) is not None  # 0 becomes most recent; 1 is now the LRU
    assert tier.put(bytes([9]), chunk(100))
    assert not tier.contains(bytes([1]))
    assert all(tier.contains(bytes([i])) for i in (0, 2, 3, 9))
    assert tier.used_bytes == 400 and tier.evictions == 1


def test_large_put_evicts_several_and_oversized_is_refused():
    tier = MemoryBackend(capacity_bytes=400)
    for i in range(4):
        tier.put(bytes([i]), chunk(100))
    assert tier.put(b"big", chunk(300))
    assert tier.num_chunks == 2 and tier.used_bytes == 400
    assert not tier.put(b"huge", chunk(800))
    assert not tier.contains(b"huge")


def test_overwrite_delete_clear_keep_accounting():
    tier = MemoryBackend(capacity_bytes=1000)
    tier.put(b"k", chunk(100))
    tier.put(b"k", chunk(200))
    assert tier.used_bytes == 200 and tier.num_chunks == 1
    tier.delete(b"k")
    tier.delete(b"missing")
    assert tier.used_bytes == 0
    tier.put(b"a", chunk(100))
    tier.clear()
    assert tier.used_bytes == 0 and tier.num_chunks == 0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        MemoryBackend(0)


def test_lfu_keeps_frequently_used_chunks():
    tier = MemoryBackend(capacity_bytes=300, policy="lfu")
    for i in range(3):
        tier.put(bytes([i]), chunk(100))
    for _ in range(3):
        tier.get(bytes([0]))
    tier.get(bytes([2]))
    tier.put(b"new", chunk(100))  # 1 was never used again: it goes, although 0 is older
    assert not tier.contains(bytes([1])) and tier.contains(bytes([0])) and tier.contains(bytes([2]))
    tier.put(b"new2", chunk(100))  # "new" (0 uses) goes before 2 (1 use)
    assert not tier.contains(b"new") and tier.contains(bytes([2]))
    # Under LRU the same sequence would have evicted 0's neighbours by age instead.
    lru = MemoryBackend(capacity_bytes=300, policy="lru")
    for i in range(3):
        lru.put(bytes([i]), chunk(100))
    lru.get(bytes([0]))
    lru.put(b"new", chunk(100))
    assert not lru.contains(bytes([1])) and lru.contains(bytes([0]))
    lru.put(b"new2", chunk(100))
    assert not lru.contains(bytes([2]))


def test_unknown_policy():
    with pytest.raises(ValueError, match="eviction"):
        MemoryBackend(100, policy="fifo")
