"""Generation on HF models with prefix KV reuse: load the longest cached prefix, prefill the rest, store, decode."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvshelf.cache.engine import CacheEngine
from kvshelf.errors import PromptError
from kvshelf.model.runner import ModelRunner


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


class CachedGenerator:
    """Prefix-reusing generation over a ModelRunner. `engine=None` disables caching (plain recompute)."""

    def __init__(self, runner: ModelRunner, engine: CacheEngine | None, tokenizer=None, *, store_generated=True):
        self.runner = runner
        self.engine = engine
        self.tokenizer = tokenizer
        self.store_generated = store_generated
        gen_cfg = getattr(runner.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) or getattr(runner.config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer is not None:
            # Chat-tuned Gemma ends a turn with <end_of_turn>, which its generation config may not list.
            for token in (tokenizer.eos_token, "<end_of_turn>"):
                tid = tokenizer.convert_tokens_to_ids(token) if token else None
                if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                    self.eos_ids.add(tid)

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

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 32,
        salt: str | None = None,
        use_cache: bool = True,
        stop_at_eos: bool = True,
    ) -> GenerationResult:
        """Greedy generation. With the cache, the KV of every prompt token but the last may come from it:
        the last one is always computed, since its logits choose the first new token."""
        t0 = time.perf_counter()
        ids = self.encode(prompt)
        self._check_length(len(ids), max_new_tokens)
        engine = self.engine if use_cache else None
        kv = self.runner.new_kv(len(ids) + max_new_tokens)

        hit = loaded = 0
        if engine is not None:
            for key, chunk in engine.retrieve_chunks(ids, salt, max_tokens=len(ids) - 1):
                kv.load_chunk(key.start, chunk)
                hit = key.end
                loaded += chunk.numel() * chunk.element_size()

        logits = self.runner.forward(ids[hit:], hit, kv)
        next_id = int(torch.argmax(logits))
        ttft = time.perf_counter() - t0
        first_logits = logits

        stored = engine.store(ids, kv.data, salt, start=hit) if engine is not None else 0

        out = [next_id]
        while len(out) < max_new_tokens and not (stop_at_eos and next_id in self.eos_ids):
            logits = self.runner.forward([next_id], len(ids) + len(out) - 1, kv)
            next_id = int(torch.argmax(logits))
            out.append(next_id)

        if engine is not None and self.store_generated and len(out) > 1:
            # Multi-turn chat resends the answer as part of the next prompt: keep its KV too. The last
            # token was never fed through the model, so it has no KV.
            seq = ids + out[:-1]
            stored += engine.store(seq, kv.data, salt, start=len(ids))

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
        )
