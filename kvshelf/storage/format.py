"""kvshelf's byte format for one stored chunk. Self-describing, versioned, checksummed, optionally
authenticated, verifiable layer by layer; never pickle.

    offset  size  field
    0       4     magic b"KVSH"
    4       2     format version (little-endian u16), 3
    6       2     flags: bit 0 = the MAC field holds a MAC; other bits 0
    8       4     header length H (u32, at most 64 KiB)
    12      8     xxh3-64 of the header bytes
    20      8     payload length (u64; equals the header's last layer offset)
    28      32    keyed BLAKE3 MAC over (domain, chunk key, bytes 0..27, header: kvshelf.storage.auth); zeros
                  without a MAC
    60      H     header: UTF-8 JSON object, exactly these fields: key (hex; keyed with a MAC key:
                  kvshelf.storage.auth.key_field), model (a tag of the model
                  fingerprint bound to the key: kvshelf.storage.auth.model_tag), codec, codec_params,
                  dtype, shape [layers, 2, kv_heads, tokens, head_dim], num_tokens, position (RoPE
                  position of the first token), layer_offsets (one segment per layer), layer_digests (each
                  layer segment's digest, hex: BLAKE3-256 in an object with a MAC, collision-resistant
                  since the MAC covers the head only; xxh3-128 in one without, which only a damage
                  check needs: without a MAC the store is trusted as is)
    60+H    ...   payload: one codec segment per layer, back to back

The MAC covers the prefix and the header, and the header holds a collision-resistant digest of every
segment, so one check of the head (prefix + header) vouches for each segment on its own: a reader may
fetch byte ranges (the head, then layer segments as it needs them: ChunkHead) and verify each as it
arrives, or read the whole object (open_chunk: the head, then every segment). Reading checks the MAC
first when the reader has a key (a hostile header is never even parsed), then the header checksum, then
every header field's type and range against what the read expects (shape, dtype, tokens, the largest
segment the codec can write) before anything is decoded or a segment is fetched; a segment is used only
once its length and digest match. Whatever goes wrong while parsing or decoding stored bytes is a
FormatError, which tiers turn into a miss and a delete. Objects of versions 1 and 2 (one checksum and
MAC over the whole payload) are misses.
"""

from __future__ import annotations

import hmac
import json
import re
import struct

import torch
import xxhash

from kvshelf.codecs import Codec, get_codec
from kvshelf.codecs.base import BackToBack, tensor_view
from kvshelf.codecs.calibration import MissingCalibration
from kvshelf.codecs.pool import CodecPoolError
from kvshelf.errors import KVShelfError
from kvshelf.storage.auth import MAC_SIZE, ObjectAuth, key_field, model_tag
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.digests import segment_digest
from kvshelf.storage.expect import GENERIC, MAX_HEADER_BYTES, MAX_POSITION, Expected

MAGIC = b"KVSH"
FORMAT_VERSION = 3
FLAG_MAC = 1
_PREFIX = struct.Struct("<4sHHIQQ32s")
PREFIX_SIZE = _PREFIX.size  # 60
_MAC_AT = PREFIX_SIZE - MAC_SIZE  # the MAC covers the prefix bytes before it
_NO_MAC = bytes(MAC_SIZE)
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}
_FIELDS = {
    "key",
    "model",
    "codec",
    "codec_params",
    "dtype",
    "shape",
    "num_tokens",
    "position",
    "layer_offsets",
    "layer_digests",
}
# Each layer segment's digest: BLAKE3-256 in an object with a MAC (collision-resistant: the MAC covers the head
# only), xxh3-128 in one without (damage only: without a MAC the store is trusted as is, and xxh3 is ~6x faster)
_DIGEST_HEX = {True: re.compile(r"[0-9a-f]{64}\Z"), False: re.compile(r"[0-9a-f]{32}\Z")}
_MAX_DEPTH = 3  # {"codec_params": {...}} and lists inside the object: deeper is not a kvshelf header
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')  # JSON strings, escapes in them
_PLAIN_STRINGS = re.compile(rb'"[^"]*"')  # the same where there is no backslash
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


