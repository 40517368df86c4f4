"""bench/blend.py's tables from per-sample records (a run's own, or `--report` of earlier runs' files).

Speed-ups against full prefill on the same samples, two ways: the median of per-sample ratios (what a typical
request sees) and the aggregate, full prefill's total time over the method's (what a server's throughput of
prefills sees: a method that is sometimes slow, such as the confidence fallback, pays there). Both on wall TTFT
and, where recorded, on the process's CPU time to the first token (less sensitive to other load).
"""

from __future__ import annotations

import random
import statistics

from rag_eval import paired
from rich.console import Console
from rich.table import Table


def speedups(full: list[float], mine: list[float]) -> tuple[float, float]:
    """(median of per-sample ratios full / mine, sum(full) / sum(mine))."""
    median = statistics.median(f / m for f, m in zip(full, mine, strict=True))
    return median, sum(full) / sum(mine)


def summarize(records: list[dict], console: Console, args=None) -> dict:
    """The tables (overall, per question type) of per-sample records; returns them as data."""
    names = [m for m in records[0]["methods"] if all(m in r["methods"] for r in records)]  # in every run given
    first = records[0]["methods"][names[0]]
    keys = ["ttft", "correct", "kl"] + [k for k in ("kl_answer",) if k in first]
    cpu = all(r["methods"][m].get("cpu_to_first_s") is not None for r in records for m in names)
    keys += ["cpu_to_first_s"] if cpu else []
    rows = {m: {k: [r["methods"][m][k] for r in records] for k in keys} for m in names}
    fallbacks = {m: sum(bool(r["methods"][m].get("fallback")) for r in records) for m in names}
    types = [r["type"] for r in records]
    lengths = [r["tokens"] for r in records]
    table = Table(
        title=f"RAG with reordered documents, {len(records)} samples, {min(lengths)}-{max(lengths)}-token prompts "
        f"(median {statistics.median(lengths):.0f})"
    )
    columns = ["method", "TTFT (median)", "speed-up: median, aggregate"]
    columns += ["CPU to 1st token: median, aggregate"] if cpu else []
    columns += ["accuracy", "vs full prefill [95% CI], McNemar p", "KL"]
    columns += ["KL, answer token"] if "kl_answer" in keys else []
    columns += ["exact fallbacks"] if any(fallbacks.values()) else []
    for col in columns:
        table.add_column(col, justify="right")
    full = rows["full prefill"]
    results = []
    for name, r in rows.items():
        ttft = statistics.median(r["ttft"])
        speedup, aggregate = speedups(full["ttft"], r["ttft"])
        cpu_speedup = speedups(full["cpu_to_first_s"], r["cpu_to_first_s"]) if cpu else None
        acc = statistics.fmean(r["correct"])
        mean_kl = statistics.fmean(r["kl"])
        kl_answer = statistics.fmean(r["kl_answer"]) if "kl_answer" in r else None
        vs = paired(full["correct"], r["correct"])
        results.append(
            {
                "method": name,
                "ttft_s": ttft,
                "speedup": speedup,
                "speedup_aggregate": aggregate,
                "cpu_speedup": cpu_speedup[0] if cpu else None,
                "cpu_speedup_aggregate": cpu_speedup[1] if cpu else None,
                "accuracy": acc,
                "correct": sum(r["correct"]),
                "kl": mean_kl,
                "kl_answer": kl_answer,
                "paired": vs,
                "fallbacks": fallbacks[name],
            }
        )
        cells = [name, f"{ttft:.3f} s", f"{speedup:.1f}x, {aggregate:.1f}x"]
        cells += [f"{cpu_speedup[0]:.1f}x, {cpu_speedup[1]:.1f}x"] if cpu else []
        cells += [f"{sum(r['correct'])}/{len(r['correct'])}", show(vs), f"{mean_kl:.4f}"]
        cells += [f"{kl_answer:.4f}"] if kl_answer is not None else []
        cells += [str(fallbacks[name])] if any(fallbacks.values()) else []
        table.add_row(*cells)
    console.print(table)
    if "kl_answer" in keys and "CacheBlend 15%" in rows:
        console.print(kl_against(rows, "CacheBlend 15%"))
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
            mine, ref = [r["correct"][i] for i in pick], [full["correct"][i] for i in pick]
            vs = paired(ref, mine)
            per_type.setdefault(name, {})[k] = {"accuracy": statistics.fmean(mine), "paired": vs}
            cells.append(f"{statistics.fmean(mine):.0%}" + ("" if name == "full prefill" else f" ({show(vs)})"))
        by_type.add_row(name, *cells)
    console.print(by_type)
    return {"methods": results, "per_type": per_type, "prompt_tokens": lengths, "samples": records}


def kl_against(rows: dict, base: str, rounds: int = 2000) -> Table:
    """Each method's answer-token KL against `base`'s on the same samples: the mean difference with a paired
    bootstrap 95% interval, and on how many samples it was lower (KL varies far less than accuracy)."""
    table = Table(title=f"KL at the answer token, paired against {base}")
    for col in ["method", "mean KL", f"minus {base} [95% CI]", "samples lower"]:
        table.add_column(col, justify="right")
    ref = rows[base]["kl_answer"]
    rng = random.Random(0)
    for name, r in rows.items():
        if name in ("full prefill", base):
            continue
        diffs = [m - b for m, b in zip(r["kl_answer"], ref, strict=True)]
        n = len(diffs)
        boot = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
        lower = sum(d < 0 for d in diffs)
        table.add_row(
            name,
            f"{statistics.fmean(r['kl_answer']):.4f}",
            f"{statistics.fmean(diffs):+.4f} [{boot[int(0.025 * rounds)]:+.4f}, {boot[int(0.975 * rounds) - 1]:+.4f}]",
            f"{lower}/{n}",
        )
    return table


def show(vs: dict) -> str:
    return f"{vs['diff']:+.0%} [{vs['low']:+.0%}, {vs['high']:+.0%}] p={vs['p_mcnemar']:.2f}"
