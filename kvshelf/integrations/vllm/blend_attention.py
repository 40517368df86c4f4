"""The blend's attention inside vLLM with vLLM's own CPU attention kernel, over the request's paged blocks
(CacheBlend inside vLLM, issue #19, third session).

kvshelf's runner adapter (kvshelf.model.vllm_runner) computes a layer for a set of tokens of the document
region: every token below the check layer, the selected ones above it. Here, for each layer:

1. the region's other tokens (placed documents, re-rotated, or the check layer's fresh K/V) are copied
   from kvshelf's dense buffer into the request's blocks with the backend's own cache-write op;
2. the computed tokens' K/V are written there too;
3. their queries attend over the blocks with vLLM's kernel (`impl.forward`), each run of consecutive
   positions being one causal "request" of the batch whose sequence ends at its last token; each layer's
   window, scale and soft-cap are the kernel's own.

So the blocks hold the fused KV once the blend is done (nothing left to scatter), and attention costs what
it costs in vLLM's own prefill (torch SDPA with masks was ~3x slower per query, measured). Only vLLM's CPU
backend (`CPUAttentionBackendImpl`) is driven this way; others keep kvshelf's dense attention and the final
scatter (`for_backend` returns None).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NULL_BLOCK = 0  # vLLM's placeholder block: never a request's own, shared by every skipped position


def for_backend(attention_layers: Sequence, caches: Sequence[torch.Tensor]):
    """A factory of `PagedBlendAttention` for vLLM's CPU attention backend, or None for any other backend."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    except ImportError:
        return None
    if not attention_layers or not all(isinstance(a.impl, CPUAttentionBackendImpl) for a in attention_layers):
        return None

    def make(block_ids: Sequence[int], block_size: int, end: int) -> PagedBlendAttention:
        if any(getattr(a, "isa", None) is None for a in attention_layers):
            # vLLM's metadata builder names each layer's kernel (`isa`); without it none can be chosen
            raise ValueError("vLLM's attention layers carry no kernel choice (isa)")
        return PagedBlendAttention(attention_layers, caches, block_ids, block_size, end)

    return make


class PagedBlendAttention:
    """`kvshelf.model.vllm_runner.PagedAttention` for one request: tokens [0, end) in `block_ids`."""

    def __init__(
        self, attention_layers: Sequence, caches: Sequence[torch.Tensor], block_ids: Sequence[int], block_size: int, end
    ):
        need = -(-end // block_size)
        if need > len(block_ids):
            raise ValueError(f"tokens up to {end} need {need} blocks, the request has {len(block_ids)}")
        if NULL_BLOCK in block_ids[:need]:
            # vLLM's sliding-window KV manager gives no block to tokens outside the window of the first token
            # it computes (Mistral-style models): the blend's own queries need them
            raise ValueError("some of the region's tokens have no block (vLLM's null block: outside a window)")
        self.layers, self.caches = list(attention_layers), list(caches)
        self.block_size, self.end = block_size, end
        self.block_table = torch.as_tensor(list(block_ids[:need]), dtype=torch.int32)
        tokens = torch.arange(end)
        self.slots = self.block_table.long()[tokens // block_size] * block_size + tokens % block_size
        impls = [a.impl for a in self.layers]
        windows = {impl.sliding_window for impl in impls}
        # As vLLM's metadata builder: the scheduler metadata may assume a window only if every layer has it.
        self._group_window = windows.pop() if len(windows) == 1 else -1
        self._positions: torch.Tensor | None = None  # the token set the cached metadata below is for
        self._meta = None
        self._others: torch.Tensor | None = None

    def attend(self, layer: int, q, k, v, positions: torch.Tensor, kv) -> torch.Tensor:
        if self._positions is not positions:  # the runner keeps one positions tensor until a check layer
            self._prepare(positions)
        attention, cache = self.layers[layer], self.caches[layer]
        impl = attention.impl
        if self._others.numel():
            others = self._others
            k_others = kv.data[layer, 0, :, others].transpose(0, 1).contiguous()
            v_others = kv.data[layer, 1, :, others].transpose(0, 1).contiguous()
            impl.do_kv_cache_update(attention, k_others, v_others, cache, self.slots[others])
        impl.do_kv_cache_update(attention, k.contiguous(), v.contiguous(), cache, self.slots[positions])
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        impl.forward(attention, q.contiguous(), k, v, cache, self._meta, output=out)
        return out

    def _prepare(self, positions: torch.Tensor) -> None:
        from vllm import _custom_ops as ops
        from vllm import envs
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

        if positions.numel() == 0 or int(positions[-1]) >= self.end:
            raise ValueError(f"positions must lie in [0, {self.end})")
        n = positions.numel()
        # runs of consecutive positions: each is one causal query block ending its own sequence
        breaks = torch.nonzero(positions[1:] - positions[:-1] != 1).view(-1) + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
        ends = torch.cat([breaks, torch.tensor([n])])
        query_start_loc = torch.cat([starts, torch.tensor([n])]).to(torch.int32)
        seq_lens = (positions[ends - 1] + 1).to(torch.int32)
        runs = starts.numel()
        max_seq_len = int(seq_lens.max())
        blocks = -(-max_seq_len // self.block_size)
        block_table = self.block_table[:blocks].expand(runs, blocks).contiguous()
        first = self.layers[0]
        impl = first.impl
        scheduler = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=runs,
            num_heads=impl.num_heads,
            num_kv_heads=impl.num_kv_heads,
            head_dim=impl.head_size,
            seq_lens=seq_lens,
            dtype=self.caches[0].dtype,
            query_start_loc=query_start_loc,
            causal=True,
            sliding_window_size=self._group_window,
            isa=first.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None,
            kv_cache_dtype=impl.kv_cache_dtype,
        )
        self._meta = CPUAttentionMetadata(
            num_actual_tokens=n,
            max_query_len=int((ends - starts).max()),
            query_start_loc=query_start_loc,
            max_seq_len=max_seq_len,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=self.slots[positions],
            scheduler_metadata=scheduler,
            causal=True,
        )
        computed = torch.zeros(self.end, dtype=torch.bool)
        computed[positions] = True
        self._others = torch.nonzero(~computed).view(-1)
        self._positions = positions
