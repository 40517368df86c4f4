"""The never-slower guard: short prompts skip the cache, slow tiers are not loaded from, costs are measured."""

import pytest
import torch

from kvshelf.advice.cost import CostModel, measure_prefill
from kvshelf.advice.guard import LOAD_SLOWER, SHORT_PROMPT, Guard
from kvshelf.cache.engine import CacheEngine
from kvshelf.generation import CachedGenerator
from kvshelf.metrics import Metrics
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.memory import MemoryBackend
from kvshelf.storage.tiers import TierManager


def prompt(n, seed):
    return torch.randint(4, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def setup(model, metrics=None, **cost_kw):
    runner = ModelRunner(model)
    engine = CacheEngine(runner.fingerprint(), TierManager([MemoryBackend(1 << 26)]), chunk_size=16)
    cost = CostModel(prefill_tokens_per_s=10_000.0, kv_bytes_per_token=1024, **cost_kw)
    guarded = CachedGenerator(runner, engine, guard=Guard(cost, min_tokens=32, metrics=metrics))
    return guarded, CachedGenerator(runner, engine)


def bypasses(m, reason):
    return m.registry.get_sample_value("kvshelf_bypasses_total", {"reason": reason}) or 0


def test_short_prompts_skip_lookup_and_store(tiny_models):
    m = Metrics()
    guarded, plain = setup(tiny_models("llama"), m)
    short = prompt(20, 1)
    out = guarded.generate(short, max_new_tokens=2)
    assert out.stored_tokens == 0 and guarded.engine.lookup(short) == 0
    assert bypasses(m, SHORT_PROMPT) == 1
    long = prompt(40, 2)
    assert guarded.generate(long, max_new_tokens=2).stored_tokens >= 40
    assert guarded.generate(long, max_new_tokens=2).hit_tokens == 39


def test_a_tier_slower_than_recompute_is_not_loaded_from(tiny_models):
    m = Metrics()
    guarded, plain = setup(tiny_models("qwen3"), m, tier_bytes_per_s={"cpu": 1.0})  # 1 byte/s: hopeless
    ids = prompt(50, 3)
    plain.generate(ids, max_new_tokens=1)
    out = guarded.generate(ids, max_new_tokens=5, stop_at_eos=False)
    assert out.hit_tokens == 0 and bypasses(m, LOAD_SLOWER) == 1
    assert out.token_ids == plain.generate(ids, max_new_tokens=5, stop_at_eos=False, use_cache=False).token_ids


def test_a_fast_tier_is_loaded_from_and_its_speed_learned(tiny_models):
    guarded, plain = setup(tiny_models("gemma3"))
    ids = prompt(50, 4)
    plain.generate(ids, max_new_tokens=1)
    before = guarded.guard.cost.tier_bytes_per_s["cpu"]
    assert guarded.generate(ids, max_new_tokens=1).hit_tokens == 49
    assert guarded.guard.cost.tier_bytes_per_s["cpu"] != before  # one observed load moved the estimate


def test_cost_model_is_measured_once_and_saved(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    runner = ModelRunner(tiny_models("llama"))
    assert measure_prefill(runner, 64) > 0
    first = CostModel.for_runner(runner, calibration_tokens=64)
    saved = list((tmp_path / "cost").glob("*.json"))
    assert len(saved) == 1 and first.prefill_tokens_per_s > 0
    again = CostModel.for_runner(runner, calibration_tokens=64)
    assert again.prefill_tokens_per_s == first.prefill_tokens_per_s  # read back, not re-measured
    assert first.recompute_s(1000) > 0 and first.load_s({"cpu": 1000}) < first.load_s({"s3": 1000})


def test_a_tier_measured_slow_is_bypassed_then_retried(tiny_models):
    from kvshelf.advice.guard import TIER_SLOW

    m = Metrics()
    guarded, plain = setup(tiny_models("llama"), m)
    now = [0.0]
    guarded.guard = Guard(guarded.guard.cost, min_tokens=32, retry_slow_after_s=30.0, clock=lambda: now[0], metrics=m)
    ids = prompt(50, 5)
    plain.generate(ids, max_new_tokens=1)
    expected = plain.generate(ids, max_new_tokens=4, stop_at_eos=False, use_cache=False).token_ids
    guarded.guard.cost.observe_load("cpu", 1000, 10.0)  # a load measured at 100 B/s: far slower than recompute
    out = guarded.generate(ids, max_new_tokens=4, stop_at_eos=False)
    assert out.hit_tokens == 0 and out.token_ids == expected and bypasses(m, TIER_SLOW) == 1
    now[0] = 31.0  # the retry is due: one request loads and measures the tier again
    out = guarded.generate(ids, max_new_tokens=4, stop_at_eos=False)
    assert out.hit_tokens == 49 and out.token_ids == expected
    assert guarded.guard.cost.tier_bytes_per_s["cpu"] > 100.0  # the fast load moved the estimate up


def test_the_layerwise_path_learns_tier_speed_too(tiny_models):
    runner = ModelRunner(tiny_models("qwen2"))
    engine = CacheEngine(runner.fingerprint(), TierManager([MemoryBackend(1 << 26)]), chunk_size=16)
    cost = CostModel(prefill_tokens_per_s=10_000.0, kv_bytes_per_token=1024)
    gen = CachedGenerator(runner, engine, guard=Guard(cost, min_tokens=32), use_layerwise=True)
    ids = prompt(50, 6)
    gen.generate(ids, max_new_tokens=1)
    assert "cpu" not in cost.measured_tiers
    assert gen.generate(ids, max_new_tokens=1).hit_tokens == 49
    assert "cpu" in cost.measured_tiers


def test_observed_time_is_split_over_the_tiers_by_predicted_share():
    cost = CostModel(prefill_tokens_per_s=1000.0, kv_bytes_per_token=100, tier_bytes_per_s={"a": 1e6, "b": 1e5})
    guard = Guard(cost, min_tokens=1)
    guard.observe({"a": 100, "b": 100}, 1.1)  # predicted 0.01 s + 0.1 s: b gets 10/11 of the time
    assert cost.tier_bytes_per_s["b"] == pytest.approx(100 * 100 / 1.0)
    assert cost.tier_bytes_per_s["a"] == pytest.approx(100 * 100 / 0.1)
