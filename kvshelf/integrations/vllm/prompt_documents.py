"""Missing blend documents' KV taken from vLLM's own prefill of the prompt that first held them (issue #19,
ninth session; `blend_document_context: prompt`, the default).

kvshelf's own runner caches a document that a prompt brings uncached with its slice of that prompt's KV, at
the position it had there, under its in-prompt blend key (kvshelf.blend.blender.Blender.store_missing); a
later prompt holding it in another place blends it, its keys re-rotated from that position. Inside vLLM the
prompt's KV is vLLM's: in the step where vLLM finishes prefilling such a prompt (the scheduler's save of it),
each missing document's tokens are copied out of the request's paged blocks, layer by layer as vLLM writes
them (`save_kv_layer`, through the probed block layout), into a host tensor. A slice is handed on only with
every layer written (never one a layer is missing from); it is stored a step later, off the step that serves
the request's first token (blending.BlendWorker).

Only valid where the request's blocks hold every prompt token of every layer when its prefill ends:
full-attention KV groups. That is vLLM's CPU backend, and any run without vLLM's hybrid KV manager (the
connector does not declare it): Gemma 3's sliding-window layers then keep all tokens too. A manager that frees
the blocks outside a sliding window would leave block ids that may hold other requests' KV by then; with such
a group (a model whose every layer slides) the connector computes documents alone instead and stores only
the prompts vLLM computes in one step (`keeps_every_token`, see connector.py and worker.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from kvshelf.integrations.vllm.paged import PagedView
from kvshelf.integrations.vllm.scheduler import SaveSpec

log = logging.getLogger(__name__)


def keeps_every_token(kv_cache_config) -> bool:
    """Whether vLLM's KV manager keeps every prompt token of every layer in a request's blocks: one KV cache
    group of plain full attention (with the hybrid manager off, vLLM promotes sliding-window layers of mixed
    models, Gemma 3's, to it). A sliding-window or chunked-local group may free blocks outside its window."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if kv_cache_config is None:
        return False
    groups = kv_cache_config.kv_cache_groups
    return len(groups) == 1 and type(groups[0].kv_cache_spec) is FullAttentionSpec


@dataclass
class DocumentSlice:
    """One missing document's KV, gathered from a request's blocks; stored at `position` (its first token's
    place in that prompt: readers re-rotate from there)."""

    req_id: str
    key: bytes
    position: int
    kv: torch.Tensor  # host [layers, 2, kv_heads, tokens, head_dim]
    view: PagedView | None = None
    written: list[bool] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PromptDocuments:
    """The slices of the documents missing from this step's finished prefills, gathered as vLLM computes
    each layer. `plan(tokens, salt)` is the blend plan of a prompt (its documents, which are cached, their
    keys); `worker` is the connector's WorkerSide (the probed layout and vLLM's layers); `release(key)` is
    called for a document taken (`wanted`) but not handed on whole."""

    def __init__(self, plan: Callable, worker, stats: dict[str, int], release: Callable[[bytes], None]):
        self.plan, self.worker, self.stats, self.release = plan, worker, stats, release
        self._active: list[DocumentSlice] = []

    @property
    def active_bytes(self) -> int:
        return sum(s.nbytes for s in self._active)

    def start(self, saves: Iterable[SaveSpec], wanted: Callable[[bytes, int], bool]) -> None:
        """Plan the slices of the prompts whose prefill completes in this step (the saves the scheduler
        planned). `wanted(key, nbytes)` says whether a document is to be taken (not queued already, room in
        the connector's bound)."""
        for spec in saves:
            try:
                self._start_one(spec, wanted)
            except Exception:  # never the step's failure: the documents stay missing, a later prompt stores them
                log.exception("kvshelf: planning the documents of request %s failed", spec.req_id)
                self.stats["document_slices_failed"] += 1

    def _start_one(self, spec: SaveSpec, wanted: Callable[[bytes, int], bool]) -> None:
        # The lookup split the prompt without its last token (scheduler.num_new_matched_tokens): the same cut.
        plan = self.plan(spec.tokens[: len(spec.tokens) - 1], spec.salt)
        if plan is None:
            return
        layers = self.worker.layers
        layout = self.worker.layout
        for doc in plan.missing:
            shape = (len(layers), 2, layout.num_heads, doc.end - doc.start, layout.head_dim)
            nbytes = torch.Size(shape).numel() * layers[0].element_size()
            if not wanted(doc.key, nbytes):
                continue
            try:
                view = layout.view(spec.block_ids, doc.start, doc.end, device=layers[0].device)
                kv = torch.empty(shape, dtype=layers[0].dtype, device="cpu")
            except Exception:
                self.release(doc.key)
                raise
            self._active.append(DocumentSlice(spec.req_id, doc.key, doc.start, kv, view, [False] * len(layers)))

    def write_layer(self, index: int, layer: torch.Tensor) -> None:
        """vLLM computed layer `index` of this step: copy each slice's tokens of it out of the blocks."""
        for piece in self._active:
            try:
                piece.kv[index].copy_(piece.view.gather(layer))
                piece.written[index] = True
            except Exception as err:  # the slice misses this layer: dropped at `finish`, never stored
                log.warning(
                    "kvshelf: copying a document of request %s out of layer %d failed: %s", piece.req_id, index, err
                )

    def finish(self) -> list[DocumentSlice]:
        """The slices of this step with every layer written (the others are dropped, counted)."""
        done = []
        for piece in self._active:
            if all(piece.written):
                piece.view = None  # the block ids mean nothing after this step
                done.append(piece)
            else:
                self.release(piece.key)
                self.stats["document_slices_failed"] += 1
                log.warning(
                    "kvshelf: a document of request %s was not stored: some layers were not copied", piece.req_id
                )
        self._active = []
        return done
