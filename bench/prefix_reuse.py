"""TTFT of a fully cached prompt vs full prefill on the real model, as ratios measured in one run.

    python bench/prefix_reuse.py [--lengths 512 1024 2048] [--repeats 3] [--model PATH] [--device cpu]

Each length runs `repeats` interleaved pairs (plain, cached) and reports medians; the cached run loads
the KV of all but the last prompt token from the CPU tier and computes that last token.
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import statistics

import torch
from common import save_results
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvshelf.assembly import open_shelf
from kvshelf.config import KVShelfConfig


def corpus_ids(tokenizer, n: int) -> list[int]:
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"corpus has only {len(ids)} tokens, asked for {n}")
    return ids[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="bench/results/prefix_reuse.json")
    args = ap.parse_args()

    console = Console()
    shelf = open_shelf(KVShelfConfig(model=args.model, device=args.device))
    gen, tok = shelf.generator, shelf.model.tokenizer
    gen.generate("warm-up", max_new_tokens=1, use_cache=False)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("prefix reuse", total=len(args.lengths) * args.repeats)
        for n in args.lengths:
            ids = corpus_ids(tok, n)
            shelf.engine.clear()
            gen.generate(ids, max_new_tokens=1)  # store the prompt's KV
            plain, cached, hits = [], [], []
            for _ in range(args.repeats):
                plain.append(gen.generate(ids, max_new_tokens=1, use_cache=False).ttft_s)
                r = gen.generate(ids, max_new_tokens=1)
                cached.append(r.ttft_s)
                hits.append(r.hit_tokens)
                progress.advance(task)
            p, c = statistics.median(plain), statistics.median(cached)
            rows.append(
                {
                    "tokens": n,
                    "hit_tokens": min(hits),
                    "ttft_full_prefill_s": p,
                    "ttft_cached_s": c,
                    "speedup": p / c,
                    "kv_mb": r.loaded_bytes / 1e6,
                }
            )

    table = Table(title=f"prefix reuse, {shelf.runner.model_id} on {args.device}, {torch.get_num_threads()} threads")
    for col in ["prompt tokens", "hit tokens", "full prefill TTFT", "cached TTFT", "speed-up", "KV loaded"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["tokens"]),
            str(r["hit_tokens"]),
            f"{r['ttft_full_prefill_s']:.3f} s",
            f"{r['ttft_cached_s']:.3f} s",
            f"{r['speedup']:.1f}x",
            f"{r['kv_mb']:.1f} MB",
        )
    console.print(table)
    save_results(args.json, rows)


if __name__ == "__main__":
    main()
