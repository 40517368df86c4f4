"""Generation on HF models with prefix KV reuse: load the longest cached prefix, prefill the rest, store, decode."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch

from kvshelf.advice.guard import Guard
from kvshelf.blend.blender import Blender, BlendInfo
from kvshelf.blend.segment import Segmented, split_text, split_tokens
from kvshelf.cache import requests as reasons
from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.requests import RequestStats
from kvshelf.errors import PromptError
from kvshelf.layerwise.loader import LayerLoadError, LayerwiseLoader
from kvshelf.layerwise.saver import LayerwiseSaver
from kvshelf.layerwise.stats import LayerwiseStats
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.tiers import tier_budget

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    prompt_tokens: int
    hit_tokens: int  # prompt tokens whose KV came from the cache
    loaded_bytes: int  # KV bytes loaded from the cache
    stored_tokens: int
    ttft_s: float  # request start to first token chosen
    total_s: float
    first_logits: torch.Tensor = field(repr=False)  # float32 [vocab] logits that chose the first token
    finish_reason: str = "length"  # "stop" (end-of-sequence token) or "length" (max_new_tokens reached)
    blend: BlendInfo | None = None  # set when CacheBlend prefilled the prompt
    cache_reason: str = reasons.LOOKED_UP  # why the cache was or was not asked (kvshelf.cache.requests)


class CachedGenerator:
    """Prefix-reusing generation over a ModelRunner. `engine=None` disables caching (plain recompute)."""

    def __init__(
        self,
        runner: ModelRunner,
        engine: CacheEngine | None,
        tokenizer=None,
        *,
        store_generated=True,
        blender: Blender | None = None,
        blend_separator: str = "<|CHUNK_SEP|>",
        layerwise: bool = False,
        async_load: bool = True,
        buffer_layers: int = 4,
        layerwise_store: bool = False,
        guard: Guard | None = None,
    ):
        self.runner = runner
        self.engine = engine
        self.tokenizer = tokenizer
        self.store_generated = store_generated
        self.blender = blender
        self.blend_separator = blend_separator
        self.layerwise = layerwise
        self.async_load = async_load
        self.buffer_layers = buffer_layers
        self.layerwise_store = layerwise_store
        self.guard = guard
        self.layerwise_stats = LayerwiseStats(runner.num_layers)
        self.request_stats = RequestStats()  # every request's prompt and hit tokens (issue #16)
        gen_cfg = getattr(runner.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) or getattr(runner.config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer is not None:
            # Chat-tuned Gemma ends a turn with <end_of_turn>, which its generation config may not list.
            for token in (tokenizer.eos_token, "<end_of_turn>"):
                tid = tokenizer.convert_tokens_to_ids(token) if token else None
                if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                    self.eos_ids.add(tid)

    def segment(self, prompt: str | Sequence[int], chunks: Sequence[str] | None) -> Segmented | None:
        """The prompt cut into blendable chunks, or None when blending does not apply to it."""
        if self.blender is None:
            if chunks is not None:
                raise PromptError("chunks were given but blending is off (set enable_blending)")
            return None
        if self.tokenizer is None:
            raise PromptError("blending needs a tokenizer to find or encode the chunks")
        if chunks is not None:
            if not isinstance(prompt, str):
                raise PromptError("with explicit chunks, the prompt is the text that follows them (the question)")
            seg = split_text(self.tokenizer, None, self.blend_separator, chunks=list(chunks), suffix=prompt)
        elif isinstance(prompt, str):
            seg = split_text(self.tokenizer, prompt, self.blend_separator)
        else:
            seg = split_tokens(self.tokenizer, prompt, self.blend_separator)
        if not seg.chunks:
            return None  # no separator: an ordinary prompt, served by prefix reuse
        if not seg.suffix:
            raise PromptError("the blended prompt has nothing after its last chunk: add the question")
        return seg

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("prompt is empty")
            if self.tokenizer is None:
                raise PromptError("a text prompt needs a tokenizer; pass token ids instead")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise PromptError("prompt is empty")
        return ids

    def _check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        limit = self.runner.max_positions
        if n_prompt > limit:
            raise PromptError(f"prompt has {n_prompt} tokens, more than the model's context of {limit}")
        if n_prompt + max_new_tokens > limit:
            raise PromptError(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {limit}"
            )
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 32,
        salt: str | None = None,
        use_cache: bool = True,
        stop_at_eos: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        chunks: Sequence[str] | None = None,
        on_logits: Callable[[torch.Tensor, int], None] | None = None,
    ) -> Generator[int, None, GenerationResult]:
        """Yield each new token id as it is chosen; the generator's return value is the GenerationResult.

        With the cache, the KV of every prompt token but the last may come from it: the last one is always
        computed, since its logits choose the first new token. temperature 0 is greedy. `should_stop` is
        asked after each yielded token (a stop string seen, a client gone) and ends generation cleanly.

        With a blender, a prompt holding the blend separator (or `chunks` given, with `prompt` as the text
        after them) is prefilled by CacheBlend instead: chunk KV is reused at any position.
        `on_logits(logits, token_id)` sees the logits each new token was chosen from (logprobs).
        """
        t0 = time.perf_counter()
        seg = self.segment(prompt, chunks) if use_cache or chunks is not None else None
        ids = seg.token_ids if seg is not None else self.encode(prompt)
        if seg is not None and (not use_cache or self.engine is None):
            seg = None  # no cache to blend from: the joined prompt is prefilled as it is, exactly
        self._check_length(len(ids), max_new_tokens)
        if temperature < 0 or not 0 < top_p <= 1:
            raise PromptError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        rng = torch.Generator().manual_seed(seed) if seed is not None else None
        engine = self.engine if use_cache else None
        load, plan = True, {}
        reason = reasons.LOOKED_UP if engine is not None else reasons.CACHE_OFF
        guard = self.guard if engine is not None and seg is None else None
        # With a guard, the request's tier reads (lookup and load; later the lookups before storing) may
        # take at most what recomputing costs, each time.
        budget_s = guard.budget_s(len(ids)) if guard is not None else None
        with tier_budget(budget_s):
            if guard is not None:
                if not guard.use_cache(len(ids)):
                    engine, reason = None, reasons.SHORT_PROMPT  # too short to pay: no lookup, no store
                else:
                    plan = engine.plan(ids, salt, max_tokens=len(ids) - 1)
                    decision = guard.load_decision(plan) if plan else None
                    load = bool(plan) and decision is None
                    if decision is not None:
                        reason = decision  # the guard's bypass reason: loading slower, or a tier measured slow
            with torch.inference_mode():
                kv = self.runner.new_kv(len(ids) + max_new_tokens)
                hit = loaded = 0
                blend_info = saver = None
                if seg is not None:
                    logits, blend_info = self.blender.prefill(seg, kv, salt)
                    # Chunks that missed were computed alone just now: their tokens are computed, not hits.
                    # (Per-chunk reuse is not reported: the hit chunks' share of the reused tokens is used.)
                    hit = blend_info.reused_tokens * blend_info.chunk_hits // max(blend_info.chunks, 1)
                    loaded = blend_info.loaded_bytes
                elif engine is not None and self.layerwise:
                    logits, hit, loaded, saver = self._prefill_layerwise(
                        engine, ids, salt, kv, load=load, plan=plan if guard is not None else None
                    )
                else:
                    if engine is not None and load:
                        t_load = time.perf_counter()
                        for key, chunk in engine.retrieve_chunks(ids, salt, max_tokens=len(ids) - 1):
                            kv.load_chunk(key.start, chunk)
                            hit = key.end
                            loaded += chunk.numel() * chunk.element_size()
                        if guard is not None:  # learn each tier's speed from this request's load
                            guard.observe(plan, time.perf_counter() - t_load)
                    logits = self.runner.forward(ids[hit:], hit, kv)
        with torch.inference_mode():
            first_logits = logits
            next_id = _choose(logits, temperature, top_p, rng)
            if on_logits is not None:
                on_logits(logits, next_id)
            ttft = time.perf_counter() - t0
            if reason == reasons.LOOKED_UP and hit == 0 and engine is not None and engine.backend.unavailable_tiers():
                reason = reasons.TIER_DOWN
            self.request_stats.record(len(ids), hit, reason)
            # Blended KV is approximate: it must never be served later as exact prefix KV.
            exact = blend_info is None
            if engine is None or not exact:
                stored = 0
            elif saver is not None:
                stored = saver.finish()
            else:
                with tier_budget(budget_s):
                    stored = engine.store(ids, kv.data, salt, start=hit)
        out = [next_id]
        yield next_id
        finish = "length"
        while True:
            if (stop_at_eos and next_id in self.eos_ids) or (should_stop is not None and should_stop()):
                finish = "stop"
                break
            if len(out) >= max_new_tokens:
                break
            with torch.inference_mode():
                logits = self.runner.forward([next_id], len(ids) + len(out) - 1, kv)
                next_id = _choose(logits, temperature, top_p, rng)
            if on_logits is not None:
                on_logits(logits, next_id)
            out.append(next_id)
            yield next_id
        if engine is not None and exact and self.store_generated and len(out) > 1:
            # Multi-turn chat resends the answer as part of the next prompt: keep its KV too. The last
            # token was never fed through the model, so it has no KV.
            with torch.inference_mode(), tier_budget(budget_s):
                stored += engine.store(ids + out[:-1], kv.data, salt, start=len(ids))
        text = self.tokenizer.decode(out, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationResult(
            token_ids=out,
            text=text,
            prompt_tokens=len(ids),
            hit_tokens=hit,
            loaded_bytes=loaded,
            stored_tokens=stored,
            ttft_s=ttft,
            total_s=time.perf_counter() - t0,
            first_logits=first_logits,
            finish_reason=finish,
            blend=blend_info,
            cache_reason=reason,
        )

    def _prefill_layerwise(
        self, engine: CacheEngine, ids: list[int], salt, kv, *, load: bool = True, plan: dict | None = None
    ):
        """Prefill with the cached prefix loaded layer by layer behind the compute, and the new chunks stored
        layer by layer behind it. A load that fails mid-way is recomputed from scratch: never partial KV.
        With a `plan` (the guard's), the load time (opening plus the loader's layer loads) is learned."""
        t0 = time.perf_counter()
        loader_s0 = sum(self.layerwise_stats.load_s)
        retrieval = engine.retrieve_layerwise(ids, salt, max_tokens=len(ids) - 1) if load else None
        hit = retrieval.num_tokens if retrieval is not None else 0
        t1 = time.perf_counter()
        saver = LayerwiseSaver(engine, ids, salt, hit, kv) if self.layerwise_store else None
        log.debug(
            "layerwise: opened %d cached tokens in %.1f ms, saver ready in %.1f ms",
            hit,
            (t1 - t0) * 1e3,
            (time.perf_counter() - t1) * 1e3,
        )
        on_layer = saver.on_layer if saver is not None else None
        if retrieval is None:
            if load and plan and self.guard is not None:  # planned but nothing opened in time: learn that
                self.guard.observe(plan, t1 - t0)
            return self.runner.forward(ids, 0, kv, layer_hook=on_layer), 0, 0, saver
        self.layerwise_stats.count(requests=1)
        loader = LayerwiseLoader(
            retrieval, kv, buffer_layers=self.buffer_layers, stats=self.layerwise_stats, start_thread=self.async_load
        )
        try:
            logits = self.runner.forward(ids[hit:], hit, kv, layer_pre_hook=loader.wait, layer_hook=on_layer)
        except LayerLoadError as err:
            log.warning("layerwise load failed (%s): recomputing the whole prompt", err)
            self.layerwise_stats.count(fallbacks=1)
            loader.close()
            if saver is not None:
                saver.abort()
            return self.runner.forward(ids, 0, kv), 0, 0, None  # stored whole, after the first token
        finally:
            loader.close()
            if plan and self.guard is not None:
                self.guard.observe(plan, (t1 - t0) + sum(self.layerwise_stats.load_s) - loader_s0)
        per_token = kv.data[:, :, :, :1].numel() * kv.data.element_size()
        return logits, hit, hit * per_token, saver

    def generate(self, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
        """Run `stream` to the end; same arguments."""
        stream = self.stream(prompt, **kwargs)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value


def _choose(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=rng))
