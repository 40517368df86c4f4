"""`kvshelf proxy` between fake prefill and decode instances (small FastAPI apps on loopback, not vLLM)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from services import free_port

from kvshelf.errors import ConfigError
from kvshelf.server.proxy import ProxySettings, create_proxy_app, prefill_body


class Running:
    """A uvicorn server in a thread on a free loopback port; stop() joins it."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


def fake_instance(name: str, *, status: int = 200, delay_s: float = 0.0):
    """An OpenAI-ish instance that records the bodies it got and answers with its name."""
    app = FastAPI()
    app.state.bodies = []

    async def answer(request: Request, path: str):
        body = await request.json()
        app.state.bodies.append((path, body, request.headers.get("authorization")))
        await asyncio.sleep(delay_s)
        if status != 200:
            return JSONResponse({"error": {"message": "broken"}}, status_code=status)
        if body.get("stream"):

            async def events():
                for i in range(3):
                    yield f"data: {json.dumps({'choices': [{'text': f'{name}-{i}'}]})}\n\n".encode()
                    await asyncio.sleep(0.01)
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"choices": [{"text": f"{name} answer"}], "max_tokens": body.get("max_tokens")}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": name}]}

    return app


@pytest.fixture
def servers():
    started: list[Running] = []

    def start(app) -> Running:
        started.append(Running(app))
        return started[-1]

    yield start
    for server in reversed(started):
        server.stop()


def proxy_for(servers, prefill, decode, **kwargs) -> Running:
    return servers(create_proxy_app(ProxySettings.of(prefill, decode, **kwargs)))


def test_prefill_gets_one_token_then_decode_gets_the_request(servers):
    p_app, d_app = fake_instance("p"), fake_instance("d")
    p, d = servers(p_app), servers(d_app)
    proxy = proxy_for(servers, [p.url], [d.url + "/"])
    body = {"model": "m", "prompt": "hello", "max_tokens": 20, "temperature": 0}
    reply = httpx.post(proxy.url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=10)
    assert reply.status_code == 200 and reply.headers["x-kvshelf-prefill"] == "ok"
    assert reply.json() == {"choices": [{"text": "d answer"}], "max_tokens": 20}
    assert p_app.state.bodies == [("/v1/completions", {**body, "max_tokens": 1, "n": 1}, "Bearer k")]
    assert d_app.state.bodies == [("/v1/completions", body, "Bearer k")]


def test_streams_the_decode_answer_back_and_chat_works(servers):
    p_app, d_app = fake_instance("p"), fake_instance("d")
    p, d = servers(p_app), servers(d_app)
    proxy = proxy_for(servers, [p.url], [d.url])
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_completion_tokens": 9}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=10) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        text = "".join(reply.iter_text())
    assert [f"d-{i}" in text for i in range(3)] == [True] * 3 and text.endswith("data: [DONE]\n\n")
    sent = p_app.state.bodies[0][1]
    assert "stream" not in sent and sent["max_tokens"] == 1 and sent["max_completion_tokens"] == 1
    assert d_app.state.bodies[0][1] == body


def test_round_robin_over_several_of_each(servers):
    apps = [fake_instance(n) for n in ("p0", "p1", "d0", "d1", "d2")]
    urls = [servers(a).url for a in apps]
    proxy = proxy_for(servers, urls[:2], urls[2:])
    texts = [
        httpx.post(proxy.url + "/v1/completions", json={"prompt": str(i)}, timeout=10).json()["choices"][0]["text"]
        for i in range(6)
    ]
    assert texts == ["d0 answer", "d1 answer", "d2 answer"] * 2
    assert [len(a.state.bodies) for a in apps] == [3, 3, 2, 2, 2]


@pytest.mark.parametrize("failure", ["unreachable", "error", "too slow"])
def test_a_failed_prefill_falls_back_to_decode_computing_the_prompt(servers, failure):
    d_app = fake_instance("d")
    d = servers(d_app)
    if failure == "unreachable":
        prefill_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    else:
        prefill_url = servers(
            fake_instance("p", status=500 if failure == "error" else 200, delay_s=2.0 * (failure == "too slow"))
        ).url
    proxy = proxy_for(servers, [prefill_url], [d.url], prefill_timeout_s=0.5)
    reply = httpx.post(proxy.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=10)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "d answer"
    assert reply.headers["x-kvshelf-prefill"] == "fallback"
    assert d_app.state.bodies[0][1] == {"prompt": "x", "max_tokens": 4}
    assert httpx.get(proxy.url + "/health", timeout=5).json()["prefill_failures"] == 1


def test_decode_errors_pass_through_and_an_unreachable_decode_is_a_502(servers):
    p = servers(fake_instance("p"))
    bad = servers(fake_instance("d", status=400))
    proxy = proxy_for(servers, [p.url], [bad.url])
    reply = httpx.post(proxy.url + "/v1/completions", json={"prompt": "x", "stream": True}, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "broken"
    gone = proxy_for(servers, [p.url], [f"http://127.0.0.1:{free_port()}"])
    reply = httpx.post(gone.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert reply.status_code == 502 and reply.json()["error"]["type"] == "upstream_error"


def test_bad_requests_are_refused_before_any_instance_sees_them(servers):
    p_app, d_app = fake_instance("p"), fake_instance("d")
    p, d = servers(p_app), servers(d_app)
    proxy = proxy_for(servers, [p.url], [d.url], max_body_bytes=1000)
    assert httpx.post(proxy.url + "/v1/completions", content=b"not json", timeout=5).status_code == 400
    assert httpx.post(proxy.url + "/v1/completions", json=[1, 2], timeout=5).status_code == 400
    assert httpx.post(proxy.url + "/v1/completions", json={"prompt": "x" * 2000}, timeout=5).status_code == 413
    assert p_app.state.bodies == [] and d_app.state.bodies == []
    assert httpx.get(proxy.url + "/v1/models", timeout=5).json() == {"data": [{"id": "d"}]}


def test_settings_are_checked_and_bind_loopback_by_default():
    settings = ProxySettings.of(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    assert settings.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="decode"):
        ProxySettings.of(["http://a:1"], [])
    with pytest.raises(ConfigError, match="prefill"):
        ProxySettings.of([], ["http://a:1"])
    with pytest.raises(ConfigError, match="ftp://x"):
        ProxySettings.of(["ftp://x"], ["http://a:1"])
    with pytest.raises(ConfigError, match="prefill_timeout_s"):
        ProxySettings.of(["http://a:1"], ["http://a:2"], prefill_timeout_s=0)
    assert prefill_body({"prompt": "p", "stream": True, "stream_options": {}, "n": 3}) == {
        "prompt": "p",
        "max_tokens": 1,
        "n": 1,
    }
