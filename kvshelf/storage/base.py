"""The storage interface every tier implements: a few verbs over chunk keys."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kvshelf.codecs.base import Codec
from kvshelf.storage.expect import expecting


@dataclass(frozen=True)
class ChunkMeta:
    """What a stored chunk claims to be; checked against the request before its KV is used."""

    fingerprint: bytes  # ModelFingerprint.digest() of the model that computed the KV
    num_tokens: int
    shape: tuple[int, ...]  # [layers, 2 (K, V), kv_heads, tokens, head_dim]
    dtype: torch.dtype
    position: int = 0  # RoPE position its first token was computed at (codecs that undo RoPE need it)


@dataclass(frozen=True)
class StoredChunk:
    meta: ChunkMeta
    kv: torch.Tensor  # CPU tensor of meta.shape and meta.dtype

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's KV, [2, kv_heads, tokens, head_dim] (the same verb as a lazily decoded chunk's)."""
        return self.kv[i]

    def layers(self, i: int, j: int) -> torch.Tensor:
        """Layers i..j-1, [j - i, 2, kv_heads, tokens, head_dim]: one view, one copy for the caller."""
        return self.kv[i:j]

    def encoded_layer(self, i: int) -> None:
        """Decoded already: no stored bytes to hand to a decoder elsewhere (ChunkReader.encoded_layer)."""
        return None

    def encoded_payload(self) -> None:
        return None


class ChunkReader(Protocol):
    """What `StorageBackend.open` returns: a chunk whose layers are read one at a time. `kv` is the whole
    tensor when it is already decoded in memory (a StoredChunk), else None (layers decode on demand)."""

    meta: ChunkMeta
    kv: torch.Tensor | None

    def layer(self, i: int) -> torch.Tensor: ...

    def layers(self, i: int, j: int) -> torch.Tensor: ...

    def encoded_layer(self, i: int) -> tuple[Codec, memoryview] | None:
        """Layer i as stored (its codec and verified segment bytes), for a loader that decodes it elsewhere
        (on a GPU, batched over chunks); None when the reader holds decoded KV."""

    def encoded_payload(self) -> tuple[Codec, memoryview, list[int]] | None:
        """Every layer as stored: (codec, verified payload, layer offsets in it: layer k is offsets[k] to
        offsets[k + 1]), for a loader that cuts layer ranges from a chunk read whole (OpenedRanges); None as
        above."""


class LayerRanges(Protocol):
    """What `StorageBackend.open_ranges` returns: a chunk whose head was read and verified, whose layers' stored
    bytes are read range by range as a loader needs them, each range verified on its own."""

    meta: ChunkMeta
    kv: None
    codec: Codec
    offsets: list[int]  # layer k's segment is offsets[k]..offsets[k + 1] of the payload

    def read(self, i: int, j: int) -> memoryview | None:
        """Layers i..j-1's segments, back to back, verified; None when the object is gone or the range is
        damaged (a miss)."""

    def read_into(self, i: int, j: int, out: memoryview) -> memoryview | None:
        """read() into `out` (writable, exactly the range's bytes: a loader's staging buffer, so that the bytes
        are not copied again before they go to a device): `out`, verified there; None as read()."""

    def file_range(self, i: int, j: int) -> FileRange | None:
        """Where layers i..j-1 lie in a local file and what their segments must hash to, for a reader in another
        process (kvshelf.storage.range_procs; its outcome then goes to refused()); None where they do not lie in
        such a file (read_into then)."""

    def refused(self, err: Exception | None) -> None:
        """A file_range read elsewhere failed: `err` a FormatError (damaged: the object is deleted, as read_into
        would), None (the file was gone)."""


@dataclass(frozen=True)
class FileRange:
    """Layers of a chunk as they lie in a local file: `n` bytes at `at`, their segments `lengths` long, each to
    hash to its `digests` entry (BLAKE3-256 with `mac`, else xxh3-128: storage.digests); `limit`: the most bytes
    the file may hold (a larger one is refused unread)."""

    path: str
    at: int
    n: int
    limit: int
    lengths: tuple[int, ...]
    digests: tuple[bytes, ...]
    mac: bool
    first: int  # the layer of the first segment (named in errors)


def copy_into(out: memoryview, data) -> int:
    """The bytes of `data` (at most out's) into `out`, by numpy (which lets other threads run while it copies,
    unlike a memoryview assignment); their count."""
    src = np.frombuffer(data, np.uint8)
    n = min(src.size, out.nbytes)
    np.frombuffer(out, np.uint8)[:n] = src[:n]
    return n


