"""Slow, trickling and stalled Redis and S3 (real servers behind a loopback fault proxy): every request
ends within a stated bound, with output identical to recompute, and the breaker or the guard reacts."""

import time

import boto3
import pytest
import torch
from proxy import FaultProxy

from kvshelf.advice.cost import CostModel
from kvshelf.advice.guard import TIER_SLOW, Guard
from kvshelf.cache.engine import CacheEngine
from kvshelf.codecs import get_codec
from kvshelf.generation import CachedGenerator
from kvshelf.metrics import Metrics
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.redis import RedisBackend
from kvshelf.storage.s3 import S3Backend
from kvshelf.storage.tiers import TierManager

DEADLINE_S = 0.5
# A request makes at most two tier calls on its own thread (the load, and the lookup before storing),
# each ended by the deadline; 3 s of margin for compute on a busy machine. A hang would blow through it.
BOUND_S = 2 * DEADLINE_S + 3.0


def prompts(n: int, length: int = 48) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(4, 320, (length,), generator=g).tolist() for _ in range(2)]
    return [docs[i % 2] + torch.randint(4, 320, (5,), generator=g).tolist() for i in range(n)]


def plain_outputs(runner, batch):
    gen = CachedGenerator(runner, None)
    return [gen.generate(p, max_new_tokens=4, stop_at_eos=False).token_ids for p in batch]


def campaign(gen, batch, expected):
    """(wrong outputs, worst request seconds, hit tokens per request)."""
    wrong, worst, hits = 0, 0.0, []
    for p, want in zip(batch, expected, strict=True):
        t0 = time.monotonic()
        out = gen.generate(p, max_new_tokens=4, stop_at_eos=False)
        worst = max(worst, time.monotonic() - t0)
        wrong += out.token_ids != want
        hits.append(out.hit_tokens)
    return wrong, worst, hits


def redis_tiers(proxy, **kw):
    backend = RedisBackend(f"redis://127.0.0.1:{proxy.port}/0", get_codec("int8"), prefix="slow:", timeout_s=1.0)
    return TierManager([backend], deadline_s=DEADLINE_S, breaker_reset_s=60, **kw)


@pytest.mark.parametrize(("mode", "delay_s"), [("trickle", 0.0), ("stall", 0.0), ("delay", 1.5)])
def test_a_redis_that_trickles_stalls_or_lags_never_holds_a_request(mode, delay_s, redis_server, tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    batch = prompts(8)
    expected = plain_outputs(runner, batch)
    with FaultProxy(redis_server.port) as proxy:
        tiers = redis_tiers(proxy)
        try:
            gen = CachedGenerator(runner, CacheEngine(runner.fingerprint(), tiers, chunk_size=16))
            wrong, _, hits = campaign(gen, batch[:2], expected[:2])  # healthy: fill the cache
            tiers.flush()
            assert wrong == 0
            proxy.set_mode(mode, delay_s=delay_s, trickle_s=0.005)
            wrong, worst, hits = campaign(gen, batch[2:], expected[2:])
            assert wrong == 0 and worst < BOUND_S, (wrong, worst)
            s = tiers.stats()["redis"]
            assert s["timeouts"] >= 1 and s["breaker_open"], s
            assert s["skipped"] >= 1  # later requests did not even ask the stuck tier
        finally:
            proxy.stop()  # frees the calls still stuck on the trickle, so close() does not wait
            tiers.close()


def test_the_guard_stops_loading_from_a_redis_that_trickles_its_values(redis_server, tiny_models):
    m = Metrics()
    runner = ModelRunner(tiny_models("qwen3"))
    batch = prompts(8)
    expected = plain_outputs(runner, batch)
    # Lookups (tiny replies) stay quick, values (kilobytes) trickle: only loading is slow.
    cost = CostModel(prefill_tokens_per_s=20_000.0, kv_bytes_per_token=runner.fingerprint().num_layers * 2 * 2 * 16 * 4)
    guard = Guard(cost, min_tokens=32, min_budget_s=0.25, retry_slow_after_s=600, metrics=m)
    with FaultProxy(redis_server.port) as proxy:
        tiers = redis_tiers(proxy, breaker_failures=100)  # the guard alone must react
        try:
            engine = CacheEngine(runner.fingerprint(), tiers, chunk_size=16, save_unfull_chunk=False)
            gen = CachedGenerator(runner, engine, guard=guard)
            campaign(gen, batch[:2], expected[:2])
            tiers.flush()
            proxy.set_mode("trickle", trickle_s=0.002, trickle_min_bytes=256)
            wrong, worst, hits = campaign(gen, batch[2:], expected[2:])
            assert wrong == 0 and worst < guard.min_budget_s + DEADLINE_S + 3.0, worst
            assert not any(hits), hits
            assert (m.registry.get_sample_value("kvshelf_bypasses_total", {"reason": TIER_SLOW}) or 0) >= 4
            assert tiers.stats()["redis"]["slow"] == 1  # one load cut by the budget, then no more tries
        finally:
            proxy.stop()
            tiers.close()


@pytest.mark.parametrize("mode", ["trickle", "stall"])
def test_an_s3_that_trickles_or_stalls_never_holds_a_request(mode, s3_server, tiny_models):
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=f"slow-{mode}")
    runner = ModelRunner(tiny_models("gemma3"))
    batch = prompts(7)
    expected = plain_outputs(runner, batch)
    with FaultProxy(s3_server.port) as proxy:
        url = f"s3://slow-{mode}/p?endpoint=http://127.0.0.1:{proxy.port}"
        tiers = TierManager(
            [S3Backend.from_url(url, get_codec("none"), timeout_s=1.0)], deadline_s=DEADLINE_S, breaker_reset_s=60
        )
        try:
            gen = CachedGenerator(runner, CacheEngine(runner.fingerprint(), tiers, chunk_size=16))
            campaign(gen, batch[:2], expected[:2])
            tiers.flush()
            proxy.set_mode(mode, trickle_s=0.005)
            wrong, worst, hits = campaign(gen, batch[2:], expected[2:])
            assert wrong == 0 and worst < BOUND_S, (wrong, worst)
            s = tiers.stats()["s3"]
            assert s["timeouts"] >= 1 and s["breaker_open"], s
        finally:
            proxy.stop()
            tiers.close()
