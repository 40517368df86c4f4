"""A miss-only workload against the cache with and without the never-slower guard, vs no cache at all.

    python bench/guard.py [--short 64] [--long 300] [--requests 10] [--redis]

Every prompt is new (nothing to reuse): the cache can only cost time here. Short prompts are below the
guard's minimum (one chunk), long ones above it (the guard then looks up, finds nothing, and recomputes).
Tiers: CPU + disk (+ Redis with --redis). Reports median TTFT per mode and the ratio to no cache.
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import save_results  # noqa: E402

from kvshelf.advice.cost import CostModel  # noqa: E402
from kvshelf.advice.guard import Guard  # noqa: E402
from kvshelf.cache.engine import CacheEngine  # noqa: E402
from kvshelf.codecs import get_codec  # noqa: E402
from kvshelf.generation import CachedGenerator  # noqa: E402
from kvshelf.model.loader import load_model  # noqa: E402
from kvshelf.storage.disk import DiskBackend  # noqa: E402
from kvshelf.storage.memory import MemoryBackend  # noqa: E402
from kvshelf.storage.tiers import TierManager  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=int, default=64)
    ap.add_argument("--long", type=int, default=300)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--redis", action="store_true")
    ap.add_argument("--json", default="bench/results/guard.json")
    args = ap.parse_args()
    lm = load_model(device="cpu")
    runner, tok = lm.runner, lm.tokenizer
    work = Path(tempfile.mkdtemp(prefix="kvshelf-guard-"))
    backends = [MemoryBackend(4 << 30), DiskBackend(work / "disk", 4 << 30, get_codec("int8"))]
    server = None
    if args.redis:
        from services import RedisServer

        from kvshelf.storage.redis import RedisBackend

        server = RedisServer(work / "redis").start()
        backends.append(RedisBackend(server.url, get_codec("int8")))
    tiers = TierManager(backends)
    engine = CacheEngine(runner.fingerprint(), tiers, chunk_size=256)
    guard = Guard(CostModel.for_runner(runner), min_tokens=256)
    modes = {
        "no cache": CachedGenerator(runner, None),
        "cache, no guard": CachedGenerator(runner, engine),
        "cache + guard": CachedGenerator(runner, engine, guard=guard),
    }
    words = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).split()
    rows = []
    for label, length in (("short", args.short), ("long", args.long)):
        times = {m: [] for m in modes}
        for r in range(args.requests):
            for k, (m, gen) in enumerate(modes.items()):
                # A fresh prompt per request and mode: every lookup misses.
                start = (r * 7919 + k * 104729 + length * 31) % max(1, len(words) - 4 * length)
                ids = tok(" ".join(words[start : start + 2 * length]))["input_ids"][:length]
                times[m].append(gen.generate(ids, max_new_tokens=1).ttft_s)
        base = statistics.median(times["no cache"])
        for m, t in times.items():
            rows.append(
                {
                    "prompts": label,
                    "tokens": length,
                    "mode": m,
                    "ttft_s": statistics.median(t),
                    "vs_no_cache": statistics.median(t) / base,
                }
            )
    tiers.close()
    if server is not None:
        server.kill()
    table = Table(title=f"miss-only workload, {args.requests} requests per cell, tiers: {[b.name for b in backends]}")
    for col in ["prompts", "mode", "TTFT (median)", "vs no cache"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['prompts']} ({r['tokens']} tok)", r["mode"], f"{r['ttft_s'] * 1e3:.1f} ms", f"{r['vs_no_cache']:.3f}x"
        )
    Console().print(table)
    save_results(args.json, rows)


if __name__ == "__main__":
    main()
