"""Base for tiers that hold bytes (disk, Redis, S3): encode with the tier's codec, verify on every read.

Objects are stored under a name derived from the chunk key and the tier's codec (its parameters and
cachegen calibration included), keyed with `remote_auth_key` when there is one (kvshelf.storage.auth).
Instances with other codecs, calibrations or secrets therefore use other names: they neither read nor
block each other's objects. Reads are held to what the engine expects (kvshelf.storage.expect): an
object larger than the largest encoding of the expected chunk is refused before it is read, and its
header is checked before anything decodes.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod

import torch

from kvshelf.codecs import Codec
from kvshelf.metrics import Metrics
from kvshelf.storage import expect
from kvshelf.storage.auth import ObjectAuth, codec_id, object_name
from kvshelf.storage.base import FileRange, StorageBackend, StoredChunk, copy_into
from kvshelf.storage.expect import GENERIC, MAX_HEADER_BYTES, Expected
from kvshelf.storage.format import (
    PREFIX_SIZE,
    ChunkHead,
    EncodedChunk,
    FormatError,
    encode_chunk_parts,
    head_size,
    object_size,
    open_chunk,
    open_head,
)

log = logging.getLogger(__name__)


class ObjectTooLarge(FormatError):
    """A stored object is larger than any chunk this read could expect; refused before reading it."""


class ByteStore(StorageBackend):
    head_probe = 16 << 10  # bytes read to verify an object's head (open_ranges; a 32-layer model's takes ~3 KB)

    def __init__(self, codec: Codec, *, auth: ObjectAuth | None = None, metrics: Metrics | None = None):
        self.auth = auth
        self.metrics = metrics or Metrics()  # the shelf's, where codec timings are observed
        self.use_codec(codec)
        self.corrupt_objects = 0  # objects that failed verification and were deleted
        self._corrupt_lock = threading.Lock()

    # Subclasses implement raw byte access under a string name (object_name of the key and codec).
    @abstractmethod
    def _put_bytes(self, name: str, parts: list[bytes | memoryview]) -> bool:
        """Store the concatenation of `parts` (passed unjoined so writers can skip a copy)."""

    @abstractmethod
    def _get_bytes(self, name: str, limit: int) -> bytes | None:
        """The object, or None when there is none; raise ObjectTooLarge, without reading it, when it is
        larger than `limit` bytes."""

    def _get_range(self, name: str, start: int, length: int, limit: int) -> bytes | memoryview | None:
        """`length` bytes of the object from byte `start` (fewer where the object ends first: the format's
        checks refuse that); None when there is no object; ObjectTooLarge for an object larger than `limit`.
        By default a whole read, cut."""
        blob = self._get_bytes(name, limit)
        return None if blob is None else memoryview(blob)[start : start + length]

    def _file_of(self, name: str) -> str | None:
        """The local file an object lies in, for a reader in another process (disk tier), or None: not in a local
        file, or not here."""
        return None

    def _get_range_into(self, name: str, start: int, out: memoryview, limit: int) -> int | None:
        """_get_range into `out` (its length the bytes asked for): the bytes read (fewer where the object ends
        first), or None when there is no object. By default a read, copied; tiers that can read into a buffer
        (disk: os.preadv) skip that copy."""
        data = self._get_range(name, start, out.nbytes, limit)
        return None if data is None else copy_into(out, data)

    @abstractmethod
    def _delete_name(self, name: str) -> None: ...

    def _forget_name(self, name: str) -> None:  # noqa: B027 - only tiers with an index of their own keep one
        """An object found gone by a read elsewhere (file_range): dropped from the tier's index, if it keeps one."""

    @property
    def codec(self) -> Codec:
        return self._coding[0]

    def use_codec(self, codec: Codec) -> None:
        """Code with `codec` from now on (auto-calibration switches a tier once its calibration exists).
        Objects are named by their codec, so objects of the previous codec are no longer found (misses)."""
        self._coding = (codec, codec_id(codec.name, codec.params()))  # one assignment: readers see a pair

    def name_of(self, key: bytes) -> str:
        return object_name(key, self._coding[1], self.auth)

    def max_object_bytes(self, expected: Expected | None, codec: Codec | None = None) -> int:
        """The largest object a read expecting `expected` can accept (this tier's codec)."""
        if expected is None:
            return GENERIC.max_object_bytes
        layers, _, heads, tokens, dim = expected.largest_shape()
        seg = (codec or self.codec).max_segment_bytes((2, heads, tokens, dim), torch.float32)  # widest dtype
        return PREFIX_SIZE + MAX_HEADER_BYTES + layers * seg

    def put(self, key: bytes, chunk: StoredChunk) -> bool:
        if chunk.meta.num_tokens > GENERIC.max_tokens or chunk.kv.numel() > GENERIC.max_values:
            return False  # no read would accept it (e.g. a blended document longer than 8192 tokens)
        codec, name_id = self._coding
        t0 = time.perf_counter()
        parts = encode_chunk_parts(key, chunk, codec, self.auth)
        self.metrics.observe_codec(
            codec.name, "encode", time.perf_counter() - t0, chunk.nbytes, sum(len(p) for p in parts)
        )
        return self._put_bytes(object_name(key, name_id, self.auth), parts)

    def get(self, key: bytes, expected: Expected | None = None) -> StoredChunk | None:
        encoded = self.open(key, expected)
        if encoded is None:
            return None
        t0 = time.perf_counter()
        try:
            chunk = encoded.decode_all()
        except FormatError as err:
            self._reject(key, err)
            return None
        self.metrics.observe_codec(self.codec.name, "decode", time.perf_counter() - t0, chunk.nbytes, 0)
        return chunk

    def open(self, key: bytes, expected: Expected | None = None) -> EncodedChunk | None:
        """Fetch and verify the object; layers decode when asked for. `expected` defaults to the engine's
        expectation for this read (kvshelf.storage.expect.expecting). I/O errors propagate (tier faults)."""
        expected = expected or expect.current()
        codec, name_id = self._coding
        try:
            name, limit = object_name(key, name_id, self.auth), self.max_object_bytes(expected, codec)
            blob = self._get_bytes(name, limit)
            if blob is None:
                return None
            return open_chunk(blob, key, codec, auth=self.auth, expected=expected)
        except FormatError as err:
            self._reject(key, err)
            return None

    def open_ranges(self, key: bytes, expected: Expected | None = None) -> RangedChunk | None:
        """Read and verify the object's head only (one read of `head_probe` bytes: a small object comes whole);
        its layer ranges are read and verified when asked for (RangedChunk.read)."""
        expected = expected or expect.current()
        codec, name_id = self._coding
        try:
            name, limit = object_name(key, name_id, self.auth), self.max_object_bytes(expected, codec)
            probe = self.head_probe
            blob = self._get_range(name, 0, probe, limit)
            if blob is None:
                return None
            size = head_size(blob)
            if size > len(blob) and len(blob) == probe:  # a header longer than the probe: the rest of it
                rest = self._get_range(name, probe, size - probe, limit)
                blob = bytes(blob) + bytes(rest or b"")
            if len(blob) > object_size(blob):  # came whole with the probe, longer than it is: as a whole read
                raise FormatError(f"object of {len(blob)} bytes is longer than its prefix says")
            head = open_head(blob, key, codec, auth=self.auth, expected=expected)
            # the payload's first bytes, read with the head (all of it for a small object): ranges within them
            # are not read again
            prefix = memoryview(blob)[head.start : head.size]
        except FormatError as err:
            self._reject(key, err)
            return None
        return RangedChunk(self, key, name, head, prefix)

    def _reject(self, key: bytes, err: Exception) -> None:
        log.warning("%s tier: deleting damaged object for chunk %s: %s", self.name, key.hex(), err)
        with self._corrupt_lock:
            self.corrupt_objects += 1
        self._delete_name(self.name_of(key))

    def delete(self, key: bytes) -> None:
        self._delete_name(self.name_of(key))

    # Remote stores manage their own space (Redis maxmemory, S3 lifecycle); the disk tier overrides these.
    @property
    def used_bytes(self) -> int | None:
        return None

    @property
    def capacity_bytes(self) -> int | None:
        return None


