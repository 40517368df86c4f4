"""APE-style attention reweighting over separately computed context (issue #18, fourth session).

Document KV computed alone and placed side by side is read differently from KV computed in one prompt: the
question's attention spreads over more competing tokens (APE, Yang et al. 2025, "Faster and Longer
Context-Augmented Generation via Adaptive Parallel Encoding"). APE, training-free, splits a query's keys into
the separately computed context (C) and the rest (O: the shared prefix, the question, what it decodes) and
attends to them as two blocks:

    within C: softmax(logits / T + bias)   (T < 1 sharpens the context's distribution; bias per key, default 0)
    within O: softmax(logits)
    block weights: softmax([LSE(logits_O), T * LSE(logits_C / T + bias) + log(mass)])

T = 1, mass = 1 is plain attention. (APE's own code multiplies the tempered block's log-sum-exp by a factor
instead of adding log(mass); that is not shift-invariant in the logits, this is.) Only queries at or after
`from_position` (the question and the tokens decoded after it) are reweighted; the documents' own tokens attend
as usual. The runner applies it when a KV buffer carries one (`KVBuffer.reweight`), in prefill and decode alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionReweight:
    context: torch.Tensor  # bool [capacity]: positions of separately computed (placed) document tokens
    from_position: int  # queries at positions >= this are reweighted (the question's first token)
    temperature: float = 1.0
    mass: float = 1.0
    layers: frozenset[int] | None = None  # None: every layer
    bias: torch.Tensor | None = None  # float [capacity]: added to each context key's tempered logit (None: 0)

    def __post_init__(self):
        if not self.temperature > 0 or not self.mass > 0:
            raise ValueError(
                f"context attention temperature and mass must be > 0, got {self.temperature} and {self.mass}"
            )
        if self.context.dtype != torch.bool or self.context.dim() != 1:
            raise ValueError("context must be a 1-D bool mask over KV positions")

    def applies(self, layer: int, last_position: int) -> bool:
        return last_position >= self.from_position and (self.layers is None or layer in self.layers)


def reweighted_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    key_start: int,
    window: int | None,
    scaling: float,
    reweight: AttentionReweight,
) -> torch.Tensor:
    """Attention output [heads, m, dim] of queries q ([heads, m, dim], rotated) at `positions` over keys and
    values [kv_heads, L, dim] at positions key_start.. (causal, with the layer's window), context keys
    reweighted as the module says."""
    heads, kv_heads = q.shape[0], keys.shape[0]
    group = heads // kv_heads
    k = keys.float().repeat_interleave(group, 0)
    v = values.float().repeat_interleave(group, 0)
    logits = (q.float() @ k.transpose(1, 2)) * scaling  # [heads, m, L]
    key_pos = torch.arange(key_start, key_start + keys.shape[1], device=q.device).view(1, -1)
    hidden = key_pos > positions.view(-1, 1)
    if window is not None:
        hidden |= positions.view(-1, 1) - key_pos >= window
    context = reweight.context[key_start : key_start + keys.shape[1]].to(q.device).view(1, -1)
    other = logits.masked_fill(hidden | context, float("-inf"))
    ctx = logits / reweight.temperature
    if reweight.bias is not None:
        ctx = ctx + reweight.bias[key_start : key_start + keys.shape[1]].to(q.device).view(1, -1)
    ctx = ctx.masked_fill(hidden | ~context, float("-inf"))
    lse_other, lse_ctx = other.logsumexp(-1), ctx.logsumexp(-1)  # [heads, m]
    # The context block's log weight; -inf (no context key visible) stays -inf: its share is then 0.
    weight_ctx = reweight.temperature * lse_ctx + math.log(reweight.mass)
    share = torch.sigmoid(weight_ctx - lse_other).unsqueeze(-1)
    out_other = other.softmax(-1).nan_to_num(0.0) @ v
    out_ctx = ctx.softmax(-1).nan_to_num(0.0) @ v
    return ((1 - share) * out_other + share * out_ctx).to(q.dtype)
