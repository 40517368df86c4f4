"""The stored-chunk byte format and the codecs: exact round trips, and every kind of damage detected."""

import random
import struct

import pytest
import torch

from kvshelf.codecs import get_codec
from kvshelf.errors import ConfigError
from kvshelf.storage.auth import model_tag
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.expect import Expected
from kvshelf.storage.format import FORMAT_VERSION, PREFIX_SIZE, FormatError, decode_chunk, encode_chunk, read_header

KEY = bytes(range(16))
FP = b"\x07" * 32


def chunk(dtype=torch.float32, shape=(3, 2, 2, 16, 8), seed=0) -> StoredChunk:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=g).to(dtype)
    return StoredChunk(ChunkMeta(FP, shape[3], shape, dtype), kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_raw_round_trip_is_exact(dtype):
    c = chunk(dtype)
    expected = Expected(3, 2, 8, str(dtype).removeprefix("torch."), 16, position=0, fingerprint=FP)
    back = decode_chunk(encode_chunk(KEY, c, get_codec("none")), KEY, expected=expected)
    assert back.kv.dtype == dtype and torch.equal(back.kv, c.kv)
    assert back.meta == c.meta
    # Without an expectation the model is unknown: the engine never accepts such a chunk.
    assert decode_chunk(encode_chunk(KEY, c, get_codec("none")), KEY).meta.fingerprint == b""


def test_header_is_self_describing():
    blob = encode_chunk(KEY, chunk(), get_codec("int8"))
    header, start = read_header(blob, expected_size=len(blob))
    assert header["codec"] == "int8" and header["dtype"] == "float32" and header["shape"] == [3, 2, 2, 16, 8]
    assert header["key"] == KEY.hex() and header["model"] == model_tag(FP, KEY, None)
    assert FP.hex() not in blob.hex()  # the fingerprint itself is never written
    assert len(header["layer_offsets"]) == 4 and start + header["layer_offsets"][-1] == len(blob)
    assert blob[:4] == b"KVSH" and struct.unpack_from("<H", blob, 4)[0] == FORMAT_VERSION


def test_int8_error_is_bounded_and_outlier_channels_do_not_hurt_the_rest():
    c = chunk(shape=(2, 2, 1, 64, 32))
    c.kv[:, 0, :, :, 3] *= 100.0  # an outlier K channel, as Gemma has
    blob = encode_chunk(KEY, c, get_codec("int8"))
    back = decode_chunk(blob, KEY).kv
    k, kb = c.kv[:, 0], back[:, 0]
    # Per-channel K scales: each channel's error is within half a step of its own absmax / 127.
    step = k.abs().amax(dim=2, keepdim=True) / 127
    assert ((k - kb).abs() <= step / 2 + 1e-6).all()
    v, vb = c.kv[:, 1], back[:, 1]
    step = v.abs().amax(dim=3, keepdim=True) / 127
    assert ((v - vb).abs() <= step / 2 + 1e-6).all()
    assert len(blob) < c.nbytes / 3.5  # ~4x smaller than fp32


def test_int8_zero_tensor():
    c = StoredChunk(ChunkMeta(FP, 4, (1, 2, 1, 4, 4), torch.float32), torch.zeros(1, 2, 1, 4, 4))
    assert torch.equal(decode_chunk(encode_chunk(KEY, c, get_codec("int8")), KEY).kv, c.kv)


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_every_single_byte_flip_is_detected(codec):
    blob = bytearray(encode_chunk(KEY, chunk(shape=(2, 2, 1, 4, 4)), get_codec(codec)))
    for pos in range(len(blob)):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x5A
        with pytest.raises(FormatError):
            decode_chunk(bytes(damaged), KEY)


def test_truncation_anywhere_is_detected():
    blob = encode_chunk(KEY, chunk(), get_codec("none"))
    for cut in [0, 3, PREFIX_SIZE - 1, PREFIX_SIZE + 5, len(blob) // 2, len(blob) - 1]:
        with pytest.raises(FormatError):
            decode_chunk(blob[:cut], KEY)
    with pytest.raises(FormatError):
        decode_chunk(blob + b"\0", KEY)


def test_wrong_key_version_and_garbage():
    blob = encode_chunk(KEY, chunk(), get_codec("none"))
    with pytest.raises(FormatError, match="asked for"):
        decode_chunk(blob, b"\1" * 16)
    future = bytearray(blob)
    struct.pack_into("<H", future, 4, FORMAT_VERSION + 1)
    with pytest.raises(FormatError, match="version"):
        decode_chunk(bytes(future), KEY)
    rng = random.Random(0)
    for _ in range(50):
        with pytest.raises(FormatError):
            decode_chunk(bytes(rng.randrange(256) for _ in range(rng.randrange(200))), KEY)


def test_unknown_codec_name():
    with pytest.raises(ConfigError, match="unknown codec 'zip'"):
        get_codec("zip")
    assert get_codec("naive").name == "none"  # LMCache's name for raw
