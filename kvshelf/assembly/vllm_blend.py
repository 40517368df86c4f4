"""CacheBlend assembled over a model that vLLM loaded (issue #19): kvshelf's blender (kvshelf.blend) on a
runner adapter over vLLM's modules (kvshelf.model.vllm_runner), for the vLLM connector, which may not
import model or blend code itself (the import contract in pyproject.toml).

The connector asks three things, all on token ids:
- `plan`: does this prompt hold documents (split at the separator's tokens), which of them are cached,
  and is enough cached to blend (`min_cached_share`, as on kvshelf's own runner)? Never blends from nothing.
- `prefill`: blend the prompt's document region (prefix, documents and their separators; the question is
  left to vLLM) into a dense KV buffer; None when the cached documents are gone since the plan.
- `store`: a missing document's slice of a prompt's KV (vLLM's exact prefill, or the fused KV of a blend
  that computed it in place), under its in-prompt blend key at the position it had there
  (`blend_document_context: prompt`, the default, as on kvshelf's own runner);
- `compute_alone`: a missing document's position-independent KV (computed after the BOS alone), stored
  under its blend key (`blend_document_context: alone`).
So the next request with the document blends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvshelf.blend.blender import Blender, BlendInfo, Document
from kvshelf.blend.segment import Segmented, separator_variants
from kvshelf.blend.selection import QUESTION_SIGNALS
from kvshelf.cache.engine import CacheEngine
from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError
from kvshelf.metrics import Metrics
from kvshelf.model.vllm_runner import PagedAttention, VllmModelRunner


def _cut(tokens: list[int], prefix: list[int], spelling: list[int]) -> Segmented | None:
    """Split at every occurrence of `spelling`; None without documents or when a piece is empty."""
    pieces, current, i, body = [], [], len(prefix), tokens
    n = len(spelling)
    while i < len(body):
        if body[i : i + n] == spelling:
            pieces.append(current)
            current, i = [], i + n
        else:
            current.append(body[i])
            i += 1
    documents = pieces
    if not documents or any(not d for d in documents):
        return None
    seg = Segmented(list(prefix), documents, current, list(spelling))
    return seg if seg.token_ids == tokens else None


@dataclass
class BlendPlan:
    segmented: Segmented
    documents: list[Document]
    region_end: int  # tokens [0, region_end): prefix, documents and separators (what kvshelf computes)
    blend: bool  # enough of the documents is cached

    @property
    def missing(self) -> list[Document]:
        return [d for d in self.documents if not d.cached and d.key is not None]


@dataclass
class BlendedRegion:
    kv: torch.Tensor  # [layers, 2, kv_heads, region tokens, head_dim]: fused KV of tokens [0, region_end)
    info: BlendInfo
    in_blocks: bool = False  # attended over the request's paged blocks: they already hold `kv`
    missing: list[Document] = field(default_factory=list)  # not cached: computed in place, in every layer


def check_selection(config: KVShelfConfig) -> None:
    """Refuse selection signals that read the question at the check layer: vLLM computes the question after
    the blended region, so the blend's forward never holds it. The question pass (`blend_question_pass`)
    reads it instead, in a pass of its own over the placed KV before the blend."""
    if config.blend_selection_signal in QUESTION_SIGNALS and not config.blend_question_pass:
        raise ConfigError(
            f"blend_selection_signal {config.blend_selection_signal!r} needs the question inside the blend; "
            "inside vLLM the question is computed after it: set blend_question_pass (the question runs alone "
            "over the placed KV first), or use 'kv', 'k' or 'v'"
        )


class VllmBlending:
    def __init__(
        self,
        model,
        hf_text_config,
        engine: CacheEngine,
        tokenizer,
        config: KVShelfConfig,
        *,
        metrics: Metrics | None = None,
        document_context: str | None = None,
    ):
        self.runner = VllmModelRunner(model, hf_text_config)
        self.engine = engine
        self.tokenizer = tokenizer
        self.separator = config.blend_special_str
        own = list(tokenizer(self.separator, add_special_tokens=False)["input_ids"])
        self._spellings = [own] + [v for v in separator_variants(tokenizer, self.separator) if v != own]
        if not own:
            raise ValueError(f"blend_special_str {self.separator!r} tokenizes to nothing")
        with_special = list(tokenizer("x")["input_ids"])
        self._bos = with_special[: len(with_special) - len(tokenizer("x", add_special_tokens=False)["input_ids"])]
        # `document_context` (default the config's): the connector falls back to alone where it cannot read
        # a prompt's KV whole (integrations.vllm.blending.document_context).
        self.blender = Blender.from_config(self.runner, engine, config, metrics, document_context=document_context)

    @property
    def document_context(self) -> str:
        """Which KV missing documents are cached with: "prompt" (`store`) or "alone" (`compute_alone`)."""
        return self.blender.document_context

    def split(self, tokens: list[int]) -> Segmented | None:
        """The prompt cut at the separator, or None without documents. The blend keys and positions are
        those of these very tokens, so a cut must reassemble them exactly: the separator's own tokens are
        tried first (prompts built like kvshelf's, pieces tokenized apart), then each spelling it takes next
        to spaces or newlines, one spelling for the whole prompt."""
        tokens = list(tokens)
        prefix = self._bos if self._bos and tokens[: len(self._bos)] == self._bos else []
        for spelling in self._spellings:
            seg = _cut(tokens, prefix, spelling)
            if seg is not None:
                return seg
        return None

    def plan(self, tokens: list[int], salt: str | None) -> BlendPlan | None:
        """None when the prompt holds no documents (plain prefix caching applies)."""
        seg = self.split(tokens)
        if seg is None:
            return None
        documents = self.blender.documents(seg, salt)
        region_end = len(seg.token_ids) - len(seg.suffix)
        return BlendPlan(seg, documents, region_end, self.blender.should_blend(documents))

    @torch.inference_mode()
    def prefill(
        self,
        tokens: list[int],
        salt: str | None,
        attention: Callable[[int], PagedAttention | None] | None = None,
        last: list[int] = (),
    ) -> BlendedRegion | None:
        """Blend the document region of `tokens`; None when too little of it is still cached (evicted or
        damaged since the plan): the caller then lets vLLM compute the prompt exactly. `attention(region
        tokens)` may give the attention over the request's paged blocks (the connector's, for vLLM's CPU
        backend); without it the runner attends over its dense buffer and the caller scatters the result.
        `last`: the prompt's tokens after `tokens` (its last one, which the lookup never sees), part of the
        question that the question pass (`blend_question_pass`) runs over the placed KV."""
        plan = self.plan(tokens, salt)
        if plan is None or not plan.blend:
            return None
        seg = plan.segmented
        region = Segmented(seg.prefix, seg.documents, [], seg.separator)  # the question is vLLM's to compute
        question = list(seg.suffix) + list(last)
        # The question pass writes the question's KV after the region (in the dense buffer only).
        kv = self.runner.new_kv(plan.region_end + (len(question) if self.blender.runs_question_pass else 0))
        paged = attention(plan.region_end) if attention is not None else None
        with self.runner.attending_in(paged, kv), self.runner.without_logits():
            _, info = self.blender.prefill(region, kv, salt, plan.documents, question=question)
        total = sum(d.tokens for d in plan.documents)
        if info.placed_tokens == 0 or info.placed_tokens < self.blender.min_cached_share * total:
            return None  # a chunk failed its checks at load: never blend from (nearly) nothing
        missing = [d for d in plan.documents if not d.cached and d.key is not None]  # incl. gone since the plan
        return BlendedRegion(kv.data[:, :, :, : plan.region_end], info, in_blocks=paged is not None, missing=missing)

    def store(self, key: bytes, kv: torch.Tensor, position: int) -> None:
        """Store a document's slice [layers, 2, kv_heads, tokens, head_dim] of a prompt's KV, its first token
        at `position` there, under its in-prompt blend key (`plan`'s keys with document_context prompt)."""
        if self.document_context != "prompt":
            raise ValueError(
                "document slices of a prompt are stored under in-prompt keys only (document_context prompt)"
            )
        self.engine.put_blend_chunk(key, kv, position=position)

    @torch.inference_mode()
    def compute_alone(self, segmented: Segmented, document: Document, salt: str | None) -> None:
        """Compute and store one missing document's position-independent KV (the blender's own routine)."""
        info = BlendInfo(deferred=1)
        with self.runner.without_logits():
            for _ in self.blender.compute_missing(segmented, [document], salt, info):
                pass
