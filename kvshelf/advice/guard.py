"""The never-slower guard: per request, use the cache only where it is predicted to pay.

- Prompts shorter than `min_tokens` skip the cache entirely: no lookup, no store (a chunk or less of
  prompt has little to reuse, and remote lookups would only add latency).
- A cached prefix is not loaded when a tier holding part of it was last measured slower than
  recomputing (`tier_slow`; one request is let through every `retry_slow_after_s` to see whether it
  recovered), nor when its predicted load time (per tier, measured speed) does not beat recomputing it
  (`load_slower_than_recompute`).
- Loads learn: every request that loaded (plain, layerwise) reports its measured load time, which is
  split over the tiers that served it; a tier that got slower is believed at once (see CostModel).
- Full prefills (nothing loaded) check the measured prefill speed: when requests keep disagreeing with
  it by more than 30%, it is measured again, and still disagreeing, the requests' own speed is believed.
- A request's tier reads (lookups and loads) run under a budget of what recomputing the prompt costs
  (`budget_s`): a tier that cannot answer in that time is cut off, and the request recomputes.
Every skip is counted in `bypasses_total{reason}`.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from kvshelf.advice.cost import PREFILL_TOLERANCE, CostModel
from kvshelf.cache.requests import LOAD_SLOWER, SHORT_PROMPT, TIER_SLOW
from kvshelf.metrics import Metrics

log = logging.getLogger(__name__)


class Guard:
    def __init__(
        self,
        cost: CostModel,
        *,
        min_tokens: int,
        margin: float = 1.0,
        min_budget_s: float = 0.25,
        retry_slow_after_s: float = 30.0,
        remeasure_prefill_after_s: float = 600.0,
        clock=time.monotonic,
        metrics: Metrics | None = None,
    ):
        self.cost = cost
        self.metrics = metrics or Metrics()  # the shelf's: where bypasses are counted
        self.min_tokens = min_tokens
        self.margin = margin  # load must be this many times faster than recompute
        # A floor under the per-request tier budget: a tiny prompt recomputes in milliseconds, less
        # than a scheduler hiccup; below this a healthy tier would be cut off by noise.
        self.min_budget_s = min_budget_s
        self.retry_slow_after_s = retry_slow_after_s
        self._clock = clock
        self._slow_retry_at: dict[str, float] = {}
        # Measuring the prefill speed again stalls the request that triggers it (a few short forwards):
        # at most once per this many seconds.
        self.remeasure_prefill_after_s = remeasure_prefill_after_s
        self._remeasure_at = -math.inf
        self._lock = threading.Lock()

    def use_cache(self, prompt_tokens: int) -> bool:
        if prompt_tokens < self.min_tokens:
            self.metrics.bypasses.labels(SHORT_PROMPT).inc()
            return False
        return True

    def budget_s(self, prompt_tokens: int) -> float:
        """Longest the request's tier reads may take: what recomputing the whole prompt costs."""
        if self.margin <= 0:  # loading is always wanted: no budget short of the tiers' own deadlines
            return math.inf
        return max(self.min_budget_s, self.cost.recompute_s(prompt_tokens) / self.margin)

    def worth_loading(self, tokens_by_tier: dict[str, int]) -> bool:
        return self.load_decision(tokens_by_tier) is None

    def load_decision(self, tokens_by_tier: dict[str, int]) -> str | None:
        """None when the cached prefix should be loaded; otherwise why not (a bypass reason, counted)."""
        hit = sum(tokens_by_tier.values())
        if hit == 0:
            return LOAD_SLOWER
        slow = [tier for tier in tokens_by_tier if self._slower_than_recompute(tier)]
        if slow:
            if self._retry_due(slow):
                return None  # a probe: this load measures the slow tier(s) again
            self.metrics.bypasses.labels(TIER_SLOW).inc()
            return TIER_SLOW
        if self.cost.load_s(tokens_by_tier) * self.margin < self.cost.recompute_s(hit):
            return None
        self.metrics.bypasses.labels(LOAD_SLOWER).inc()
        return LOAD_SLOWER

    def _slower_than_recompute(self, tier: str) -> bool:
        """Measured here (not a default guess: its loads, or its codec's decode speed on this host) to load a
        token slower than it recomputes (no margin: a tier is slow when loading from it loses outright, not
        merely when the margin is not met)."""
        return self.cost.speed_known(tier) and self.cost.load_s({tier: 1}) >= self.cost.recompute_s(1)

    def _retry_due(self, slow: list[str]) -> bool:
        """True for one request every `retry_slow_after_s` per slow tier: its load measures the tier again."""
        now = self._clock()
        with self._lock:
            due = [t for t in slow if now >= self._slow_retry_at.setdefault(t, now + self.retry_slow_after_s)]
            if len(due) < len(slow):
                return False
            for tier in slow:
                self._slow_retry_at[tier] = now + self.retry_slow_after_s
            return True

    def observe(self, tokens_by_tier: dict[str, int], seconds: float) -> None:
        """A request loaded (or tried to load) the planned tokens in `seconds`: learn each tier's speed.

        The time is split over the tiers in proportion to their predicted share. A load cut short (a
        miss, a deadline, the budget) still counts the planned bytes: the tier delivered at most that in
        this time, so its speed is not overestimated.
        """
        if seconds <= 0 or not tokens_by_tier:
            return
        per_token = self.cost.kv_bytes_per_token
        predicted = {tier: self.cost.load_s({tier: n}) for tier, n in tokens_by_tier.items() if n > 0}
        total = sum(predicted.values())
        for tier, share in predicted.items():
            self.cost.observe_load(tier, tokens_by_tier[tier] * per_token, seconds * share / total)

    def observe_prefill(self, tokens: int, seconds: float, runner) -> None:
        """A full prefill of `tokens` (nothing loaded) took `seconds`. Prompts shorter than `min_tokens` are
        not a measure of prefill speed (fixed costs dominate). A speed given by hand (a CostModel not
        measured here, e.g. in a test) is observed but never replaced."""
        if tokens < self.min_tokens:
            return
        self.cost.observe_prefill(tokens, seconds)
        if self.cost.prefill_source is None:
            return
        observed = self.cost.prefill_disagrees()
        if observed is None or self._clock() < self._remeasure_at:
            return
        self._remeasure_at = self._clock() + self.remeasure_prefill_after_s
        before = self.cost.prefill_tokens_per_s
        self.cost.remeasure_prefill(runner, show_progress=False)
        rate = self.cost.prefill_tokens_per_s
        if abs(observed - rate) > PREFILL_TOLERANCE * rate:
            self.cost.prefill_tokens_per_s = observed  # a busy machine, or prompts unlike the measurement's
        log.info(
            "prefill speed: requests saw %.0f tokens/s against %.0f saved; measured again %.0f; using %.0f",
            observed,
            before,
            rate,
            self.cost.prefill_tokens_per_s,
        )
