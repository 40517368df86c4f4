"""Between vLLM's paged KV cache and kvshelf's dense chunks, for any attention backend's block layout.

A vLLM layer tensor is [num_blocks, ...]: one block holds the K and V of `block_size` tokens, in an
order that is the backend's business (the CPU backend keeps K transposed, [head_dim, block_size], next to
V [block_size, head_dim]; GPU backends differ). Rather than hard-code each layout, `PagedLayout.probe`
asks the backend itself: it writes tokens whose values encode their own (K|V, head, token, dim) through
the backend's cache-update op into a spare block, reads where each value landed, and then checks the map
with a random round trip. A layout that does not come out as a clean one-to-one map is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Probe values are written in base-64 digits (+1, so an untouched zero is recognisable): integers up to 65
# are exact in every float dtype vLLM keeps KV in (fp32, fp16, bf16).
_DIGIT_BITS = 6

# write(key [T, heads, dim], value [T, heads, dim], layer tensor, slot_mapping [T]) through the backend.
CacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class LayoutError(RuntimeError):
    """The backend's KV block layout could not be mapped exactly; the connector must not run."""


@dataclass
class PagedLayout:
    block_size: int
    num_heads: int
    head_dim: int
    block_numel: int
    # Position inside one block's flattened storage of K[h, t, d] and V[h, t, d]: [2, heads, block_size, dim].
    position: torch.Tensor

    @classmethod
    def probe(
        cls, write: CacheWriter, layer: torch.Tensor, *, block_size: int, num_heads: int, head_dim: int, block: int = 0
    ) -> PagedLayout:
        """Map the block layout of `layer` by writing through `write` into block `block` (restored after)."""
        if not layer.is_contiguous():
            raise LayoutError(f"the KV cache tensor is not contiguous (strides {layer.stride()}); cannot map it")
        saved = layer[block].clone()
        try:
            position = cls._find_positions(write, layer, block, block_size, num_heads, head_dim)
            layout = cls(block_size, num_heads, head_dim, layer[block].numel(), position)
            layout._check_round_trip(write, layer, block)
        finally:
            layer[block].copy_(saved)
        return layout

    @staticmethod
    def _find_positions(write, layer, block, block_size, num_heads, head_dim) -> torch.Tensor:
        shape = (block_size, num_heads, head_dim)
        per_side = block_size * num_heads * head_dim
        ids = torch.arange(2 * per_side, dtype=torch.int64)
        slots = torch.arange(block * block_size, (block + 1) * block_size, dtype=torch.int64, device=layer.device)
        numel = layer[block].numel()
        if numel < 2 * per_side:
            raise LayoutError(f"a block holds {numel} values, fewer than K and V of {block_size} tokens")
        found = torch.zeros(numel, dtype=torch.int64)
        seen = torch.ones(numel, dtype=torch.bool)
        passes = max(1, -(-int(2 * per_side - 1).bit_length() // _DIGIT_BITS))
        for p in range(passes):
            digit = ((ids >> (p * _DIGIT_BITS)) & ((1 << _DIGIT_BITS) - 1)) + 1
            values = digit.to(layer.dtype).to(layer.device)
            layer[block].zero_()
            write(values[:per_side].view(shape), values[per_side:].view(shape), layer, slots)
            raw = layer[block].reshape(-1).to("cpu", torch.float64)
            seen &= raw > 0
            found += (raw.clamp(min=1).round().to(torch.int64) - 1) << (p * _DIGIT_BITS)
        positions = torch.nonzero(seen).view(-1)
        owners = found[positions]
        if len(positions) != 2 * per_side or not torch.equal(torch.sort(owners).values, ids):
            raise LayoutError(
                f"the backend's cache write did not place each of the {2 * per_side} K/V values in its own slot"
            )
        # ids run over (K|V, token, head, dim) as written; store as (K|V, head, token, dim).
        by_id = torch.empty(2 * per_side, dtype=torch.int64)
        by_id[owners] = positions
        return by_id.view(2, block_size, num_heads, head_dim).transpose(1, 2).contiguous()

    def _check_round_trip(self, write: CacheWriter, layer: torch.Tensor, block: int) -> None:
        gen = torch.Generator().manual_seed(0)
        k = torch.randn(self.block_size, self.num_heads, self.head_dim, generator=gen).to(layer.dtype)
        v = torch.randn(self.block_size, self.num_heads, self.head_dim, generator=gen).to(layer.dtype)
        slots = torch.arange(block * self.block_size, (block + 1) * self.block_size, device=layer.device)
        write(k.to(layer.device), v.to(layer.device), layer, slots)
        got = self.view([block], 0, self.block_size, device=layer.device).gather(layer).cpu()
        want = torch.stack([k.transpose(0, 1), v.transpose(0, 1)])
        if not torch.equal(got, want):
            raise LayoutError("reading back a block written by the backend did not return the written K/V")

    def view(self, block_ids: Sequence[int], start: int, end: int, *, device=None) -> PagedView:
        """Tokens [start, end) of a request whose KV lives in `block_ids` (its block table, in order)."""
        return PagedView(self, block_ids, start, end, device=device)


class PagedView:
    """Element indices of one request's tokens [start, end) in a layer tensor, built once and reused for
    every layer (with one KV cache group, all layers share the block table)."""

    def __init__(self, layout: PagedLayout, block_ids: Sequence[int], start: int, end: int, *, device=None):
        if not 0 <= start <= end:
            raise ValueError(f"bad token range [{start}, {end})")
        need = -(-end // layout.block_size)
        if need > len(block_ids):
            raise ValueError(f"tokens up to {end} need {need} blocks, the request has {len(block_ids)}")
        self.layout, self.start, self.end = layout, start, end
        tokens = torch.arange(start, end)
        blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)[tokens // layout.block_size]
        offsets = tokens % layout.block_size
        # [2, heads, tokens, dim] flat indices into the layer tensor viewed as one vector
        index = layout.position[:, :, offsets, :] + (blocks * layout.block_numel).view(1, 1, -1, 1)
        self.index = index.to(device) if device is not None else index

    def gather(self, layer: torch.Tensor) -> torch.Tensor:
        """K and V of the tokens as [2, heads, tokens, dim] (a new tensor on the layer's device)."""
        return layer.view(-1)[self.index]

    def scatter(self, layer: torch.Tensor, kv: torch.Tensor, *, first: int = 0) -> None:
        """Write kv [2, heads, n, dim] for tokens [start + first, start + first + n) into the layer tensor."""
        index = self.index[:, :, first : first + kv.shape[2]]
        layer.view(-1)[index] = kv.to(layer.device, layer.dtype, non_blocking=True)