class OpenedRanges:
    """LayerRanges over a chunk opened (read and verified) whole: what tiers without range reads give."""

    kv = None

    def __init__(self, meta: ChunkMeta, codec: Codec, payload: memoryview, offsets: list[int]):
        self.meta, self.codec, self._payload, self.offsets = meta, codec, payload, offsets

    def read(self, i: int, j: int) -> memoryview:
        return self._payload[self.offsets[i] : self.offsets[j]]

    def read_into(self, i: int, j: int, out: memoryview) -> memoryview:
        data = self.read(i, j)
        if out.nbytes != data.nbytes:
            raise ValueError(f"layers {i}..{j - 1} are {data.nbytes} bytes, not {out.nbytes}")
        copy_into(out, data)  # verified when the chunk was opened; these bytes are a copy of what was checked
        return out

    def file_range(self, i: int, j: int) -> None:
        return None  # in memory already

    def refused(self, err: Exception | None) -> None:
        raise RuntimeError("a chunk opened whole has no file ranges to refuse")


class StorageBackend(ABC):
    """A keyed store of chunks. Implementations must be thread-safe.

    Byte tiers raise on I/O trouble (refused, timeout, disk full); the tier manager turns that into a
    miss or a dropped store. A corrupt or foreign object is never returned: it is a miss.
    """

    name: str = "backend"
    # The codec its objects are stored with; None where it holds decoded tensors (memory).
    codec: Codec | None = None
    # True when put() is cheap enough to run on the request path (memory); others are written behind.
    inline_put: bool = False
    # Calls a prefix's heads (open_many with ranges: small reads, then each head parsed and checked) are cut into on
    # the tier's workers; 0: as many as the caller asks for. Reads that wait on a network gain from running side by
    # side; a local disk answers from the page cache, and its heads cost the reader's own CPU, mostly Python holding
    # the GIL, which threads side by side only hand to each other (issue #17, ninth session).
    head_calls: int = 0

    @abstractmethod
    def put(self, key: bytes, chunk: StoredChunk) -> bool:
        """Store `chunk`; return False if it was not stored (too large, tier full or down)."""

    @abstractmethod
    def get(self, key: bytes) -> StoredChunk | None:
        """The chunk under `key`, or None on a miss."""

    def open(self, key: bytes) -> ChunkReader | None:
        """The chunk under `key` for layer-by-layer reading, or None.
        Tiers that store bytes return it verified but not yet decoded."""
        return self.get(key)

    def open_many(
        self, keys: list[bytes], expected: list | None = None, *, tier: str | None = None, ranges=False, calls: int = 0
    ):
        """open() (open_ranges with `ranges`) of each key in order, each read under its Expected
        (kvshelf.storage.expect), yielding every reader (None: a miss) as it comes; a tier stack reads several
        side by side from the tier `tier` (in `calls` calls to its workers when > 0; here they are one call)."""
        for key, want in zip(keys, expected or [None] * len(keys), strict=True):
            with expecting(want):
                yield self.open_ranges(key) if ranges else self.open(key)

    def open_ranges(self, key: bytes) -> LayerRanges | None:
        """The chunk under `key` for reading layer ranges (its head verified now, each range as it is read), or
        None on a miss or where the tier holds decoded KV. By default the whole object is read and verified
        now and ranges are cut from it; byte tiers read the head now and each range when asked."""
        reader = self.open(key)
        encoded = reader.encoded_payload() if reader is not None else None
        return None if encoded is None else OpenedRanges(reader.meta, *encoded)

    def run_many(self, calls, *, tier: str | None = None):
        """fn(*args) of each (fn, args) in `calls`, in order, yielding each result as it comes: a tier stack runs
        them side by side on the workers of the tier `tier` (reads of LayerRanges it opened)."""
        for fn, args in calls:
            yield fn(*args)

    def tier_codec(self, name: str) -> Codec | None:
        """The codec of the tier named `name` (as locate() names it): None where it holds decoded tensors."""
        return self.codec if name == self.name else None

    @abstractmethod
    def contains(self, key: bytes) -> bool: ...

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        """Batched contains (one round trip on remote tiers)."""
        return [self.contains(k) for k in keys]

    @abstractmethod
    def delete(self, key: bytes) -> None: ...

    @abstractmethod
    def clear(self) -> None: ...

    def locate(self, keys: list[bytes]) -> list[str | None]:
        """For each key, the name of the tier that holds it, or None (one batched call)."""
        return [self.name if here else None for here in self.contains_many(keys)]

    def flush(self, timeout_s: float | None = None) -> None:  # noqa: B027 - nothing queued by default
        """Wait until writes behind the request path are done (a tier stack's write-behind)."""

    def stats(self) -> dict[str, dict]:
        """Counters per tier (a tier stack's); a plain backend reports none."""
        return {}

    # Stored objects that failed verification and were deleted (byte tiers count them).
    corrupt_objects: int = 0

    def unavailable_tiers(self) -> list[str]:
        """Names of tiers being skipped right now (an open circuit breaker); a plain backend has none."""
        return []

    @property
    @abstractmethod
    def used_bytes(self) -> int | None:
        """Bytes held, or None where the tier cannot tell cheaply (remote stores)."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int | None:
        """Byte capacity, or None where the store itself manages space (Redis maxmemory, S3)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most tiers hold nothing to release
        """Release connections and threads."""
