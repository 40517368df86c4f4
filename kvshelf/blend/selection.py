"""Which placed document tokens CacheBlend recomputes: a model-agnostic function of fresh and cached KV.

At a check layer the blend has, for every placed (cached) document token still computed, the K and V it just
computed with the whole prompt in view (`fresh`) and the K and V from the document's cache (`cached`), both
shaped [2, kv_heads, tokens, head_dim] (K then V, keys at this prompt's positions). `select` returns a boolean
mask over those tokens: the ones that stay computed in this layer and above. Nothing here knows the model:
a vLLM runner adapter (issue #19) can call it with its own tensors.

Options measured on the RAG evaluation (issue #18, BENCHMARKS.md):
- `signal`: deviation of K and V ("kv", each normalised by its mean energy), K alone ("k") or V alone ("v");
- `per_document`: the budget split over documents by their size instead of one global top-k;
- `head_tokens`: each document's first tokens always recomputed (inside the budget). A document cached alone
  behind BOS attends to few tokens at its start: its first tokens' KV differs most from what they would be
  after other documents (EPIC's "link" tokens).

Question-aware signals (issue #18, third session): the question (the prompt's suffix) is computed in every
layer, so the blend can ask which document tokens its queries attend to (`attention`: each token's share of
the question's attention). "question" ranks by that share alone; "kv+question" weights the K and V deviation
by it, deviation x (1 + question_weight x share / mean share): a token that deviates but that the question
ignores matters less to the answer than one it reads. Options: `question_span` also credits each token with
the largest share among the `question_span` tokens before it (the question attends to the words it shares
with a fact, the value it asks for follows them); `question_budget` < 1 gives "question" only that share of
the budget, the rest going to K and V deviation (a two-hop answer lies where the question does not look);
`question_by_document` credits each token with its document's share instead. Where the share comes from is
the blender's business: the check layer's queries, or (`question_pass`, `question_layers`,
`question_reduce`) a pass of the question alone over the placed KV, every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGNALS = ("kv", "k", "v", "question", "kv+question")
QUESTION_SIGNALS = ("question", "kv+question")


@dataclass(frozen=True)
class SelectionPolicy:
    signal: str = "kv"
    per_document: bool = False
    head_tokens: int = 0
    question_weight: float = 1.0
    question_span: int = 0
    question_pass: bool = False
    question_layers: str = "all"  # the pass's layers: "all", or "global" (those without a sliding window)
    question_reduce: str = "mean"  # the pass's share over layers: "mean" or "max"
    question_by_document: bool = False  # each token credited with its document's share (needs `document`)
    question_budget: float = 1.0  # signal "question": this share of the budget by attention, the rest by deviation

    @property
    def needs_attention(self) -> bool:
        return self.signal in QUESTION_SIGNALS

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"blend selection signal must be one of {', '.join(SIGNALS)}, got {self.signal!r}")
        if self.head_tokens < 0:
            raise ValueError(f"blend head tokens must be >= 0, got {self.head_tokens}")
        if self.question_layers not in ("all", "global") or self.question_reduce not in ("mean", "max"):
            raise ValueError(
                f"blend question layers must be all or global and reduce mean or max, got "
                f"{self.question_layers!r} and {self.question_reduce!r}"
            )
        if not 0.0 <= self.question_budget <= 1.0:
            raise ValueError(f"blend question budget must be within 0..1, got {self.question_budget}")
        if self.question_weight < 0 or self.question_span < 0:
            raise ValueError(
                f"blend question weight and span must be >= 0, got {self.question_weight} and {self.question_span}"
            )


def deviation(fresh: torch.Tensor, cached: torch.Tensor, signal: str = "kv") -> torch.Tensor:
    """Per-token squared deviation of fresh from cached KV ([2, heads, tokens, dim] each), K and V each
    normalised by the cached tensor's mean energy so that neither dominates by scale."""
    fresh, cached = fresh.float(), cached.float()
    energy = cached.pow(2).mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    per_part = ((fresh - cached).pow(2) / energy).sum(dim=(1, 3))  # [2, tokens]
    return {"kv": per_part.sum(0), "k": per_part[0], "v": per_part[1]}[signal]


def question_score(share: torch.Tensor, span: int = 0) -> torch.Tensor:
    """Each token's share of the question's attention, normalised to mean 1; with `span`, the largest share
    among the token and the `span` tokens before it (document boundaries are not special: spans are short)."""
    share = share.float().clamp_min(0)
    if span:
        padded = torch.nn.functional.pad(share.view(1, 1, -1), (span, 0), value=0.0)
        share = torch.nn.functional.max_pool1d(padded, span + 1, stride=1).view(-1)
    return share / share.mean().clamp_min(1e-12)


