"""kvshelf's byte format for one stored chunk. Self-describing, versioned, checksummed; never pickle.

    offset  size  field
    0       4     magic b"KVSH"
    4       2     format version (little-endian u16)
    6       2     reserved, 0
    8       4     header length H (u32)
    12      8     xxh3-64 of the header bytes
    20      8     xxh3-64 of the payload bytes
    28      H     header: UTF-8 JSON (key, fingerprint, codec + params, dtype, shape, layer range,
                  tokens, RoPE position of the first token, per-layer segment offsets)
    28+H    ...   payload: one codec segment per layer, back to back

Every read checks all of it; any mismatch raises FormatError, which tiers turn into a miss and a delete.
"""

from __future__ import annotations

import json
import struct

import torch
import xxhash

from kvshelf.codecs import Codec, get_codec
from kvshelf.codecs.base import tensor_view
from kvshelf.codecs.calibration import MissingCalibration
from kvshelf.errors import KVShelfError
from kvshelf.storage.base import ChunkMeta, StoredChunk

MAGIC = b"KVSH"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHIQQ")
PREFIX_SIZE = _PREFIX.size  # 28
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class FormatError(KVShelfError):
    """A stored object is truncated, corrupted, of an unknown version, or not the object asked for."""


class UnreadableHere(FormatError):
    """A sound object this process cannot decode (its cachegen calibration is not here): a miss, kept."""


def encode_chunk_parts(key: bytes, chunk: StoredChunk, codec: Codec) -> list[bytes | memoryview]:
    """The encoded object as a list of buffers (prefix + header, then one segment per layer), so that
    writers can send it without joining; raw segments are views of the tensor, not copies."""
    kv = chunk.kv
    num_layers = kv.shape[0]
    segments = codec.encode_layers(kv, chunk.meta.position)
    offsets = [0]
    payload_hash = xxhash.xxh3_64()
    for seg in segments:
        offsets.append(offsets[-1] + len(seg))
        payload_hash.update(seg)
    header = {
        "key": key.hex(),
        "fingerprint": chunk.meta.fingerprint.hex(),
        "codec": codec.name,
        "codec_params": codec.params(),
        "dtype": str(kv.dtype).removeprefix("torch."),
        "shape": list(kv.shape),
        "layers": [0, num_layers],
        "num_tokens": chunk.meta.num_tokens,
        "position": chunk.meta.position,
        "layer_offsets": offsets,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(head), xxhash.xxh3_64_intdigest(head), payload_hash.intdigest())
    return [prefix + head, *segments]


def encode_chunk(key: bytes, chunk: StoredChunk, codec: Codec) -> bytes:
    return b"".join(encode_chunk_parts(key, chunk, codec))


