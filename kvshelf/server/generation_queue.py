"""One generation thread serving a bounded first-come-first-served queue of requests.

The model runs one request at a time (on a CPU two concurrent prefills only slow each other down). A
request waits in a FIFO of at most `max_waiting` entries; when it is full the server answers 429 at
once. Each job carries a cancel flag (set when its client goes away) and a deadline: a cancelled or
expired job is skipped when it reaches the front, and a running one stops at its next token. The thread
count stays constant whatever clients do.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class Cancelled(Exception):
    pass


@dataclass
class Job:
    """One generation: `run(job)` executes in the generation thread and reports through `emit`."""

    run: Callable[[Job], None]
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() value
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.expired()


class GenerationQueue:
    def __init__(self, max_waiting: int):
        self._max_waiting = max_waiting  # jobs waiting behind the running one
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._current: Job | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kvshelf-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when max_waiting requests already wait (abandoned ones do not count)."""
        with self._cond:
            if self._stopping:
                raise QueueFull
            for gone in [j for j in self._waiting if j.cancelled.is_set()]:
                self._waiting.remove(gone)
                gone.emit("error", Cancelled("cancelled before it started"))
            idle = not self._busy and not self._waiting
            if not idle and len(self._waiting) >= self._max_waiting:
                raise QueueFull
            self._waiting.append(job)
            self._cond.notify()

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            self._busy = True
            self._current = self._waiting.popleft()
            return self._current

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            try:
                if job.cancelled.is_set():  # its client left while it waited
                    job.emit("error", Cancelled("cancelled before it started"))
                    continue
                if job.expired():
                    job.emit("error", DeadlineExceeded("the request deadline passed while it waited for the model"))
                    continue
                job.run(job)
            except BaseException as err:  # run() reports its own errors: reaching here is a bug, be loud
                self._error = err
                log.exception("generation thread crashed")
                job.emit("error", err)
                raise
            finally:
                with self._cond:
                    self._busy, self._current = False, None

    def close(self, timeout_s: float = 30.0) -> None:
        """Cancel what waits, let the running job stop at its next token, and join the thread."""
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.cancelled.set()
                job.emit("error", Cancelled("the server is shutting down"))
            self._waiting.clear()
            if self._current is not None:
                self._current.cancelled.set()
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("the generation thread did not stop within %.0f s", timeout_s)
        if self._error is not None:
            raise RuntimeError("the generation thread crashed") from self._error
