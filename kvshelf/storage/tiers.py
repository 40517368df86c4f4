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
  call cut by the budget, like a read slower than `slow_s`, counts against the tier's breaker.
- side by side: `open_many` (chunks, or heads) and `run_many` (layer ranges) keep up to `read_window` calls
  of one request in flight, in order, each under its own deadline (GPU layerwise loading, issue #17).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from kvshelf.storage.base import StorageBackend, StoredChunk
from kvshelf.storage.breaker import CircuitBreaker
from kvshelf.storage.expect import expecting
from kvshelf.storage.lanes import Lanes

log = logging.getLogger(__name__)
_STOP = object()
_budget = threading.local()


class TierTimeout(TimeoutError):
    """A tier call that did not finish within its deadline or the request's budget."""


class TierSlow(TimeoutError):
    """A tier read that succeeded, but slower than the tier may be to pay."""


class TierStuck(RuntimeError):
    """Every worker of a tier is still busy with earlier calls that overran."""


@contextlib.contextmanager
def tier_budget(seconds: float | None) -> Iterator[None]:
    """Bound the tier reads this thread makes inside the block to `seconds` in total (None: no budget).

    Reads still running when the budget ends are cut (a miss, counted against the tier as slow);
    later reads inside the block are not made. Budgets nest: the tighter one wins.
    """
    with tier_budget_until(None if seconds is None else time.monotonic() + max(0.0, seconds)):
        yield


@contextlib.contextmanager
def tier_budget_until(until: float | None) -> Iterator[None]:
    """tier_budget with its end as a time.monotonic() instant: carries a request's budget to another thread."""
    outer = getattr(_budget, "until", None)
    bounds = [t for t in (outer, until) if t is not None]
    _budget.until = min(bounds) if bounds else None
    try:
        yield
    finally:
        _budget.until = outer


def budget_until() -> float | None:
    """The end of this thread's request budget (time.monotonic()), or None: for tier_budget_until elsewhere."""
    return getattr(_budget, "until", None)


def _budget_left() -> float | None:
    until = getattr(_budget, "until", None)
    return None if until is None else until - time.monotonic()


@dataclass
class _Call:
    """A tier call begun by Tier.start: finished already (`value`), or running on a worker (`future`)."""

    fn: Callable
    done: bool = False
    value: object = None
    future: Future | None = None
    wait_s: float | None = None  # the most its caller waits, from t0: deadline or request budget
    cut: bool = False  # wait_s is the request's budget, not the tier's deadline
    write: bool = False
    t0: float = field(default_factory=time.monotonic)


BUSY = _Call(lambda: None, done=True)  # Tier.start(wait_if_busy=True): every worker busy, nothing begun


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_bytes: int = 0
    errors: int = 0  # exceptions from the tier (refused, timeout, disk full, ...)
    skipped: int = 0  # calls not made because the breaker was open or the request's budget was spent
    dropped_writes: int = 0  # writes lost to a full queue, an open breaker or an error
    promotions: int = 0  # chunks copied up into this tier from a lower one
    timeouts: int = 0  # calls cut by their deadline (also counted in errors)
    slow: int = 0  # reads cut by the request's budget or slower than `slow_s`: breaker failures, not errors
    stuck: int = 0  # calls not made because every worker of the tier was busy with overrunning calls


class Tier:
    """One backend with its breaker, stats and (for tiers that are not inline) deadline and workers."""

    def __init__(
        self,
        backend: StorageBackend,
        breaker: CircuitBreaker,
        *,
        deadline_s: float | None = None,
        write_deadline_s: float | None = None,
        slow_s: float | None = None,
        workers: int = 4,
    ):
        self.backend = backend
        self.breaker = breaker
        self.stats = TierStats()
        self._lock = threading.Lock()
        timed = not backend.inline_put and deadline_s is not None
        self.deadline_s = deadline_s if timed else None
        self.write_deadline_s = (write_deadline_s or deadline_s) if timed else None
        self.slow_s = slow_s if timed else None
        self.lanes = Lanes(backend.name, workers) if timed else None

    @property
    def name(self) -> str:
        return self.backend.name

    def count(self, **deltas: int) -> None:
        with self._lock:
            for field, delta in deltas.items():
                setattr(self.stats, field, getattr(self.stats, field) + delta)

    def call(self, fn: Callable, *args, default=None, write: bool = False):
        """Run fn(*args) against the tier; on an open breaker, an overrun or any error return `default`."""
        return self.finish(self.start(fn, *args, default=default, write=write), default)

    def start(self, fn: Callable, *args, default=None, write: bool = False, wait_if_busy: bool = False):
        """Begin fn(*args) on the tier (finish() gives its result). With `wait_if_busy`, every worker busy
        returns BUSY instead of counting the tier as stuck: a caller with calls of its own in flight waits
        for those first (bounded parallel reads that stay within the tier's workers)."""
        limit = self.write_deadline_s if write else self.deadline_s
        left = None if (write or limit is None) else _budget_left()
        if left is not None and left <= 0:
            self.count(skipped=1)  # the request's budget is spent: no new call
            return _Call(fn, done=True, value=default)
        if not self.breaker.allow():
            self.count(skipped=1)
            return _Call(fn, done=True, value=default)
        if self.lanes is None:
            try:
                result = fn(*args)
            except Exception as err:  # a tier fault is a miss, never a crash
                return _Call(fn, done=True, value=self._failed(fn, err, default))
            self.breaker.record_success()
            return _Call(fn, done=True, value=result)
        cut = left is not None and left < limit
        future = self.lanes.submit(fn, args)
        if future is None:
            if wait_if_busy:
                return BUSY
            self.count(stuck=1)
            self.breaker.record_failure(TierStuck(f"all {self.lanes.size} workers busy"))
            return _Call(fn, done=True, value=default)
        return _Call(fn, future=future, wait_s=left if cut else limit, cut=cut, write=write)

    def finish(self, call: _Call, default=None):
        """The result of a call begun by start(), waiting at most its deadline (or the request's budget)
        from when it began; an overrun or an error is `default`, counted against the tier."""
        if call.done:
            return call.value
        fn, future = call.fn, call.future
        try:
            result = future.result(timeout=max(0.0, call.t0 + call.wait_s - time.monotonic()))
        except Exception as err:
            if future.done():  # the call itself failed (its own socket timeout included)
                return self._failed(fn, err, default)
            waited = time.monotonic() - call.t0
            if call.cut:  # the request's budget ran out: slower than this request could use
                self.count(slow=1)
                log.info("tier %s: %s cut after %.3f s by the request's budget", self.name, fn.__name__, waited)
                self.breaker.record_failure(TierSlow(f"{fn.__name__} overran the request's budget"))
                return default
            self.count(timeouts=1)
            return self._failed(fn, TierTimeout(f"no answer within the {call.wait_s:.3g} s deadline"), default)
        elapsed = time.monotonic() - call.t0
        if not call.write and self.slow_s is not None and elapsed > self.slow_s:
            self.count(slow=1)
            self.breaker.record_failure(TierSlow(f"{fn.__name__} took {elapsed:.3f} s > {self.slow_s:.3g} s"))
            return result  # the answer is good, only late: use it
        self.breaker.record_success()
        return result

    def _failed(self, fn: Callable, err: Exception, default):
        self.count(errors=1)
        log.warning("tier %s: %s failed: %s: %s", self.name, fn.__name__, type(err).__name__, err)
        self.breaker.record_failure(err)
        return default

    def close(self) -> None:
        if self.lanes is not None:
            self.lanes.close(self.deadline_s or 0.0)  # writes were flushed before: only overruns are left


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
