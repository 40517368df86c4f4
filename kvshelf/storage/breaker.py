"""A circuit breaker per tier: after too many recent failures the tier is skipped for a while, then retried.

"Too many" is `failure_threshold` failures among the last `window` outcomes (default 4x the threshold),
not only in a row: a tier whose small replies succeed while every value read times out (a trickling
link) fails half its calls and must still be cut off, while a rare error among many good calls does not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        reset_after_s: float = 5.0,
        window: int | None = None,
        clock=time.monotonic,
    ):
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: deque[bool] = deque(maxlen=max(window or 4 * failure_threshold, failure_threshold))
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self.times_opened = 0

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a call go to the tier now? While open, one trial call is let through after the cool-down."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._trial_in_flight or self._clock() - self._opened_at < self.reset_after_s:
                return False
            self._trial_in_flight = True
            return True

    def record_success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                if not self._trial_in_flight:
                    return  # a call begun before the breaker opened: only the trial call may close it
                log.warning("tier %s is back: closing its circuit breaker", self.name)
                self._recent.clear()
            self._recent.append(False)
            self._opened_at = None
            self._trial_in_flight = False

    def record_failure(self, err: BaseException) -> None:
        with self._lock:
            self._recent.append(True)
            self._trial_in_flight = False
            if self._opened_at is not None:
                self._opened_at = self._clock()  # the trial failed: wait another cool-down
            elif sum(self._recent) >= self.failure_threshold:
                self._opened_at = self._clock()
                self.times_opened += 1
                log.warning(
                    "tier %s failed %d of its last %d calls (last: %s); skipping it for %.1f s",
                    self.name,
                    sum(self._recent),
                    len(self._recent),
                    err,
                    self.reset_after_s,
                )
