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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGNALS = ("kv", "k", "v")


@dataclass(frozen=True)
class SelectionPolicy:
    signal: str = "kv"
    per_document: bool = False
    head_tokens: int = 0

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"blend selection signal must be one of {', '.join(SIGNALS)}, got {self.signal!r}")
        if self.head_tokens < 0:
            raise ValueError(f"blend head tokens must be >= 0, got {self.head_tokens}")


def deviation(fresh: torch.Tensor, cached: torch.Tensor, signal: str = "kv") -> torch.Tensor:
    """Per-token squared deviation of fresh from cached KV ([2, heads, tokens, dim] each), K and V each
    normalised by the cached tensor's mean energy so that neither dominates by scale."""
    fresh, cached = fresh.float(), cached.float()
    energy = cached.pow(2).mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    per_part = ((fresh - cached).pow(2) / energy).sum(dim=(1, 3))  # [2, tokens]
    return {"kv": per_part.sum(0), "k": per_part[0], "v": per_part[1]}[signal]


def select(
    fresh: torch.Tensor,
    cached: torch.Tensor,
    budget: int,
    *,
    document: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    policy: SelectionPolicy = SelectionPolicy(),
) -> torch.Tensor:
    """Boolean mask of the tokens to recompute: `budget` of them (at most all).

    `document` ([tokens], int) says which document each token belongs to (needed by `per_document`), `offset`
    ([tokens], int) its place inside its document (needed by `head_tokens`)."""
    n = fresh.shape[2]
    if cached.shape != fresh.shape:
        raise ValueError(f"fresh and cached KV differ in shape: {tuple(fresh.shape)} vs {tuple(cached.shape)}")
    budget = max(0, min(n, budget))
    keep = torch.zeros(n, dtype=torch.bool, device=fresh.device)
    if budget == 0:
        return keep
    score = deviation(fresh, cached, policy.signal)
    if policy.head_tokens:
        if offset is None:
            raise ValueError("head_tokens needs each token's offset inside its document")
        head = offset.to(fresh.device) < policy.head_tokens
        if int(head.sum()) >= budget:  # more heads than budget: the earliest offsets first
            order = torch.argsort(offset.to(fresh.device).masked_fill(~head, 1 << 30), stable=True)
            keep[order[:budget]] = True
            return keep
        keep |= head
        score = score.masked_fill(head, float("-inf"))
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
                keep[members[torch.topk(score[members], q).indices]] = True
        return keep
    keep[torch.topk(score, budget).indices] = True
    return keep


def budget_for(ratio: float, placed_tokens: int) -> int:
    """Tokens recomputed at a check layer: `ratio` of all placed document tokens, rounded up."""
    return math.ceil(ratio * placed_tokens)
