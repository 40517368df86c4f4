"""What one client can cost the others: auth and size checked before the body, slow clients let go, a
bounded FIFO with 429s, cancellation on disconnect (streaming or not), deadlines and caps."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from serving import KEY, RunningServer, SlowModel, make_shelf

AUTH = {"Authorization": f"Bearer {KEY}"}
DOC = "The quick brown fox jumps over the lazy dog. " * 2


def raw_request(port: int, head: str, body: bytes = b"", timeout_s: float = 15.0) -> str:
    """Send `head` (and `body`) on a raw socket, then read whatever the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(head.encode() + body)
        data = b""
        while True:
            try:
                part = s.recv(65536)
            except TimeoutError:
                break
            if not part:
                break
            data += part
            if b"\r\n\r\n" in data and data.rstrip().endswith(b"}"):
                break
        return data.decode("latin-1")


@pytest.fixture(scope="module")
def server():
    shelf = make_shelf(max_body_bytes=64 << 10, read_timeout_s=0.5, max_waiting_requests=1, max_output_tokens=400)
    slow = SlowModel(shelf)
    with RunningServer(shelf) as running:
        running.slow = slow
        yield running


def set_delay(server, seconds: float) -> None:
    server.slow.delay = seconds


def test_wrong_key_is_refused_before_the_body_is_read(server):
    # Headers promise 500 MB; nothing of it is sent: the answer must come anyway.
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        "Content-Type: application/json\r\nContent-Length: 500000000\r\n\r\n"
    )
    answer = raw_request(server.port, head)
    assert answer.startswith("HTTP/1.1 401") and '"authentication_error"' in answer
    no_key = head.replace("Authorization: Bearer wrong\r\n", "")
    assert raw_request(server.port, no_key).startswith("HTTP/1.1 401")


def test_oversized_bodies_are_413(server):
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 500000000\r\n\r\n"
    )
    assert raw_request(server.port, head).startswith("HTTP/1.1 413")

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"a" * 1024
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", headers=AUTH, content=chunks())
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]


def test_a_client_that_stalls_mid_body_is_let_go(server):
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    answer = raw_request(server.port, head, b"{")  # headers and one byte, then silence
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    # the server still answers others
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": DOC, "max_tokens": 2})
    assert r.status_code == 200


def _generate_in_thread(server, results: list, **body):
    def go():
        r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": DOC, **body}, timeout=60)
        results.append(r)

    t = threading.Thread(target=go)
    t.start()
    return t


def test_a_full_queue_answers_429_with_retry_after(server):
    set_delay(server, 0.02)
    try:
        admitted = server.sample("kvshelf_requests_total", {"endpoint": "completions"})
        results: list = []
        running = _generate_in_thread(server, results, max_tokens=60, temperature=0)
        server.wait_for("kvshelf_requests_total", {"endpoint": "completions"}, admitted + 1)
        waiting = _generate_in_thread(server, results, max_tokens=2, temperature=0)
        server.wait_for("kvshelf_requests_total", {"endpoint": "completions"}, admitted + 2)
        r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": DOC, "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        running.join(60)
        waiting.join(60)
        assert [x.status_code for x in results] == [200, 200]  # those admitted are served, in order
        assert server.sample("kvshelf_rejected_requests_total", {"reason": "queue_full"}) >= 1
    finally:
        set_delay(server, 0.0)


def test_an_abandoned_request_stops_and_frees_the_model(server):
    set_delay(server, 0.02)
    try:
        before = server.sample("kvshelf_cancelled_requests_total", {"reason": "client_gone"})
        calls_before = server.slow.calls
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/completions",
                headers=AUTH,
                json={"prompt": DOC, "max_tokens": 400, "temperature": 0},
                timeout=httpx.Timeout(10, read=0.4),
            )
        server.wait_for("kvshelf_cancelled_requests_total", {"reason": "client_gone"}, before + 1)
        assert server.slow.calls - calls_before < 200  # it stopped long before its 400 tokens
        threads_before = threading.active_count()
        for _ in range(20):  # abandoned while waiting: skipped, no thread left behind
            with pytest.raises(httpx.TimeoutException):
                httpx.post(
                    server.url + "/v1/completions",
                    headers=AUTH,
                    json={"prompt": DOC, "max_tokens": 400},
                    timeout=httpx.Timeout(10, read=0.05),
                )
        r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": DOC, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        tasks = server.server.server_state.tasks  # uvicorn's in-flight request handlers
        deadline = time.monotonic() + 20
        while tasks:  # every abandoned handler ended (not parked until its deadline)
            assert time.monotonic() < deadline, f"{len(tasks)} request handlers still running"
            time.sleep(0.05)
        names = [t.name for t in threading.enumerate()]
        assert names.count("kvshelf-generate") == 1
        assert threading.active_count() <= threads_before + 6  # at most the bounded tokenizer pool
    finally:
        set_delay(server, 0.0)


