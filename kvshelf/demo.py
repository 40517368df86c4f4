"""The main job, told in four steps on the default model (a few minutes on two CPU cores).

Three long documents (Python's reference docs from the stdlib, each with one planted fact) sit in front
of questions about the planted facts, which the small default model answers correctly:

1. prefix reuse: each question cold (full prefill) and warm (the documents' KV from the cache);
2. the same documents in another order: full prefill vs prefix caching (which reuses nothing) vs
   CacheBlend (which reuses each document's KV at its new position);
3. a restart: a new process with an empty CPU tier answers from the disk tier;
4. the bytes: what each tier holds, and the same KV under each codec.

Every answer is checked against the planted value (✓/✗); warm answers are compared with cold ones.
"""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvshelf.config import KVShelfConfig

# (stdlib topic, planted sentence, question, the answer's value)
FACTS = [
    ("for", "The pass key for the archive room is 71842.", "What is the pass key for the archive room?", "71842"),
    ("exceptions", "The name of the ship's cat is Marmalade.", "What is the name of the ship's cat?", "Marmalade"),
    (
        "with",
        "The meeting with the auditors is on Thursday at 4 pm in room 318.",
        "In which room is the meeting with the auditors?",
        "318",
    ),
]
INSTRUCTION = "Read the documents and answer the question."
REORDER = [2, 0, 1]