def read_header(blob: bytes | memoryview, *, expected_size: int | None = None) -> tuple[dict, int]:
    """Parse and verify the prefix and header; return (header, payload offset). Payload is not checked."""
    view = memoryview(blob)
    if len(view) < PREFIX_SIZE:
        raise FormatError(f"object of {len(view)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    magic, version, reserved, head_len, head_sum, _ = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise FormatError(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise FormatError(f"format version {version} is not supported (this kvshelf reads {FORMAT_VERSION})")
    if reserved != 0:
        raise FormatError(f"reserved prefix field is {reserved}, expected 0")
    head = view[PREFIX_SIZE : PREFIX_SIZE + head_len]
    if len(head) != head_len or xxhash.xxh3_64_intdigest(head) != head_sum:
        raise FormatError("header truncated or corrupted")
    try:
        header = json.loads(bytes(head))
        payload_len = header["layer_offsets"][-1]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise FormatError(f"header unreadable: {err}") from None
    start = PREFIX_SIZE + head_len
    if expected_size is not None and expected_size != start + payload_len:
        raise FormatError(f"object is {expected_size} bytes, header says {start + payload_len}")
    return header, start


class EncodedChunk:
    """A verified stored object whose layers decode on demand (layerwise loading decodes layer by layer)."""

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
                return self.codec.decode_layer_on(seg, shape[1:], dtype, i, shape[0], device, self.meta.position)
            if self.codec.raw_layout:
                return tensor_view(seg, dtype, shape[1:])
            return self.codec.decode_layer(seg, shape[1:], dtype, i, shape[0], self.meta.position)
        except (ValueError, RuntimeError, TypeError) as err:
            raise FormatError(f"layer {i} does not decode: {err}") from None

    def layers(self, i: int, j: int) -> torch.Tensor:
        """Layers i..j-1 ([j - i, 2, kv_heads, tokens, head_dim]); a view when the codec is raw."""
        if self.codec.raw_layout:
            shape = self.meta.shape
            return tensor_view(self._payload[self._offsets[i] : self._offsets[j]], self.meta.dtype, (j - i, *shape[1:]))
        return torch.stack(self._decode(list(range(i, j))))

    def _decode(self, layers: list[int]) -> list[torch.Tensor]:
        shape, dtype = self.meta.shape, self.meta.dtype
        segments = [self._payload[self._offsets[k] : self._offsets[k + 1]] for k in layers]
        try:
            return self.codec.decode_layers(segments, shape[1:], dtype, layers, shape[0], self.meta.position)
        except (ValueError, RuntimeError, TypeError) as err:
            raise FormatError(f"layers {layers[0]}..{layers[-1]} do not decode: {err}") from None

    def decode_all(self) -> StoredChunk:
        shape, dtype = self.meta.shape, self.meta.dtype
        if self.codec.raw_layout:
            kv = tensor_view(self._payload, dtype, shape)  # no copy: the chunk is read-only
        else:
            kv = torch.stack(self._decode(list(range(shape[0]))))
        return StoredChunk(self.meta, kv)


def open_chunk(blob: bytes | memoryview, expected_key: bytes) -> EncodedChunk:
    """Verify everything about a stored object (prefix, header, key, layer table, payload checksum)."""
    view = memoryview(blob)
    header, start = read_header(view)
    *_, payload_sum = _PREFIX.unpack_from(view)
    payload = view[start:]
    try:
        if header["key"] != expected_key.hex():
            raise FormatError(f"object holds key {header['key']}, asked for {expected_key.hex()}")
        offsets = [int(o) for o in header["layer_offsets"]]
        if len(payload) != offsets[-1]:
            raise FormatError(f"payload is {len(payload)} bytes, header says {offsets[-1]}")
        if xxhash.xxh3_64_intdigest(payload) != payload_sum:
            raise FormatError("payload checksum mismatch")
        dtype = _DTYPES[header["dtype"]]
        shape = tuple(int(s) for s in header["shape"])
        try:
            codec = get_codec(header["codec"], header["codec_params"])
        except MissingCalibration as err:
            raise UnreadableHere(str(err)) from None
        num_layers = shape[0]
        if len(offsets) != num_layers + 1 or header["layers"] != [0, num_layers]:
            raise FormatError("layer table does not match the shape")
        if codec.raw_layout and len(payload) != torch.Size(shape).numel() * dtype.itemsize:
            raise FormatError(f"raw payload is {len(payload)} bytes, shape {shape} needs more or less")
        position = int(header.get("position", 0))
        if position < 0:
            raise FormatError(f"chunk position {position} is negative")
        meta = ChunkMeta(bytes.fromhex(header["fingerprint"]), int(header["num_tokens"]), shape, dtype, position)
    except FormatError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, KVShelfError) as err:
        raise FormatError(f"object does not decode: {err}") from None
    return EncodedChunk(meta, codec, payload, offsets)


def decode_chunk(blob: bytes | memoryview, expected_key: bytes) -> StoredChunk:
    return open_chunk(blob, expected_key).decode_all()