def test_a_closed_stream_stops_generation(server):
    set_delay(server, 0.02)
    try:
        before = server.sample("kvshelf_cancelled_requests_total", {"reason": "client_gone"})
        calls_before = server.slow.calls
        body = {"prompt": DOC, "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, json=body, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        server.wait_for("kvshelf_cancelled_requests_total", {"reason": "client_gone"}, before + 1)
        assert server.slow.calls - calls_before < 200
    finally:
        set_delay(server, 0.0)


def test_caps_on_max_tokens_and_prompt_length():
    with RunningServer(make_shelf(max_output_tokens=8, max_prompt_tokens=20)) as s:
        r = httpx.post(s.url + "/v1/completions", headers=AUTH, json={"prompt": "hello", "max_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = httpx.post(s.url + "/v1/completions", headers=AUTH, json={"prompt": "x" * 30, "max_tokens": 2})
        assert r.status_code == 400 and "max_prompt_tokens of 20" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/completions", headers=AUTH, json={"prompt": "hello", "max_tokens": 8})
        assert r.status_code == 200


def test_the_request_deadline_ends_a_long_generation():
    shelf = make_shelf(request_timeout_s=0.5)
    slow = SlowModel(shelf, 0.02)
    with RunningServer(shelf) as s:
        r = httpx.post(s.url + "/v1/completions", headers=AUTH, json={"prompt": DOC, "max_tokens": 400}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        s.wait_for("kvshelf_cancelled_requests_total", {"reason": "deadline"}, 1)
        assert slow.calls < 200


def test_a_client_that_never_finishes_its_headers_is_let_go(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert s.recv(100) == b""  # closed by the server (read_timeout_s = 0.5), not held open
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\n")  # a second, unfinished head on the kept-alive connection
        assert s.recv(100) == b""


def test_a_request_abandoned_while_waiting_never_runs_and_its_handler_ends(server):
    set_delay(server, 0.02)
    try:
        admitted = server.sample("kvshelf_requests_total", {"endpoint": "completions"})
        results: list = []
        running = _generate_in_thread(server, results, max_tokens=150, temperature=0)  # ~3 s of decoding
        server.wait_for("kvshelf_requests_total", {"endpoint": "completions"}, admitted + 1)
        started = server.slow.calls
        with pytest.raises(httpx.ReadTimeout):  # waits behind it, then its client gives up
            httpx.post(
                server.url + "/v1/completions",
                headers=AUTH,
                json={"prompt": DOC + "waiting", "max_tokens": 5},
                timeout=httpx.Timeout(10, read=0.3),
            )
        tasks = server.server.server_state.tasks
        deadline = time.monotonic() + 20
        while len(tasks) > 1:  # only the running request's handler is left, long before it finishes
            assert time.monotonic() < deadline, f"{len(tasks)} request handlers still running"
            time.sleep(0.02)
        calls = server.slow.calls
        assert calls - started < 100  # the running request was still decoding: the waiting one ended first
        running.join(60)
        assert results[0].status_code == 200
        assert server.slow.calls - calls <= 150  # the abandoned request never ran after it
    finally:
        set_delay(server, 0.0)


def test_a_client_gone_mid_prefill_stops_the_prefill_between_layers():
    """The prefill itself is interrupted (not run to its end) when the client of a non-streaming request
    hangs up: the forward stops at the next layer."""
    shelf = make_shelf()
    layers_run = []

    def slow_layer(_module, _args):
        layers_run.append(1)
        time.sleep(0.5)

    for layer in shelf.runner.layers:
        layer.mlp.register_forward_pre_hook(slow_layer)
    with RunningServer(shelf) as server:
        before = server.sample("kvshelf_cancelled_requests_total", {"reason": "client_gone"})
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/completions",
                headers=AUTH,
                json={"prompt": DOC, "max_tokens": 4},
                timeout=httpx.Timeout(10, read=0.3),
            )
        server.wait_for("kvshelf_cancelled_requests_total", {"reason": "client_gone"}, before + 1)
        assert len(layers_run) < len(shelf.runner.layers)  # stopped inside the prefill, before its last layer
