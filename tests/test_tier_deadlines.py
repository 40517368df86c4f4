"""Deadlines on tiers that are not inline: a hung or slow tier costs a bounded wait, never a hang; the
write-behind queue is bounded in bytes."""

import threading
import time

import pytest
from helpers import key, make_chunk

from kvshelf.storage.base import StorageBackend
from kvshelf.storage.memory import MemoryBackend
from kvshelf.storage.tier import tier_budget
from kvshelf.storage.tiers import TierManager


class SlowBackend(StorageBackend):
    """A remote-like tier whose reads take `delay` seconds, or hang until `release` is set."""

    name = "slow"

    def __init__(self, delay: float = 0.0):
        self.items = {}
        self.delay = delay
        self.release = threading.Event()
        self.release.set()
        self.finished = 0
        self._lock = threading.Lock()

    def _wait(self):
        time.sleep(self.delay)
        self.release.wait()
        with self._lock:
            self.finished += 1

    def put(self, key, chunk):
        self._wait()
        self.items[key] = chunk
        return True

    def get(self, key):
        self._wait()
        return self.items.get(key)

    def contains(self, key):
        self._wait()
        return key in self.items

    def delete(self, key):
        self.items.pop(key, None)

    def clear(self):
        self.items.clear()

    used_bytes = None
    capacity_bytes = None


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t0


def test_a_hung_read_ends_at_the_deadline_and_opens_the_breaker():
    slow = SlowBackend()
    slow.items[key(1)] = make_chunk()
    slow.release.clear()  # every call hangs
    tiers = TierManager([slow], deadline_s=0.2, breaker_failures=3, workers=8)
    try:
        for _ in range(3):
            out, took = timed(tiers.get, key(1))
            assert out is None and took < 0.2 + 1.0  # a miss, after the deadline, not a hang
        s = tiers.stats()["slow"]
        assert s["timeouts"] == 3 and s["errors"] == 3 and s["breaker_open"]
        out, took = timed(tiers.get, key(1))  # breaker open: not even tried
        assert out is None and tiers.stats()["slow"]["skipped"] == 1
    finally:
        slow.release.set()
        tiers.close()
    assert slow.finished == 3  # the stuck calls ended in the background once the tier answered


def test_every_worker_stuck_skips_the_tier_without_new_threads():
    slow = SlowBackend()
    slow.release.clear()
    tiers = TierManager([slow], deadline_s=0.05, breaker_failures=100, workers=2)
    try:
        for i in range(2):
            assert tiers.get(key(i)) is None  # each leaves a worker stuck
        threads = threading.active_count()
        out, took = timed(tiers.get, key(9))
        assert out is None and tiers.stats()["slow"]["stuck"] == 1
        assert threading.active_count() == threads  # bounded: no thread per stuck call
    finally:
        slow.release.set()
        tiers.close()
    assert tiers.stats()["slow"]["timeouts"] == 2


def test_a_request_budget_cuts_reads_and_counts_them_slow():
    slow = SlowBackend(delay=0.5)
    slow.items[key(1)] = make_chunk()
    tiers = TierManager([MemoryBackend(1 << 20), slow], deadline_s=5.0, breaker_failures=2)
    try:
        with tier_budget(0.05):
            out, took = timed(tiers.get, key(1))
            assert out is None and took < 0.5
            later, took = timed(tiers.get, key(1))  # budget spent: not made at all
            assert later is None and took < 0.1
        s = tiers.stats()["slow"]
        assert s["slow"] == 1 and s["skipped"] == 1 and s["errors"] == 0
        assert tiers.get(key(1)) is not None  # outside the budget the same read succeeds
    finally:
        tiers.close()


def test_slow_successes_are_used_but_open_the_breaker():
    slow = SlowBackend(delay=0.06)
    slow.items[key(1)] = make_chunk()
    tiers = TierManager([slow], deadline_s=1.0, slow_s=0.03, breaker_failures=2)
    try:
        assert tiers.get(key(1)) is not None  # late but good: used
        assert tiers.get(key(1)) is not None
        s = tiers.stats()["slow"]
        assert s["slow"] == 2 and s["breaker_open"]
        assert tiers.get(key(1)) is None  # skipped while the breaker is open
    finally:
        tiers.close()


def test_budget_nesting_keeps_the_tighter_bound():
    slow = SlowBackend(delay=0.3)
    tiers = TierManager([slow], deadline_s=5.0, breaker_failures=100)
    try:
        with tier_budget(0.05), tier_budget(10.0):
            _, took = timed(tiers.contains, key(1))
        assert took < 0.3
        with tier_budget(None):
            assert tiers.contains(key(1)) is False  # no budget: the full read
    finally:
        tiers.close()


def test_write_behind_is_bounded_in_bytes():
    slow = SlowBackend()
    slow.release.clear()  # writes hang: the queue fills
    chunk = make_chunk()
    tiers = TierManager(
        [MemoryBackend(1 << 24), slow],
        write_queue_size=1000,
        write_queue_bytes=3 * chunk.nbytes,
        write_block_s=0.01,
        deadline_s=0.5,
        write_deadline_s=30.0,
    )
    try:
        for i in range(10):
            assert tiers.put(key(i), make_chunk(seed=i))  # memory takes every chunk
            assert tiers.queued_bytes <= 3 * chunk.nbytes
        assert tiers.stats()["slow"]["dropped_writes"] >= 6
    finally:
        slow.release.set()
        tiers.flush()
        tiers.close()
    assert tiers.queued_bytes == 0


def test_one_chunk_above_the_byte_bound_still_goes_through_an_empty_queue():
    slow = SlowBackend()
    tiers = TierManager([slow], write_queue_bytes=16, deadline_s=1.0)
    try:
        assert tiers.put(key(1), make_chunk())
        tiers.flush()
        assert key(1) in slow.items
    finally:
        tiers.close()


def test_bad_deadline_settings_are_refused():
    with pytest.raises(ValueError, match="deadline_s"):
        TierManager([SlowBackend()], deadline_s=0)
    with pytest.raises(ValueError, match="workers"):
        TierManager([SlowBackend()], workers=0)
