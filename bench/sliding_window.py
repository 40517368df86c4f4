"""Full prefill with sliding layers attending in window blocks vs one masked attention over every key.

    python bench/sliding_window.py [--tokens 2048 4096 8192] [--repeats 2] [--threads 1] [--json FILE]

Gemma 3's sliding layers (window 512) see at most 512 keys per query. The runner used to score every key up
to the last query and mask most of them (quadratic in the prompt on 15 of the default model's 18 layers); it
now cuts a sliding layer's queries into blocks that read at most 2 x window keys (kvshelf.model.runner,
`_window_blocks`). Both ways run in one process, alternating, on the same prompt (text from the stdlib's
pydoc topics), the default model on CPU; the last-token logits of both are compared (the same math, another
summation order).
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import statistics
import time

import torch
from common import save_results
from rich.console import Console
from rich.table import Table

import kvshelf.model.runner as runner_module
from kvshelf.assembly import open_shelf
from kvshelf.config import KVShelfConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--json", default="bench/results/sliding_window.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shelf = open_shelf(KVShelfConfig(model=args.model, device="cpu"))
    runner, tok = shelf.runner, shelf.model.tokenizer
    text = " ".join(pydoc_data.topics.topics.values())
    ids = tok(text)["input_ids"]
    blocked = runner_module._window_blocks
    ways = {"window blocks": blocked, "every key, masked": lambda *a: None}
    rows = []
    for n in args.tokens:
        times: dict[str, list[float]] = {name: [] for name in ways}
        logits = {}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                runner_module._window_blocks = fn
                kv = runner.new_kv(n)
                start = time.perf_counter()
                logits[name] = runner.forward(ids[:n], 0, kv)
                times[name].append(time.perf_counter() - start)
        runner_module._window_blocks = blocked
        a, b = logits.values()
        row = {
            "tokens": n,
            **{f"{name} s": statistics.median(t) for name, t in times.items()},
            "max |logit difference|": float((a - b).abs().max()),
            "same argmax": int(a.argmax()) == int(b.argmax()),
        }
        row["speed-up"] = row["every key, masked s"] / row["window blocks s"]
        rows.append(row)
    table = Table(title=f"Full prefill, the default model on CPU ({torch.get_num_threads()} threads)")
    for key in rows[0]:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console(width=160).print(table)
    save_results(args.json, {"threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
