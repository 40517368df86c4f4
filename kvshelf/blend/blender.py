"""CacheBlend on kvshelf's model runner: reuse the KV of documents at any position, recompute the few
tokens whose KV deviates most.

Each document's KV is cached on its own (the separator that follows every document is cached with it), keyed
by its tokens and the prefix (the BOS token, the attention sink every real prompt starts with) alone, so it
serves the document wherever it appears: with `document_context` "prompt" (the config's default) the slice of
the first prompt that held it, as that prefill computed it, at the position it had there; with "alone" computed
as `prefix + document + sep` on its own. For a prompt
`prefix, document, sep, document, sep, ..., suffix`:

1. every cached document's KV is loaded and its keys re-rotated from the position it was computed at
   (stored with it, and part of its key) to the document's position here; a document not cached is
   computed in place with the prompt in every layer, like the question;
2. layers below the first check layer run on every token, so the check layer's fresh K and V are exact;
3. at each check layer, fresh K and V of the active tokens (projections only) are compared with the
   cached ones (squared error, K and V each normalised by their mean energy) and only the top `ratio`
   fraction of the placed document tokens stays active for the rest of the layer and above; the prefix,
   the documents not cached and the suffix always do;
4. later layers compute only active tokens, attending over the fused KV: fresh where computed, cached
   elsewhere. The fused KV is what decoding continues from.

Fused KV is approximate, so it is never stored under prefix-cache keys.

The first request with new documents is never slower than a plain prefill (issue #18; computing each new
document alone before blending made it 1.3-2.4x slower): a missing document's KV is stored after the request's
first token (`store_missing`: its slice of this prompt's KV, or computed alone by `compute_missing`), so that
the next request with it blends. A request with less than `min_cached_share` of its document tokens cached
is not blended at all but prefilled exactly (kvshelf.generation.blend): the little it would save is not
worth an approximate answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from kvshelf.blend.question_pass import QuestionPass
from kvshelf.blend.segment import Segmented
from kvshelf.blend.selection import SelectionPolicy, budget_for, select
from kvshelf.cache.engine import CacheEngine
from kvshelf.config import KVShelfConfig
from kvshelf.metrics import Metrics
from kvshelf.model.kv_buffer import KVBuffer
from kvshelf.model.reweight import AttentionReweight
from kvshelf.model.runner import ModelRunner

DOCUMENT_CONTEXTS = ("alone", "prompt")


@dataclass
class BlendInfo:
    documents: int = 0
    document_hits: int = 0
    document_tokens: int = 0
    placed_tokens: int = 0  # tokens of the cached documents, placed from the cache (the others are computed)
    reused_tokens: int = 0  # placed tokens whose cached KV survived to the last layer
    recomputed_tokens: int = 0  # placed tokens recomputed in the last layer
    computed_alone: int = 0  # documents that missed, computed on their own (after the first token) and stored
    stored_from_prompt: int = 0  # documents that missed, stored from this prompt's KV (document_context prompt)
    loaded_bytes: int = 0
    selected_per_check: list[int] = field(default_factory=list)
    exact: bool = False  # too few documents cached: the prompt was prefilled exactly, not blended
    deferred: int = 0  # documents whose KV is computed after the first token (counted in computed_alone once done)
    question_pass_tokens: int = 0  # question tokens run alone over the placed KV first (the question pass)
    answer_margin: float | None = None  # its first answer token's top-1 minus top-2 log-probability (fallback on)
    fallback: bool = False  # that margin was below blend_fallback_margin: served by an exact prefill instead


@dataclass
class Document:
    """One document (with its separator) in a prompt: where it sits, its blend key, whether it is cached."""

    start: int
    end: int
    key: bytes | None
    cached: bool

    @property
    def tokens(self) -> int:
        return self.end - self.start


class Blender:
    def __init__(
        self,
        runner: ModelRunner,
        engine: CacheEngine | None,
        *,
        check_layers: list[int],
        ratios: list[float],
        metrics: Metrics | None = None,
        min_cached_share: float = 0.25,
        selection: SelectionPolicy | None = None,
        prefix_documents: int = 0,
        context_attention: tuple[float, float, str] = (1.0, 1.0, "all"),
        context_distance_bias: float = 0.0,
        document_context: str = "alone",
        ratio_tokens: int | None = None,
        beyond_share: float = 1.0,
        long_selection: SelectionPolicy | None = None,
        fallback_margin: float = 0.0,
    ):
        if not 0 <= min_cached_share <= 1:
            raise ValueError(f"min_cached_share must be within 0..1, got {min_cached_share}")
        if len(ratios) not in (1, len(check_layers)):
            raise ValueError(
                f"blend_recompute_ratios has {len(ratios)} values for {len(check_layers)} check layers; "
                "give one ratio, or one per check layer"
            )
        bad = [c for c in check_layers if not 0 <= c < runner.num_layers]
        if bad or not check_layers:
            raise ValueError(f"blend_check_layers must be within 0..{runner.num_layers - 1}, got {check_layers}")
        self.runner = runner
        self.engine = engine
        self.check_layers = sorted(check_layers)
        self.ratios = ratios * len(check_layers) if len(ratios) == 1 else ratios
        self.metrics = metrics if metrics is not None else Metrics()
        # Blend only when at least this share of the document tokens is cached. A blend costs about the
        # missing share of a plain prefill (computed in place) plus a quarter to a half of the cached share
        # (issue #18, fourth session: at 26-58% cached 0.58-0.92x of a plain prefill, median 0.68x, at 30%
        # recompute); below a quarter cached it would save little for an approximate answer.
        self.min_cached_share = min_cached_share
        self.selection = selection if selection is not None else SelectionPolicy()
        if prefix_documents < 0:
            raise ValueError(f"blend_prefix_documents must be >= 0, got {prefix_documents}")
        # The first documents of every prompt are part of the always-computed prefix (segment.fixed_prefix).
        self.prefix_documents = prefix_documents
        self.question_pass = QuestionPass(runner)
        # APE-style reweighting of the question's attention over the placed documents (model.reweight):
        # (temperature, mass, "all" or "global" layers); (1, 1, ...) is plain attention.
        temperature, mass, layers = context_attention
        if layers not in ("all", "global"):
            raise ValueError(f"blend_context_layers must be all or global, got {layers!r}")
        AttentionReweight(torch.zeros(1, dtype=torch.bool), 0, temperature, mass)  # validates both
        self.context_attention = (float(temperature), float(mass), layers)
        # Each placed key's logit + bias x (1 - position / the question's first position): earlier documents
        # count more (a blend makes the question favour the later ones; issue #18, fourth session).
        self.context_distance_bias = float(context_distance_bias)
        # Which KV a document is cached with: "alone" (computed on its own behind the prefix, after the first
        # token) or "prompt" (its slice of the prompt that first held it, as that prefill computed it: no extra
        # compute, and deep layers that saw other documents before it; issue #18, fifth session).
        if document_context not in DOCUMENT_CONTEXTS:
            raise ValueError(
                f"blend_document_context must be one of {', '.join(DOCUMENT_CONTEXTS)}, got {document_context!r}"
            )
        self.document_context = document_context
        # The ratios apply in full to the first `ratio_tokens` placed tokens, `beyond_share` of them past those
        # (selection.budget_for); None: the ratios everywhere.
        if ratio_tokens is not None and ratio_tokens < 1:
            raise ValueError(f"blend_ratio_tokens must be >= 1 or null, got {ratio_tokens}")
        if not 0 <= beyond_share <= 1:
            raise ValueError(f"blend_ratio_beyond_share must be within 0..1, got {beyond_share}")
        self.ratio_tokens, self.beyond_share = ratio_tokens, float(beyond_share)
        # Past `ratio_tokens` placed tokens `long_selection` picks the recomputed tokens, when the question is in
        # the blend (not inside vLLM): the small budget goes to what the question reads (tenth session).
        if long_selection is not None and not long_selection.needs_attention:
            raise ValueError(f"a long-prompt selection must read the question, got signal {long_selection.signal!r}")
        self.long_selection = long_selection
        # Below this first-answer-token margin (nats) an exact prefill serves instead (generation.fallback).
        if not fallback_margin >= 0:
            raise ValueError(f"blend_fallback_margin must be >= 0, got {fallback_margin}")
        self.fallback_margin = float(fallback_margin)

    @classmethod
    def from_config(
        cls,
        runner: ModelRunner,
        engine: CacheEngine | None,
        config: KVShelfConfig,
        metrics: Metrics | None = None,
        *,
        document_context: str | None = None,
    ) -> Blender:
        """The blender the config describes (kvshelf's own runner and the vLLM adapter alike; `document_context`
        overrides the config's)."""
        return cls(
            runner,
            engine,
            check_layers=config.blend_check_layers,
            ratios=config.blend_recompute_ratios,
            metrics=metrics,
            min_cached_share=config.blend_min_cached_share,
            selection=SelectionPolicy(
                signal=config.blend_selection_signal,
                per_document=config.blend_per_document,
                head_tokens=config.blend_head_tokens,
                question_weight=config.blend_question_weight,
                question_span=config.blend_question_span,
                question_pass=config.blend_question_pass,
                question_budget=config.blend_question_budget,
            ),
            prefix_documents=config.blend_prefix_documents,
            context_attention=(
                config.blend_context_temperature,
                config.blend_context_mass,
                config.blend_context_layers,
            ),
            context_distance_bias=config.blend_context_distance_bias,
            document_context=document_context or config.blend_document_context,
            ratio_tokens=config.blend_ratio_tokens,
            beyond_share=config.blend_ratio_beyond_share,
            long_selection=SelectionPolicy(
                signal="question", question_pass=True, question_budget=config.blend_long_question_budget
            )
            if config.blend_long_question_pass
            else None,
            fallback_margin=config.blend_fallback_margin,
        )

    def selection_for(self, seg: Segmented, placed_tokens: int) -> SelectionPolicy:
        """The policy of a blend of `placed_tokens` cached tokens: `long_selection` past `ratio_tokens` when the
        question is part of the blend (`seg.suffix`), else `selection`."""
        long = self.ratio_tokens is not None and placed_tokens > self.ratio_tokens and bool(seg.suffix)
        return self.long_selection if long and self.long_selection is not None else self.selection

    # -- which documents are cached ----------------------------------------------------------------------------
    def documents(self, seg: Segmented, salt) -> list[Document]:
        """The prompt's documents, each with its blend key and whether a tier holds it (no KV is read)."""
        spans = self._cached_spans(seg)
        if self.engine is None:
            return [Document(start, end, None, False) for start, end in spans]
        in_prompt = self.document_context == "prompt"
        keys = [
            self.engine.blend_key(seg.token_ids[s:e], salt, prefix=seg.prefix, in_prompt=in_prompt) for s, e in spans
        ]
        held = self.engine.backend.contains_many(keys)
        return [Document(s, e, k, bool(h)) for (s, e), k, h in zip(spans, keys, held, strict=True)]

    def should_blend(self, documents: list[Document]) -> bool:
        total = sum(d.tokens for d in documents)
        cached = sum(d.tokens for d in documents if d.cached)
        return total > 0 and cached >= self.min_cached_share * total  # 0: always blend

    def store_missing(
        self, seg: Segmented, documents: list[Document], kv: KVBuffer, salt, info: BlendInfo
    ) -> Iterator[None]:
        """The steps that cache the documents not cached, run after the first token: each one's KV computed
        alone (`compute_missing`), or with `document_context` "prompt" its slice of `kv` (this request's
        prefill, exact or blended: a missing document was computed in place in every layer) stored as it is,
        at its position here: no compute."""
        if self.document_context == "alone":
            yield from self.compute_missing(seg, documents, salt, info)
            return
        for doc in documents:
            if doc.cached or doc.key is None:
                continue
            self.engine.put_blend_chunk(doc.key, kv.data[:, :, :, doc.start : doc.end], position=doc.start)
            info.stored_from_prompt += 1
            info.deferred -= 1
            yield

    def compute_missing(self, seg: Segmented, documents: list[Document], salt, info: BlendInfo) -> Iterator[None]:
        """Compute and store the position-independent KV of the documents not cached, one document per step
        (the generator runs a step between decoded tokens, off the first token's critical path), so that the
        next request with them blends."""
        position = len(seg.prefix)
        for doc in documents:
            if doc.cached or doc.key is None:
                continue
            alone = self.runner.new_kv(position + doc.tokens)
            self.runner.forward(seg.prefix + seg.token_ids[doc.start : doc.end], 0, alone)
            self.engine.put_blend_chunk(doc.key, alone.data[:, :, :, position:], position=position)
            info.computed_alone += 1
            info.deferred -= 1
            yield

    # -- document KV ----------------------------------------------------------------------------------------
    def place_documents(
        self, seg: Segmented, kv: KVBuffer, salt, info: BlendInfo, documents: list[Document] | None = None
    ) -> torch.Tensor:
        """Write every cached document's KV into `kv` at its place in this prompt, keys rotated from the
        position they were computed at to the new one; the mask of the tokens placed. A document not cached
        (or gone or rejected since `documents` was asked) is left out of the mask: it is computed in place with
        the prompt, exactly like the question, and marked not cached for `compute_missing`."""
        runner = self.runner
        documents = documents if documents is not None else self.documents(seg, salt)
        document_mask = torch.zeros(len(seg.token_ids), dtype=torch.bool)
        position = len(seg.prefix) if self.document_context == "alone" else None  # in-prompt KV: where it was
        for doc in documents:
            info.documents += 1
            info.document_tokens += doc.tokens
            cached = self.engine.get_blend_chunk(doc.key, doc.tokens, position=position) if doc.cached else None
            if cached is None:
                doc.cached = False
                continue
            info.document_hits += 1
            info.loaded_bytes += doc.tokens * runner.kv_bytes_per_token
            document_mask[doc.start : doc.end] = True
            stored, computed_at = cached.kv.to(runner.device), cached.meta.position
            for layer in range(runner.num_layers):
                kv.data[layer, 0, :, doc.start : doc.end] = runner.rerotate(
                    stored[layer, 0], doc.start - computed_at, layer
                )
                kv.data[layer, 1, :, doc.start : doc.end] = stored[layer, 1]
        info.placed_tokens = int(document_mask.sum())
        return document_mask

    # -- the blended prefill -------------------------------------------------------------------------------
    @property
    def runs_question_pass(self) -> bool:
        """Whether a blend first runs the question alone over the placed KV (`_question_pass`)."""
        return self.selection.question_pass and self.selection.needs_attention

    def prefill(
        self,
        seg: Segmented,
        kv: KVBuffer,
        salt: str | None = None,
        documents: list[Document] | None = None,
        *,
        question: list[int] | None = None,
    ) -> tuple[torch.Tensor, BlendInfo]:
        """Blend the cached documents; the others are computed in place (all layers, like the question). Their
        position-independent KV is not computed here: `compute_missing` does it, off the critical path.
        `question`: tokens that follow `seg` but that this blend does not compute (inside vLLM, vLLM computes
        the question after the blended region); the question pass reads their attention (`kv` then needs room
        for them). None: the question is `seg`'s suffix."""
        runner, info = self.runner, BlendInfo()
        documents = documents if documents is not None else self.documents(seg, salt)
        document_mask = self.place_documents(seg, kv, salt, info, documents)
        # Per prompt position: the placed document it belongs to and its offset inside it (selection policies).
        document_of = torch.full((len(seg.token_ids),), -1, dtype=torch.long)
        offset_of = torch.zeros(len(seg.token_ids), dtype=torch.long)
        for index, doc in enumerate(documents):
            if doc.cached:
                document_of[doc.start : doc.end] = index
                offset_of[doc.start : doc.end] = torch.arange(doc.tokens)
        info.deferred = info.documents - info.document_hits
        self.metrics.blend_lookups.inc(info.documents)
        self.metrics.blend_hits.inc(info.document_hits)
        checks = dict(zip(self.check_layers, self.ratios, strict=True))
        is_document = document_mask.to(runner.device)  # of the tokens still computed: placed ones
        question_share, policy = None, self.selection_for(seg, info.placed_tokens)
        if policy.question_pass and policy.needs_attention and info.placed_tokens:
            question_share = self._question_pass(seg, kv, policy, question)
            info.question_pass_tokens = len(seg.suffix if question is None else question)

        kv.reweight = self._reweight(seg, document_mask, kv.capacity)

        def select(layer: int, hidden: torch.Tensor, positions: torch.Tensor, rope: dict) -> torch.Tensor | None:
            # Fresh K and V of every active token (projections only: cheap), compared with the cached
            # ones; the full layer then runs only for the tokens that stay active. The others keep their
            # fresh K and V at this layer and their cached KV above it.
            nonlocal is_document
            ratio = checks.get(layer)
            if ratio is None or not info.placed_tokens:
                return None
            placed = positions[is_document]
            cached = kv.data[layer, :, :, placed].clone()
            runner.write_kv(layer, hidden, positions, kv, rope)
            attention = None
            if question_share is not None:
                attention = question_share[placed]
            elif policy.needs_attention:
                attention = self.question_pass.attention(layer, hidden, positions, rope, kv, len(seg.suffix))[placed]
            placed = placed.cpu()
            keep = self._select(
                kv.data[layer, :, :, positions[is_document]],
                cached,
                is_document,
                ratio,
                info,
                document_of[placed],
                offset_of[placed],
                attention,
                policy,
            )
            is_document = is_document[keep]
            return keep

        logits = runner.forward(seg.token_ids, 0, kv, select_tokens=select)
        info.recomputed_tokens = int(is_document.sum())
        info.reused_tokens = info.placed_tokens - info.recomputed_tokens
        return logits, info

    def _reweight(self, seg: Segmented, document_mask: torch.Tensor, capacity: int) -> AttentionReweight | None:
        """The reweighting of the question's (and the decoded tokens') attention over the placed documents,
        or None when it is plain attention (temperature and mass 1, no distance bias) or nothing was placed."""
        temperature, mass, layers = self.context_attention
        beta = self.context_distance_bias
        if (temperature, mass, beta) == (1.0, 1.0, 0.0) or not bool(document_mask.any()):
            return None
        question = len(seg.token_ids) - len(seg.suffix)
        positions = torch.arange(capacity, device=self.runner.device, dtype=torch.float32)
        bias = beta * (1 - positions / max(1, question)) if beta else None
        context = torch.zeros(capacity, dtype=torch.bool, device=self.runner.device)
        context[: len(document_mask)] = document_mask.to(self.runner.device)
        chosen = None
        if layers == "global":
            chosen = frozenset(i for i, spec in enumerate(self.runner.layer_specs) if spec.window is None)
        return AttentionReweight(context, question, temperature, mass, chosen, bias)

    @staticmethod
    def _cached_spans(seg: Segmented) -> list[tuple[int, int]]:
        """Each document together with the separator after it: the separator is the same after every document,
        so it is cached with the document instead of being recomputed in every layer of every request."""
        spans, layout = [], seg.layout()
        for k, (kind, start, end) in enumerate(layout):
            if kind == "document":
                if k + 1 < len(layout) and layout[k + 1][0] == "sep":
                    end = layout[k + 1][2]
                spans.append((start, end))
        return spans

    def _question_pass(
        self, seg: Segmented, kv: KVBuffer, policy: SelectionPolicy | None = None, question: list[int] | None = None
    ) -> torch.Tensor:
        """Each prompt position's share of the question's attention (blend.question_pass)."""
        return self.question_pass.shares(seg, kv, policy or self.selection, question)

    def _select(
        self, fresh, cached, is_document, ratio: float, info: BlendInfo, document, offset, attention, policy
    ) -> torch.Tensor:
        """Indices (into the active tokens) that stay active: every non-document token, plus the document tokens
        `selection.select` picks, `ratio` of all document tokens."""
        budget = min(
            int(is_document.sum()), budget_for(ratio, info.placed_tokens, self.ratio_tokens, self.beyond_share)
        )
        keep_document = select(
            fresh,
            cached,
            budget,
            document=document,
            offset=offset,
            attention=attention,
            policy=policy,
        )
        keep = ~is_document.clone()
        keep[is_document] = keep_document
        info.selected_per_check.append(int(keep_document.sum()))
        return keep.nonzero().view(-1)