def document(topic: str, fact: str) -> str:
    """A stdlib reference text with `fact` planted as a paragraph in its middle."""
    paras = pydoc_data.topics.topics[topic].strip().split("\n\n")
    half = max(1, len(paras) // 2)
    return "\n\n".join([*paras[:half], fact, *paras[half:]])


def documents() -> list[str]:
    return [document(topic, fact) for topic, fact, _, _ in FACTS]


def joined(docs: list[str], sep: str, question: str) -> str:
    """The prompt: instruction, the documents each followed by the blend separator, the question.

    One text serves every mode: prefix caching reads it as plain text, CacheBlend splits it at `sep`.
    """
    body = "".join(f"{doc}\n{sep}" for doc in docs)
    return f"{INSTRUCTION}\n\n{sep}{body}\nQuestion: {question}\nAnswer:"


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    ttft_s: float
    prompt_tokens: int
    hit_tokens: int  # prompt tokens whose KV came from the cache

    def correct(self, value: str) -> bool:
        return value in self.text


def ask(gen, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> Answer:
    """Greedy answer up to the end of its first line (the model goes on to invent the next question)."""
    ids: list[int] = []
    stream = gen.stream(
        prompt, max_new_tokens=max_new_tokens, should_stop=lambda: "\n" in tokenizer.decode(ids), **kwargs
    )
    while True:
        try:
            ids.append(next(stream))
        except StopIteration as done:
            r = done.value
            break
    text = tokenizer.decode(r.token_ids, skip_special_tokens=True).split("\n")[0].strip()
    hit = r.hit_tokens
    if r.blend is not None and r.blend.document_hits == 0:
        hit = 0  # the documents were computed (and stored) first: nothing came from the cache
    return Answer(text, r.token_ids, r.ttft_s, r.prompt_tokens, hit)


def demo_config(config: KVShelfConfig, disk_dir: str) -> KVShelfConfig:
    """The user's config with what the story needs: CacheBlend on, a CPU tier, and a fresh disk tier."""
    data = config.model_dump()
    data.update(enable_blending=True, local_cpu=True, local_disk=disk_dir)
    return KVShelfConfig.model_validate(data)


def _mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[red]✗[/]"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def run_demo(
    config: KVShelfConfig | None = None,
    *,
    quick: bool = False,
    max_new_tokens: int = 8,
    console: Console | None = None,
) -> dict:
    """Run the four steps and print them; return what was measured (rows for --json)."""
    console = console or Console()
    disk_dir = tempfile.mkdtemp(prefix="kvshelf-demo-disk-")
    try:
        from kvshelf.assembly.runtimes import check_runtime

        config = config or KVShelfConfig()
        check_runtime(config, "demo")
        return _run(demo_config(config, disk_dir), quick, max_new_tokens, console)
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]demo[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _run(cfg: KVShelfConfig, quick: bool, max_new_tokens: int, console: Console) -> dict:
    from kvshelf.assembly import open_shelf

    facts = FACTS[:2] if quick else FACTS
    console.print(f"[bold]kvshelf demo[/]: loading the model ({cfg.model})")
    shelf = open_shelf(cfg, runtime=None)  # run_demo checked the user's keys; demo_config sets the rest
    try:
        return _story(shelf, cfg, facts, max_new_tokens, console)
    finally:
        shelf.close()


def _story(shelf, cfg: KVShelfConfig, facts: list, max_new_tokens: int, console: Console) -> dict:
    from kvshelf.generation import CachedGenerator

    tok = shelf.model.tokenizer
    sep = cfg.blend_special_str
    # One generator per mode over the same model and cache: prefix reuse only, and CacheBlend.
    blend_gen = shelf.generator
    prefix_gen = CachedGenerator(shelf.runner, shelf.engine, tok, guard=blend_gen.guard)
    docs = documents()
    out: dict = {"config": {"chunk_size": cfg.chunk_size, "disk_codec": cfg.local_disk_codec}}
    steps = 1 + 2 * len(facts) + 4 + 1
    with _progress(console) as progress:
        task = progress.add_task("", total=steps)

        def step(desc: str, fn: Callable[[], Answer]) -> Answer:
            progress.update(task, description=desc)
            result = fn()
            progress.advance(task)
            return result

        # One untimed prefill of the same length first: a process's first long prefill pays one-off costs
        # (allocations, page faults) that would otherwise land in the first row only.
        step("warming up", lambda: prefix_gen.generate(joined(docs, sep, "warm-up"), max_new_tokens=1, use_cache=False))

        # 1. Prefix reuse: the first question fills the cache, the next ones reuse the documents' KV.
        rows = []
        for i, (_, _, question, value) in enumerate(facts, 1):
            prompt = joined(docs, sep, question)
            cold = step(
                f"1. Q{i} full prefill", lambda p=prompt: ask(prefix_gen, tok, p, max_new_tokens, use_cache=False)
            )
            warm = step(f"1. Q{i} with kvshelf", lambda p=prompt: ask(prefix_gen, tok, p, max_new_tokens))
            rows.append((question, value, cold, warm))
        out["prefix"] = [
            {
                "question": q,
                "expected": v,
                "prompt_tokens": w.prompt_tokens,
                "hit_tokens": w.hit_tokens,
                "ttft_no_cache_s": c.ttft_s,
                "ttft_kvshelf_s": w.ttft_s,
                "answer": w.text,
                "correct": w.correct(v) and c.correct(v),
                "same_answer": c.token_ids == w.token_ids,
            }
            for q, v, c, w in rows
        ]
        _print_prefix(console, rows, len(docs))

        # 2. The same documents in another order.
        _, _, question, value = facts[0]
        first = joined(docs, sep, question)
        moved = joined([docs[i] for i in REORDER], sep, question)
        modes = [
            ("full prefill", lambda: ask(prefix_gen, tok, moved, max_new_tokens, use_cache=False)),
            ("prefix caching", lambda: ask(prefix_gen, tok, moved, max_new_tokens)),
            # CacheBlend keeps each document's KV on its own; the first blended prompt computes and stores it.
            ("CacheBlend, documents first seen", lambda: ask(blend_gen, tok, first, max_new_tokens)),
            ("CacheBlend, documents reordered", lambda: ask(blend_gen, tok, moved, max_new_tokens)),
        ]
        reorder = [(name, step(f"2. {name}", fn)) for name, fn in modes]
        out["reorder"] = [
            {
                "mode": name,
                "prompt_tokens": a.prompt_tokens,
                "reused_tokens": a.hit_tokens,
                "ttft_s": a.ttft_s,
                "answer": a.text,
                "correct": a.correct(value),
            }
            for name, a in reorder
        ]
        _print_reorder(console, question, value, reorder, cfg.blend_recompute_ratios[-1])

        # 3. A restart: a new process, empty CPU tier, the same disk tier.
        shelf.engine.backend.flush()
        q_index = 1 if len(facts) > 1 else 0
        _, _, question, value = facts[q_index]
        prompt = joined(docs, sep, question)
        progress.update(task, description="3. restart: a new process loads the model and reads the disk tier")
        child = _restart(cfg, prompt, max_new_tokens)
        progress.advance(task)
        cold = rows[q_index][2]
        out["restart"] = {
            **child,
            "ttft_no_cache_s": cold.ttft_s,
            "correct": value in child["answer"],
            "same_answer": child["token_ids"] == cold.token_ids,
        }
        _print_restart(console, question, value, out["restart"])

    # 4. The bytes.
    with console.status("4. coding the documents' KV with each codec"):
        out["bytes"] = _bytes(shelf, joined(docs, sep, facts[0][2]), tok)
    _print_bytes(console, out["bytes"], shelf)
    answers = [r["correct"] for r in out["prefix"]] + [r["correct"] for r in out["reorder"]]
    answers.append(out["restart"]["correct"])
    console.print(
        f"{sum(answers)} of {len(answers)} answers correct; every warm answer the same as its cold one: "
        f"{'yes' if all(r['same_answer'] for r in out['prefix']) and out['restart']['same_answer'] else 'NO'}."
    )
    return out


def _print_prefix(console: Console, rows, n_docs: int) -> None:
    tokens = rows[0][2].prompt_tokens
    table = Table(title=f"1. Prefix reuse: {n_docs} documents, then a question ({tokens} tokens)", title_justify="left")
    for col in ("#", "TTFT cold", "TTFT warm", "speed-up", "KV hit", "answer", "", "same"):
        table.add_column(col, justify="right" if col not in ("answer",) else "left", no_wrap=col != "answer")
    for i, (_, value, cold, warm) in enumerate(rows, 1):
        table.add_row(
            f"Q{i}",
            _s(cold.ttft_s),
            _s(warm.ttft_s),
            f"{cold.ttft_s / warm.ttft_s:.1f}x" if warm.hit_tokens else "fills cache",
            f"{warm.hit_tokens}/{warm.prompt_tokens}",
            warm.text,
            _mark(warm.correct(value) and cold.correct(value)),
            "yes" if cold.token_ids == warm.token_ids else "[red]NO[/]",
        )
    console.print(table)
    for i, (question, value, _, _) in enumerate(rows, 1):
        console.print(f"  Q{i} {question} [dim](planted: {value})[/]")
    console.print(
        "  cold: no cache; warm: kvshelf (Q1's warm run fills the cache, later questions reuse every whole "
        "chunk of the documents); same: identical greedy tokens."
    )


def _print_reorder(console: Console, question: str, value: str, rows, ratio: float) -> None:
    order = ", ".join(str(i + 1) for i in REORDER)
    table = Table(title=f"2. The same documents in another order ({order})", title_justify="left")
    for col in ("mode", "TTFT", "KV reused", "answer", ""):
        table.add_column(col, justify="left" if col in ("mode", "answer") else "right")
    for name, a in rows:
        table.add_row(name, _s(a.ttft_s), f"{a.hit_tokens}/{a.prompt_tokens}", a.text, _mark(a.correct(value)))
    console.print(table)
    console.print(
        f"  {question} [dim](planted: {value})[/] Prefix caching stops at the first document that moved; "
        f"CacheBlend reuses each document's KV at its new position and recomputes the {ratio:.0%} of tokens "
        "whose KV deviates most (its output may differ slightly from a full prefill)."
    )


def _print_restart(console: Console, question: str, value: str, r: dict) -> None:
    table = Table(title="3. Restart: a new process, empty CPU memory, the same disk tier", title_justify="left")
    for col in ("start-up", "TTFT", "cold TTFT", "KV from disk", "answer", "", "same"):
        table.add_column(col, justify="left" if col == "answer" else "right")
    table.add_row(
        _s(r["startup_s"]),
        _s(r["ttft_s"]),
        _s(r["ttft_no_cache_s"]),
        f"{r['hit_tokens']}/{r['prompt_tokens']}" + ("" if r["tier_hits"].get("disk") else " [red](not disk)[/]"),
        r["answer"],
        _mark(r["correct"]),
        "yes" if r["same_answer"] else "[red]NO[/]",
    )
    console.print(table)
    console.print(
        f"  {question} [dim](planted: {value})[/] start-up: a new Python process loading the model; "
        "cold TTFT: the first process without a cache; same: identical to that cold answer."
    )


def _restart(cfg: KVShelfConfig, prompt: str, max_new_tokens: int) -> dict:
    """Ask `prompt` in a new Python process with the same config (so the same disk tier)."""
    with tempfile.TemporaryDirectory(prefix="kvshelf-demo-") as tmp:
        cfg_path = os.path.join(tmp, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg.model_dump(), f)
        with open(os.path.join(tmp, "prompt.txt"), "w") as f:
            f.write(prompt)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "kvshelf.demo", cfg_path, os.path.join(tmp, "prompt.txt"), str(max_new_tokens)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the restarted demo process failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["startup_s"] = wall - result.pop("ask_s")
    return result


def _child(cfg_path: str, prompt_path: str, max_new_tokens: int) -> None:
    """The restarted process: open a shelf on the same config and ask once; one JSON line on stdout."""
    from kvshelf.assembly import open_shelf
    from kvshelf.generation import CachedGenerator

    with open(cfg_path) as f:
        cfg = KVShelfConfig.model_validate(json.load(f))
    shelf = open_shelf(cfg, show_progress=False, runtime=None)  # the parent checked the user's keys
    gen = CachedGenerator(shelf.runner, shelf.engine, shelf.model.tokenizer, guard=shelf.generator.guard)
    with open(prompt_path) as f:
        prompt = f.read()
    gen.generate("warm-up", max_new_tokens=1, use_cache=False)  # as in the first process: start-up costs apart
    t0 = time.perf_counter()
    a = ask(gen, shelf.model.tokenizer, prompt, max_new_tokens)
    ask_s = time.perf_counter() - t0
    tiers = {name: t["hits"] for name, t in shelf.engine.backend.stats().items()}
    shelf.close()
    print(
        json.dumps(
            {
                "answer": a.text,
                "token_ids": a.token_ids,
                "ttft_s": a.ttft_s,
                "prompt_tokens": a.prompt_tokens,
                "hit_tokens": a.hit_tokens,
                "tier_hits": tiers,
                "ask_s": ask_s,
            }
        )
    )


def _bytes(shelf, prompt: str, tokenizer) -> dict:
    """Bytes each tier holds, and the KV of the documents' whole chunks under each codec."""
    from kvshelf.assembly.tiers import tier_codec
    from kvshelf.codecs.calibration import default_dir
    from kvshelf.config import TierCodec

    tiers = {
        name: {"used_bytes": t["used_bytes"], "codec": "none" if name in ("cpu", "memory") else None}
        for name, t in shelf.engine.backend.stats().items()
    }
    engine = shelf.engine
    ids = tokenizer(prompt)["input_ids"]
    chunks = list(engine.retrieve_chunks(ids, max_tokens=len(ids) - 1))
    tokens = sum(kv.shape[3] for _, kv in chunks)
    values = sum(kv.numel() for _, kv in chunks)
    calibration = None
    fp = shelf.runner.fingerprint().digest().hex()
    index = default_dir() / f"model-{fp}.txt"
    if index.is_file():  # calibrated cachegen when this model has been calibrated (kvshelf calibrate)
        from kvshelf.model.calibrate import calibration_for

        calibration = calibration_for(shelf.runner, tokenizer).digest
    codecs = {}
    for name in ("none", "int8", "cachegen"):
        level = shelf.config.quantization_bits if name == "cachegen" else None
        spec = TierCodec(name, level, "auto", "codec", "quantization_bits", "codec_calibration")
        codec = tier_codec(spec, calibration, processes=shelf.owned.codec_processes)
        size = 0
        for key, kv in chunks:
            size += sum(len(part) for part in codec.encode_layers(kv, position=key.start))
        codecs[name] = {"bytes": size, "bits_per_value": 8 * size / values}
    return {"tiers": tiers, "tokens": tokens, "codecs": codecs, "cachegen_calibrated": calibration is not None}


def _print_bytes(console: Console, b: dict, shelf) -> None:
    table = Table(title="4. Where the KV lives, and what it costs under each codec", title_justify="left")
    for col in ("", "codec", "bytes", "bits/value"):
        table.add_column(col, justify="left" if col in ("", "codec") else "right")
    cfg = shelf.config
    codec_of = {"disk": cfg.local_disk_codec, "redis": cfg.remote_serde, "s3": cfg.remote_serde}
    for name, t in b["tiers"].items():
        if t["used_bytes"] is not None:
            table.add_row(
                f"{name} tier (all chunks so far)",
                t["codec"] or codec_of.get(name, "?"),
                f"{t['used_bytes'] / 1e6:.1f} MB",
                "",
            )
    for name, c in b["codecs"].items():
        label = name + (" (calibrated)" if name == "cachegen" and b["cachegen_calibrated"] else "")
        table.add_row(
            f"the documents' KV, {b['tokens']} tokens",
            label,
            f"{c['bytes'] / 1e6:.1f} MB",
            f"{c['bits_per_value']:.2f}",
        )
    console.print(table)
    note = "  int8 answered the restart above; cachegen's size is shown for the same KV (its quality: BENCHMARKS.md)."
    if not b["cachegen_calibrated"]:
        note += (
            " cachegen ran uncalibrated here: after `kvshelf calibrate` (a few minutes, once per model) it is"
            " calibrated, ~2.65 bits/value."
        )
    console.print(note)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
