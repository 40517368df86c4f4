"""The codec's thread layout (kvshelf.codecs.pool.CodecProcesses.map_threads): the caller runs calls of its own
batch, idle codec threads join in, never more than `workers` calls run at once, errors come back to the caller
after the batch's other calls, close joins the threads."""

from __future__ import annotations

import threading
import time

import pytest

from kvshelf.codecs.pool import CodecProcesses
from kvshelf.codecs.rans import RansError


def _codec_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kvshelf-codec-")]


@pytest.mark.parametrize("workers", [0, 1, 2, 3, 16])
@pytest.mark.parametrize("calls", [0, 1, 2, 7, 40])
def test_results_come_back_in_order(workers, calls):
    processes = CodecProcesses(workers)
    try:
        assert processes.map_threads(lambda a, b: a * b, [(k, k + 1) for k in range(calls)]) == [
            k * (k + 1) for k in range(calls)
        ]
    finally:
        processes.close()


def test_the_caller_and_a_codec_thread_share_one_batch():
    """Two calls that only finish together: the caller runs one, a codec thread the other (a Barrier with a
    timeout: a missing helper fails the test instead of hanging it)."""
    processes = CodecProcesses(2)
    barrier = threading.Barrier(2, timeout=30)
    try:
        names = processes.map_threads(lambda: (barrier.wait(), threading.current_thread().name)[1], [(), ()])
    finally:
        processes.close()
    assert threading.current_thread().name in names and any(n.startswith("kvshelf-codec-") for n in names)


def test_never_more_calls_running_than_workers_with_many_callers():
    processes = CodecProcesses(3)
    lock = threading.Lock()
    running, most = [0], [0]

    def call(k):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002)  # releases the GIL, as the codec's units do
        with lock:
            running[0] -= 1
        return k

    # 2 callers at most (the cap counts callers too: with more callers than workers each still runs its own)
    callers = [
        threading.Thread(target=lambda: processes.map_threads(call, [(k,) for k in range(12)])) for _ in range(2)
    ]
    try:
        for t in callers:
            t.start()
        assert processes.map_threads(call, [(k,) for k in range(12)]) == list(range(12))
        for t in callers:
            t.join(timeout=30)
    finally:
        processes.close()
    assert 2 <= most[0] <= 3 + 2  # the 3 workers (caller included) plus the two callers' own calls at most


def test_codec_threads_never_exceed_workers():
    """One caller: at most `workers` calls at once (the caller and workers - 1 codec threads)."""
    processes = CodecProcesses(4)
    lock = threading.Lock()
    running, most = [0], [0]

    def call():
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1

    try:
        for _ in range(5):
            processes.map_threads(call, [()] * 20)
        assert len(_codec_threads()) >= 3
    finally:
        processes.close()
    assert most[0] <= 4


def test_a_caller_finishes_alone_while_the_codec_threads_are_busy():
    """A second caller needs no codec thread: with both threads of a 2-worker pool blocked in another batch,
    it runs its whole batch itself."""
    processes = CodecProcesses(2)
    release, started = threading.Event(), threading.Barrier(3, timeout=30)

    def blocked():
        started.wait()
        assert release.wait(30)

    first = threading.Thread(target=lambda: processes.map_threads(blocked, [(), ()]))
    try:
        first.start()
        started.wait()  # the first caller and the one codec thread both run a blocked call
        assert processes.map_threads(lambda k: -k, [(k,) for k in range(9)]) == [-k for k in range(9)]
    finally:
        release.set()
        first.join(timeout=30)
        processes.close()
    assert not first.is_alive()


def test_errors_reach_the_caller_as_they_are_after_every_call_finished():
    """The lowest-numbered failing call's exception (serial order's), raised only once no call of the batch runs
    any more (they write into the caller's buffers)."""
    processes = CodecProcesses(4)
    done = []

    def call(k):
        time.sleep(0.001 * (k % 3))
        if k in (5, 9):
            raise RansError(f"cachegen segment {k} damaged")
        if k == 7:
            raise ValueError("other")
        done.append(k)

    try:
        for _ in range(5):
            done.clear()
            with pytest.raises(RansError, match="segment 5 damaged"):
                processes.map_threads(call, [(k,) for k in range(16)])
            assert sorted(done) == [k for k in range(16) if k not in (5, 7, 9)]
        with pytest.raises(KeyError):  # any type, the object itself
            processes.map_threads(lambda k: {}[k], [(1,), (2,)])
        assert processes.map_threads(lambda k: k, [(1,), (2,)]) == [1, 2]  # the pool still works
    finally:
        processes.close()


def test_close_joins_the_threads_and_a_later_call_starts_them_again():
    before = len(_codec_threads())
    processes = CodecProcesses(3)
    assert processes.map_threads(lambda k: k, [(1,), (2,), (3,)]) == [1, 2, 3]
    assert len(_codec_threads()) == before + 2  # workers - 1: the caller is the third
    processes.close()
    assert len(_codec_threads()) == before
    assert processes.map_threads(lambda k: k + 1, [(1,), (2,)]) == [2, 3]
    processes.close()
    processes.close()  # twice: nothing to do
    assert len(_codec_threads()) == before


def test_free_threads_counts_the_threads_a_new_batch_could_use():
    """free_threads (the hint cachegen cuts its work units by): every worker when idle, 1 at least (the caller)
    when other batches' calls hold every thread, and the freed threads again after."""
    processes = CodecProcesses(3)
    release, started = threading.Event(), threading.Barrier(3, timeout=30)
    seen = []

    def blocked():
        started.wait()
        assert release.wait(30)

    first = threading.Thread(target=lambda: processes.map_threads(blocked, [(), ()]))
    try:
        assert processes.free_threads() == 3
        first.start()
        started.wait()  # two calls run: the first caller's and a codec thread's
        seen.append(processes.free_threads())
        processes.map_threads(lambda: seen.append(processes.free_threads()), [(), ()])  # runs on the last thread
    finally:
        release.set()
        first.join(timeout=30)
    assert seen[0] == 1 and min(seen[1:]) == 1
    assert processes.free_threads() == 3
    assert CodecProcesses(0).free_threads() == 1
    processes.close()
