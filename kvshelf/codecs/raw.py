"""`none`: the KV bytes as they are. Lossless; the hot tier's codec."""

from __future__ import annotations

import torch

from kvshelf.codecs.base import Codec, tensor_bytes, tensor_view


class RawCodec(Codec):
    name = "none"
    raw_layout = True

    def encode_layer(self, kv: torch.Tensor, layer: int, num_layers: int, position: int = 0) -> memoryview:
        return tensor_bytes(kv)

    def decode_layer(self, data, shape, dtype, layer, num_layers, position=0) -> torch.Tensor:
        expected = torch.Size(shape).numel() * dtype.itemsize
        if len(data) != expected:
            raise ValueError(f"raw segment has {len(data)} bytes, expected {expected}")
        return tensor_view(data, dtype, shape)
