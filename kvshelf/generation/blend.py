"""CacheBlend prefill: documents' KV reused at any position, a few tokens recomputed (kvshelf.blend)."""

from __future__ import annotations

import time

from kvshelf.blend.blender import Blender
from kvshelf.generation.outcome import PrefillOutcome, PrefillRequest
from kvshelf.model.kv_buffer import KVBuffer


class BlendPrefill:
    def __init__(self, blender: Blender):
        self.blender = blender

    def prefill(self, request: PrefillRequest, kv: KVBuffer) -> PrefillOutcome:
        if request.documents is None:
            raise ValueError("a blended prefill needs the prompt cut into documents")
        t0 = time.perf_counter()
        logits, info = self.blender.prefill(request.documents, kv, request.salt)
        # Documents that missed were computed alone just now: their tokens are computed, not hits.
        # (Per-document reuse is not reported: the hit documents' share of the reused tokens is used.)
        hit = info.reused_tokens * info.document_hits // max(info.documents, 1)
        return PrefillOutcome(
            logits,
            hit_tokens=hit,
            loaded_bytes=info.loaded_bytes,
            exact=False,  # fused KV is approximate: never stored under prefix keys
            compute_s=time.perf_counter() - t0,
            blend=info,
        )
