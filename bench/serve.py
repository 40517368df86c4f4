"""Concurrent clients with shared documents against `kvshelf serve`, with the KV cache and without.

    python bench/serve.py [--clients 4] [--requests 3] [--model gemma3-270m] [--max-tokens 8]

Starts the server twice on a loopback port (cache on; `local_cpu=false`, i.e. no cache), sends the same
workload to each: every client asks `requests` questions over the same documents, streaming, all clients
at once. Reports p50/p99 TTFT (request sent to first streamed text), request throughput, errors, and the
server's peak RSS, as ratios of the two runs measured back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import save_results  # noqa: E402
from services import free_port, wait_for  # noqa: E402

DOCS = ["for", "with", "exceptions"]


def workload(clients: int, requests: int) -> list[list[str]]:
    docs = "\n\n".join(pydoc_data.topics.topics[d].strip() for d in DOCS)
    return [
        [
            f"{docs}\n\nQuestion {c}.{r}: summarise rule {c * requests + r} of these documents.\nAnswer:"
            for r in range(requests)
        ]
        for c in range(clients)
    ]


def run_server(args, cache: bool):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "kvshelf.cli",
        "serve",
        "--model",
        args.model,
        "--device",
        args.device,
        "--port",
        str(port),
        "--set",
        f"local_cpu={'true' if cache else 'false'}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, timeout_s=600, what="kvshelf serve")
    return proc, url


def measure(url: str, prompts: list[list[str]], max_tokens: int, proc) -> dict:
    ttfts, errors, lock = [], [], threading.Lock()
    peak = [0]
    done = threading.Event()

    def sample_rss():
        p = psutil.Process(proc.pid)
        while not done.is_set():
            peak[0] = max(peak[0], p.memory_info().rss)
            time.sleep(0.2)

    def client(qs: list[str]):
        with httpx.Client(timeout=600) as http:
            for q in qs:
                t0 = time.perf_counter()
                first = None
                try:
                    body = {"prompt": q, "max_tokens": max_tokens, "temperature": 0, "stream": True}
                    with http.stream("POST", url + "/v1/completions", json=body) as resp:
                        resp.raise_for_status()
                        for line in resp.iter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                chunk = json.loads(line[6:])
                                if "error" in chunk:
                                    raise RuntimeError(chunk["error"])
                                if first is None and chunk["choices"][0]["text"]:
                                    first = time.perf_counter() - t0
                    with lock:
                        ttfts.append(first if first is not None else time.perf_counter() - t0)
                except Exception as err:
                    with lock:
                        errors.append(repr(err))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(qs,)) for qs in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    ttfts.sort()
    return {
        "requests": len(ttfts) + len(errors),
        "errors": len(errors),
        "error_samples": errors[:3],
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
        "throughput_rps": len(ttfts) / wall,
        "wall_s": wall,
        "peak_rss_mb": peak[0] / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="bench/results/serve.json")
    args = ap.parse_args()
    console = Console()
    prompts = workload(args.clients, args.requests)
    results = {}
    for name, cache in (("kvshelf", True), ("no cache", False)):
        console.print(f"[bold]{name}[/]: starting the server ...")
        proc, url = run_server(args, cache)
        try:
            # One untimed request warms the server (and, with the cache, stores the documents' KV).
            httpx.post(url + "/v1/completions", json={"prompt": prompts[0][0], "max_tokens": 1}, timeout=600)
            results[name] = measure(url, prompts, args.max_tokens, proc)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        console.print(f"  {results[name]}")
    a, b = results["kvshelf"], results["no cache"]
    table = Table(title=f"{args.clients} concurrent clients x {args.requests} requests, shared documents")
    for col in ["", "TTFT p50", "TTFT p99", "requests/s", "errors", "peak RSS"]:
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['ttft_p50_s']:.2f} s",
            f"{r['ttft_p99_s']:.2f} s",
            f"{r['throughput_rps']:.3f}",
            str(r["errors"]),
            f"{r['peak_rss_mb']:.0f} MB",
        )
    table.add_row(
        "ratio",
        f"{b['ttft_p50_s'] / a['ttft_p50_s']:.1f}x faster",
        f"{b['ttft_p99_s'] / a['ttft_p99_s']:.1f}x faster",
        f"{a['throughput_rps'] / b['throughput_rps']:.1f}x",
        "",
        f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x",
    )
    console.print(table)
    save_results(args.json, results)


if __name__ == "__main__":
    main()
