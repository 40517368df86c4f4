"""Plain prefix reuse: load the longest cached prefix whole, then compute the rest of the prompt."""

from __future__ import annotations

import time

from kvshelf.generation.outcome import PrefillOutcome, PrefillRequest
from kvshelf.model.kv_buffer import KVBuffer
from kvshelf.model.runner import ModelRunner


class PlainPrefill:
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def prefill(self, request: PrefillRequest, kv: KVBuffer) -> PrefillOutcome:
        ids, hit, load_s = request.ids, 0, None
        if request.engine is not None and request.load:
            t0 = time.perf_counter()
            # Every prompt token but the last may come from the cache: its logits choose the first token.
            for key, chunk in request.engine.retrieve_chunks(ids, request.salt, max_tokens=len(ids) - 1):
                kv.load_chunk(key.start, chunk)
                hit = key.end
            load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        logits = self.runner.forward(ids[hit:], hit, kv)
        return PrefillOutcome(
            logits,
            hit_tokens=hit,
            loaded_bytes=hit * kv.token_nbytes,
            load_s=load_s,
            compute_s=time.perf_counter() - t0,
        )
