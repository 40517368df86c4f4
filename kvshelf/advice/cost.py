"""What recomputing and loading cost on this machine, measured rather than assumed.

- Prefill speed: one timed forward of a calibration prompt, cached per model fingerprint, device and
  thread count in the kvshelf cache dir (re-measured when any of those change).
- Tier speed: effective bytes/s of each tier (fetch + verify + decode), learned from every load: a
  slowdown at once, a speed-up as an exponential moving average; seeded with conservative defaults
  until the first loads are seen.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from kvshelf.model.provision import cache_root

log = logging.getLogger(__name__)

# Conservative until measured: bytes/s including verification and decoding.
DEFAULT_TIER_BYTES_PER_S = {"cpu": 5e9, "disk": 5e8, "redis": 2e8, "s3": 5e7}
_EMA = 0.3


@dataclass
class CostModel:
    prefill_tokens_per_s: float
    kv_bytes_per_token: int
    tier_bytes_per_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_BYTES_PER_S))
    measured_tiers: set[str] = field(default_factory=set)  # tiers whose speed comes from loads seen here
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def recompute_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def load_s(self, tokens_by_tier: dict[str, int]) -> float:
        return sum(
            n * self.kv_bytes_per_token / self.tier_bytes_per_s.get(tier, min(DEFAULT_TIER_BYTES_PER_S.values()))
            for tier, n in tokens_by_tier.items()
        )

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        """Learn from one load: a slower speed is believed at once (a tier that became slow must stop
        being loaded from on the next request), a faster one through a moving average (one lucky load
        does not make a tier fast)."""
        if nbytes <= 0 or seconds <= 0:
            return
        seen = nbytes / seconds
        with self._lock:
            old = self.tier_bytes_per_s.get(tier, seen)
            self.tier_bytes_per_s[tier] = seen if seen < old else (1 - _EMA) * old + _EMA * seen
            self.measured_tiers.add(tier)

    @classmethod
    def for_runner(cls, runner, *, calibration_tokens: int = 256, use_saved: bool = True) -> CostModel:
        fp = runner.fingerprint()
        per_token = fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim * runner.dtype.itemsize
        path = cache_root() / "cost" / f"{fp.hex()[:24]}-{runner.device}-{torch.get_num_threads()}t.json"
        if use_saved and path.is_file():
            try:
                return cls(float(json.loads(path.read_text())["prefill_tokens_per_s"]), per_token)
            except (ValueError, KeyError, OSError) as err:
                log.warning("ignoring unreadable cost file %s: %s", path, err)
        rate = measure_prefill(runner, calibration_tokens)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"prefill_tokens_per_s": rate}))
        except OSError as err:
            log.warning("could not save the cost model to %s: %s", path, err)
        return cls(rate, per_token)


@torch.inference_mode()
def measure_prefill(runner, tokens: int = 256) -> float:
    """Prefill tokens/s of this model here: the best of three timed forwards after a warm-up."""
    tokens = max(8, min(tokens, runner.max_positions))
    ids = torch.arange(tokens) % 1000 + 10
    kv = runner.new_kv(tokens)
    runner.forward(ids[:8], 0, kv)
    best = float("inf")
    for _ in range(3):
        kv = runner.new_kv(tokens)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        runner.forward(ids, 0, kv)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return tokens / best
