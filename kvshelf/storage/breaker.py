"""A circuit breaker per tier: after a run of failures the tier is skipped for a while, then retried."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, name: str, *, failure_threshold: int = 3, reset_after_s: float = 5.0, clock=time.monotonic):
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
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
                log.warning("tier %s is back: closing its circuit breaker", self.name)
            self._failures = 0
            self._opened_at = None
            self._trial_in_flight = False

    def record_failure(self, err: BaseException) -> None:
        with self._lock:
            self._failures += 1
            self._trial_in_flight = False
            if self._opened_at is not None:
                self._opened_at = self._clock()  # the trial failed: wait another cool-down
            elif self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
                self.times_opened += 1
                log.warning(
                    "tier %s failed %d times in a row (last: %s); skipping it for %.1f s",
                    self.name,
                    self._failures,
                    err,
                    self.reset_after_s,
                )
