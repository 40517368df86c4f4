"""Fault campaign (issue #15): generation on a tiny model over a real redis-server / moto S3 behind a
loopback fault proxy (tests/proxy.py, in a process of its own), one fault per row. Every output is compared with plain recompute.

    python bench/fault_campaign.py [--requests 8] [--out bench/results/fault_campaign.json]

Tiers: the remote one alone (no CPU tier, so every reuse goes to the faulty store), int8, chunk 16, and
kvshelf's defaults otherwise (remote_timeout_s 2 s, so a 4 s deadline per tier call; breaker 3 failures,
5 s cool-down; the guard on unless the row says otherwise). Each row: 2 healthy requests
fill the store, then the fault starts and `--requests` more run (alternating between two cached
documents, so each would hit). Worst latency is per whole request (prefill + 4 new tokens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import save_results  # noqa: E402
from conftest import build_tiny_model  # noqa: E402
from proxy import ProxyProcess  # noqa: E402
from services import RedisServer, S3Server, s3_env  # noqa: E402

from kvshelf.advice.cost import CostModel, measure_prefill  # noqa: E402
from kvshelf.advice.guard import Guard  # noqa: E402
from kvshelf.assembly.tiers import build_tiers  # noqa: E402
from kvshelf.cache.engine import CacheEngine  # noqa: E402
from kvshelf.config import KVShelfConfig  # noqa: E402
from kvshelf.generation import CachedGenerator  # noqa: E402
from kvshelf.metrics import Metrics  # noqa: E402
from kvshelf.model.runner import ModelRunner  # noqa: E402


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(4, 320, (48,), generator=g).tolist() for _ in range(2)]
    return [docs[i % 2] + torch.randint(4, 320, (5,), generator=g).tolist() for i in range(n)]


def corrupt_redis(server: RedisServer) -> None:
    client = server.client()
    for k in client.scan_iter(match="kvshelf:*"):
        value = client.get(k)
        client.set(k, bytes(b ^ 0x5A for b in value))  # same size, every byte flipped


def corrupt_s3(s3, bucket: str) -> None:
    for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        s3.put_object(Bucket=bucket, Key=o["Key"], Body=bytes(b ^ 0x5A for b in body))


# (name, store, fault): fault(proxy, server) starts the fault.
SCENARIOS = [
    ("none (healthy Redis)", "redis", lambda p, s: None),
    ("Redis killed", "redis", lambda p, s: s.kill()),
    ("Redis +0.5 s per reply", "redis", lambda p, s: p.set_mode("delay", delay_s=0.5)),
    ("Redis +1.5 s per reply", "redis", lambda p, s: p.set_mode("delay", delay_s=1.5)),
    ("Redis trickling (5 ms/byte)", "redis", lambda p, s: p.set_mode("trickle", trickle_s=0.005)),
    (
        "Redis trickling values only",
        "redis",
        lambda p, s: p.set_mode("trickle", trickle_s=0.002, trickle_min_bytes=256),
    ),
    ("Redis stalled", "redis", lambda p, s: p.set_mode("stall")),
    ("Redis values corrupted", "redis", lambda p, s: corrupt_redis(s)),
    ("Redis trickling, guard off", "redis", lambda p, s: p.set_mode("trickle", trickle_s=0.005)),
    ("Redis stalled, guard off", "redis", lambda p, s: p.set_mode("stall")),
    ("none (healthy S3)", "s3", lambda p, s: None),
    ("S3 killed", "s3", lambda p, s: s.kill()),
    ("S3 +0.5 s per reply", "s3", lambda p, s: p.set_mode("delay", delay_s=0.5)),
    ("S3 trickling (5 ms/byte)", "s3", lambda p, s: p.set_mode("trickle", trickle_s=0.005)),
    ("S3 stalled", "s3", lambda p, s: p.set_mode("stall")),
    ("S3 objects corrupted", "s3", lambda p, s: corrupt_s3(*s)),
    ("S3 stalled, guard off", "s3", lambda p, s: p.set_mode("stall")),
]


def run_one(name, store, fault, runner, prefill_tokens_per_s, batch, expected, workdir: Path, n: int) -> dict:
    m = Metrics()
    fp = runner.fingerprint()
    cost = CostModel(prefill_tokens_per_s, fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim * 4)  # learns afresh
    guard = None if name.endswith("guard off") else Guard(cost, min_tokens=16, metrics=m)
    if store == "redis":
        server = RedisServer(workdir / f"redis-{time.monotonic_ns()}").start()
        port, handle = server.port, server
    else:
        import boto3

        server = S3Server().start()
        bucket = "campaign"
        s3 = boto3.client("s3", endpoint_url=server.endpoint)
        s3.create_bucket(Bucket=bucket)
        port, handle = server.port, (s3, bucket)
    proxy = ProxyProcess(port).start()
    url = (
        f"redis://127.0.0.1:{proxy.port}/0"
        if store == "redis"
        else f"s3://campaign/c?endpoint=http://127.0.0.1:{proxy.port}"
    )
    config = KVShelfConfig(local_cpu=False, remote_url=url, remote_serde="int8", chunk_size=16)
    tiers = build_tiers(config, metrics=m)
    gen = CachedGenerator(runner, CacheEngine(fp, tiers, chunk_size=16), guard=guard)
    try:
        for p in batch[:2]:
            gen.generate(p, max_new_tokens=4, stop_at_eos=False)
        tiers.flush()
        fault(proxy, server if name.endswith("killed") or store == "redis" else handle)
        lat, plain_lat, wrong, hits = [], [], 0, []
        plain = CachedGenerator(runner, None)
        for p, want in zip(batch[2 : 2 + n], expected[2 : 2 + n], strict=True):
            t0 = time.monotonic()
            out = gen.generate(p, max_new_tokens=4, stop_at_eos=False)
            lat.append(time.monotonic() - t0)
            t0 = time.monotonic()  # the same request recomputed, right after: a reference under the same load
            plain.generate(p, max_new_tokens=4, stop_at_eos=False)
            plain_lat.append(time.monotonic() - t0)
            wrong += out.token_ids != want
            hits.append(out.hit_tokens)
        tier = tiers.tiers[-1]
        s = tier.stats
        bypass = {
            r: int(m.registry.get_sample_value("kvshelf_bypasses_total", {"reason": r}) or 0)
            for r in ("tier_slow", "load_slower_than_recompute")
        }
        return {
            "fault": name,
            "requests": n,
            "wrong": wrong,
            "worst_s": max(lat),
            "median_s": statistics.median(lat),
            "recompute_median_s": statistics.median(plain_lat),
            "recompute_worst_s": max(plain_lat),
            "requests_with_hits": sum(1 for h in hits if h),
            "breaker_opened": tier.breaker.times_opened,
            "timeouts": s.timeouts,
            "slow": s.slow,
            "errors": s.errors,
            "skipped": s.skipped,
            "stuck": s.stuck,
            "corrupt": getattr(tier.backend, "corrupt_objects", 0),
            "bypass_tier_slow": bypass["tier_slow"],
            "bypass_load_slower": bypass["load_slower_than_recompute"],
        }
    finally:
        proxy.stop()
        tiers.close()
        server.kill()


def action(r: dict) -> str:
    parts = []
    if r["breaker_opened"]:
        parts.append(f"breaker opened x{r['breaker_opened']}")
    for key, label in (("timeouts", "deadline cuts"), ("slow", "budget cuts"), ("errors", "errors")):
        if r[key]:
            parts.append(f"{r[key]} {label}")
    if r["skipped"]:
        parts.append(f"{r['skipped']} calls skipped")
    if r["stuck"]:
        parts.append(f"{r['stuck']} stuck-skips")
    if r["corrupt"]:
        parts.append(f"{r['corrupt']} corrupt deleted")
    if r["bypass_tier_slow"]:
        parts.append(f"guard tier_slow x{r['bypass_tier_slow']}")
    return ", ".join(parts) or "none needed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--only", default=None, help="run the scenarios whose name contains this")
    ap.add_argument("--prefill-tokens-per-s", type=float, default=500.0, help="what the guard believes")
    ap.add_argument("--out", default="bench/results/fault_campaign.json")
    args = ap.parse_args()
    s3_env()
    runner = ModelRunner(build_tiny_model("llama"))

    # The tiny model recomputes faster than any store loads (a 1 KiB/token KV): the guard would rightly
    # never load, and the faults would never meet a load. So the guard is told the prefill speed of the
    # real default model here (Gemma 3 270M, ~500 tokens/s on this 2-core CPU), as if recomputing cost
    # what it costs there; the tiny model still computes every output that is compared.
    measured = measure_prefill(runner, 64)
    batch = prompts(2 + args.requests)
    plain = CachedGenerator(runner, None)
    plain.generate(batch[0], max_new_tokens=4)  # warm-up
    expected, plain_lat = [], []
    for p in batch:
        t0 = time.monotonic()
        expected.append(plain.generate(p, max_new_tokens=4, stop_at_eos=False).token_ids)
        plain_lat.append(time.monotonic() - t0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, store, fault in SCENARIOS:
            if args.only and args.only.lower() not in name.lower():
                continue
            r = run_one(
                name, store, fault, runner, args.prefill_tokens_per_s, batch, expected, Path(tmp), args.requests
            )
            rows.append(r)
            print(f"{name}: wrong {r['wrong']}, worst {r['worst_s']:.2f} s, {action(r)}", flush=True)
    table = Table(
        title=f"fault campaign (tiny llama; recompute only: median {statistics.median(plain_lat):.3f} s, "
        f"worst {max(plain_lat):.3f} s per request)"
    )
    cols = ("fault", "requests", "wrong outputs", "worst request", "median", "recompute median / worst", "hits")
    for col in (*cols, "breaker / guard action"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["fault"],
            str(r["requests"]),
            str(r["wrong"]),
            f"{r['worst_s']:.2f} s",
            f"{r['median_s']:.2f} s",
            f"{r['recompute_median_s']:.2f} / {r['recompute_worst_s']:.2f} s",
            str(r["requests_with_hits"]),
            action(r),
        )
    Console(width=200).print(table)
    save_results(
        args.out,
        {
            "recompute_worst_s": max(plain_lat),
            "recompute_median_s": statistics.median(plain_lat),
            "guard_prefill_tokens_per_s": args.prefill_tokens_per_s,
            "tiny_model_prefill_tokens_per_s": measured,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
