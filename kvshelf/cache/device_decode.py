"""Decoding a request's cached prefix on the device its KV goes to, layer group by layer group.

Where a codec decodes on the target device itself (calibrated cachegen on a CUDA GPU: Codec.decodes_on), a
layerwise loader hands it the chunks' verified stored bytes rather than decoding them on the CPU and
copying the result. The chunks are cut into runs (consecutive chunks of one codec, shape and dtype) whose
layers i..j-1 decode in one batched call (one entropy kernel, one inverse transform for all of them).

A plan is made either from chunks opened already (`plan`: each group's segments are checked and staged
as it decodes, Codec.decode_run_on) or from chunks located but not yet read (`streamed`): the loader
thread then reads them itself (several reads in flight within the tier's workers, into pinned memory),
and each chunk's payload is queued to the device as soon as it is there (Codec.stage_chunk_on), so the
copies overlap the reads and the request's compute starts without waiting for them; each group's
segments are checked as it decodes (Codec.decode_staged_on).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from kvshelf.codecs.base import Codec


class ChunkNotDecodable(RuntimeError):
    """A chunk of a streamed plan was missing, damaged or not what the plan expected: the request recomputes."""


@dataclass(frozen=True)
class _Run:
    codec: Codec
    first: int  # index of its first chunk among the request's
    count: int  # consecutive chunks, each of `shape`
    start: int  # first token of the run in the prompt
    end: int  # one past its last token used (the last chunk may be used in part)
    position: int  # RoPE position of its first chunk
    shape: tuple  # a layer of one chunk: [2, kv_heads, tokens, head_dim]
    dtype: torch.dtype
    num_layers: int


def _runs(specs: list[tuple]) -> list[_Run]:
    """specs: (codec, start, end, position, shape, dtype, num_layers) per chunk in prompt order."""
    runs: list[_Run] = []
    for k, (codec, start, end, position, shape, dtype, layers) in enumerate(specs):
        last = runs[-1] if runs else None
        tokens = shape[2]
        if (
            last is not None
            and last.codec is codec
            and last.shape == shape
            and last.dtype == dtype
            and last.end == start == last.start + last.count * tokens
            and position == last.position + last.count * tokens
        ):
            runs[-1] = _Run(codec, last.first, last.count + 1, last.start, end, last.position, shape, dtype, layers)
        else:
            runs.append(_Run(codec, k, 1, start, end, position, shape, dtype, layers))
    return runs


class DeviceDecoding:
    """The runs of one request's chunks, staged chunk by chunk and decoded group by group onto `device`."""

    def __init__(self, runs: list[_Run], device: torch.device, readers: list | None, opener: Callable | None):
        self.runs, self.device = runs, device
        self.num_chunks = sum(r.count for r in runs)
        self._readers = readers  # opened already (plan), or None: opener() yields them in order (streamed)
        self._opener = opener
        self._staged: list = [None] * self.num_chunks
        self._run_of = [r for r in runs for _ in range(r.count)]

    @classmethod
    def plan(cls, chunks: list, device) -> DeviceDecoding | None:
        """A plan for `chunks` ((ChunkKey, reader) pairs in prompt order, opened), or None unless every chunk
        is held as stored bytes by a codec that decodes on `device`."""
        device = torch.device(device)
        specs = []
        for key, reader in chunks:
            encoded = reader.encoded_layer(0)
            if encoded is None or not encoded[0].decodes_on(device):
                return None
            meta = reader.meta
            specs.append(
                (encoded[0], key.start, key.end, meta.position, tuple(meta.shape[1:]), meta.dtype, meta.shape[0])
            )
        return cls(_runs(specs), device, [r for _, r in chunks], None) if specs else None

    @classmethod
    def streamed(cls, specs: list[tuple], device, opener: Callable[[], Generator]) -> DeviceDecoding:
        """A plan for chunks located but not read: specs as _runs takes them; opener() yields each chunk's
        verified reader in order (None: it could not be read or verified)."""
        return cls(_runs(specs), torch.device(device), None, opener)

    @property
    def streaming(self) -> bool:
        return self._opener is not None

    def open(self, on_staged: Callable[[int], None] | None = None) -> None:
        """A streamed plan: read and stage every chunk in order, on_staged(n) after the first n are staged;
        raises ChunkNotDecodable for a chunk missing, damaged or unlike the plan. A plan of chunks opened
        already has nothing to do: each layer group stages its segments as it decodes (decode_run_on), so
        the host side of one group overlaps the device side of the one before."""
        if self._opener is None:
            return
        stream = self._opener()
        try:
            for k in range(self.num_chunks):
                self._staged[k] = self._stage(k, next(stream, None))
                if on_staged is not None:
                    on_staged(k + 1)
        finally:
            stream.close()  # ends the reads still in flight (on an error)

    def _stage(self, k: int, reader):
        run = self._run_of[k]
        encoded = reader.encoded_payload() if reader is not None else None
        if encoded is None:
            raise ChunkNotDecodable(f"chunk {k} of the prefix could not be read (a miss or a damaged object)")
        codec, payload, offsets = encoded
        meta = reader.meta
        if codec is not run.codec or tuple(meta.shape[1:]) != run.shape or meta.dtype != run.dtype:
            raise ChunkNotDecodable(f"chunk {k} is not coded as planned ({codec.name}, {tuple(meta.shape)})")
        return run.codec.stage_chunk_on(payload, offsets, run.shape, self.device)

    def decode(self, i: int, j: int, lo: int = 0, hi: int | None = None) -> tuple[list, torch.Tensor | None]:
        """Layers i..j-1 of chunks lo..hi-1 on the device: ([(start, end, [j - i, 2, heads, end - start, dim])],
        an error flag on the device that must be seen False before the KV is used, or None)."""
        hi = self.num_chunks if hi is None else hi
        parts, flags = [], []
        for run in self.runs:
            a, b = max(lo, run.first), min(hi, run.first + run.count)
            if a >= b:
                continue
            skip = (a - run.first) * run.shape[2]
            at = (run.shape, run.dtype)
            if self._readers is not None:  # opened already: the stored segments, staged by the codec per group
                segments = [[self._readers[k].encoded_layer(m)[1] for k in range(a, b)] for m in range(i, j)]
                kv, err = run.codec.decode_run_on(
                    segments, *at, list(range(i, j)), run.num_layers, self.device, run.position + skip
                )
            else:
                staged = self._staged[a:b]
                if any(x is None for x in staged):
                    raise ChunkNotDecodable(f"chunks {a}..{b - 1} decoded before they were read")
                kv, err = run.codec.decode_staged_on(
                    staged, i, j, *at, run.num_layers, self.device, run.position + skip
                )
            start, end = run.start + skip, min(run.start + (b - run.first) * run.shape[2], run.end)
            parts.append((start, end, kv[:, :, :, : end - start]))
            if err is not None:
                flags.append(err.reshape(1))
        return parts, (torch.cat(flags).any() if flags else None)

    def num_tokens_bytes(self, i: int, j: int) -> int:
        """Bytes of layers i..j-1 of every chunk's used tokens in their decoded dtype."""
        total = 0
        for run in self.runs:
            two, heads, _, dim = run.shape
            total += (j - i) * two * heads * (run.end - run.start) * dim * run.dtype.itemsize
        return total

    def release(self) -> None:
        """Drop the staged chunks (their device copies) once every layer is decoded."""
        self._staged = [None] * self.num_chunks
