"""The never-slower guard: per request, use the cache only where it is predicted to pay.

- Prompts shorter than `min_tokens` skip the cache entirely: no lookup, no store (a chunk or less of
  prompt has little to reuse, and remote lookups would only add latency).
- A cached prefix is loaded only when its predicted load time (per tier, measured bandwidth) beats
  recomputing it; otherwise the request recomputes.
Every skip is counted in `bypasses_total{reason}`.
"""

from __future__ import annotations

from kvshelf.advice.cost import CostModel
from kvshelf.metrics import metrics

SHORT_PROMPT = "short_prompt"
LOAD_SLOWER = "load_slower_than_recompute"


class Guard:
    def __init__(self, cost: CostModel, *, min_tokens: int, margin: float = 1.0):
        self.cost = cost
        self.min_tokens = min_tokens
        self.margin = margin  # load must be this many times faster than recompute

    def use_cache(self, prompt_tokens: int) -> bool:
        if prompt_tokens < self.min_tokens:
            metrics().bypasses.labels(SHORT_PROMPT).inc()
            return False
        return True

    def worth_loading(self, tokens_by_tier: dict[str, int]) -> bool:
        hit = sum(tokens_by_tier.values())
        if hit == 0:
            return False
        if self.cost.load_s(tokens_by_tier) * self.margin < self.cost.recompute_s(hit):
            return True
        metrics().bypasses.labels(LOAD_SLOWER).inc()
        return False
