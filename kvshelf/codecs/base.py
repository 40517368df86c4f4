"""Codec interface: how one layer of a chunk's KV becomes bytes and back.

A chunk is encoded layer by layer so that one layer decodes alone (layerwise loading). A segment must be
self-contained: everything needed to decode it is in the segment plus the codec's params and the chunk's
`position` (the RoPE position of its first token), which are stored in the chunk header so decoding never
depends on the reader's configuration.
"""

from __future__ import annotations

import functools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch


class Codec(ABC):
    name: str
    # True when a chunk's payload is its tensor's bytes in layer order, so it can be viewed without decoding.
    raw_layout: bool = False

    def params(self) -> dict:
        """Settings that decoding needs; recorded in every chunk header."""
        return {}

    @abstractmethod
    def encode_layer(self, kv: torch.Tensor, layer: int, num_layers: int, position: int = 0) -> bytes | memoryview:
        """Encode one layer's KV, [2, kv_heads, tokens, head_dim], on CPU, computed at positions position..."""

    @abstractmethod
    def decode_layer(
        self,
        data: memoryview,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        layer: int,
        num_layers: int,
        position: int = 0,
    ) -> torch.Tensor:
        """Decode a segment back to a [2, kv_heads, tokens, head_dim] tensor of `dtype`."""

    def max_segment_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """The largest segment this codec writes for one layer of `shape` ([2, kv_heads, tokens, head_dim]):
        readers refuse larger objects before reading them. Default: the raw size."""
        return _numel(shape) * dtype.itemsize

    def encode_layers(self, kv: torch.Tensor, position: int = 0) -> list[bytes | memoryview]:
        """Encode every layer of a chunk, [layers, 2, kv_heads, tokens, head_dim]; codecs may spread the
        layers over several cores."""
        return [self.encode_layer(kv[i], i, kv.shape[0], position) for i in range(kv.shape[0])]

    def decode_layers(
        self,
        segments: list,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        layers: list[int],
        num_layers: int,
        position: int = 0,
    ):
        """Decode several segments (of the given layer indices) of one chunk; may use several cores."""
        return [
            self.decode_layer(seg, shape, dtype, i, num_layers, position)
            for seg, i in zip(segments, layers, strict=True)
        ]

    def decode_stacked(self, segments: list, shape, dtype, layers: list[int], num_layers: int, position: int = 0):
        """decode_layers as one tensor [len(layers), *shape]; codecs that decode a chunk into one tensor return
        it (no second copy of the chunk's KV)."""
        return torch.stack(self.decode_layers(segments, shape, dtype, layers, num_layers, position))

    def decode_layer_on(self, data, shape, dtype, layer: int, num_layers: int, device, position: int = 0):
        """Decode straight onto `device`; codecs that can finish decoding there (dequantise on a GPU) do."""
        return self.decode_layer(data, shape, dtype, layer, num_layers, position).to(device)

    def decodes_on(self, device) -> bool:
        """True when decode_run_on does its work on `device` itself, batched over chunks and layers (a GPU
        decoder): a layerwise loader then hands it the stored bytes instead of decoding on the CPU first."""
        return False

    def decode_run_on(self, segments, shape, dtype, layers, num_layers: int, device, position: int):
        """Layers `layers` of a run of consecutive chunks of the same `shape` ([2, kv_heads, tokens,
        head_dim]; segments[l][c]: layer layers[l] of chunk c, the first chunk at RoPE `position`, each
        next one `tokens` later) decoded onto `device` as one tensor [len(layers), 2, kv_heads, chunks *
        tokens, head_dim] of `dtype`, and an error flag: None, or a boolean tensor on `device` that the
        caller must see False before it uses the KV (a GPU decoder does not wait for its own check)."""
        tokens = shape[2]
        out = [
            torch.cat(
                [
                    self.decode_layer_on(seg, shape, dtype, layer, num_layers, device, position + c * tokens)
                    for c, seg in enumerate(row)
                ],
                dim=2,
            )
            for row, layer in zip(segments, layers, strict=True)
        ]
        return torch.stack(out), None

    def stage_run_on(self, segments, shape, dtype, layers, num_layers: int, device, position: int) -> Callable:
        """decode_run_on in two steps: what runs on the CPU (checks, staging into host memory) now, and a callable
        that queues the device's share later and returns what decode_run_on returns, so that a loader stages one
        layer group while the device decodes the one before. Here: everything later (no CPU share to split)."""
        return functools.partial(self.decode_run_on, segments, shape, dtype, layers, num_layers, device, position)

    def decode_chunks_on(self, segments, shape, dtype, layer: int, num_layers: int, device, positions) -> list:
        """One layer of several chunks of the same `shape` (their segments, at RoPE `positions`) decoded onto
        `device`; codecs that batch their work over chunks (cachegen on a GPU: one kernel) do."""
        return [
            self.decode_layer_on(seg, shape, dtype, layer, num_layers, device, pos)
            for seg, pos in zip(segments, positions, strict=True)
        ]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (any dtype, bf16 included), without a copy when the
    tensor is contiguous. The view keeps the tensor's memory alive."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


