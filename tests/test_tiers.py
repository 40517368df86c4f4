"""The tier manager: lookup order, promotion, write-behind, bounded queue, breakers, clean shutdown."""

import threading

import pytest
import torch
from helpers import key, make_chunk

from kvshelf.codecs import get_codec
from kvshelf.storage.base import StorageBackend
from kvshelf.storage.breaker import CircuitBreaker
from kvshelf.storage.disk import DiskBackend
from kvshelf.storage.memory import MemoryBackend
from kvshelf.storage.tiers import TierManager


class FlakyBackend(StorageBackend):
    """A remote-like tier that can be switched down (every call raises) and slowed down (puts block)."""

    name = "flaky"

    def __init__(self):
        self.items = {}
        self.down = False
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0

    def _check(self):
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("tier is down")

    def put(self, key, chunk):
        self._check()
        self.gate.wait()
        self.items[key] = chunk
        return True

    def get(self, key):
        self._check()
        return self.items.get(key)

    def contains(self, key):
        self._check()
        return key in self.items

    def delete(self, key):
        self.items.pop(key, None)

    def clear(self):
        self.items.clear()

    used_bytes = None
    capacity_bytes = None


def test_write_behind_promotion_and_order(tmp_path):
    mem = MemoryBackend(2 * make_chunk().nbytes)
    disk = DiskBackend(tmp_path, 1 << 30, get_codec("none"))
    tiers = TierManager([mem, disk])
    for i in range(4):
        assert tiers.put(key(i), make_chunk(seed=i))
    tiers.flush()
    assert disk.num_chunks == 4 and mem.num_chunks == 2  # memory evicted 0 and 1, disk has all
    assert tiers.contains_many([key(i) for i in range(5)]) == [True] * 4 + [False]
    got = tiers.get(key(0))  # from disk, promoted into memory
    assert torch.equal(got.kv, make_chunk(seed=0).kv) and mem.contains(key(0))
    stats = tiers.stats()
    assert stats["disk"]["hits"] == 1 and stats["cpu"]["promotions"] == 1 and stats["cpu"]["misses"] == 1
    assert tiers.get(key(9)) is None
    tiers.close()


def test_tier_down_is_a_miss_and_breaker_skips_it():
    mem, flaky = MemoryBackend(1 << 20), FlakyBackend()
    tiers = TierManager([mem, flaky], breaker_failures=2, breaker_reset_s=3600)
    tiers.put(key(1), make_chunk())
    tiers.flush()
    mem.clear()
    flaky.down = True
    calls_before = flaky.calls
    for _ in range(5):
        assert tiers.get(key(1)) is None  # never raises
    assert tiers.contains_many([key(1)]) == [False]
    s = tiers.stats()["flaky"]
    assert s["errors"] == 2 and s["skipped"] >= 4 and s["breaker_open"]
    assert flaky.calls - calls_before == 2  # the open breaker kept every later call away from the dead tier
    tiers.put(key(2), make_chunk())
    tiers.flush()
    assert tiers.stats()["flaky"]["dropped_writes"] >= 1
    tiers.close()


def test_breaker_retries_after_cool_down():
    now = [0.0]
    breaker = CircuitBreaker("t", failure_threshold=2, reset_after_s=10, clock=lambda: now[0])
    breaker.record_failure(OSError())
    assert breaker.allow()
    breaker.record_failure(OSError())
    assert not breaker.allow() and breaker.is_open
    now[0] = 11
    assert breaker.allow()  # one trial call ...
    assert not breaker.allow()  # ... at a time
    breaker.record_failure(OSError())  # trial failed: another cool-down
    assert not breaker.allow()
    now[0] = 22
    assert breaker.allow()
    breaker.record_success()
    assert not breaker.is_open and breaker.allow()


def test_full_write_queue_drops_instead_of_blocking():
    flaky = FlakyBackend()
    flaky.gate.clear()  # the remote tier hangs on puts
    tiers = TierManager([MemoryBackend(1 << 24), flaky], write_queue_size=1, write_block_s=0.01)
    for i in range(5):
        assert tiers.put(key(i), make_chunk(seed=i))  # memory still takes every chunk
    assert tiers.stats()["flaky"]["dropped_writes"] >= 3
    flaky.gate.set()
    tiers.flush()
    tiers.close()


def flaky_items(tiers):
    return tiers.tiers[1].backend.items


def test_close_joins_writer_thread():
    tiers = TierManager([MemoryBackend(1 << 20), FlakyBackend()])
    tiers.put(key(1), make_chunk())
    writer = tiers._writer
    tiers.close()
    assert not writer.is_alive() and flaky_items(tiers)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_writer_bug_is_loud():
    class Broken(FlakyBackend):
        name = "broken"

        def contains(self, key):
            return True if False else None  # noqa: SIM210

        def put(self, key, chunk):
            raise AssertionError("not reached")

    tiers = TierManager([Broken()])
    tiers._queue.put(("not a key/chunk pair",))  # a malformed item: a bug in kvshelf, not a tier fault
    tiers.flush(timeout_s=5)
    with pytest.raises(RuntimeError, match="writer thread crashed"):
        tiers.close()


def test_memory_only_manager_has_no_writer_thread():
    tiers = TierManager([MemoryBackend(1 << 20)])
    assert tiers._writer is None
    assert tiers.put(key(1), make_chunk()) and tiers.get(key(1)) is not None
    tiers.close()


def test_breaker_opens_on_failures_among_successes_not_only_in_a_row():
    breaker = CircuitBreaker("t", failure_threshold=3, reset_after_s=10)
    for _ in range(3):  # a trickling tier: small replies succeed, every value read times out
        breaker.record_failure(TimeoutError())
        breaker.record_success()
    assert breaker.is_open
    rare = CircuitBreaker("r", failure_threshold=3, reset_after_s=10)
    for i in range(60):  # one error in ten calls: stays closed
        rare.record_failure(OSError()) if i % 10 == 0 else rare.record_success()
    assert not rare.is_open
