"""OpenAI parity: errors in OpenAI's shape (400, never 422 or 500) for every bad request, refused
unsupported fields, logprobs and stream usage; checked with the official `openai` client."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from serving import KEY, RunningServer, make_shelf

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
DOC = "The quick brown fox jumps over the lazy dog. " * 2


@pytest.fixture(scope="module")
def server():
    with RunningServer(make_shelf()) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post_raw(server, path: str, content: str) -> httpx.Response:
    return httpx.post(server.url + path, headers=AUTH, content=content.encode("utf-8", "surrogatepass"))


def assert_openai_400(r: httpx.Response, *words: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    for word in words:
        assert word in err["message"], err["message"]
    return err


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('{"prompt": "x", "temperature": NaN}', ["temperature"]),
        ('{"prompt": "x", "top_p": Infinity}', ["top_p"]),
        ('{"prompt": "x", "presence_penalty": -Infinity}', ["presence_penalty"]),
        ('{"prompt": "x", "max_tokens": 1e999}', ["max_tokens"]),
        ('{"prompt": "x", "seed": 123456789012345678901234567890}', ["seed"]),
        ('{"prompt": "\\ud800 lone"}', ["surrogate", "prompt"]),
        ('{"prompt": [5, -1]}', ["vocabulary"]),
        ('{"prompt": [5, 99999]}', ["99999", "vocabulary"]),
        ('{"prompt": "x", "echo": true}', ["echo"]),
        ('{"prompt": "x", "n": 2}', ["n=2"]),
        ('{"prompt": "x", "best_of": 3}', ["best_of"]),
        ('{"prompt": "x", "logit_bias": {"5": 1}}', ["logit_bias"]),
        ('{"prompt": "x", "frobnicate": 1}', ["frobnicate", "unsupported"]),
        ('{"prompt": "x", "stream_options": {"include_usage": true}}', ["stream"]),
        ('{"prompt": ["a", "b"]}', ["one prompt"]),
        ('{"prompt": "x", "cache_salt": ""}', ["cache_salt"]),
        ('{"prompt": "x", "cache_salt": "' + "s" * 1025 + '"}', ["cache_salt", "1024"]),
        ('{"prompt": "x", "stop": [' + ", ".join(['"s"'] * 17) + "]}", ["stop", "16"]),
        ('{"prompt": "x",', ["not valid JSON"]),
        ('{"max_tokens": 2}', ["prompt", "required"]),
    ],
)
def test_bad_completion_requests_are_openai_400s(server, body, words):
    assert_openai_400(post_raw(server, "/v1/completions", body), *words)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', ["temperature"]),
        ('{"messages": []}', ["messages"]),
        ('{"messages": [{"role": "user", "content": "\\udfff"}]}', ["surrogate"]),
        ('{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', ["top_logprobs"]),
        ('{"messages": [{"role": "user", "content": "hi"}], "tools": []}', ["tools", "unsupported"]),
        ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', ["text content"]),
    ],
)
def test_bad_chat_requests_are_openai_400s(server, body, words):
    assert_openai_400(post_raw(server, "/v1/chat/completions", body), *words)


def test_the_openai_client_shows_the_message(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=5)
    assert "temperature" in caught.value.message and caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, echo=True)
    with pytest.raises(openai.BadRequestError, match="n=3"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=3)


def test_other_errors_have_the_shape_too_and_docs_are_off(server):
    r = httpx.get(server.url + "/nowhere", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path, headers=AUTH).status_code == 404
    with RunningServer(make_shelf(server_docs=True)) as with_docs:
        assert httpx.get(with_docs.url + "/openapi.json", headers=AUTH).status_code == 200
        assert httpx.get(with_docs.url + "/openapi.json").status_code == 401


def test_stream_usage_when_asked(client):
    chunks = list(
        client.completions.create(
            model="tiny", prompt=DOC, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert text == client.completions.create(model="tiny", prompt=DOC, max_tokens=5, temperature=0).choices[0].text
    plain = list(client.completions.create(model="tiny", prompt=DOC, max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)
    chat = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": DOC}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    final = chat[-1]
    assert final.choices == [] and final.usage.prompt_tokens > 0 and 1 <= final.usage.completion_tokens <= 4
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens


def test_completion_logprobs(client, server):
    out = client.completions.create(model="tiny", prompt=DOC, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and all(v <= 0 for v in top.values())
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-5)  # greedy picks the likeliest
    # the same numbers as the model's own distribution
    import torch

    gen = server.shelf.generator.generate(DOC, max_new_tokens=1, use_cache=False)
    expected = float(torch.log_softmax(gen.first_logits.float(), -1).max())
    assert math.isclose(lp.token_logprobs[0], expected, abs_tol=1e-4)
    streamed = client.completions.create(model="tiny", prompt=DOC, max_tokens=6, temperature=0, logprobs=0, stream=True)
    got = [x for c in streamed if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert got == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_chat_logprobs(client):
    messages = [{"role": "user", "content": DOC}]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert math.isclose(item.logprob, item.top_logprobs[0].logprob, abs_tol=1e-5)
    none = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert none.choices[0].logprobs is None
