"""The main job: a RAG-style session on the default model, cold vs warm, shown as a table.

A few long documents (Python's own reference docs, always present in the stdlib) sit in front of several
questions. Each question runs twice: without the cache (full prefill) and with kvshelf (the documents'
KV comes from the cache after the first question). Answers must be identical; TTFT should not be.
"""

from __future__ import annotations

import pydoc_data.topics

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvshelf.app import Shelf

DOC_TOPICS = ["for", "with", "exceptions"]
QUICK_DOC_TOPICS = ["assert", "del"]
QUESTIONS = [
    "What does the with statement call on the context manager before the block runs?",
    "When is the else clause of a for loop executed?",
    "Which method of the context manager runs when the block exits?",
    "What happens when an exception is not handled at all?",
]


def build_prompt(topics: list[str], question: str) -> str:
    docs = "\n\n".join(f"Document {i + 1}:\n{pydoc_data.topics.topics[name].strip()}" for i, name in enumerate(topics))
    return f"Answer the question using the documents below.\n\n{docs}\n\nQuestion: {question}\nAnswer:"


def run_demo(
    shelf: Shelf, *, quick: bool = False, max_new_tokens: int = 16, console: Console | None = None
) -> list[dict]:
    console = console or Console()
    topics = QUICK_DOC_TOPICS if quick else DOC_TOPICS
    questions = QUESTIONS[:2] if quick else QUESTIONS
    if shelf.engine is not None:
        shelf.engine.clear()
    gen = shelf.generator
    # One short untimed run first, so one-off start-up costs (allocator, thread pools) land in no row.
    gen.generate("warm-up", max_new_tokens=1, use_cache=False)
    rows = []
    with Progress(
        TextColumn("[bold]demo[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("", total=2 * len(questions))
        for i, question in enumerate(questions, 1):
            prompt = build_prompt(topics, question)
            progress.update(task, description=f"question {i}: full prefill (no cache)")
            base = gen.generate(prompt, max_new_tokens=max_new_tokens, use_cache=False)
            progress.advance(task)
            progress.update(task, description=f"question {i}: with kvshelf")
            cached = gen.generate(prompt, max_new_tokens=max_new_tokens, use_cache=True)
            progress.advance(task)
            rows.append(
                {
                    "question": question,
                    "prompt_tokens": cached.prompt_tokens,
                    "hit_tokens": cached.hit_tokens,
                    "ttft_no_cache_s": base.ttft_s,
                    "ttft_kvshelf_s": cached.ttft_s,
                    "loaded_bytes": cached.loaded_bytes,
                    "stored_tokens": cached.stored_tokens,
                    "same_answer": base.token_ids == cached.token_ids,
                    "answer": cached.text,
                }
            )
    _print_table(console, rows, shelf)
    return rows


def _print_table(console: Console, rows: list[dict], shelf: Shelf) -> None:
    table = Table(title="kvshelf demo: RAG over Python reference docs (cold vs warm)")
    for col in ["#", "prompt", "hit", "TTFT plain", "TTFT kvshelf", "speed-up", "KV loaded", "same"]:
        table.add_column(col, justify="right", no_wrap=True)
    for i, r in enumerate(rows, 1):
        table.add_row(
            str(i),
            str(r["prompt_tokens"]),
            str(r["hit_tokens"]),
            f"{r['ttft_no_cache_s']:.2f}s",
            f"{r['ttft_kvshelf_s']:.2f}s",
            f"{r['ttft_no_cache_s'] / r['ttft_kvshelf_s']:.1f}x",
            f"{r['loaded_bytes'] / 1e6:.1f}MB",
            "yes" if r["same_answer"] else "[red]NO[/]",
        )
    console.print(table)
    console.print("prompt/hit: tokens in the prompt / whose KV came from the cache; same: identical greedy answer.")
    for i, r in enumerate(rows, 1):
        answer = (r["answer"] or "").strip().replace("\n", " ")
        console.print(f"[bold]Q{i}[/] {r['question']}\n   [dim]->[/] {answer[:100]}")
    if shelf.engine is not None:
        fp = shelf.runner.fingerprint()
        per_token = fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim * shelf.runner.dtype.itemsize
        tiers = ", ".join(
            f"{name} {t['used_bytes'] / 1e6:.1f} MB"
            for name, t in shelf.engine.backend.stats().items()
            if t["used_bytes"] is not None
        )
        console.print(
            f"cache: {tiers} ({per_token / 1024:.1f} KiB of KV per token, chunk size {shelf.engine.chunk_size}); "
            "the first question is cold, later ones reuse the documents' KV."
        )
