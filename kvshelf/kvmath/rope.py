"""Rotary position embeddings (rotate-half convention), the one implementation in kvshelf.

The model runner applies RoPE with its model's cos/sin tables and moves cached keys to new positions
(CacheBlend); the cachegen codec undoes RoPE before coding keys and applies it again after decoding.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [..., tokens, dim] by the angles whose cos/sin tables ([..., tokens, dim]) are given."""
    return x * cos + rotate_half(x) * sin


def shift_keys(k: torch.Tensor, inv_freq: torch.Tensor, delta: int) -> torch.Tensor:
    """Move keys ([..., tokens, head_dim], already rotated) by `delta` positions.

    RoPE rotations compose, R(a + d) = R(d) R(a), so rotating cached keys by the position difference
    equals computing them at the new position (any attention scaling of the tables is already in k).
    """
    if delta == 0:
        return k
    angles = delta * inv_freq.to(device=k.device, dtype=torch.float32)
    emb = torch.cat((angles, angles))
    kf = k.float()
    return apply_rope(kf, emb.cos(), emb.sin()).to(k.dtype)


def rotate_keys(k: torch.Tensor, inv_freq: torch.Tensor, position: int, sign: float) -> torch.Tensor:
    """Rotate keys [heads, tokens, dim] by sign * their positions' angles (tokens at position,
    position + 1, ...): sign -1 undoes RoPE, sign +1 applies it again. Angles in float64 (long contexts).
    Several layers at once: keys [layers, heads, tokens, dim] and inv_freq [layers, dim / 2]."""
    pos = torch.arange(position, position + k.shape[-2], device=k.device, dtype=torch.float64)
    inv = inv_freq.to(k.device, torch.float64)
    angles = (pos[:, None] * inv[..., None, :]).float()  # [tokens, dim / 2], or [layers, tokens, dim / 2]
    if inv.dim() == 2:
        angles = angles.unsqueeze(-3)  # the same angles for every head of a layer
    cos, sin = angles.cos(), angles.sin() * sign
    return apply_rope(k, torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1))
