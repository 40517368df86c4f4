"""A tier's bounded set of worker threads (kvshelf.storage.tiers runs calls to tiers that are not inline on
them, so that a caller waits at most a deadline however slowly the tier answers)."""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger(__name__)


class Lanes:
    """A tier's bounded set of worker threads: at most `size` calls in flight, none queued behind them."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._free = threading.Semaphore(size)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable, args: tuple) -> Future | None:
        """A future for fn(*args), or None when every worker is busy."""
        if not self._free.acquire(blocking=False):
            return None
        with self._lock:
            if not self._threads:
                for i in range(self.size):
                    t = threading.Thread(target=self._work, name=f"kvshelf-{self.name}-{i}", daemon=True)
                    t.start()
                    self._threads.append(t)
        future: Future = Future()
        # The caller's context travels with the call: byte tiers read the engine's expectation from it.
        self._jobs.put((future, contextvars.copy_context(), fn, args))
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, context, fn, args = job
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(context.run(fn, *args))
                    except BaseException as err:  # handed to the caller (a tier fault), if it still waits
                        future.set_exception(err)
            finally:
                self._free.release()

    def close(self, wait_s: float) -> None:
        """Stop the workers; a worker still stuck in a call after `wait_s` is left behind (daemon), said loudly."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        until = time.monotonic() + wait_s
        stuck = 0
        for t in threads:
            t.join(max(0.0, until - time.monotonic()))
            stuck += t.is_alive()
        if stuck:
            log.warning("tier %s: %d call(s) still stuck at shutdown; their threads are left behind", self.name, stuck)
