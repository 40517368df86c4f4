"""The tier manager: an ordered stack of tiers that looks like one backend to the cache engine.

- get: first tier that has the chunk wins; a hit below the first tier is promoted into the first tier
  (CPU memory).
- put: inline into cheap tiers (memory), and through a bounded queue to a background writer for the
  rest (write-through). A full queue blocks the caller at most `write_block_s`, then drops the write.
- faults: any exception from a tier is a miss (get/contains) or a dropped write (put), counted, logged,
  and fed to that tier's circuit breaker; nothing reaches the caller, which recomputes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvshelf.storage.base import StorageBackend, StoredChunk
from kvshelf.storage.breaker import CircuitBreaker

log = logging.getLogger(__name__)
_STOP = object()


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_bytes: int = 0
    errors: int = 0  # exceptions from the tier (refused, timeout, disk full, ...)
    skipped: int = 0  # calls not made because the breaker was open
    dropped_writes: int = 0  # writes lost to a full queue, an open breaker or an error
    promotions: int = 0  # chunks copied up into this tier from a lower one


class Tier:
    """One backend with its breaker and stats."""

    def __init__(self, backend: StorageBackend, breaker: CircuitBreaker):
        self.backend = backend
        self.breaker = breaker
        self.stats = TierStats()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.backend.name

    def count(self, **deltas: int) -> None:
        with self._lock:
            for field, delta in deltas.items():
                setattr(self.stats, field, getattr(self.stats, field) + delta)

    def call(self, fn: Callable, *args, default=None):
        """Run fn(*args) against the tier; on an open breaker or any error return `default`."""
        if not self.breaker.allow():
            self.count(skipped=1)
            return default
        try:
            result = fn(*args)
        except Exception as err:  # a tier fault is a miss, never a crash
            self.count(errors=1)
            log.warning("tier %s: %s failed: %s: %s", self.name, fn.__name__, type(err).__name__, err)
            self.breaker.record_failure(err)
            return default
        self.breaker.record_success()
        return result


class TierManager(StorageBackend):
    name = "tiers"

    def __init__(
        self,
        backends: list[StorageBackend],
        *,
        write_queue_size: int = 64,
        write_block_s: float = 0.02,
        breaker_failures: int = 3,
        breaker_reset_s: float = 5.0,
    ):
        if not backends:
            raise ValueError("a tier manager needs at least one tier")
        self.tiers = [
            Tier(b, CircuitBreaker(b.name, failure_threshold=breaker_failures, reset_after_s=breaker_reset_s))
            for b in backends
        ]
        self.write_block_s = write_block_s
        self._queue: queue.Queue = queue.Queue(maxsize=write_queue_size)
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        if any(not t.backend.inline_put for t in self.tiers):
            self._writer = threading.Thread(target=self._write_loop, name="kvshelf-tier-writer", daemon=True)
            self._writer.start()

    # -- reads ---------------------------------------------------------------------------------------
    def _first_hit(self, verb: str, key: bytes):
        """(tier, result) from the first tier whose `verb` finds the key, counting hits and misses."""
        for tier in self.tiers:
            found = tier.call(getattr(tier.backend, verb), key)
            if found is not None:
                tier.count(hits=1)
                return tier, found
            tier.count(misses=1)
        return None, None

    def _promotes(self, tier: Tier | None) -> bool:
        return tier is not None and tier is not self.tiers[0] and self.tiers[0].backend.inline_put

    def get(self, key: bytes) -> StoredChunk | None:
        tier, chunk = self._first_hit("get", key)
        if self._promotes(tier):
            top = self.tiers[0]
            if top.call(top.backend.put, key, chunk, default=False):
                top.count(promotions=1)
        return chunk

    def open(self, key: bytes):
        """Like get, for layer-by-layer reading; a lower-tier hit is promoted once all its layers were read."""
        tier, reader = self._first_hit("open", key)
        return _PromotingReader(reader, key, self.tiers[0]) if self._promotes(tier) else reader

    def locate(self, keys: list[bytes]) -> list[str | None]:
        """For each key, the name of the first tier that holds it (None: no tier)."""
        where: list[str | None] = [None] * len(keys)
        for tier in self.tiers:
            todo = [i for i, w in enumerate(where) if w is None]
            if not todo:
                break
            flags = tier.call(tier.backend.contains_many, [keys[i] for i in todo])
            for i, flag in zip(todo, flags or [], strict=False):
                if flag:
                    where[i] = tier.name
        return where

    def contains(self, key: bytes) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        return [w is not None for w in self.locate(keys)]

    # -- writes --------------------------------------------------------------------------------------
    def put(self, key: bytes, chunk: StoredChunk) -> bool:
        stored = False
        behind = False
        for tier in self.tiers:
            if tier.backend.inline_put:
                stored |= self._put_one(tier, key, chunk)
            else:
                behind = True
        if behind:
            try:
                if self.write_block_s > 0:
                    self._queue.put((key, chunk), timeout=self.write_block_s)
                else:
                    self._queue.put_nowait((key, chunk))
                stored = True
            except queue.Full:
                for tier in self.tiers:
                    if not tier.backend.inline_put:
                        tier.count(dropped_writes=1)
                log.warning("tier write queue full: dropping the write-behind of chunk %s", key.hex())
        return stored

    def _put_one(self, tier: Tier, key: bytes, chunk: StoredChunk) -> bool:
        ok = tier.call(tier.backend.put, key, chunk, default=False)
        if ok:
            tier.count(puts=1, put_bytes=chunk.nbytes)
        else:
            tier.count(dropped_writes=1)
        return bool(ok)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                key, chunk = item
                for tier in self.tiers:
                    # Skip a tier that has it already (e.g. a chunk loaded from it and stored again).
                    if not tier.backend.inline_put and not tier.call(tier.backend.contains, key, default=False):
                        self._put_one(tier, key, chunk)
            except BaseException as err:  # a bug, not a tier fault (those are caught in Tier.call): be loud
                self._writer_error = err
                log.exception("tier writer thread crashed")
                raise
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every queued write-behind is done (tests, shutdown)."""
        if self._writer is None:
            return
        if timeout_s is None:
            self._queue.join()
            return
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        done.wait(timeout_s)

    def close(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            self._queue.put(_STOP)
            self._writer.join()
        if self._writer_error is not None:
            raise RuntimeError("the tier writer thread crashed") from self._writer_error
        for tier in self.tiers:
            tier.backend.close()

    # -- admin ---------------------------------------------------------------------------------------
    def delete(self, key: bytes) -> None:
        for tier in self.tiers:
            tier.call(tier.backend.delete, key)

    def clear(self) -> None:
        self.flush()
        for tier in self.tiers:
            tier.call(tier.backend.clear)

    def unavailable_tiers(self) -> list[str]:
        return [t.name for t in self.tiers if t.breaker.is_open]

    @property
    def used_bytes(self) -> int:
        return self.tiers[0].backend.used_bytes or 0

    @property
    def capacity_bytes(self) -> int | None:
        return self.tiers[0].backend.capacity_bytes

    def stats(self) -> dict:
        return {
            t.name: {
                **t.stats.__dict__,
                "breaker_open": t.breaker.is_open,
                "used_bytes": t.backend.used_bytes,
                "capacity_bytes": t.backend.capacity_bytes,
                "corrupt_objects": getattr(t.backend, "corrupt_objects", 0),
            }
            for t in self.tiers
        }


class _PromotingReader:
    """Passes layers through and, once every layer has been read, copies the chunk up into `top`."""

    def __init__(self, reader, key: bytes, top: Tier):
        self.meta, self._reader, self._key, self._top = reader.meta, reader, key, top
        self._layers: dict[int, torch.Tensor] = {}

    def layers(self, i: int, j: int) -> torch.Tensor:
        return torch.stack([self.layer(k) for k in range(i, j)])

    def layer(self, i: int) -> torch.Tensor:
        layer = self._reader.layer(i)
        self._layers[i] = layer
        if len(self._layers) == self.meta.shape[0]:
            chunk = StoredChunk(self.meta, torch.stack([self._layers[j] for j in range(len(self._layers))]))
            if self._top.call(self._top.backend.put, self._key, chunk, default=False):
                self._top.count(promotions=1)
        return layer
