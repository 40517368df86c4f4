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
from types import SimpleNamespace

import torch
from blend_report import summarize
from blend_reuse import Reuse
from blend_variants import VARIANTS
from common import save_results
from rag_eval import correct
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvshelf.assembly import open_shelf
from kvshelf.blend.blender import Blender, BlendInfo
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


def prompt_text(docs: list[str], question: str, cue: str = "") -> str:
    """The instruction is a chunk of its own, so it is cached once whatever document follows it. `cue` starts
    the answer (bench/rag_eval.py's samples carry one)."""
    parts = ["Answer the question using the documents.\n", *docs]
    return SEP.join(parts) + SEP + f"\nQuestion: {question}\nAnswer:" + (f" {cue}" if cue else "")


def read_samples(path: str, start: int = 0, limit: int | None = None) -> list[dict]:
    """Samples start..start+limit-1 of a `--jsonl` file (one {documents, question, answer, ...} per line)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[start : None if limit is None else start + limit]


def another_order(docs: list[str], rng: random.Random) -> list[str]:
    """The documents shuffled into an order other than `docs`' (an earlier request saw them so)."""
    while True:
        order = rng.sample(docs, len(docs))
        if order != docs:
            return order


def store_documents(gen: CachedGenerator, text: str) -> None:
    """Each document of `text` stored as a cold request with it stores it: computed alone (document_context
    alone), or its slice of that request's exact prefill (prompt: the request itself is run)."""
    if gen.blender.document_context == "prompt":
        gen.generate(text, max_new_tokens=1)
        return
    seg = gen.segment(text, None)
    for _ in gen.blender.compute_missing(seg, gen.blender.documents(seg, None), None, BlendInfo()):
        pass


def kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    return float((p.exp() * (p - q)).sum())


def margin(logits: torch.Tensor) -> float:
    """The log-probability gap between the two likeliest tokens: how firmly a method picked its token."""
    top = torch.log_softmax(logits.float(), -1).topk(2).values
    return float(top[0] - top[1])


def diverges_at(tokens: list[int], ref: list[int]) -> int | None:
    """The first new token that differs from full prefill's (None: the same tokens, as far as both go)."""
    return next((j for j, (a, b) in enumerate(zip(tokens, ref, strict=False)) if a != b), None)


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


