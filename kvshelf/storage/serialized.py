"""Base for tiers that hold bytes (disk, Redis, S3): encode with the tier's codec, verify on every read."""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod

from kvshelf.codecs import Codec
from kvshelf.metrics import metrics
from kvshelf.storage.base import StorageBackend, StoredChunk
from kvshelf.storage.format import EncodedChunk, FormatError, UnreadableHere, encode_chunk_parts, open_chunk

log = logging.getLogger(__name__)


class ByteStore(StorageBackend):
    def __init__(self, codec: Codec):
        self.codec = codec
        self.corrupt_objects = 0  # objects that failed verification and were deleted
        self._corrupt_lock = threading.Lock()
        self._unreadable_seen: set[str] = set()

    # Subclasses implement raw byte access under a string name (the key's hex digest).
    @abstractmethod
    def _put_bytes(self, name: str, parts: list[bytes | memoryview]) -> bool:
        """Store the concatenation of `parts` (passed unjoined so writers can skip a copy)."""

    @abstractmethod
    def _get_bytes(self, name: str) -> bytes | None: ...

    @abstractmethod
    def _delete_name(self, name: str) -> None: ...

    def put(self, key: bytes, chunk: StoredChunk) -> bool:
        t0 = time.perf_counter()
        parts = encode_chunk_parts(key, chunk, self.codec)
        metrics().observe_codec(
            self.codec.name, "encode", time.perf_counter() - t0, chunk.nbytes, sum(len(p) for p in parts)
        )
        return self._put_bytes(key.hex(), parts)

    def get(self, key: bytes) -> StoredChunk | None:
        encoded = self.open(key)
        if encoded is None:
            return None
        t0 = time.perf_counter()
        try:
            chunk = encoded.decode_all()
        except FormatError as err:
            self._reject(key, err)
            return None
        metrics().observe_codec(self.codec.name, "decode", time.perf_counter() - t0, chunk.nbytes, 0)
        return chunk

    def open(self, key: bytes) -> EncodedChunk | None:
        """Fetch and verify the object; layers decode when asked for."""
        blob = self._get_bytes(key.hex())
        if blob is None:
            return None
        try:
            return open_chunk(blob, key)
        except UnreadableHere as err:
            # Another instance's calibration: the object is fine for them, so it stays.
            if str(err) not in self._unreadable_seen:
                self._unreadable_seen.add(str(err))
                log.warning("%s tier: %s; such chunks are misses here", self.name, err)
            metrics().bypasses.labels("unknown_calibration").inc()
            return None
        except FormatError as err:
            self._reject(key, err)
            return None

    def _reject(self, key: bytes, err: Exception) -> None:
        log.warning("%s tier: deleting damaged object %s: %s", self.name, key.hex(), err)
        with self._corrupt_lock:
            self.corrupt_objects += 1
        self._delete_name(key.hex())

    def delete(self, key: bytes) -> None:
        self._delete_name(key.hex())

    # Remote stores manage their own space (Redis maxmemory, S3 lifecycle); the disk tier overrides these.
    @property
    def used_bytes(self) -> int | None:
        return None

    @property
    def capacity_bytes(self) -> int | None:
        return None
