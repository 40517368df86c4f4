"""Generation on HF models with KV reuse: choose a prefill strategy, prefill, store, decode.

One request: the prompt is encoded (or cut into CacheBlend documents); the guard decides whether the
cache is asked and whether a planned load is worth it; one strategy (plain, layerwise or blend) fills
the request's KV and returns a `PrefillOutcome`; the guard learns from every outcome; exact KV is
stored (prompt, then the answer); decoding continues on the model runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvshelf.blend.blender import Blender, BlendInfo
from kvshelf.blend.segment import Segmented, fixed_prefix
from kvshelf.cache import requests as reasons
from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.requests import RequestStats
from kvshelf.errors import PromptError
from kvshelf.generation import fallback
from kvshelf.generation import prompt as prompts
from kvshelf.generation.blend import BlendPrefill
from kvshelf.generation.layerwise import LayerwisePrefill
from kvshelf.generation.outcome import PrefillOutcome, PrefillRequest, PrefillStrategy
from kvshelf.generation.plain import PlainPrefill
from kvshelf.generation.policy import CachePolicy
from kvshelf.generation.sampling import choose
from kvshelf.layerwise.stats import LayerwiseStats
from kvshelf.metrics import Metrics
from kvshelf.model.runner import ModelRunner, interruptible
from kvshelf.storage.tier import tier_budget


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
    """KV-reusing generation over a ModelRunner. `engine=None` disables caching (plain recompute).

    Keyword names are the config keys they come from (kvshelf.config)."""

    def __init__(
        self,
        runner: ModelRunner,
        engine: CacheEngine | None,
        tokenizer=None,
        *,
        store_generated: bool = True,
        blender: Blender | None = None,
        blend_special_str: str = "<|CHUNK_SEP|>",
        use_layerwise: bool = False,
        use_async_load: bool = True,
        buffer_size: int = 4,
        layerwise_store: bool = False,
        guard: CachePolicy | None = None,
        metrics: Metrics | None = None,
    ):
        self.runner = runner
        self.engine = engine
        self.tokenizer = tokenizer
        self.store_generated = store_generated
        self.blender = blender
        self.blend_special_str = blend_special_str
        self.use_layerwise = use_layerwise
        self.guard = guard
        self.metrics = metrics if metrics is not None else Metrics()
        self.layerwise_stats = LayerwiseStats(runner.num_layers)
        self.request_stats = RequestStats()  # every request's prompt and hit tokens (issue #16)
        self.eos_ids = prompts.eos_ids(runner, tokenizer)
        self.plain = PlainPrefill(runner)
        self.layerwise = LayerwisePrefill(
            runner,
            buffer_size=buffer_size,
            use_async_load=use_async_load,
            layerwise_store=layerwise_store,
            stats=self.layerwise_stats,
            metrics=self.metrics,
        )
        self.blend = BlendPrefill(blender) if blender is not None else None

    def segment(self, prompt: str | Sequence[int], documents: Sequence[str] | None) -> Segmented | None:
        """The prompt cut into CacheBlend documents, or None when blending does not apply to it."""
        seg = prompts.segment(
            self.tokenizer, prompt, documents, blending=self.blender is not None, separator=self.blend_special_str
        )
        if seg is not None and self.blender.prefix_documents:
            seg = fixed_prefix(seg, self.blender.prefix_documents)
        return seg if seg is None or seg.documents else None

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return prompts.encode(self.tokenizer, prompt)

    def strategy(self, request: PrefillRequest) -> PrefillStrategy:
        if request.documents is not None and self.blend is not None:
            return self.blend
        if request.engine is not None and self.use_layerwise:
            return self.layerwise
        return self.plain

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
        documents: Sequence[str] | None = None,
        on_logits: Callable[[torch.Tensor, int], None] | None = None,
    ) -> Generator[int, None, GenerationResult]:
        """Yield each new token id as it is chosen; the generator's return value is the GenerationResult.

        With the cache, the KV of every prompt token but the last may come from it: the last one is always
        computed, since its logits choose the first new token. temperature 0 is greedy. `should_stop` is
        asked after each yielded token (a stop string seen, a client gone) and ends generation cleanly;
        during the prefill it is asked between layers, and a true answer raises errors.Interrupted.

        With a blender, a prompt holding the blend separator (or `documents` given, with
        `prompt` as the text after them) is prefilled by CacheBlend instead: document KV is reused at any
        position. `on_logits(logits, token_id)` sees the logits each new token was chosen from (logprobs).
        """
        t0 = time.perf_counter()
        seg = self.segment(prompt, documents) if use_cache or documents is not None else None
        ids = seg.token_ids if seg is not None else self.encode(prompt)
        if seg is not None and (not use_cache or self.engine is None):
            seg = None  # no cache to blend from: the joined prompt is prefilled as it is, exactly
        prompts.check_length(len(ids), max_new_tokens, self.runner.max_positions)
        if temperature < 0 or not 0 < top_p <= 1:
            raise PromptError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        rng = torch.Generator().manual_seed(seed) if seed is not None else None

        def pick(logits: torch.Tensor) -> int:
            return choose(logits, temperature, top_p, rng)

        engine = self.engine if use_cache else None
        request = PrefillRequest(ids, salt, engine, documents=seg)
        reason = reasons.LOOKED_UP if engine is not None else reasons.CACHE_OFF
        guard = self.guard if engine is not None and seg is None else None
        # With a guard, the request's tier reads (lookup and load; later the lookups before storing) may
        # take at most what recomputing costs, each time.
        budget_s = guard.budget_s(len(ids)) if guard is not None else None
        plan: dict = {}
        with tier_budget(budget_s):
            if guard is not None:
                if not guard.use_cache(len(ids)):
                    request.engine, reason = None, reasons.SHORT_PROMPT  # too short to pay: no lookup, no store
                else:
                    plan = engine.plan(ids, salt, max_tokens=len(ids) - 1)
                    decision = guard.load_decision(plan) if plan else None
                    request.load = bool(plan) and decision is None
                    if decision is not None:
                        reason = decision  # the guard's bypass reason: loading slower, or a tier measured slow
            engine = request.engine
            # A caller that stops wanting the answer (should_stop) interrupts the prefill between layers.
            with torch.inference_mode(), interruptible(should_stop):
                kv = self.runner.new_kv(len(ids) + max_new_tokens)
                outcome = self.strategy(request).prefill(request, kv)
                if fallback.applies(self.blender, outcome):  # a near tie of the blend's answer: exact prefill
                    start, outcome = fallback.confident_start(
                        self.blender, request, kv, outcome, pick, self._blank, max_new_tokens
                    )
                else:
                    start = [(pick(outcome.logits), outcome.logits)]
        if guard is not None and plan and outcome.load_s is not None:  # every strategy's load teaches the guard
            guard.observe(plan, outcome.load_s)
        hit = outcome.hit_tokens
        with torch.inference_mode():
            next_id = start[0][0]  # chosen above (with the fallback, with the tokens chosen ahead of streaming)
            if on_logits is not None:
                on_logits(start[0][1], next_id)
            ttft = time.perf_counter() - t0
            fell_back = outcome.blend is not None and outcome.blend.fallback  # blended, then recomputed: no miss
            missed = reason == reasons.LOOKED_UP and hit == 0 and not fell_back
            if missed and engine is not None and engine.backend.unavailable_tiers():
                reason = reasons.TIER_DOWN
            self.request_stats.record(len(ids), hit, reason)
            stored = self._store_prompt(engine, request, outcome, kv, budget_s)
        out = [next_id]
        yield next_id
        # Work kept off the first token (a cold blend's documents computed alone): one step after each token
        # streamed, so no gap between two tokens carries more than one step. A stream closed early skips
        # the rest: those documents are computed by a later request.
        self._run_deferred(outcome.deferred)
        if self.guard is not None and outcome.exact and hit == 0:
            # A full prefill checks the guard's prefill speed (which may measure it again: after the first
            # token, so that this request's time to first token does not carry it).
            self.guard.observe_prefill(len(ids), outcome.compute_s, self.runner)
        finish = "length"
        while True:
            if (stop_at_eos and next_id in self.eos_ids) or (should_stop is not None and should_stop()):
                finish = "stop"
                break
            if len(out) >= max_new_tokens:
                break
            if len(out) < len(start):  # chosen ahead over this KV, not streamed yet (the fallback's check)
                next_id, logits = start[len(out)]
            else:
                with torch.inference_mode():
                    logits = self.runner.forward([next_id], len(ids) + len(out) - 1, kv)
                    next_id = choose(logits, temperature, top_p, rng)
            if on_logits is not None:
                on_logits(logits, next_id)
            out.append(next_id)
            yield next_id
            self._run_deferred(outcome.deferred)
        self._run_deferred(outcome.deferred, every_step=True)
        if engine is not None and outcome.store_from is not None and self.store_generated and len(out) > 1:
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
            loaded_bytes=outcome.loaded_bytes,
            stored_tokens=stored,
            ttft_s=ttft,
            total_s=time.perf_counter() - t0,
            first_logits=start[0][1],
            finish_reason=finish,
            blend=outcome.blend,
            cache_reason=reason,
        )

    @staticmethod
    def _run_deferred(steps: Iterator[None] | None, *, every_step: bool = False) -> None:
        if steps is None:
            return
        with torch.inference_mode():
            for _ in steps:
                if not every_step:
                    return

    def _blank(self, token: int) -> bool:
        """Whether `token` is white space alone (not end-of-sequence): not yet the answer's first token."""
        if self.tokenizer is None or token in self.eos_ids:
            return False
        return not self.tokenizer.decode([token]).strip()

    @staticmethod
    def _store_prompt(engine, request: PrefillRequest, outcome: PrefillOutcome, kv, budget_s) -> int:
        if engine is None or outcome.store_from is None:
            if outcome.saver is not None:
                outcome.saver.abort()
            return 0
        if outcome.saver is not None:
            return outcome.saver.finish()
        with tier_budget(budget_s):
            return engine.store(request.ids, kv.data, request.salt, start=outcome.store_from)

    def generate(self, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
        """Run `stream` to the end; same arguments."""
        stream = self.stream(prompt, **kwargs)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value
