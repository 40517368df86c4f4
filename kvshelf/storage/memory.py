"""Hot tier: chunks kept as tensors in CPU memory, with a byte capacity and LRU or LFU eviction.

Chunks are stored as given (the engine has already copied them into host memory, pinned when the KV
lives on a GPU), so a put is a dictionary insert and a get a lookup.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict

from kvshelf.storage.base import StorageBackend, StoredChunk

EVICTION_POLICIES = ("lru", "lfu")


class MemoryBackend(StorageBackend):
    name = "cpu"
    inline_put = True

    def __init__(self, capacity_bytes: int, *, policy: str = "lru"):
        if capacity_bytes <= 0:
            raise ValueError(f"cpu tier capacity must be > 0 bytes, got {capacity_bytes}")
        if policy not in EVICTION_POLICIES:
            raise ValueError(f"cpu tier eviction must be one of {EVICTION_POLICIES}, got {policy!r}")
        self.policy = policy
        self._capacity = int(capacity_bytes)
        self._used = 0
        self._items: dict[bytes, StoredChunk] = {}
        # LRU: one ordered bucket. LFU: a bucket per use count, each in LRU order (ties go to the oldest).
        self._freq: dict[bytes, int] = {}
        self._buckets: defaultdict[int, OrderedDict] = defaultdict(OrderedDict)
        self._min_freq = 0
        self._lock = threading.Lock()
        self.evictions = 0

    # -- bookkeeping (caller holds the lock) --------------------------------------------------------
    def _touch(self, key: bytes) -> None:
        f = self._freq[key]
        if self.policy == "lru":
            self._buckets[0].move_to_end(key)
            return
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min_freq == f:
                self._min_freq = f + 1
        self._freq[key] = f + 1
        self._buckets[f + 1][key] = None

    def _insert(self, key: bytes, chunk: StoredChunk) -> None:
        self._items[key] = chunk
        self._freq[key] = 0
        self._buckets[0][key] = None
        self._min_freq = 0
        self._used += chunk.nbytes

    def _remove(self, key: bytes) -> StoredChunk | None:
        chunk = self._items.pop(key, None)
        if chunk is None:
            return None
        f = self._freq.pop(key)
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
        self._used -= chunk.nbytes
        return chunk

    def _victim(self) -> bytes:
        if self.policy == "lru":
            return next(iter(self._buckets[0]))
        while self._min_freq not in self._buckets:
            self._min_freq = min(self._buckets)
        return next(iter(self._buckets[self._min_freq]))

    # -- verbs ---------------------------------------------------------------------------------------
    def put(self, key: bytes, chunk: StoredChunk) -> bool:
        size = chunk.nbytes
        if size > self._capacity:
            return False
        with self._lock:
            self._remove(key)
            while self._used + size > self._capacity:
                self._remove(self._victim())
                self.evictions += 1
            self._insert(key, chunk)
        return True

    def get(self, key: bytes) -> StoredChunk | None:
        with self._lock:
            chunk = self._items.get(key)
            if chunk is not None:
                self._touch(key)
            return chunk

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._items

    def delete(self, key: bytes) -> None:
        with self._lock:
            self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._freq.clear()
            self._buckets.clear()
            self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def num_chunks(self) -> int:
        return len(self._items)
