"""Codec interface: how one layer of a chunk's KV becomes bytes and back.

A chunk is encoded layer by layer so that one layer decodes alone (layerwise loading). A segment must be
self-contained: everything needed to decode it is in the segment plus the codec's params, which are
stored in the chunk header so decoding never depends on the reader's configuration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Codec(ABC):
    name: str

    def params(self) -> dict:
        """Settings that decoding needs; recorded in every chunk header."""
        return {}

    @abstractmethod
    def encode_layer(self, kv: torch.Tensor, layer: int, num_layers: int) -> bytes:
        """Encode one layer's KV, [2, kv_heads, tokens, head_dim], on CPU."""

    @abstractmethod
    def decode_layer(
        self, data: memoryview, shape: tuple[int, ...], dtype: torch.dtype, layer: int, num_layers: int
    ) -> torch.Tensor:
        """Decode a segment back to a [2, kv_heads, tokens, head_dim] tensor of `dtype`."""


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor (any dtype, bf16 included)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: memoryview | bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    buf = bytearray(data)  # a private, writable copy: the result must not alias the caller's buffer
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
