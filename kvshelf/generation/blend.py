"""CacheBlend prefill: documents' KV reused at any position, a few tokens recomputed (kvshelf.blend).

Documents not cached are computed in place (with the prompt) and, after the first token, stored for the next
request (their slice of this prompt's KV, or computed alone: blend_document_context); a request with too few of its documents cached is prefilled exactly instead (never slower than a
plain prefill, issue #18).
"""

from __future__ import annotations

import time

from kvshelf.blend.blender import Blender, BlendInfo
from kvshelf.generation.outcome import PrefillOutcome, PrefillRequest
from kvshelf.model.kv_buffer import KVBuffer


class BlendPrefill:
    def __init__(self, blender: Blender):
        self.blender = blender

    def prefill(self, request: PrefillRequest, kv: KVBuffer) -> PrefillOutcome:
        seg = request.documents
        if seg is None:
            raise ValueError("a blended prefill needs the prompt cut into documents")
        blender = self.blender
        documents = blender.documents(seg, request.salt)
        if not blender.should_blend(documents):
            return self._exact(request, kv, documents)
        t0 = time.perf_counter()
        logits, info = blender.prefill(seg, kv, request.salt, documents)
        return PrefillOutcome(
            logits,
            hit_tokens=info.reused_tokens,  # only cached documents are placed: missing ones count as computed
            loaded_bytes=info.loaded_bytes,
            exact=False,  # fused KV is approximate: never stored under prefix keys
            compute_s=time.perf_counter() - t0,
            blend=info,
            deferred=blender.store_missing(seg, documents, kv, request.salt, info) if info.deferred else None,
        )

    def _exact(self, request: PrefillRequest, kv: KVBuffer, documents) -> PrefillOutcome:
        """A plain prefill of the whole prompt (its answer equals full prefill's); the documents not cached
        are stored after the first token. Nothing came from the cache: no hit tokens."""
        blender, seg = self.blender, request.documents
        missing = sum(1 for d in documents if not d.cached and d.key is not None)
        info = BlendInfo(documents=len(documents), document_tokens=sum(d.tokens for d in documents), exact=True)
        info.deferred = missing
        blender.metrics.blend_lookups.inc(len(documents))  # looked up (no hit used): the hit rate stays honest
        t0 = time.perf_counter()
        logits = blender.runner.forward(request.ids, 0, kv)
        compute_s = time.perf_counter() - t0

        return PrefillOutcome(
            logits,
            exact=True,
            store_prefix=False,  # a blended prompt is served from document KV, never from prefix KV
            compute_s=compute_s,
            blend=info,
            deferred=blender.store_missing(seg, documents, kv, request.salt, info) if missing else None,
        )
