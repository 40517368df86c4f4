"""One storage tier as the tier manager drives it: its circuit breaker, its stats, and, for tiers that are
not inline (disk, Redis, S3), a deadline per call and a few worker threads of its own, so that a caller waits at
most the deadline however the tier trickles its bytes. A request may also put all its reads under one budget
(`tier_budget`): calls then end when the budget does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from kvshelf.storage.base import StorageBackend
from kvshelf.storage.breaker import CircuitBreaker
from kvshelf.storage.lanes import Lanes

log = logging.getLogger(__name__)
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
