"""Plots for docs/tuning.md, drawn from the JSON results the benchmarks wrote in bench/results/.

python bench/prefix_reuse.py && python bench/codec_quality.py && python bench/blend.py && python bench/tiers.py
python bench/plots.py            # writes docs/img/*.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path("bench/results")
OUT = Path("docs/img")


def load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def prefix_reuse(rows) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    tokens = [r["tokens"] for r in rows]
    ax.plot(tokens, [r["ttft_full_prefill_s"] for r in rows], "o-", label="full prefill")
    ax.plot(tokens, [r["ttft_cached_s"] for r in rows], "o-", label="fully cached")
    for r in rows:
        ax.annotate(
            f"{r['speedup']:.0f}x", (r["tokens"], r["ttft_cached_s"]), textcoords="offset points", xytext=(0, 6)
        )
    ax.set(xlabel="prompt tokens", ylabel="TTFT (s)", title="Prefix reuse, Gemma 3 270M, 2-core CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "prefix_reuse.png", dpi=120)


def codecs(data) -> None:
    rows = data["summary"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in rows:
        ax.scatter(16 / r["bits"], r["dppl"], s=40)
        ax.annotate(
            r["codec"].replace("cachegen:calibration=none", "cachegen uncalibrated").replace("cachegen:", "cg "),
            (16 / r["bits"], r["dppl"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 4),
        )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylim(top=ax.get_ylim()[1] * 4)
    ax.set(
        xlabel="size reduction vs fp16 (x)",
        ylabel="perplexity increase (%)",
        yscale="symlog",
        title="KV codecs on real KV: size against quality",
    )
    fig.tight_layout()
    fig.savefig(OUT / "codecs.png", dpi=120)


def blend(rows) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, r in enumerate(rows):
        ax.scatter(r["speedup"], 100 * r["accuracy"], s=40)
        ax.annotate(
            r["method"],
            (r["speedup"], 100 * r["accuracy"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 7 if i % 2 else -11),
            rotation=20,
        )
    ax.set_ylim(top=ax.get_ylim()[1] + 4)
    ax.set(
        xlabel="TTFT speed-up vs full prefill (x)",
        ylabel="answer accuracy (%)",
        title="CacheBlend, reordered RAG documents",
    )
    fig.tight_layout()
    fig.savefig(OUT / "blend.png", dpi=120)


def tiers(rows) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{r['tier']}\n{r['op']}\n{r['codec']}" for r in rows]
    ax.bar(range(len(rows)), [100 * r["ratio"] for r in rows])
    ax.axhline(80, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set(ylabel="% of raw ceiling", yscale="log", title="Tier throughput vs the same bytes moved raw")
    fig.tight_layout()
    fig.savefig(OUT / "tiers.png", dpi=120)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in (("prefix_reuse", prefix_reuse), ("codec_quality", codecs), ("blend", blend), ("tiers", tiers)):
        data = load(name)
        if data is None:
            print(f"no bench/results/{name}.json: run its benchmark first")
            continue
        draw(data)
        print(f"wrote a plot from {name}.json")


if __name__ == "__main__":
    main()