class BackToBack(list):
    """Segments (memoryviews) that lie back to back in one buffer, as a stored chunk's consecutive layers do:
    `joined` is all of them as one memoryview, `ends[k]` where segment k ends in it. A plain list to any
    codec; one that decodes a chunk's segments as one buffer (calibrated cachegen) reads `joined` instead of
    joining them, a copy of the chunk's bytes saved (issue #17, twelfth session)."""

    def __init__(self, buffer: memoryview, offsets: list[int]):
        """Segment k = buffer[offsets[k] : offsets[k + 1]] (offsets ascending, at least one)."""
        first = offsets[0]
        super().__init__(buffer[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True))
        self.joined = buffer[first : offsets[-1]]
        self.ends = [b - first for b in offsets[1:]]

    @classmethod
    def layers(cls, buffer: memoryview, offsets: list[int], layers: list[int]) -> list:
        """Segments `layers` of a payload (layer k = buffer[offsets[k] : offsets[k + 1]]): a BackToBack where the
        layers are consecutive, else a plain list."""
        if layers and layers == list(range(layers[0], layers[-1] + 1)):
            return cls(buffer, offsets[layers[0] : layers[-1] + 2])
        return [buffer[offsets[k] : offsets[k + 1]] for k in layers]


def tensor_view(data: memoryview | bytes | bytearray, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor over `data` without a copy. Read-only by contract when `data` is immutable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we never write into it
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


class SegmentRows(list):
    """segments[l][c] (layer l of a layer group, chunk c) as Codec.decode_run_on takes them, where each chunk's
    layers lie back to back in one buffer: spans[c] holds chunk c's, layer l from offsets[c, l] to offsets[c, l + 1]
    (offsets[c, 0] is 0), so that a codec that copies them (to stage them for a GPU) copies one span per chunk."""

    def __init__(self, spans: list, offsets: np.ndarray):
        rows = offsets.tolist()
        super().__init__(
            [[span[o[m] : o[m + 1]] for span, o in zip(spans, rows, strict=True)] for m in range(offsets.shape[1] - 1)]
        )
        self.spans, self.offsets = spans, offsets

    @classmethod
    def of(cls, payloads: list[tuple], i: int, j: int) -> SegmentRows:
        """Layers i..j-1 of chunks given as (payload, layer offsets: layer k is offsets[k]..offsets[k + 1])."""
        at = np.array([offs[i : j + 1] for _, offs in payloads], dtype=np.int64).reshape(len(payloads), j - i + 1)
        spans = [payload[a:b] for (payload, _), (a, b) in zip(payloads, at[:, [0, -1]].tolist(), strict=True)]
        return cls(spans, at - at[:, :1])
