"""Hot tier: chunks kept as tensors in CPU memory, with a byte capacity and LRU eviction."""

from __future__ import annotations

import threading
from collections import OrderedDict

from kvshelf.storage.base import StorageBackend, StoredChunk


class MemoryBackend(StorageBackend):
    name = "cpu"
    inline_put = True

    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"cpu tier capacity must be > 0 bytes, got {capacity_bytes}")
        self._capacity = int(capacity_bytes)
        self._used = 0
        self._items: OrderedDict[bytes, StoredChunk] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def put(self, key: bytes, chunk: StoredChunk) -> bool:
        size = chunk.nbytes
        if size > self._capacity:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= old.nbytes
            while self._used + size > self._capacity:
                _, victim = self._items.popitem(last=False)
                self._used -= victim.nbytes
                self.evictions += 1
            self._items[key] = chunk
            self._used += size
        return True

    def get(self, key: bytes) -> StoredChunk | None:
        with self._lock:
            chunk = self._items.get(key)
            if chunk is not None:
                self._items.move_to_end(key)
            return chunk

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._items

    def delete(self, key: bytes) -> None:
        with self._lock:
            chunk = self._items.pop(key, None)
            if chunk is not None:
                self._used -= chunk.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
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
