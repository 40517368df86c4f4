"""Decoding a request's cached prefix on the device its KV goes to, layer group by layer group.

Where a codec decodes on the target device itself (calibrated cachegen on a CUDA GPU: Codec.decodes_on), a
layerwise loader hands it the chunks' verified stored bytes rather than decoding them on the CPU and
copying the result: the chunks of a request are cut into runs (consecutive chunks of one codec, shape and
dtype), and each run's layers i..j-1 decode in one batched call (Codec.decode_run_on: one staging copy,
one entropy kernel, one inverse transform for all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshelf.codecs.base import Codec


@dataclass(frozen=True)
class _Run:
    codec: Codec
    readers: list  # ChunkReaders of consecutive chunks, each of `shape`
    start: int  # first token of the run in the prompt
    end: int  # one past its last token used (the last chunk may be used in part)
    position: int  # RoPE position of its first chunk
    shape: tuple  # a layer of one chunk: [2, kv_heads, tokens, head_dim]
    dtype: torch.dtype
    num_layers: int


class DeviceDecoding:
    """The runs of one request's chunks, decoded group by group onto `device`."""

    def __init__(self, runs: list[_Run], device: torch.device):
        self.runs, self.device = runs, device

    @classmethod
    def plan(cls, chunks: list, device) -> DeviceDecoding | None:
        """A plan for `chunks` ((ChunkKey, reader) pairs in prompt order), or None unless every chunk is held
        as stored bytes by a codec that decodes on `device`."""
        device = torch.device(device)
        runs: list[_Run] = []
        for key, reader in chunks:
            encoded = reader.encoded_layer(0)
            if encoded is None or not encoded[0].decodes_on(device):
                return None
            codec, meta = encoded[0], reader.meta
            shape, tokens = tuple(meta.shape[1:]), meta.shape[3]
            last = runs[-1] if runs else None
            if (
                last is not None
                and last.codec is codec
                and last.shape == shape
                and last.dtype == meta.dtype
                and last.end == key.start == last.start + len(last.readers) * tokens
                and meta.position == last.position + len(last.readers) * tokens
            ):
                last.readers.append(reader)
                runs[-1] = _Run(
                    codec, last.readers, last.start, key.end, last.position, shape, meta.dtype, last.num_layers
                )
            else:
                runs.append(_Run(codec, [reader], key.start, key.end, meta.position, shape, meta.dtype, meta.shape[0]))
        return cls(runs, device) if runs else None

    def decode(self, i: int, j: int) -> tuple[list[tuple[int, int, torch.Tensor]], torch.Tensor | None]:
        """Layers i..j-1 of every run on the device: ([(start, end, [j - i, 2, heads, end - start, dim])], an
        error flag on the device that must be seen False before the KV is used, or None)."""
        parts, flags = [], []
        for run in self.runs:
            segments = [[r.encoded_layer(k)[1] for r in run.readers] for k in range(i, j)]
            kv, err = run.codec.decode_run_on(
                segments, run.shape, run.dtype, list(range(i, j)), run.num_layers, self.device, run.position
            )
            parts.append((run.start, run.end, kv[:, :, :, : run.end - run.start]))
            if err is not None:
                flags.append(err.reshape(1))
        return parts, (torch.cat(flags).any() if flags else None)