class RangedChunk:
    """A byte tier's object whose head was read and verified (LayerRanges): each layer range is read when asked
    for and used only once its digests match; a damaged range deletes the object, like any damage."""

    kv = None

    def __init__(self, store: ByteStore, key: bytes, name: str, head: ChunkHead, prefix: memoryview):
        self.meta, self.codec, self.offsets = head.meta, head.codec, head.offsets
        # the payload's first bytes, read with the head (ByteStore.head_probe)
        self._store, self._key, self._name, self._head, self._prefix = store, key, name, head, prefix

    def read(self, i: int, j: int) -> memoryview | None:
        at, n = self._head.span(i, j)
        try:
            if at - self._head.start + n <= self._prefix.nbytes:  # came with the head
                data = self._prefix[at - self._head.start : at - self._head.start + n]
            else:
                data = self._store._get_range(self._name, at, n, self._head.size)
                if data is None:
                    return None  # gone since the head was read (evicted, deleted)
            return self._head.check(i, j, data)
        except FormatError as err:
            self._store._reject(self._key, err)
            return None

    def read_into(self, i: int, j: int, out: memoryview) -> memoryview | None:
        at, n = self._head.span(i, j)
        if out.nbytes != n:
            raise ValueError(f"layers {i}..{j - 1} are {n} bytes, not {out.nbytes}")
        try:
            if at - self._head.start + n <= self._prefix.nbytes:  # came with the head
                got = copy_into(out, self._prefix[at - self._head.start : at - self._head.start + n])
            else:
                got = self._store._get_range_into(self._name, at, out, self._head.size)
                if got is None:
                    return None  # gone since the head was read (evicted, deleted)
            return self._head.check(i, j, out[:got])  # every digest, on the bytes as they lie in `out`
        except FormatError as err:
            self._store._reject(self._key, err)
            return None

    def file_range(self, i: int, j: int) -> FileRange | None:
        at, n = self._head.span(i, j)
        if at - self._head.start + n <= self._prefix.nbytes:  # came with the head: read_into copies it
            return None
        path = self._store._file_of(self._name)
        if path is None:
            return None
        offs, head = self.offsets, self._head
        lengths = tuple(offs[k + 1] - offs[k] for k in range(i, j))
        return FileRange(path, at, n, head.size, lengths, tuple(head.digests[i:j]), head.mac, i)

    def refused(self, err: Exception | None) -> None:
        if err is None:
            self._store._forget_name(self._name)
        else:
            self._store._reject(self._key, err)
