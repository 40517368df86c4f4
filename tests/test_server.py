"""The OpenAI-compatible server end to end with the official `openai` client, on a tiny model."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from serving import KEY, RunningServer, make_shelf


@pytest.fixture(scope="module")
def server():
    with RunningServer(make_shelf()) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


DOC = "The quick brown fox jumps over the lazy dog. " * 4


def test_completion_reuses_cache_and_matches_uncached(client, server):
    server.shelf.engine.clear()
    first = client.completions.create(model="tiny", prompt=DOC + "Q1", max_tokens=8, temperature=0)
    second = client.completions.create(model="tiny", prompt=DOC + "Q1", max_tokens=8, temperature=0)
    assert first.choices[0].text == second.choices[0].text
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == len(DOC) + 3  # bytes + BOS
    raw = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"prompt": DOC + "Q1", "max_tokens": 8, "temperature": 0},
    ).json()
    assert raw["usage"]["kvshelf"]["hit_tokens"] == raw["usage"]["prompt_tokens"] - 1
    plain = server.shelf.generator.generate(DOC + "Q1", max_new_tokens=8, use_cache=False)
    assert raw["choices"][0]["text"] == plain.text
    assert raw["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_completion_and_chat(client):
    stream = client.completions.create(model="tiny", prompt=DOC, max_tokens=12, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream]
    whole = client.completions.create(model="tiny", prompt=DOC, max_tokens=12, temperature=0)
    assert "".join(pieces) == whole.choices[0].text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": DOC}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="tiny", prompt=DOC, max_tokens=20, temperature=0).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = client.completions.create(model="tiny", prompt=DOC, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=DOC, max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.find(stop)]


def test_cache_salt_isolates_tenants(client, server):
    server.shelf.engine.clear()

    def hits(salt):
        body = {"prompt": DOC + "tenant", "max_tokens": 2, "temperature": 0, "cache_salt": salt}
        r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body)
        return r.json()["usage"]["kvshelf"]["hit_tokens"]

    assert hits("alice") == 0 and hits("bob") == 0 and hits("alice") > 0 and hits("bob") > 0
    via_client = client.completions.create(
        model="tiny", prompt=DOC + "tenant", max_tokens=2, temperature=0, extra_body={"cache_salt": "carol"}
    )
    assert via_client.choices[0].text is not None


def test_api_key_required_and_errors_are_clear(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        good.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="empty"):
        good.completions.create(model="tiny", prompt="", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context"):
        good.completions.create(model="tiny", prompt="x" * 600, max_tokens=1)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # open without a key
    assert httpx.get(server.url + "/api/v1/cache/stats").status_code == 401


def test_concurrent_requests_are_all_answered_correctly(server):
    prompts = [DOC + f"question {i}" for i in range(6)]
    expected = [server.shelf.generator.generate(p, max_new_tokens=6, use_cache=False).text for p in prompts]
    results: dict[int, str] = {}

    def ask(i):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        results[i] = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=6, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(6)] == expected


def test_metrics_stats_and_clear(client, server):
    client.completions.create(model="tiny", prompt=DOC + "m", max_tokens=2, temperature=0)
    client.completions.create(model="tiny", prompt=DOC + "m", max_tokens=2, temperature=0)
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/metrics").status_code == 401
    text = httpx.get(server.url + "/metrics", headers=headers).text
    for name in [
        "kvshelf_hit_tokens_total",
        "kvshelf_requested_tokens_total",
        "kvshelf_stored_tokens_total",
        "kvshelf_time_to_first_token_seconds_bucket",
        'kvshelf_requests_total{endpoint="completions"}',
        'kvshelf_tier_usage_bytes{tier="cpu"}',
        "kvshelf_blend_lookups_total",
        "kvshelf_layerwise_load_latency_seconds_bucket",
        "kvshelf_bypasses_total",
    ]:
        assert name in text, name
    stats = httpx.get(server.url + "/api/v1/cache/stats", headers=headers).json()
    assert stats["engine"]["hit_tokens"] > 0 and stats["tiers"]["cpu"]["used_bytes"] > 0
    layerwise = httpx.get(server.url + "/api/v1/layerwise/stats", headers=headers).json()
    assert layerwise["enabled"] is False
    assert httpx.post(server.url + "/api/v1/cache/clear", headers=headers).json() == {"cleared": ["cpu"]}
    assert httpx.get(server.url + "/api/v1/cache/stats", headers=headers).json()["tiers"]["cpu"]["used_bytes"] == 0


def test_stats_command_prints_a_running_servers_cache(server):
    from typer.testing import CliRunner

    from kvshelf.cli import app

    httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"prompt": DOC, "max_tokens": 1},
    )
    result = CliRunner().invoke(app, ["stats", "--url", server.url, "--api-key", KEY])
    assert result.exit_code == 0, result.output
    assert "prompt tokens hit" in result.output and "cpu" in result.output
    denied = CliRunner().invoke(app, ["stats", "--url", server.url, "--api-key", "wrong"])
    assert denied.exit_code == 2
