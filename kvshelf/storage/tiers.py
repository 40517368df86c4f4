"""The tier manager: an ordered stack of tiers that looks like one backend to the cache engine.

- get: first tier that has the chunk wins; a hit below the first tier is promoted into the first tier
  (CPU memory).
- put: inline into cheap tiers (memory), and through a bounded queue to a background writer for the
  rest (write-through). The queue is bounded in chunks and in bytes; a full queue blocks the caller at
  most `write_block_s`, then drops the write.
- faults: any exception from a tier is a miss (get/contains) or a dropped write (put), counted, logged,
  and fed to that tier's circuit breaker; nothing reaches the caller, which recomputes.
- deadlines: calls to tiers that are not inline (disk, Redis, S3) run on a few worker threads of their
  own and the caller waits at most `deadline_s` (`write_deadline_s` for writes) in total, however the
  tier trickles its bytes; an overrun is a miss and a fault, and the stuck call ends in the background.
  Every worker of a tier busy means the tier is stuck: it is skipped (no thread growth). A caller may
  also put a whole request under a budget (`tier_budget`): calls then end when the budget does, and a
  call cut by the budget, like a read slower than `slow_s`, counts against the tier's breaker (one tier and
  the budgets: storage.tier).
- side by side: `open_many` (chunks, or heads) and `run_many` (layer ranges) keep up to `read_window` calls
  of one request in flight, in order, each under its own deadline (GPU layerwise loading, issue #17).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from kvshelf.storage.base import StorageBackend, StoredChunk
from kvshelf.storage.breaker import CircuitBreaker
from kvshelf.storage.expect import expecting
from kvshelf.storage.tier import BUSY, Tier

log = logging.getLogger(__name__)
_STOP = object()


def _open_each(read: Callable, keys: list[bytes], expected: list) -> list:
    """read(key) of each key under its Expected (a call of TierManager.open_many)."""
    out = []
    for key, want in zip(keys, expected, strict=True):
        with expecting(want):
            out.append(read(key))
    return out


class TierManager(StorageBackend):
    name = "tiers"

    def __init__(
        self,
        backends: list[StorageBackend],
        *,
        write_queue_size: int = 64,
        write_queue_bytes: int = 256 << 20,
        write_block_s: float = 0.02,
        breaker_failures: int = 3,
        breaker_reset_s: float = 5.0,
        deadline_s: float | None = 2.0,
        write_deadline_s: float | None = None,
        slow_s: float | None = None,
        workers: int = 4,
        read_window: int | None = None,
    ):
        """`deadline_s` bounds each read of a tier that is not inline (None: unbounded), `write_deadline_s`
        each write (default 5x `deadline_s`); reads slower than `slow_s` (default: off; reads cut by a
        request's budget always count) count against the tier's breaker; `workers` calls per tier may be
        in flight at once, `read_window` of them (default: half) for one request's open_many."""
        if not backends:
            raise ValueError("a tier manager needs at least one tier")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        write_deadline_s = write_deadline_s or (5 * deadline_s if deadline_s is not None else None)
        self.tiers = [
            Tier(
                b,
                CircuitBreaker(b.name, failure_threshold=breaker_failures, reset_after_s=breaker_reset_s),
                deadline_s=deadline_s,
                write_deadline_s=write_deadline_s,
                slow_s=slow_s,
                workers=workers,
            )
            for b in backends
        ]
        self.write_block_s = write_block_s
        self.read_window = max(1, min(read_window or workers // 2, workers))  # open_many's reads in flight
        self.write_queue_bytes = write_queue_bytes
        self._queue: queue.Queue = queue.Queue(maxsize=write_queue_size)
        self._queued_bytes = 0  # bytes of the chunks in the queue or being written
        self._space = threading.Condition()
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

    def open_many(self, keys: list[bytes], expected: list | None = None, *, tier=None, ranges=False, calls=0):
        """Open `keys` from the tier named `tier` (default: the first), in order, yielding each reader (None: a
        miss or a fault) as soon as it and those before it are there; with `ranges`, each key's LayerRanges
        (head verified; ranges read by run_many). Up to `read_window` calls side by side (_in_order): one per key,
        or `calls` (heads: the tier's head_calls if set), each opening its share of the keys (a miss for all of
        them if it fails)."""
        t = self._named(tier)
        read = t.backend.open_ranges if ranges else t.backend.open
        expected = expected or [None] * len(keys)
        if calls > 0 and ranges and t.backend.head_calls > 0:
            calls = t.backend.head_calls
        n = len(keys)
        c = min(calls, n) if calls > 0 else n
        spans = [(n * i // c, n * (i + 1) // c) for i in range(c)]  # consecutive, none empty (c <= n)
        jobs = ((_open_each, (read, keys[a:b], expected[a:b]), None) for a, b in spans)
        for (a, b), batch in zip(spans, self._in_order(t, jobs), strict=True):
            for reader in batch if batch is not None else [None] * (b - a):
                t.count(**({"hits": 1} if reader is not None else {"misses": 1}))
                yield reader

    def run_many(self, calls, *, tier: str | None = None):
        """fn(*args) of each (fn, args) in `calls` on the tier named `tier`'s workers, as open_many reads: each
        result (None: a fault) in order (layer ranges of chunks open_many opened)."""
        return self._in_order(self._named(tier), ((fn, args, None) for fn, args in calls))

    def _named(self, tier: str | None) -> Tier:
        t = next((x for x in self.tiers if x.name == tier), None) if tier is not None else self.tiers[0]
        if t is None:
            raise ValueError(f"no tier named {tier!r}")
        return t

    def _in_order(self, t: Tier, calls):
        """Results of (fn, args, Expected) calls on tier t, in order, up to read_window in flight; the rest of
        the tier's workers stay free for other requests, and a worker taken by them makes this wait for its
        own calls rather than count the tier stuck."""
        window = max(1, min(self.read_window, t.lanes.size)) if t.lanes is not None else 1
        pending: collections.deque = collections.deque()
        calls = iter(calls)
        nxt = next(calls, None)
        while nxt is not None or pending:
            while nxt is not None and len(pending) < window:
                fn, args, want = nxt
                with expecting(want):
                    call = t.start(fn, *args, wait_if_busy=bool(pending))
                if call is BUSY:
                    break
                pending.append(call)
                nxt = next(calls, None)
            yield t.finish(pending.popleft())

    def tier_codec(self, name: str):
        """The codec of the tier named `name` (None: it holds decoded tensors, or there is no such tier)."""
        return next((t.backend.codec for t in self.tiers if t.name == name), None)

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
            if self._enqueue(key, chunk):
                stored = True
            else:
                for tier in self.tiers:
                    if not tier.backend.inline_put:
                        tier.count(dropped_writes=1)
                log.warning("tier write queue full: dropping the write-behind of chunk %s", key.hex())
        return stored

    def _enqueue(self, key: bytes, chunk: StoredChunk) -> bool:
        """Queue a write-behind within the chunk and byte bounds, waiting at most `write_block_s` for room.
        A chunk larger than the byte bound alone still goes through an empty queue (else it never could)."""
        size = chunk.nbytes
        until = time.monotonic() + self.write_block_s
        with self._space:
            while self._queued_bytes and self._queued_bytes + size > self.write_queue_bytes:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._space.wait(left)
            self._queued_bytes += size
        try:
            left = until - time.monotonic()
            if left > 0:
                self._queue.put((key, chunk), timeout=left)
            else:
                self._queue.put_nowait((key, chunk))
            return True
        except queue.Full:
            self._release(size)
            return False

    def _release(self, size: int) -> None:
        with self._space:
            self._queued_bytes -= size
            self._space.notify_all()

    def _put_one(self, tier: Tier, key: bytes, chunk: StoredChunk, *, write: bool = False) -> bool:
        ok = tier.call(tier.backend.put, key, chunk, default=False, write=write)
        if ok:
            tier.count(puts=1, put_bytes=chunk.nbytes)
        else:
            tier.count(dropped_writes=1)
        return bool(ok)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            size = 0
            try:
                if item is _STOP:
                    return
                key, chunk = item
                size = chunk.nbytes
                for tier in self.tiers:
                    # Skip a tier that has it already (e.g. a chunk loaded from it and stored again).
                    if not tier.backend.inline_put and not tier.call(tier.backend.contains, key, default=False):
                        self._put_one(tier, key, chunk, write=True)
            except BaseException as err:  # a bug, not a tier fault (those are caught in Tier.call): be loud
                self._writer_error = err
                log.exception("tier writer thread crashed")
                raise
            finally:
                if size:
                    self._release(size)
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
        for tier in self.tiers:
            tier.close()
            tier.backend.close()
        if self._writer_error is not None:
            raise RuntimeError("the tier writer thread crashed") from self._writer_error

    # -- admin ---------------------------------------------------------------------------------------
    def delete(self, key: bytes) -> None:
        for tier in self.tiers:
            tier.call(tier.backend.delete, key)

    def clear(self) -> None:
        self.flush()
        for tier in self.tiers:
            tier.call(tier.backend.clear, write=True)

    @property
    def queued_bytes(self) -> int:
        """Bytes of write-behind chunks queued or being written."""
        return self._queued_bytes

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
                "corrupt_objects": t.backend.corrupt_objects,
                "deadline_s": t.deadline_s,
            }
            for t in self.tiers
        }


class _PromotingReader:
    """Passes layers through and, once every layer has been read, copies the chunk up into `top`."""

    kv = None  # a ChunkReader whose layers decode on demand

    def __init__(self, reader, key: bytes, top: Tier):
        self.meta, self._reader, self._key, self._top = reader.meta, reader, key, top
        self._layers: dict[int, torch.Tensor] = {}

    def layers(self, i: int, j: int) -> torch.Tensor:
        return torch.stack([self.layer(k) for k in range(i, j)])

    def encoded_layer(self, i: int):
        """The lower tier's stored bytes, for a loader that decodes them on a GPU. Layers read this way are
        not promoted: that would copy the decoded KV back to the host, about what decoding it costs again."""
        return self._reader.encoded_layer(i)

    def encoded_payload(self):
        return self._reader.encoded_payload()  # as encoded_layer: not promoted

    def layer(self, i: int) -> torch.Tensor:
        layer = self._reader.layer(i)
        self._layers[i] = layer
        if len(self._layers) == self.meta.shape[0]:
            chunk = StoredChunk(self.meta, torch.stack([self._layers[j] for j in range(len(self._layers))]))
            if self._top.call(self._top.backend.put, self._key, chunk, default=False):
                self._top.count(promotions=1)
        return layer
