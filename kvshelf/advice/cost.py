"""What recomputing and loading cost on this machine, measured rather than assumed.

- Prefill speed: the median of several short timed forwards, kept per model fingerprint, device and
  thread count in the kvshelf cache dir; measured again when any of those change, when the measurement
  is older than MAX_PREFILL_AGE_S, or on request when observed prefills disagree with it by > 30%.
- Tier speed: effective bytes/s of each tier (fetch + verify + decode), learned from every load: a
  slowdown at once, a speed-up as an exponential moving average; seeded with conservative defaults
  until the first loads are seen.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvshelf.paths import cache_root

log = logging.getLogger(__name__)

# Prefill speed: the median of this many short runs, measured again after MAX_PREFILL_AGE_S, or when
# requests' observed prefill speed differs from it by more than PREFILL_TOLERANCE (issue 21).
PREFILL_RUNS = 5
MAX_PREFILL_AGE_S = 7 * 24 * 3600.0
PREFILL_TOLERANCE = 0.3
_OBSERVED_KEPT = 32

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
    observed_prefill: list[float] = field(default_factory=list, repr=False)  # tokens/s of full prefills seen
    prefill_source: Path | None = field(default=None, repr=False)  # the file the prefill speed is kept in
    # Issue #17: decode speed (bytes/s of KV) of each codec measured here (kvshelf.advice.decode_speed), and
    # which codec each tier stores with: until loads from a tier are seen, its predicted speed is the seed's
    # fetch followed by its codec's measured decode, not the seed alone.
    codec_bytes_per_s: dict[str, float] = field(default_factory=dict)
    tier_codecs: dict[str, str] = field(default_factory=dict)
    kv_value_bytes: int = 4  # bytes per KV value in the model's dtype (what codec ratios are against)

    def recompute_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def tier_rate(self, tier: str) -> float:
        """Predicted bytes/s of KV loaded from `tier`: as loads showed it, else fetch + measured decode."""
        rate = self.tier_bytes_per_s.get(tier, min(DEFAULT_TIER_BYTES_PER_S.values()))
        decode = self.codec_bytes_per_s.get(self.tier_codecs.get(tier, ""))
        if tier in self.measured_tiers or decode is None:
            return rate
        return 1.0 / (1.0 / rate + 1.0 / decode)

    def load_s(self, tokens_by_tier: dict[str, int]) -> float:
        return sum(n * self.kv_bytes_per_token / self.tier_rate(tier) for tier, n in tokens_by_tier.items())

    def speed_known(self, tier: str) -> bool:
        """Whether the tier's predicted speed rests on a measurement here (its loads, or its codec's decode)."""
        return tier in self.measured_tiers or self.tier_codecs.get(tier, "") in self.codec_bytes_per_s

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
    def for_runner(
        cls,
        runner,
        *,
        calibration_tokens: int = 256,
        use_saved: bool = True,
        max_age_s: float = MAX_PREFILL_AGE_S,
        show_progress: bool = True,
    ) -> CostModel:
        fp = runner.fingerprint()
        per_token = fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim * runner.dtype.itemsize
        path = prefill_file(runner)
        if use_saved and path.is_file():
            try:
                saved = json.loads(path.read_text())
                age = time.time() - float(saved.get("measured_at", 0))
                if age <= max_age_s:
                    model = cls(float(saved["prefill_tokens_per_s"]), per_token, kv_value_bytes=runner.dtype.itemsize)
                    model.prefill_source = path
                    return model
                log.info("prefill speed measured %.0f h ago: measuring again", age / 3600)
            except (ValueError, KeyError, OSError, TypeError) as err:
                log.warning("ignoring unreadable cost file %s: %s", path, err)
        model = cls(
            measure_and_save(runner, calibration_tokens, show_progress=show_progress),
            per_token,
            kv_value_bytes=runner.dtype.itemsize,
        )
        model.prefill_source = path
        return model

    # -- prefill speed against what requests show (issue 21) ------------------------------------------
    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A full prefill of `tokens` seen taking `seconds` (e.g. a request without cache)."""
        if tokens > 0 and seconds > 0:
            with self._lock:
                self.observed_prefill.append(tokens / seconds)
                del self.observed_prefill[:-_OBSERVED_KEPT]

    def prefill_disagrees(self, *, tolerance: float = PREFILL_TOLERANCE, min_observations: int = 3) -> float | None:
        """The observed prefill speed (median) when it differs from the model's by more than `tolerance`."""
        with self._lock:
            seen = list(self.observed_prefill)
        if len(seen) < min_observations:
            return None
        observed = statistics.median(seen)
        if abs(observed - self.prefill_tokens_per_s) > tolerance * self.prefill_tokens_per_s:
            return observed
        return None

    def remeasure_prefill(self, runner, *, calibration_tokens: int = 256, show_progress: bool = True) -> None:
        """Measure the prefill speed again (and save it), forgetting the observations."""
        self.prefill_tokens_per_s = measure_and_save(runner, calibration_tokens, show_progress=show_progress)
        with self._lock:
            self.observed_prefill.clear()


def prefill_file(runner) -> Path:
    """Where this model's prefill speed on this device and thread count is kept."""
    fp = runner.fingerprint()
    return cache_root() / "cost" / f"{fp.hex()[:24]}-{runner.device}-{torch.get_num_threads()}t.json"


def measure_and_save(runner, tokens: int = 256, *, runs: int = PREFILL_RUNS, show_progress: bool = True) -> float:
    samples = measure_prefill_runs(runner, tokens, runs=runs, show_progress=show_progress)
    rate = statistics.median(samples)
    path = prefill_file(runner)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"prefill_tokens_per_s": rate, "runs": samples, "measured_at": time.time()}))
        tmp.replace(path)
    except OSError as err:
        log.warning("could not save the cost model to %s: %s", path, err)
    return rate


def measure_prefill(runner, tokens: int = 256) -> float:
    """Prefill tokens/s of this model here: the median of several timed forwards after a warm-up."""
    return statistics.median(measure_prefill_runs(runner, tokens, show_progress=False))


@torch.inference_mode()
def measure_prefill_runs(runner, tokens: int = 256, *, runs: int = PREFILL_RUNS, show_progress: bool = True) -> list:
    """Tokens/s of `runs` timed prefills of `tokens` tokens after a warm-up. Short runs, and the median
    of them: one run on a busy machine (a neighbour's burst) must not set the speed for good."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    tokens = max(8, min(tokens, runner.max_positions))
    ids = torch.arange(tokens) % 1000 + 10
    kv = runner.new_kv(tokens)
    samples = []
    with Progress(
        TextColumn("measuring this model's prefill speed here (once; kept in the cache folder)"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not show_progress,
    ) as progress:
        task = progress.add_task("", total=runs)
        runner.forward(ids[:8], 0, kv)
        for _ in range(runs):
            kv = runner.new_kv(tokens)
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            runner.forward(ids, 0, kv)
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(tokens / (time.perf_counter() - t))
            progress.advance(task)
    return samples
