"""Request-level cache accounting: every request counts its prompt tokens and the tokens the cache served.

The engine counts only the lookups it was asked for; a request the guard kept away from the cache (too
short, loading slower than recomputing) or one whose tier was down never reaches it. Counting here, once
per request, with the reason a request did not look up, keeps the hit rate honest.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

LOOKED_UP = "looked_up"  # the cache was asked (a hit or a miss)
SHORT_PROMPT = "short_prompt"  # the guard: too short for the cache to pay
LOAD_SLOWER = "load_slower_than_recompute"  # the guard: a cached prefix exists, recomputing is faster
TIER_SLOW = "tier_slow"  # the guard: a tier holding the prefix was measured slower than recompute
TIER_DOWN = "tier_down"  # a miss while a tier's breaker was open
CACHE_OFF = "cache_off"  # the request or the server disabled the cache
REASONS = (LOOKED_UP, SHORT_PROMPT, LOAD_SLOWER, TIER_SLOW, TIER_DOWN, CACHE_OFF)


@dataclass
class RequestStats:
    requests: int = 0
    requested_tokens: int = 0  # prompt tokens of every request
    hit_tokens: int = 0  # prompt tokens whose KV came from the cache (blend: reused from cached chunks)
    by_reason: dict[str, dict[str, int]] = field(
        default_factory=lambda: {r: {"requests": 0, "tokens": 0} for r in REASONS}
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, prompt_tokens: int, hit_tokens: int, reason: str) -> None:
        if reason not in self.by_reason:
            raise ValueError(f"unknown cache reason {reason!r}; known: {', '.join(REASONS)}")
        with self._lock:
            self.requests += 1
            self.requested_tokens += prompt_tokens
            self.hit_tokens += hit_tokens
            self.by_reason[reason]["requests"] += 1
            self.by_reason[reason]["tokens"] += prompt_tokens

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "requests": self.requests,
                "requested_tokens": self.requested_tokens,
                "hit_tokens": self.hit_tokens,
                "hit_rate": self.hit_tokens / self.requested_tokens if self.requested_tokens else 0.0,
                "by_reason": {r: dict(v) for r, v in self.by_reason.items()},
            }