def first_line_done(tok, out: list[int]):
    """A `should_stop` for short answers: stop once a line break follows some text (the answer is on line 1)."""

    def done() -> bool:
        text = tok.decode(out, skip_special_tokens=True)
        return "\n" in text.lstrip()

    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.15, 0.3])
    ap.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS), metavar="VARIANT")
    ap.add_argument(
        "--fallback-margin",
        type=float,
        nargs="+",
        default=[],
        metavar="NATS",
        help="also run each --variants with the confidence fallback at each margin (blend_fallback_margin: a first "
        "answer token picked by less is served by an exact prefill)",
    )
    ap.add_argument("--check-layer", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--jsonl", default=None)
    ap.add_argument("--limit", type=int, default=None, help="only N samples of --jsonl")
    ap.add_argument("--start", type=int, default=0, help="the first sample of --jsonl to run (0-based)")
    ap.add_argument("--no-prefix", action="store_true", help="leave out prefix caching (exact: full prefill's answers)")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="bench/results/blend.json")
    ap.add_argument(
        "--report", nargs="+", default=None, help="only print the tables of runs' per-sample files (*.samples.jsonl)"
    )
    ap.add_argument("--cold", action="store_true", help="measure the first request with new documents instead")
    ap.add_argument(
        "--reuse",
        default=None,
        metavar="DIR",
        help="keep the earlier request's document KV and full prefill's reference here, and load them on the next "
        "run of the same samples (bench/blend_reuse.py)",
    )
    ap.add_argument(
        "--no-alone",
        action="store_true",
        help="leave out the methods with documents computed alone (0%% and --ratios): only --variants",
    )
    args = ap.parse_args()
    console = Console(width=200)
    if args.report:
        lines = [line for report in args.report for line in Path(report).read_text().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]
        summarize(records, console, None)
        return
    samples = read_samples(args.jsonl, args.start, args.limit) if args.jsonl else builtin_samples(args.samples)
    shelf = open_shelf(KVShelfConfig(model=args.model, device=args.device, max_local_cpu_size=8))
    runner, engine, tok = shelf.runner, shelf.engine, shelf.model.tokenizer
    if args.cold:
        cold_requests(samples, shelf, tok, args, console)
        return

    def blend_gen(**kwargs) -> CachedGenerator:
        kwargs.setdefault("check_layers", [args.check_layer])
        blender = Blender(runner, engine, **kwargs)
        return CachedGenerator(runner, engine, tok, blender=blender, blend_special_str=SEP)

    methods = {"full prefill": None}
    if not args.no_prefix:
        methods["prefix caching"] = shelf.generator
    if not args.no_alone:
        methods["full reuse (0%)"] = blend_gen(ratios=[0.0])
        methods.update({f"CacheBlend {r:.0%}": blend_gen(ratios=[r]) for r in args.ratios})
    methods.update({name: blend_gen(**VARIANTS[name]) for name in args.variants})
    methods.update(
        {
            f"{name}, exact prefill below {tau:g} nats": blend_gen(**VARIANTS[name], fallback_margin=tau)
            for name in args.variants
            for tau in args.fallback_margin
        }
    )
    probe = next(g for g in methods.values() if g is not None and g is not shelf.generator)
    # Each kind of document cache filled once: behind BOS alone, behind another fixed prefix (other keys), or
    # from the earlier prompt itself (document_context prompt: other keys too).
    fillers = [probe] + [
        g
        for g in methods.values()
        if g is not None and g.blender and (g.blender.prefix_documents or g.blender.document_context == "prompt")
    ]
    fillers = list({(g.blender.prefix_documents, g.blender.document_context): g for g in reversed(fillers)}.values())
    probe.generate("warm-up", max_new_tokens=1, use_cache=False)
    reuse = Reuse(args.reuse, f"{args.model} {args.max_new_tokens}")
    per_sample = Path(args.json).with_suffix(".samples.jsonl")
    per_sample.parent.mkdir(parents=True, exist_ok=True)
    per_sample.write_text("")
    records = []
    rng = random.Random(1)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("blend", total=len(samples))
        for index, sample in enumerate(samples, start=args.start):
            docs, question, cue = list(sample["documents"]), sample["question"], sample.get("cue", "")
            # An earlier request saw the documents in another order: it filled the chunk cache (and the prefix
            # cache). The measured request brings them in the sample's order (the answer document first or last
            # for those question types).
            first = prompt_text(another_order(docs, rng), question, cue)
            if "prefix caching" in methods:
                shelf.generator.generate(probe.segment(first, None).token_ids, max_new_tokens=1)
            for filler_gen in fillers:  # documents behind another fixed prefix have other keys: fill each kind
                reuse.documents(filler_gen, first, store_documents)
            text = prompt_text(docs, question, cue)
            ids = probe.segment(text, None).token_ids
            record = {
                "index": index,
                "type": sample.get("type", "builtin"),
                "tokens": len(ids),
                "documents": len(docs),
                "distractors": sample.get("distractors"),
                "expected": sample["answer"],
                "methods": {},
            }
            ref = ref_tokens = ref_steps = None
            for name, gen in methods.items():
                out: list[int] = []
                steps: list[torch.Tensor] = []  # the logits of the first few new tokens

                def keep(logits, _token, steps=steps):
                    if len(steps) < 4:
                        steps.append(logits.detach().float().clone())

                kw = {
                    "max_new_tokens": args.max_new_tokens,
                    "should_stop": first_line_done(tok, out),
                    "on_logits": keep,
                }
                kept = reuse.reference(ids) if gen is None else None
                if kept is not None:  # full prefill as an earlier run of these samples measured it
                    steps[:] = list(kept["steps"])
                    r = SimpleNamespace(
                        token_ids=kept["tokens"], first_logits=kept["first_logits"], ttft_s=kept["ttft_s"], blend=None
                    )
                    cpu_to_first = kept["cpu_to_first_s"]
                else:
                    if gen is None:
                        stream = probe.stream(ids, use_cache=False, **kw)
                    elif gen is shelf.generator:
                        stream = gen.stream(ids, **kw)
                    else:
                        stream = gen.stream(text, **kw)
                    cpu_start, cpu_to_first = time.process_time(), None
                    while True:
                        try:
                            out.append(next(stream))
                            if len(out) == 1:  # the process's CPU time to the first token: less sensitive to load
                                cpu_to_first = time.process_time() - cpu_start
                        except StopIteration as done:
                            r = done.value
                            break
                    if gen is None:
                        kept = {"tokens": list(r.token_ids), "first_logits": r.first_logits, "steps": steps}
                        reuse.keep_reference(ids, {**kept, "ttft_s": r.ttft_s, "cpu_to_first_s": cpu_to_first})
                if gen is None:
                    ref, ref_tokens, ref_steps = r.first_logits, r.token_ids, steps
                    # The first answer token that is not white space (after "... is", numbers start with a
                    # space token of their own, whose distribution says nothing about the answer).
                    at = next((j for j, t in enumerate(ref_tokens[:4]) if tok.decode([t]).strip()), 0)
                answer = tok.decode(r.token_ids, skip_special_tokens=True)
                same_start = r.token_ids[:at] == ref_tokens[:at] and len(steps) > at
                record["methods"][name] = {
                    "ttft": r.ttft_s,
                    "cpu_to_first_s": cpu_to_first,
                    "correct": correct(sample["answer"], answer),
                    "answer": answer,
                    "kl": kl(ref, r.first_logits),
                    # KL at the answer's first real token (at the first token when the method began otherwise).
                    "kl_answer": kl(ref_steps[at], steps[at]) if same_start else kl(ref, r.first_logits),
                    # Its own top-1 over top-2 log-probability gap at the answer token, and where its tokens
                    # part from full prefill's (the answer's first token, or a later one: decoding over fused KV).
                    "margin": margin(steps[at]) if len(steps) > at else None,
                    "diverges_at": diverges_at(r.token_ids, ref_tokens),
                    # the confidence fallback served it by an exact prefill (--fallback-margin)
                    "fallback": bool(r.blend is not None and r.blend.fallback),
                    "answer_margin": r.blend.answer_margin if r.blend is not None else None,
                }
            records.append(record)
            with per_sample.open("a") as f:
                f.write(json.dumps(record) + "\n")
            progress.advance(task)
    if args.reuse:
        console.print(f"reused from {args.reuse}: {reuse.loaded}")
    save_results(args.json, summarize(records, console, args))


if __name__ == "__main__":
    main()
