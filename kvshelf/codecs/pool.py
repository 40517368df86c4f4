"""Worker processes (and threads) for cachegen's entropy coding, so that it uses more than one core.

Calibrated cachegen codes with a numba rANS coder that releases the GIL: its layers run on `codec_workers`
threads (map_threads), no processes. What follows is about the uncalibrated mode's constriction coder.

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
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from kvshelf.errors import KVShelfError

log = logging.getLogger(__name__)


class CodecPoolError(KVShelfError):
    """The worker pool failed (a worker died, e.g. OOM-killed): a fault of this process, never a sign that
    the data is damaged. The pool is rebuilt; the caller treats the read as a tier fault (kept, retried)."""


class CodecProcesses:
    """`workers` codec processes (0: code in the calling process), started on first use."""

    def __init__(self, workers: int = 0):
        if type(workers) is not int or workers < 0:
            raise ValueError(f"codec_workers must be >= 0, got {workers}")
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._threads: ThreadPoolExecutor | None = None

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
        """[fn(*a) for a in args] on `workers` threads (for code that releases the GIL: the calibrated
        mode's rANS coder and torch); exceptions come back as they are. Inline with no workers or one call."""
        calls = list(args)
        if not self.workers or len(calls) < 2:
            return [fn(*a) for a in calls]
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kvshelf-codec")
                _open.add(self)
            threads = self._threads
        return [f.result() for f in [threads.submit(fn, *a) for a in calls]]

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
        """Stop the processes (a later call starts them again)."""
        with self._lock:
            if self._threads is not None:
                self._threads.shutdown(wait=True, cancel_futures=True)
                self._threads = None
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        _open.discard(self)


# In the calling process: what codecs use when nobody gave them processes. Never starts any.
IN_PROCESS = CodecProcesses(0)
# Pools with processes running, so that exit stops them even when their owner forgot (no state is shared
# through it: it only holds what to shut down).
_open: weakref.WeakSet[CodecProcesses] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for processes in list(_open):
        processes.close()
