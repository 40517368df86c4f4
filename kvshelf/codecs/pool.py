"""Worker processes (and threads) for cachegen's entropy coding, so that it uses more than one core.

Calibrated cachegen codes with a numba rANS coder that releases the GIL: its work units run on `codec_workers`
threads (map_threads), no processes, and the calling thread is one of them: it takes units from its own
batch instead of waiting for futures, and idle codec threads join in, never more than `codec_workers` units
running at once in all (callers' and codec threads'). Why: with one future per unit, 16 callers handing
units to 16 codec threads lost about a quarter of what the units reach on 16 plain threads in hand-offs
(submit, wake-up, the GIL taken back): BENCHMARKS.md, issue #17, fifth session. Now a batch costs one
wake-up per codec thread that helps, none when the callers keep the cores busy.
What follows is about the uncalibrated mode's constriction coder.

The ANS coder (constriction) holds Python's GIL while it runs, so threads cannot share its work. With
`codec_workers: N` the layers of a chunk are entropy-decoded in N worker processes, and in the calibrated
mode entropy-coded there too (its transforms run in the calling process; for the uncalibrated mode,
shipping encoding out measured slower than doing it in-process). A worker gets a segment's bytes, which
the calling process has already verified (checksum, key, header), or integer symbols, and returns plain
arrays or bytes; nothing is unpickled from storage. 0 workers: in-process.

A `CodecProcesses` belongs to whoever assembled the codecs (a shelf, a tool, a test): there is no
process-wide pool, so two shelves in one process never restart or resize each other's.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from kvshelf.codecs.outputs import OutputBuffers
from kvshelf.errors import KVShelfError

log = logging.getLogger(__name__)


class CodecPoolError(KVShelfError):
    """The worker pool failed (a worker died, e.g. OOM-killed): a fault of this process, never a sign that
    the data is damaged. The pool is rebuilt; the caller treats the read as a tier fault (kept, retried)."""


class CodecProcesses:
    """`workers` codec threads (the calling thread one of them) or processes (0: code in the calling
    thread), started on first use; `outputs`: the memory CPU-decoded chunks go into, up to
    `output_pool_bytes` of freed ones kept for reuse (kvshelf.codecs.outputs)."""

    def __init__(self, workers: int = 0, output_pool_bytes: int = 0):
        if type(workers) is not int or workers < 0:
            raise ValueError(f"codec_workers must be >= 0, got {workers}")
        self.workers = workers
        self.outputs = OutputBuffers(output_pool_bytes)
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        # map_threads' state, all under _lock: batches with calls not yet taken (oldest first), how many such
        # calls, calls running (callers' and codec threads'), codec threads waiting for work and not yet woken
        self._work = threading.Condition(self._lock)
        self._open: list[_Batch] = []
        self._untaken = self._running = self._idle = 0
        self._crew: _Crew | None = None

    def map_calls(self, fn: Callable, args: Iterable[tuple]) -> list:
        """[fn(*a) for a in args], in the worker processes when there are any. Exceptions raised by `fn`
        come back as they are; a broken pool is replaced and the calls tried once more on the new one, then
        CodecPoolError."""
        calls = list(args)
        for attempt in range(2):
            with self._lock:
                pool = self._pool_locked() if self.workers and len(calls) > 1 else None
            if pool is None:
                return [fn(*a) for a in calls]
            try:
                futures = [pool.submit(fn, *a) for a in calls]
            except (BrokenProcessPool, RuntimeError) as err:  # broken, or shut down under us
                self._discard(pool, err)
                continue
            try:
                return [f.result() for f in futures]
            except BrokenProcessPool as err:
                self._discard(pool, err)
                if attempt:
                    break
        raise CodecPoolError("codec worker pool failed twice in a row (workers dying); decoding is a tier fault")

    def map_threads(self, fn: Callable, args: Iterable[tuple]) -> list:
        """[fn(*a) for a in args] on `workers` threads (for code that releases the GIL: the calibrated mode's
        rANS coder and torch), the calling thread being one of them: it runs calls of this batch until none
        is left untaken, idle codec threads take the others, then it waits for those. Inline with fewer
        than two workers or calls. An exception raised by a call comes back as it is, after the batch's
        other calls have finished (the lowest-numbered call's, as serial order would raise it)."""
        calls = list(args)
        if self.workers < 2 or len(calls) < 2:
            return [fn(*a) for a in calls]
        batch = _Batch(fn, calls, self._lock)
        with self._lock:
            self._start_crew_locked()
            self._open.append(batch)
            self._untaken += len(calls)
            while batch.taken < len(calls):  # the caller's share: no hand-off at all
                self._run_locked(batch)
            self._wake_locked()  # this thread stops running calls: an idle codec thread may take its place
            while batch.running:  # calls taken by codec threads: each finishes (a bounded unit of work)
                batch.finished.wait()
        if batch.errors:
            raise batch.errors[min(batch.errors)]
        return batch.results

    def free_threads(self) -> int:
        """How many threads a batch started now could run on (1 to `workers`): `workers` less the calls running
        (other callers' and codec threads'). A hint for cutting work into calls, read without the lock: when
        every thread is busy a caller runs its whole batch itself, and fewer, larger calls then pass the GIL
        fewer times."""
        return max(1, self.workers - self._running)

    def _run_locked(self, batch: _Batch) -> None:
        """Take `batch`'s next call and run it with the lock released (held on entry and on return)."""
        i = batch.taken
        batch.taken += 1
        self._untaken -= 1
        if batch.taken == len(batch.calls):
            self._open.remove(batch)
        batch.running += 1
        self._running += 1
        self._wake_locked()  # more calls left than threads running them: wake helpers (never above `workers`)
        self._lock.release()
        try:
            batch.results[i] = batch.fn(*batch.calls[i])
        except BaseException as err:  # the caller re-raises it
            batch.errors[i] = err
        finally:
            self._lock.acquire()
            batch.running -= 1
            self._running -= 1
            if not batch.running and batch.taken == len(batch.calls):
                batch.finished.notify()

    def _wake_locked(self) -> None:
        """Wake idle codec threads for untaken calls, so that at most `workers` calls run at once."""
        n = min(self._idle, self._untaken, self.workers - self._running)
        if n > 0:
            self._idle -= n  # counted here: a woken thread is no longer one to wake
            self._work.notify(n)

    def _start_crew_locked(self) -> None:
        if self._crew is None:  # workers - 1 threads: every caller runs calls too
            self._crew = crew = _Crew()
            for k in range(self.workers - 1):
                # daemon: an idle one must not hold up the interpreter's exit (atexit closes them first)
                t = threading.Thread(target=self._serve, args=(crew,), name=f"kvshelf-codec-{k}", daemon=True)
                crew.threads.append(t)
                t.start()
            _open.add(self)

    def _serve(self, crew: _Crew) -> None:
        """A codec thread: runs calls of the oldest open batch while fewer than `workers` run, else waits."""
        with self._lock:
            while not crew.stopping:
                if self._open and self._running < self.workers:
                    self._run_locked(self._open[0])
                else:
                    self._idle += 1
                    self._work.wait()  # woken by _wake_locked (which counted it) or by close

    def _discard(self, pool: ProcessPoolExecutor, err: BaseException) -> None:
        """Forget a broken pool so the next call builds a new one."""
        log.warning("codec worker pool broken (%s: %s); starting a new one", type(err).__name__, err)
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def _pool_locked(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent runs torch's thread pools, which a forked child must not inherit
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
            _open.add(self)
            log.info("codec worker pool: %d processes", self.workers)
        return self._pool

    def close(self) -> None:
        """Stop and join the codec threads and processes (a later call starts them again)."""
        with self._lock:
            crew, self._crew = self._crew, None
            pool, self._pool = self._pool, None
            if crew is not None:  # each codec thread finishes the call it runs, then returns
                crew.stopping = True
                self._idle = 0
                self._work.notify_all()
        _open.discard(self)
        for t in crew.threads if crew is not None else []:
            t.join(timeout=_JOIN_S)
            if t.is_alive():
                log.error("codec thread %s still running a call %.0f s after close", t.name, _JOIN_S)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class _Batch:
    """One map_threads call: its calls are taken in order, by the caller and by idle codec threads."""

    def __init__(self, fn: Callable, calls: list[tuple], lock: threading.Lock):
        self.fn, self.calls = fn, calls
        self.results: list = [None] * len(calls)
        self.errors: dict[int, BaseException] = {}
        self.taken = 0  # calls handed out so far (in order)
        self.running = 0  # taken, not yet finished
        self.finished = threading.Condition(lock)  # the caller waits here for codec threads' calls


class _Crew:
    """One generation of codec threads: close() stops it, a later map_threads starts another."""

    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.stopping = False


# How long close() waits for a codec thread to finish the call it runs (a unit takes milliseconds).
_JOIN_S = 60.0


# In the calling process: what codecs use when nobody gave them processes. Never starts any.
IN_PROCESS = CodecProcesses(0)
# Pools with processes running, so that exit stops them even when their owner forgot (no state is shared
# through it: it only holds what to shut down).
_open: weakref.WeakSet[CodecProcesses] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for processes in list(_open):
        processes.close()