def score(
    fresh, cached, policy: SelectionPolicy, attention: torch.Tensor | None, document: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token selection score (higher: recompute first)."""
    if not policy.needs_attention:
        return deviation(fresh, cached, policy.signal)
    if attention is None or attention.shape != (fresh.shape[2],):
        shape = None if attention is None else tuple(attention.shape)
        raise ValueError(
            f"signal {policy.signal!r} needs the question's attention per token ([{fresh.shape[2]}]), got {shape}"
        )
    share = attention.to(fresh.device).float()
    if policy.question_by_document:
        if document is None:
            raise ValueError("question_by_document needs each token's document index")
        document = document.to(fresh.device)
        ids, member = torch.unique(document, return_inverse=True)
        share = torch.zeros(len(ids), device=share.device).index_add_(0, member, share)[member]
    share = question_score(share, policy.question_span)
    if policy.signal == "question":
        return share
    return deviation(fresh, cached, "kv") * (1 + policy.question_weight * share)


def select(
    fresh: torch.Tensor,
    cached: torch.Tensor,
    budget: int,
    *,
    document: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    attention: torch.Tensor | None = None,
    policy: SelectionPolicy = SelectionPolicy(),
) -> torch.Tensor:
    """Boolean mask of the tokens to recompute: `budget` of them (at most all).

    `document` ([tokens], int) says which document each token belongs to (needed by `per_document`), `offset`
    ([tokens], int) its place inside its document (needed by `head_tokens`), `attention` ([tokens]) each token's
    share of the question's attention (needed by the question signals)."""
    n = fresh.shape[2]
    if cached.shape != fresh.shape:
        raise ValueError(f"fresh and cached KV differ in shape: {tuple(fresh.shape)} vs {tuple(cached.shape)}")
    budget = max(0, min(n, budget))
    keep = torch.zeros(n, dtype=torch.bool, device=fresh.device)
    if budget == 0:
        return keep
    ranking = score(fresh, cached, policy, attention, document)
    if policy.head_tokens:
        if offset is None:
            raise ValueError("head_tokens needs each token's offset inside its document")
        head = offset.to(fresh.device) < policy.head_tokens
        if int(head.sum()) >= budget:  # more heads than budget: the earliest offsets first
            order = torch.argsort(offset.to(fresh.device).masked_fill(~head, 1 << 30), stable=True)
            keep[order[:budget]] = True
            return keep
        keep |= head
        ranking = ranking.masked_fill(head, float("-inf"))
        budget -= int(head.sum())
    if policy.per_document:
        if document is None:
            raise ValueError("per_document needs each token's document index")
        document = document.to(fresh.device)
        ids, sizes = torch.unique(document, return_counts=True)
        # Each document's share of the remaining budget by size (largest remainders get the rounding).
        shares = sizes.double() * budget / n
        quota = shares.floor().long()
        quota[torch.argsort(shares - quota, descending=True)[: budget - int(quota.sum())]] += 1
        for doc, q in zip(ids.tolist(), quota.tolist(), strict=True):
            members = (document == doc).nonzero().view(-1)
            q = min(q, int((~keep[members]).sum()))
            if q:
                keep[members[torch.topk(ranking[members], q).indices]] = True
        return keep
    if policy.signal == "question" and policy.question_budget < 1.0:
        # The question's own share of the budget first, then the rest by K and V deviation among the others:
        # a two-hop answer lies in tokens the question does not read itself, but which deviate.
        first = round(budget * policy.question_budget)
        ranking = ranking.masked_fill(keep, float("-inf"))
        keep[torch.topk(ranking, first).indices] = True
        ranking = deviation(fresh, cached, "kv").masked_fill(keep, float("-inf"))
        budget -= first
    keep[torch.topk(ranking, budget).indices] = True
    return keep


def budget_for(ratio: float, placed_tokens: int, full_tokens: int | None = None, beyond_share: float = 1.0) -> int:
    """Tokens recomputed at a check layer: `ratio` of the placed document tokens, rounded up. With `full_tokens`,
    the placed tokens past the first `full_tokens` count `beyond_share` each: a long prompt recomputes a smaller
    share (the layers before the check run in full whatever the ratio, so a flat share caps the speed-up; issue
    #18, ninth session: at 4-8K tokens 7-10% answered as 15% did, BENCHMARKS.md)."""
    counted = placed_tokens
    if full_tokens is not None and placed_tokens > full_tokens:
        counted = full_tokens + beyond_share * (placed_tokens - full_tokens)
    return math.ceil(ratio * counted)
