"""CacheBlend on a RAG workload with the real model: documents reordered between requests.

    python bench/blend.py [--cold] [--samples 10] [--ratios 0.05 0.15 0.3] [--jsonl FILE] [--max-new-tokens 12]

Each sample is a few documents and a question whose answer is in them (a pass-key in one document,
facts spread over several). Documents are shuffled into a new order for the measured request, after
an earlier request saw them in another order. Compared on identical token sequences:

- full prefill (no cache), the reference;
- prefix caching (kvshelf's prefix reuse; reuse stops at the first document that moved);
- full reuse with 0% recompute (chunk KV re-rotated, nothing recomputed);
- CacheBlend at each ratio (check layer 1).

Reported per method: median TTFT, TTFT speed-up vs full prefill, answer accuracy (the expected answer
appears in the greedy output) with its difference from full prefill on the same samples (paired bootstrap
95% interval, exact McNemar p), and mean next-token KL divergence from full prefill; then accuracy per
question type. `--jsonl` takes lines of {"documents": [...], "question": "...", "answer": "...", "type": "..."}
instead of the built-in samples (bench/rag_eval.py writes a varied set).
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import random
import statistics
import time
from pathlib import Path

import torch
from common import save_results
from rag_eval import paired
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvshelf.assembly import open_shelf
from kvshelf.blend.blender import Blender
from kvshelf.config import KVShelfConfig
from kvshelf.generation import CachedGenerator

SEP = "<|CHUNK_SEP|>"
CITIES = ["Valmora", "Keswin", "Orlath", "Dunmere", "Sarvik", "Pellow", "Ithren", "Marrow"]
NAMES = [
    "Teodor Brask",
    "Ilse Varn",
    "Omar Quill",
    "Nadia Fenn",
    "Rurik Holm",
    "Lena Stray",
    "Piet Calder",
    "Yara Moss",
]
RIVERS = ["Lenne", "Ostra", "Fael", "Dorrow", "Venn", "Asker", "Millow", "Tarn"]


def filler(rng: random.Random, words: int) -> str:
    topics = sorted(pydoc_data.topics.topics)
    text = pydoc_data.topics.topics[rng.choice(topics)].split()
    start = rng.randrange(max(1, len(text) - words))
    return " ".join(text[start : start + words])


def builtin_samples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        cities = rng.sample(range(len(CITIES)), 3)
        key = rng.randrange(10000, 99999)
        docs = []
        for c in cities:
            docs.append(
                f"Notes on the city of {CITIES[c]}. {filler(rng, 170)} The mayor of {CITIES[c]} is "
                f"{NAMES[c]}. The river {RIVERS[c]} runs through {CITIES[c]}. {filler(rng, 170)}"
            )
        docs.append(f"Security memo. {filler(rng, 200)} The pass key is {key}. Remember it. {filler(rng, 140)}")
        target = cities[i % 3]
        kind = i % 3
        if kind == 0:
            q, a = "What is the pass key?", str(key)
        elif kind == 1:
            q, a = f"Who is the mayor of {CITIES[target]}?", NAMES[target].split()[0]
        else:
            q, a = f"Which river runs through {CITIES[target]}?", RIVERS[target]
        samples.append({"documents": docs, "question": q, "answer": a})
    return samples


def prompt_text(docs: list[str], question: str) -> str:
    # The instruction is a chunk of its own, so it is cached once whatever document follows it.
    parts = ["Answer the question using the documents.\n", *docs]
    return SEP.join(parts) + SEP + f"\nQuestion: {question}\nAnswer:"


def kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    return float((p.exp() * (p - q)).sum())


def cold_requests(samples: list[dict], shelf, tok, args, console: Console) -> None:
    """The first request with new documents (issue #18): TTFT of a plain prefill, of the cold request as
    served now (exact prefill, documents computed after the first token), of the old way (each document
    computed alone, then blended: min_cached_share 0), and of a request with half its documents cached."""
    runner, engine = shelf.runner, shelf.engine

    def gen(share: float) -> CachedGenerator:
        blender = Blender(runner, engine, check_layers=[args.check_layer], ratios=[0.15], min_cached_share=share)
        return CachedGenerator(runner, engine, tok, blender=blender, blend_special_str=SEP)

    now, old = gen(0.5), gen(0.0)
    now.generate("warm-up", max_new_tokens=1, use_cache=False)
    names = [
        "plain prefill",
        "cold, exact",
        "cold, blended anyway",
        "half cached, blended",
        "full hit, blended",
    ]
    rows = {n: [] for n in names}
    rest = []  # the cold request's stream after its first token: the documents alone and one decode step
    lengths = []
    for i, sample in enumerate(samples):
        docs, q = list(sample["documents"]), sample["question"]
        text = prompt_text(docs, q)
        ids = now.segment(text, None).token_ids
        lengths.append(len(ids))
        rows["plain prefill"].append(now.generate(ids, max_new_tokens=1, use_cache=False).ttft_s)
        t0 = time.perf_counter()
        stream = now.stream(text, max_new_tokens=2, salt=f"now{i}", stop_at_eos=False)
        next(stream)
        t1 = time.perf_counter()
        for _ in stream:
            pass
        rows["cold, exact"].append(t1 - t0)
        rest.append(time.perf_counter() - t1)
        rows["cold, blended anyway"].append(old.generate(text, max_new_tokens=1, salt=f"old{i}").ttft_s)
        half = [d for k, d in enumerate(docs) if k % 2 == 0]
        old.generate(prompt_text(half, q), max_new_tokens=1, salt=f"half{i}")  # caches half the documents
        rows["half cached, blended"].append(old.generate(text, max_new_tokens=1, salt=f"half{i}").ttft_s)
        rows["full hit, blended"].append(now.generate(text, max_new_tokens=1, salt=f"now{i}").ttft_s)
    base = statistics.median(rows["plain prefill"])
    table = Table(
        title=f"First request with new documents, {len(samples)} samples, {min(lengths)}-{max(lengths)} tokens"
    )
    for col in ["request", "TTFT (median)", "vs plain prefill (medians)", "per sample: median, max"]:
        table.add_column(col, justify="right")
    results = []
    for name, ttfts in rows.items():
        ttft = statistics.median(ttfts)
        ratios = [t / p for t, p in zip(ttfts, rows["plain prefill"], strict=True)]
        table.add_row(
            name, f"{ttft:.3f} s", f"{ttft / base:.2f}x", f"{statistics.median(ratios):.2f}x, {max(ratios):.2f}x"
        )
        results.append({"request": name, "ttft_s": ttft, "vs_plain": ttft / base, "all": ttfts, "ratios": ratios})
    console.print(table)
    console.print(
        f"cold request, exact: the rest of its stream took {statistics.median(rest):.3f} s (median): every "
        "document computed alone, one per token streamed, and one decode step"
    )
    save_results(args.json, results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.15, 0.3])
    ap.add_argument("--check-layer", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--jsonl", default=None)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="bench/results/blend.json")
    ap.add_argument("--cold", action="store_true", help="measure the first request with new documents instead")
    args = ap.parse_args()
    console = Console()
    samples = (
        [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
        if args.jsonl
        else builtin_samples(args.samples)
    )
    shelf = open_shelf(KVShelfConfig(model=args.model, device=args.device, max_local_cpu_size=8))
    runner, engine, tok = shelf.runner, shelf.engine, shelf.model.tokenizer
    if args.cold:
        cold_requests(samples, shelf, tok, args, console)
        return

    def blend_gen(ratio: float) -> CachedGenerator:
        blender = Blender(runner, engine, check_layers=[args.check_layer], ratios=[ratio])
        return CachedGenerator(runner, engine, tok, blender=blender, blend_special_str=SEP)

    methods = {"full prefill": None, "prefix caching": shelf.generator, "full reuse (0%)": blend_gen(0.0)}
    methods.update({f"CacheBlend {r:.0%}": blend_gen(r) for r in args.ratios})
    rows = {m: {"ttft": [], "correct": [], "kl": [], "answers": []} for m in methods}
    types, lengths = [], []
    probe = methods["full reuse (0%)"]
    probe.generate("warm-up", max_new_tokens=1, use_cache=False)
    rng = random.Random(1)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("blend", total=len(samples))
        for sample in samples:
            docs = list(sample["documents"])
            # An earlier request saw the documents in one order: it fills both the prefix cache and the
            # chunk cache. The measured request brings them in another order.
            first = prompt_text(docs, sample["question"])
            shelf.generator.generate(probe.segment(first, None).token_ids, max_new_tokens=1)
            probe.generate(first, max_new_tokens=1)
            while True:
                order = rng.sample(docs, len(docs))
                if order != docs:
                    break
            text = prompt_text(order, sample["question"])
            ids = probe.segment(text, None).token_ids
            types.append(sample.get("type", "builtin"))
            lengths.append(len(ids))
            ref = None
            for name, gen in methods.items():
                if gen is None:
                    r = probe.generate(ids, max_new_tokens=args.max_new_tokens, use_cache=False)
                    ref = r.first_logits
                elif gen is shelf.generator:
                    r = gen.generate(ids, max_new_tokens=args.max_new_tokens)
                else:
                    r = gen.generate(text, max_new_tokens=args.max_new_tokens)
                answer = tok.decode(r.token_ids, skip_special_tokens=True)
                rows[name]["ttft"].append(r.ttft_s)
                rows[name]["correct"].append(sample["answer"].lower() in answer.lower())
                rows[name]["answers"].append(answer)
                rows[name]["kl"].append(kl(ref, r.first_logits))
            progress.advance(task)

    base = statistics.median(rows["full prefill"]["ttft"])
    table = Table(
        title=f"RAG with reordered documents, {len(samples)} samples, {min(lengths)}-{max(lengths)}-token prompts "
        f"(median {statistics.median(lengths):.0f})"
    )
    for col in ["method", "TTFT (median)", "speed-up", "accuracy", "vs full prefill [95% CI], McNemar p", "KL"]:
        table.add_column(col, justify="right")
    results = []
    for name, r in rows.items():
        ttft = statistics.median(r["ttft"])
        acc = statistics.fmean(r["correct"])
        mean_kl = statistics.fmean(r["kl"])
        vs = paired(rows["full prefill"]["correct"], r["correct"])
        results.append(
            {"method": name, "ttft_s": ttft, "speedup": base / ttft, "accuracy": acc, "kl": mean_kl, "paired": vs}
        )
        table.add_row(name, f"{ttft:.3f} s", f"{base / ttft:.1f}x", f"{acc:.0%}", show(vs), f"{mean_kl:.4f}")
    console.print(table)
    by_type = Table(title="Accuracy per question type (difference from full prefill on the same samples)")
    kinds = sorted(set(types))
    for col in ["method", *kinds]:
        by_type.add_column(col, justify="right")
    by_type.add_row("samples", *[str(types.count(k)) for k in kinds])
    per_type = {}
    for name, r in rows.items():
        cells = []
        for k in kinds:
            pick = [i for i, t in enumerate(types) if t == k]
            mine, full = [r["correct"][i] for i in pick], [rows["full prefill"]["correct"][i] for i in pick]
            vs = paired(full, mine)
            per_type.setdefault(name, {})[k] = {"accuracy": statistics.fmean(mine), "paired": vs}
            cells.append(f"{statistics.fmean(mine):.0%}" + ("" if r is rows["full prefill"] else f" ({show(vs)})"))
        by_type.add_row(name, *cells)
    console.print(by_type)
    answers = {name: r["answers"] for name, r in rows.items()}  # per sample, to see what a method got wrong
    expected = [s["answer"] for s in samples]
    save_results(
        args.json,
        {"methods": results, "per_type": per_type, "prompt_tokens": lengths, "expected": expected, "answers": answers},
    )


def show(vs: dict) -> str:
    return f"{vs['diff']:+.0%} [{vs['low']:+.0%}, {vs['high']:+.0%}] p={vs['p_mcnemar']:.2f}"


if __name__ == "__main__":
    main()
