"""What one careless or hostile client costs the others on `kvshelf serve` (issue #16's probes, re-run).

    python bench/server_limits.py [--model gemma3-270m] [--prompt-tokens 2048] [--abandoned 200]

Starts the server on a loopback port with an API key and measures:
1. a client that abandons a long non-streaming request after --abandon-after seconds: how long the
   next 2-token request then takes (and the same request on an idle server);
2. --abandoned requests abandoned one after another: the server's thread count and the next request's time;
3. a 600 MB POST with a wrong key: the answer, its time and the server's peak RSS growth;
4. a client that sends its headers and one byte of body, then stalls: when the server lets it go.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console

KEY = "bench-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kvshelf.cli", "serve", "--model", args.model, "--port", str(port)]
    for setting in (f"api_key={KEY}", f"read_timeout_s={args.read_timeout}", "max_output_tokens=4096"):
        cmd += ["--set", setting]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("kvshelf serve did not start")
        time.sleep(1)


def long_prompt(tokens: int) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics.values())
    return text[: tokens * 4]  # about 4 characters per token in this English text


def short_request(url: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", headers=AUTH, json={"prompt": "Hello", "max_tokens": 2}, timeout=900)
    r.raise_for_status()
    return time.perf_counter() - t0


def abandon(url: str, prompt: str, max_tokens: int, after_s: float) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    try:
        httpx.post(url + "/v1/completions", headers=AUTH, json=body, timeout=httpx.Timeout(60, read=after_s))
    except httpx.TimeoutException:
        return
    raise SystemExit("the long request finished before it could be abandoned: raise --max-tokens")


def big_unauthenticated_post(url: str, proc: subprocess.Popen, megabytes: int) -> dict:
    server = psutil.Process(proc.pid)
    base = server.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            time.sleep(0.05)

    def body():
        block = b"a" * (1 << 20)
        for _ in range(megabytes):
            yield block

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    try:
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer wrong"}, content=body(), timeout=120)
        status = r.status_code
    except httpx.HTTPError as err:  # the server answered and closed before the upload finished
        status = f"closed ({type(err).__name__})"
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"status": status, "seconds": elapsed, "rss_growth_mb": (peak[0] - base) / 1e6}


def slow_client(url: str) -> dict:
    port = int(url.rsplit(":", 1)[1])
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        t0 = time.perf_counter()
        s.sendall(head.encode())
        answer = s.recv(200).decode("latin-1")
        return {"status": answer.split("\r\n", 1)[0], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--abandon-after", type=float, default=3.0)
    ap.add_argument("--abandoned", type=int, default=200)
    ap.add_argument("--upload-mb", type=int, default=600)
    ap.add_argument("--read-timeout", type=float, default=5.0)
    ap.add_argument("--json", default="bench/results/server_limits.json")
    args = ap.parse_args()

    proc, url = start_server(args)
    results: dict = {"args": vars(args)}
    try:
        short_request(url)  # warm-up
        results["idle_short_request_s"] = short_request(url)
        prompt = long_prompt(args.prompt_tokens)
        abandon(url, prompt, args.max_tokens, args.abandon_after)
        results["after_abandoned_long_request_s"] = short_request(url)

        threads_before = psutil.Process(proc.pid).num_threads()
        refused = 0
        for i in range(args.abandoned):
            body = {"prompt": f"{i} {prompt[:2000]}", "max_tokens": 50}
            try:
                r = httpx.post(url + "/v1/completions", headers=AUTH, json=body, timeout=httpx.Timeout(10, read=0.05))
                refused += r.status_code == 429
            except httpx.TimeoutException:
                pass
        results["abandoned"] = {
            "requests": args.abandoned,
            "refused_429": refused,
            "server_threads_before": threads_before,
            "server_threads_after": psutil.Process(proc.pid).num_threads(),
            "next_short_request_s": short_request(url),
        }
        results["unauthenticated_upload"] = big_unauthenticated_post(url, proc, args.upload_mb)
        results["slow_client"] = slow_client(url)
    finally:
        proc.terminate()
        proc.wait(60)
    console.print_json(json.dumps(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
