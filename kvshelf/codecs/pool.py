"""Worker processes (and threads) for cachegen's entropy coding, so that it uses more than one core.

Calibrated cachegen codes with a numba rANS coder that releases the GIL: its layers run on `codec_workers`
threads (map_threads), no processes. What follows is about the uncalibrated mode's constriction coder.

The ANS coder (constriction) holds Python's GIL while it runs, so threads cannot share its work. With
`codec_workers: N` the layers of a chunk are entropy-decoded in N worker processes, and in the calibrated
mode entropy-coded there too (its transforms run in the calling process; for the uncalibrated mode,
shipping encoding out measured slower than doing it in-process). A worker gets a segment's bytes, which
the calling process has already verified (checksum, key, header), or integer symbols, and returns plain
arrays or bytes; nothing is unpickled from storage. 0 workers: in-process.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from kvshelf.errors import KVShelfError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_workers = 0
_pool: ProcessPoolExecutor | None = None
_threads: ThreadPoolExecutor | None = None


def configure(workers: int) -> None:
    """Use `workers` processes from now on (0: code in this process). Restarts the pool if it changes."""
    global _workers
    if workers < 0:
        raise ValueError(f"codec_workers must be >= 0, got {workers}")
    with _lock:
        if workers != _workers:
            _shutdown_locked()
            _workers = workers


def workers() -> int:
    """How many worker processes decode (0: decoding runs in the calling process)."""
    return _workers


class CodecPoolError(KVShelfError):
    """The worker pool failed (a worker died, e.g. OOM-killed): a fault of this process, never a sign that
    the data is damaged. The pool is rebuilt; the caller treats the read as a tier fault (kept, retried)."""


def map_calls(fn: Callable, args: Iterable[tuple]) -> list:
    """[fn(*a) for a in args], in the worker processes when there are any. Exceptions raised by `fn`
    come back as they are; a broken pool is replaced and the calls tried once more on the new one, then
    CodecPoolError."""
    calls = list(args)
    for attempt in range(2):
        with _lock:
            pool = _pool_locked() if _workers and len(calls) > 1 else None
        if pool is None:
            return [fn(*a) for a in calls]
        try:
            futures = [pool.submit(fn, *a) for a in calls]
        except (BrokenProcessPool, RuntimeError) as err:  # broken, or shut down under us
            _discard(pool, err)
            continue
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool as err:
            _discard(pool, err)
            if attempt:
                break
    raise CodecPoolError("codec worker pool failed twice in a row (workers dying); decoding is a tier fault")


def map_threads(fn: Callable, args: Iterable[tuple]) -> list:
    """[fn(*a) for a in args] on `workers()` threads (for code that releases the GIL); exceptions come back
    as they are. Inline when there are no workers or only one call."""
    global _threads
    calls = list(args)
    with _lock:
        if _workers and len(calls) > 1 and _threads is None:
            _threads = ThreadPoolExecutor(max_workers=_workers, thread_name_prefix="kvshelf-codec")
        threads = _threads if _workers and len(calls) > 1 else None
    if threads is None:
        return [fn(*a) for a in calls]
    return [f.result() for f in [threads.submit(fn, *a) for a in calls]]


def _discard(pool: ProcessPoolExecutor, err: BaseException) -> None:
    """Forget a broken pool so the next call builds a new one."""
    global _pool
    log.warning("codec worker pool broken (%s: %s); starting a new one", type(err).__name__, err)
    with _lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def _pool_locked() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        # spawn, not fork: the parent runs torch's thread pools, which a forked child must not inherit
        _pool = ProcessPoolExecutor(max_workers=_workers, mp_context=multiprocessing.get_context("spawn"))
        log.info("codec worker pool: %d processes", _workers)
    return _pool


def _shutdown_locked() -> None:
    global _pool, _threads
    if _threads is not None:
        _threads.shutdown(wait=True, cancel_futures=True)
        _threads = None
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None


@atexit.register
def shutdown() -> None:
    with _lock:
        _shutdown_locked()