class FormatError(KVShelfError):
    """A stored object is truncated, corrupted, forged, of an unknown version, or not the object asked for."""


class OtherVersion(FormatError):
    """An object of another format version (e.g. written before an upgrade): a miss, like any damage."""


class UnreadableHere(FormatError):
    """A sound object this process cannot decode (its cachegen calibration is not here)."""


def seal(key: bytes, header: dict, payload_len: int, auth: ObjectAuth | None = None) -> bytes:
    """The head of an object (prefix + header) for `header` as given: checksum, payload length and, with
    `auth`, the MAC over both. The encoder's last step (and what a test's forger would write)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    flags = FLAG_MAC if auth is not None else 0
    prefix = bytearray(
        _PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(head), xxhash.xxh3_64_intdigest(head), payload_len, _NO_MAC)
    )
    if auth is not None:
        prefix[_MAC_AT:] = auth.mac(key, bytes(prefix[:_MAC_AT]) + head)
    return bytes(prefix) + head


def encode_chunk_parts(
    key: bytes, chunk: StoredChunk, codec: Codec, auth: ObjectAuth | None = None
) -> list[bytes | memoryview]:
    """The encoded object as a list of buffers (prefix + header, then one segment per layer), so that
    writers can send it without joining; raw segments are views of the tensor, not copies."""
    kv = chunk.kv
    segments = codec.encode_layers(kv, chunk.meta.position)
    offsets = [0]
    for seg in segments:
        offsets.append(offsets[-1] + memoryview(seg).nbytes)
    header = {
        "key": key_field(key, auth),
        "model": model_tag(chunk.meta.fingerprint, key, auth),
        "codec": codec.name,
        "codec_params": codec.params(),
        "dtype": str(kv.dtype).removeprefix("torch."),
        "shape": list(kv.shape),
        "num_tokens": chunk.meta.num_tokens,
        "position": chunk.meta.position,
        "layer_offsets": offsets,
        "layer_digests": [segment_digest(seg, auth is not None).hex() for seg in segments],
    }
    return [seal(key, header, offsets[-1], auth), *segments]


def encode_chunk(key: bytes, chunk: StoredChunk, codec: Codec, auth: ObjectAuth | None = None) -> bytes:
    return b"".join(encode_chunk_parts(key, chunk, codec, auth))


def _json_depth(head: bytes) -> int:
    """Bracket depth outside strings (up to _MAX_DEPTH + 1); strings and other bytes cut by compiled calls first
    (a walk of every token was half of a header's parse: issue #17)."""
    depth = deepest = 0
    strings = _STRINGS if b"\\" in head else _PLAIN_STRINGS
    for c in strings.sub(b"", head).translate(None, _NOT_BRACKETS):
        if c in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > _MAX_DEPTH:
                    break
        else:
            depth -= 1
    return deepest


def _prefix(view: memoryview) -> tuple[int, int, int, int, bytes]:
    if len(view) < PREFIX_SIZE:
        raise FormatError(f"object of {len(view)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    magic, version, flags, head_len, head_sum, payload_len, mac = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise FormatError(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise OtherVersion(f"format version {version} is not supported (this kvshelf reads {FORMAT_VERSION})")
    if flags & ~FLAG_MAC:
        raise FormatError(f"unknown prefix flags {flags:#x}")
    if not flags & FLAG_MAC and mac != _NO_MAC:
        raise FormatError("MAC field of an object without a MAC is not zero")
    if head_len > MAX_HEADER_BYTES:
        raise FormatError(f"header of {head_len} bytes is larger than {MAX_HEADER_BYTES}")
    return flags, head_len, head_sum, payload_len, mac


def head_size(blob: bytes | memoryview) -> int:
    """Bytes of the head (prefix + header) of the object `blob` begins with (its prefix at least): what a
    range reader fetches first."""
    return _sizes(blob)[0]


def object_size(blob: bytes | memoryview) -> int:
    """Bytes of that whole object, as its prefix says (checked against the header by open_head)."""
    return sum(_sizes(blob))


def _sizes(blob: bytes | memoryview) -> tuple[int, int]:
    _, head_len, _, payload_len, _ = _prefix(memoryview(blob))  # FormatError for a short or unsound prefix
    return PREFIX_SIZE + head_len, payload_len


def _parse_header(head: memoryview) -> dict:
    raw = bytes(head)
    if _json_depth(raw) > _MAX_DEPTH:
        raise FormatError(f"header JSON is nested deeper than {_MAX_DEPTH}")
    header = json.loads(raw)
    if not isinstance(header, dict) or set(header) != _FIELDS:
        got = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise FormatError(f"header fields are {got}, expected {sorted(_FIELDS)}")
    return header


def read_header(blob: bytes | memoryview, *, expected_size: int | None = None) -> tuple[dict, int]:
    """Parse and check the prefix and header (types and generic ranges); return (header, payload offset).
    Neither the payload nor the MAC is checked: for indexing files, not for loading them."""
    view = memoryview(blob)
    try:
        flags, head_len, head_sum, payload_len, _ = _prefix(view)
        head = view[PREFIX_SIZE : PREFIX_SIZE + head_len]
        if len(head) != head_len or xxhash.xxh3_64_intdigest(head) != head_sum:
            raise FormatError("header truncated or corrupted")
        header = _parse_header(head)
        _, _, offsets, _ = _check_header(header, None, None, payload_len, bool(flags & FLAG_MAC))
    except FormatError:
        raise
    except Exception as err:  # noqa: BLE001 - anything at all in stored bytes is damage
        raise FormatError(f"header unreadable: {type(err).__name__}: {err}") from None
    start = PREFIX_SIZE + head_len
    if expected_size is not None and expected_size != start + offsets[-1]:
        raise FormatError(f"object is {expected_size} bytes, header says {start + offsets[-1]}")
    return header, start


def _int(value, lo: int, hi: int, what: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"header {what} is {value!r}, expected an integer within {lo}..{hi}")
    return value


def _check_header(header: dict, codec: Codec | None, expected: Expected | None, payload_len: int, mac: bool):
    """Types and ranges of every field, against `expected` when given, the layer table against the prefix's
    payload length, and the digests' kind against the MAC flag; returns (shape, dtype, offsets, digests)."""
    if not isinstance(header["key"], str) or not isinstance(header["model"], str):
        raise FormatError("header key/model are not strings")
    dtype = _DTYPES.get(header["dtype"]) if isinstance(header["dtype"], str) else None
    if dtype is None:
        raise FormatError(f"header dtype {header['dtype']!r} is not one of {sorted(_DTYPES)}")
    shape = header["shape"]
    if not isinstance(shape, list) or len(shape) != 5:
        raise FormatError(f"header shape {shape!r} is not [layers, 2, kv_heads, tokens, head_dim]")
    lim = GENERIC
    if expected is None:
        layers = _int(shape[0], 1, lim.max_layers, "layer count")
        heads = _int(shape[2], 1, lim.max_kv_heads, "KV head count")
        dim = _int(shape[4], 1, lim.max_head_dim, "head dim")
        tokens = _int(shape[3], 1, lim.max_tokens, "token count")
    else:
        want = expected.largest_shape()
        layers = _int(shape[0], want[0], want[0], "layer count")
        heads = _int(shape[2], want[2], want[2], "KV head count")
        dim = _int(shape[4], want[4], want[4], "head dim")
        hi = want[3]
        tokens = _int(shape[3], hi if expected.exact else 1, hi, "token count")
        if expected.dtype is not None and header["dtype"] != expected.dtype:
            raise FormatError(f"dtype {header['dtype']} != expected {expected.dtype}")
    _int(shape[1], 2, 2, "K/V dimension")
    if layers * 2 * heads * tokens * dim > lim.max_values:
        raise FormatError(f"shape {shape!r} holds more than {lim.max_values} values")
    _int(header["num_tokens"], tokens, tokens, "num_tokens (must equal the shape's tokens)")
    position = _int(header["position"], 0, MAX_POSITION, "position")
    if expected is not None and expected.position is not None and position != expected.position:
        raise FormatError(f"chunk position {position} != expected {expected.position}")
    offsets = header["layer_offsets"]
    if not isinstance(offsets, list) or len(offsets) != layers + 1:
        raise FormatError("layer table does not match the shape")
    _int(offsets[0], 0, 0, "first layer offset")
    per_layer = (2, heads, tokens, dim)
    cap = codec.max_segment_bytes(per_layer, dtype) if codec is not None else lim.max_object_bytes
    for a, b in zip(offsets, offsets[1:], strict=False):
        _int(b, 0, lim.max_object_bytes, "layer offset")
        if not 0 <= b - a <= cap:
            raise FormatError(f"layer segment of {b - a} bytes is outside 0..{cap}")
    if offsets[-1] != payload_len:
        raise FormatError(f"layer table ends at {offsets[-1]}, the prefix says the payload is {payload_len} bytes")
    if codec is not None and codec.raw_layout and payload_len != layers * 2 * heads * tokens * dim * dtype.itemsize:
        raise FormatError(f"raw payload is {payload_len} bytes, shape {shape} needs more or less")
    digests = header["layer_digests"]
    if not isinstance(digests, list) or len(digests) != layers:
        raise FormatError("layer digests do not match the shape")
    if not all(isinstance(d, str) and _DIGEST_HEX[mac].match(d) for d in digests):
        raise FormatError(f"a layer digest is not {32 if mac else 16} bytes of lowercase hex")
    return tuple(shape), dtype, offsets, [bytes.fromhex(d) for d in digests]


class EncodedChunk:
    """A verified stored object whose layers decode on demand (layerwise loading decodes layer by layer).
    The shape was checked against the read's expectation, so no decoder makes more than that."""

    kv = None  # a ChunkReader (storage/base.py) not decoded yet

    def __init__(self, meta: ChunkMeta, codec: Codec, payload: memoryview, offsets: list[int]):
        self.meta, self.codec, self._payload, self._offsets = meta, codec, payload, offsets

    @property
    def num_layers(self) -> int:
        return self.meta.shape[0]

    def layer(self, i: int, device=None) -> torch.Tensor:
        """Layer i's KV, [2, kv_heads, tokens, head_dim], on the CPU or decoded onto `device`."""
        shape, dtype = self.meta.shape, self.meta.dtype
        seg = self._payload[self._offsets[i] : self._offsets[i + 1]]
        try:
            if device is not None:
                out = self.codec.decode_layer_on(seg, shape[1:], dtype, i, shape[0], device, self.meta.position)
            elif self.codec.raw_layout:
                out = tensor_view(seg, dtype, shape[1:])
            else:
                out = self.codec.decode_layer(seg, shape[1:], dtype, i, shape[0], self.meta.position)
        except (FormatError, CodecPoolError):
            raise
        except Exception as err:  # noqa: BLE001 - any failure to decode stored bytes is damage
            raise FormatError(f"layer {i} does not decode: {type(err).__name__}: {err}") from None
        return _checked(out, shape[1:], dtype, f"layer {i}")

    def encoded_layer(self, i: int) -> tuple[Codec, memoryview]:
        """Layer i's verified segment and the codec that decodes it (ChunkReader.encoded_layer)."""
        return self.codec, self._payload[self._offsets[i] : self._offsets[i + 1]]

    def encoded_payload(self) -> tuple[Codec, memoryview, list[int]]:
        """The verified payload, every layer's segment, and the layer offsets (ChunkReader.encoded_payload)."""
        return self.codec, self._payload, self._offsets

    def layers(self, i: int, j: int) -> torch.Tensor:
        """Layers i..j-1 ([j - i, 2, kv_heads, tokens, head_dim]); a view when the codec is raw."""
        if self.codec.raw_layout:
            shape = self.meta.shape
            return tensor_view(self._payload[self._offsets[i] : self._offsets[j]], self.meta.dtype, (j - i, *shape[1:]))
        return self._decode(list(range(i, j)))

    def _decode(self, layers: list[int]) -> torch.Tensor:  # one tensor [len(layers), *layer shape]
        shape, dtype = self.meta.shape, self.meta.dtype
        segments = BackToBack.layers(self._payload, self._offsets, layers)
        try:
            out = self.codec.decode_stacked(segments, shape[1:], dtype, layers, shape[0], self.meta.position)
        except (FormatError, CodecPoolError):
            raise  # a dead worker is this process's fault, not the data's
        except Exception as err:  # noqa: BLE001
            raise FormatError(f"layers {layers[0]}..{layers[-1]} do not decode: {type(err).__name__}: {err}") from None
        return _checked(out, (len(layers), *shape[1:]), dtype, f"layers {layers[0]}..{layers[-1]}")

    def decode_all(self) -> StoredChunk:
        shape, dtype = self.meta.shape, self.meta.dtype
        if self.codec.raw_layout:
            return StoredChunk(self.meta, tensor_view(self._payload, dtype, shape))  # no copy: read-only chunk
        return StoredChunk(self.meta, self._decode(list(range(shape[0]))))


def _checked(t: torch.Tensor, shape, dtype, what: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise FormatError(f"{what} decoded to {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
    return t


class ChunkHead:
    """A stored object's verified head (prefix and header): what the chunk is, where each layer's segment lies
    in the object, and the digest it must have. Segments fetched apart (byte ranges) are checked by `check`."""

    def __init__(self, meta: ChunkMeta, codec: Codec, offsets: list[int], digests: list[bytes], start: int, mac: bool):
        self.meta, self.codec, self.offsets, self.digests, self.start = meta, codec, offsets, digests, start
        self.mac = mac  # the digests are BLAKE3 (object with a MAC) or xxh3-128

    @property
    def num_layers(self) -> int:
        return self.meta.shape[0]

    @property
    def size(self) -> int:
        """Bytes of the whole object."""
        return self.start + self.offsets[-1]

    def span(self, i: int, j: int) -> tuple[int, int]:
        """(first byte in the object, length) of layers i..j-1's segments, which lie back to back."""
        if not 0 <= i < j <= self.num_layers:
            raise ValueError(f"layers {i}..{j - 1} are not within 0..{self.num_layers - 1}")
        return self.start + self.offsets[i], self.offsets[j] - self.offsets[i]

    def check(self, i: int, j: int, data: bytes | memoryview) -> memoryview:
        """`data` as layers i..j-1's segments, back to back, once its length and every segment's digest match;
        FormatError otherwise (a short read, a flipped byte, a segment of another layer or object)."""
        _, want = self.span(i, j)
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if view.nbytes != want:
            raise FormatError(f"layers {i}..{j - 1} are {view.nbytes} bytes, the header says {want}")
        base = self.offsets[i]
        for k in range(i, j):
            seg = view[self.offsets[k] - base : self.offsets[k + 1] - base]
            if not hmac.compare_digest(segment_digest(seg, self.mac), self.digests[k]):
                raise FormatError(f"layer {k} segment digest mismatch")
        return view

    def chunk(self, payload: bytes | memoryview) -> EncodedChunk:
        """The chunk over its whole payload, every segment checked."""
        view = self.check(0, self.num_layers, payload)
        return EncodedChunk(self.meta, self.codec, view, self.offsets)


def open_head(
    blob: bytes | memoryview,
    expected_key: bytes,
    codec: Codec | None = None,
    *,
    auth: ObjectAuth | None = None,
    expected: Expected | None = None,
) -> ChunkHead:
    """Verify a stored object's head (`blob` starts with it; what follows is ignored): MAC (with `auth`),
    prefix, header checksum and fields, key, model tag (with `expected`'s fingerprint), shape, layer table
    and digests. `codec`: the reading tier's codec, which the header must name exactly; None decodes with
    whatever codec the header names (tools and tests)."""
    view = memoryview(blob)
    try:
        flags, head_len, head_sum, payload_len, mac = _prefix(view)
        start = PREFIX_SIZE + head_len
        head = view[PREFIX_SIZE:start]
        if len(head) != head_len:
            raise FormatError("header truncated")
        if auth is not None:
            if not flags & FLAG_MAC:
                raise FormatError("object carries no MAC, and this instance requires one (remote_auth_key)")
            if not hmac.compare_digest(auth.mac(expected_key, bytes(view[:_MAC_AT]) + bytes(head)), mac):
                raise FormatError("MAC mismatch: object not written by an instance holding remote_auth_key")
        elif flags & FLAG_MAC:
            raise FormatError("object carries a MAC but this instance has no remote_auth_key")
        if xxhash.xxh3_64_intdigest(head) != head_sum:
            raise FormatError("header checksum mismatch")
        header = _parse_header(head)
        if header["key"] != key_field(expected_key, auth):
            raise FormatError(f"object holds key {header['key']!r}, asked for {key_field(expected_key, auth)}")
        fingerprint = b""  # unknown: the engine accepts no chunk whose fingerprint it cannot confirm
        if expected is not None and expected.fingerprint is not None:
            if not hmac.compare_digest(str(header["model"]), model_tag(expected.fingerprint, expected_key, auth)):
                raise FormatError("model fingerprint differs")
            fingerprint = expected.fingerprint
        codec = _codec_for(header, codec)
        signed = bool(flags & FLAG_MAC)
        shape, dtype, offsets, digests = _check_header(header, codec, expected, payload_len, signed)
        meta = ChunkMeta(fingerprint, shape[3], shape, dtype, header["position"])
    except FormatError:
        raise
    except Exception as err:  # noqa: BLE001 - RecursionError, OverflowError, MemoryError...: all damage
        raise FormatError(f"object does not parse: {type(err).__name__}: {err}") from None
    return ChunkHead(meta, codec, offsets, digests, start, signed)


def open_chunk(
    blob: bytes | memoryview,
    expected_key: bytes,
    codec: Codec | None = None,
    *,
    auth: ObjectAuth | None = None,
    expected: Expected | None = None,
) -> EncodedChunk:
    """Verify everything about a whole stored object before any decoding: its head (open_head), then that the
    payload is as long as the header says and every segment's digest."""
    view = memoryview(blob)
    head = open_head(view, expected_key, codec, auth=auth, expected=expected)
    try:
        return head.chunk(view[head.start :])
    except FormatError:
        raise
    except Exception as err:  # noqa: BLE001
        raise FormatError(f"object does not parse: {type(err).__name__}: {err}") from None


def _codec_for(header: dict, codec: Codec | None) -> Codec:
    if codec is not None:
        if header["codec"] != codec.name or header["codec_params"] != codec.params():
            raise FormatError(f"object coded with {header['codec']} {header['codec_params']}, not this tier's codec")
        return codec
    params = header["codec_params"]
    if not isinstance(header["codec"], str) or not isinstance(params, dict):
        raise FormatError("header codec/codec_params have the wrong types")
    try:
        return get_codec(header["codec"], params)
    except MissingCalibration as err:
        raise UnreadableHere(str(err)) from None


def decode_chunk(
    blob: bytes | memoryview,
    expected_key: bytes,
    codec: Codec | None = None,
    *,
    auth: ObjectAuth | None = None,
    expected: Expected | None = None,
) -> StoredChunk:
    return open_chunk(blob, expected_key, codec, auth=auth, expected=expected).decode_all()
