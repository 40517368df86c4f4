"""The model runner's working KV for one sequence: one dense tensor, written in place, read per layer.

Layout [layers, 2 (K, V), kv_heads, capacity, head_dim], the same as a cached chunk's, so loading a chunk
is one slice copy and storing one is a slice read.
"""

from __future__ import annotations

import torch

from kvshelf.kvmath.strided_copy import ChunkRowCopier, copy_to_device
from kvshelf.model.reweight import AttentionReweight


class KVBuffer:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, *, dtype, device):
        self.data = torch.zeros(num_layers, 2, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.length = 0  # tokens [0, length) hold valid KV
        # Set by a blend that reweights the question's attention over placed documents (model.reweight);
        # every later forward over this buffer (the prefill's question, each decoded token) applies it.
        self.reweight: AttentionReweight | None = None

    @property
    def capacity(self) -> int:
        return self.data.shape[3]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def token_nbytes(self) -> int:
        """KV bytes of one token over all layers: how loaded bytes are counted everywhere."""
        layers, kv, heads, _capacity, dim = self.data.shape
        return layers * kv * heads * dim * self.data.element_size()

    def _check_room(self, end: int) -> None:
        if end > self.capacity:
            raise ValueError(f"KV buffer holds {self.capacity} tokens, asked to write up to token {end}")

    def load_chunk(self, start: int, kv: torch.Tensor) -> None:
        """Copy a cached chunk [layers, 2, heads, n, dim] into tokens [start, start + n)."""
        self.write_layers(0, self.data.shape[0], start, kv, non_blocking=True)
        self.length = max(self.length, start + kv.shape[3])

    @property
    def device(self) -> torch.device:
        return self.data.device

    def write_layers(self, i: int, j: int, start: int, part: torch.Tensor, *, non_blocking: bool = False) -> None:
        """Copy layers i..j-1 of a cached piece [j - i, 2, heads, n, dim] into tokens [start, start + n)."""
        self._check_room(start + part.shape[3])
        dst = self.data[i:j, :, :, start : start + part.shape[3]]
        if non_blocking and dst.is_cuda and part.device.type == "cpu":
            copy_to_device(dst, part)  # one 2-D memcpy instead of a temporary, a memcpy and a kernel
        else:
            dst.copy_(part, non_blocking=non_blocking)

    def row_copier(self, chunks: list[tuple[int, torch.Tensor, int]]) -> ChunkRowCopier | None:
        """A copier of pinned host chunks (first token, tensor, tokens) into this GPU buffer, group by group
        (the layerwise loader's fast path; `LayerTarget.row_copier`)."""
        for start, _src, tokens in chunks:
            self._check_room(start + tokens)
        return ChunkRowCopier(self.data, chunks)

    def write_layer(self, layer: int, positions: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K and V ([heads, n, dim]) of one layer at `positions` (a slice or index tensor)."""
        self.data[layer, 0, :, positions] = k
        self.data[layer, 1, :, positions] = v

    def layer_kv(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[layer, 0, :, start:end], self.data[layer, 1, :, start:end]

    def tokens(self, end: int | None = None) -> torch.Tensor:
        """View of all layers' KV for tokens [0, end)."""
        return self.data[:, :, :, : self.length if end is None else end]
