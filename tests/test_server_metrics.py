"""Metrics tell the truth: every request counts its prompt and hit tokens, bypasses with their reason;
/metrics, /api/v1/cache/stats and `kvshelf stats` agree with what happened."""

from __future__ import annotations

import httpx
import pytest
from conftest import tiny_tokenizer
from serving import KEY, RunningServer, make_shelf
from typer.testing import CliRunner

from kvshelf.blend.blender import Blender
from kvshelf.cache.engine import CacheEngine
from kvshelf.cli import app as cli
from kvshelf.generation import CachedGenerator
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.memory import MemoryBackend

AUTH = {"Authorization": f"Bearer {KEY}"}
DOC = "The quick brown fox jumps over the lazy dog. " * 2


def test_hits_misses_and_bypasses_are_all_counted():
    shelf = make_shelf(guard=True, breaker_reset_s=600)
    guard = shelf.generator.guard
    with RunningServer(shelf) as s:
        seen = []

        def ask(prompt: str, expect_reason: str) -> dict:
            r = httpx.post(s.url + "/v1/completions", headers=AUTH, json={"prompt": prompt, "max_tokens": 1})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["kvshelf"]["cache"] == expect_reason, usage
            seen.append((usage["prompt_tokens"], usage["kvshelf"]["hit_tokens"], expect_reason))
            return usage

        ask("hi", "short_prompt")
        ask("yo!", "short_prompt")
        guard.margin = 0.0  # loading always pays
        assert ask(DOC + "one", "looked_up")["kvshelf"]["hit_tokens"] == 0  # a miss
        hit = ask(DOC + "one", "looked_up")
        assert hit["kvshelf"]["hit_tokens"] == hit["prompt_tokens"] - 1  # a hit
        guard.margin = 1e12  # loading never pays: the guard recomputes
        assert ask(DOC + "one", "load_slower_than_recompute")["kvshelf"]["hit_tokens"] == 0
        guard.margin = 0.0
        cpu = shelf.engine.backend.tiers[0]
        stored_before = shelf.engine.stats.stored_tokens
        for _ in range(shelf.config.breaker_failures):
            cpu.breaker.record_failure(RuntimeError("test: tier down"))
        assert ask(DOC + "two", "tier_down")["kvshelf"]["hit_tokens"] == 0
        assert shelf.engine.stats.stored_tokens == stored_before  # nothing reached a tier: nothing stored
        cpu.breaker.record_success()

        requested = sum(n for n, _, _ in seen)
        hits = sum(h for _, h, _ in seen)
        by_reason: dict[str, int] = {}
        for n, _, reason in seen:
            by_reason[reason] = by_reason.get(reason, 0) + n
        assert 0 < hits < requested

        # /metrics
        for reason, tokens in by_reason.items():
            assert s.sample("kvshelf_requested_tokens_total", {"reason": reason}) == tokens, reason
        assert s.sample("kvshelf_hit_tokens_total") == hits
        assert s.sample("kvshelf_bypasses_total", {"reason": "short_prompt"}) == 2
        assert s.sample("kvshelf_bypasses_total", {"reason": "load_slower_than_recompute"}) == 1
        assert s.sample("kvshelf_tier_dropped_writes_total", {"tier": "cpu"}) >= 1
        assert s.sample("kvshelf_tier_puts_total", {"tier": "cpu"}) >= 1
        text = httpx.get(s.url + "/metrics", headers=AUTH).text
        assert f"kvshelf_hit_tokens_total {float(hits)}" in text

        # /api/v1/cache/stats
        stats = httpx.get(s.url + "/api/v1/cache/stats", headers=AUTH).json()
        engine = stats["engine"]
        assert (engine["requested_tokens"], engine["hit_tokens"], engine["requests"]) == (requested, hits, len(seen))
        assert engine["hit_rate"] == pytest.approx(hits / requested)
        assert {r: v["tokens"] for r, v in engine["by_reason"].items() if v["tokens"]} == by_reason
        assert engine["lookup_requested_tokens"] < requested  # the engine alone saw fewer: why this matters

        # kvshelf stats
        out = CliRunner().invoke(cli, ["stats", "--url", s.url, "--api-key", KEY])
        assert out.exit_code == 0, out.output
        assert f"{hits}/{requested} prompt tokens hit ({hits / requested:.1%})" in out.output
        assert "short_prompt" in out.output and "tier_down" in out.output


def test_cold_blend_chunks_are_computed_not_hits(tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    engine = CacheEngine(runner.fingerprint(), MemoryBackend(1 << 28), chunk_size=16)
    blender = Blender(runner, engine, check_layers=[1], ratios=[0.15])
    gen = CachedGenerator(runner, engine, tiny_tokenizer(), blender=blender, blend_special_str="<|SEP|>")
    prompt = "<|SEP|>".join(["Alpha facts: the key is 4821. " * 2, "Beta notes about rivers. " * 2]) + "<|SEP|>Q?"
    cold = gen.generate(prompt, max_new_tokens=1)
    assert cold.blend.document_hits == 0 and cold.hit_tokens == 0
    warm = gen.generate(prompt, max_new_tokens=1)
    assert warm.blend.document_hits == 2 and warm.hit_tokens == warm.blend.reused_tokens > 0
    stats = gen.request_stats.as_dict()
    assert stats["hit_tokens"] == warm.hit_tokens and stats["requested_tokens"] == 2 * cold.prompt_tokens
