"""The stored-chunk byte format and the codecs: exact round trips, and every kind of damage detected."""

import random
import struct

import pytest
import torch

from kvshelf.codecs import get_codec
from kvshelf.errors import ConfigError
from kvshelf.storage.auth import ObjectAuth, model_tag
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.expect import Expected
from kvshelf.storage.format import (
    FORMAT_VERSION,
    PREFIX_SIZE,
    FormatError,
    decode_chunk,
    encode_chunk,
    head_size,
    open_chunk,
    open_head,
    read_header,
    seal,
)

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
    _, start = read_header(blob)
    assert len(blob) - start < c.nbytes / 3.5  # the payload ~4x smaller than fp32


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


EXPECTED = Expected(3, 2, 8, "float32", 16, position=0, fingerprint=FP)
AUTH = ObjectAuth.from_secret("the fleet's shared secret, 32 bytes")


@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("auth", [None, AUTH])
def test_each_layer_range_is_verified_on_its_own_and_equals_the_whole_object(codec, auth):
    c = chunk()
    blob = encode_chunk(KEY, c, get_codec(codec), auth)
    head = open_head(blob[: head_size(blob[:PREFIX_SIZE])], KEY, get_codec(codec), auth=auth, expected=EXPECTED)
    assert head.size == len(blob) and head.meta.shape == (3, 2, 2, 16, 8)
    whole = open_chunk(blob, KEY, get_codec(codec), auth=auth, expected=EXPECTED)
    for i, j in [(0, 1), (1, 3), (0, 3), (2, 3)]:
        at, n = head.span(i, j)
        seg = head.check(i, j, blob[at : at + n])
        for k in range(i, j):  # the same bytes as the whole object's segments, decoded alike
            a, b = head.offsets[k] - head.offsets[i], head.offsets[k + 1] - head.offsets[i]
            assert bytes(seg[a:b]) == bytes(whole.encoded_layer(k)[1])


def test_a_damaged_swapped_truncated_or_foreign_layer_range_is_refused():
    codec = get_codec("int8")
    blob = encode_chunk(KEY, chunk(), codec, AUTH)
    other = encode_chunk(KEY, chunk(seed=1), codec, AUTH)  # same key and shape, other KV
    head = open_head(blob, KEY, codec, auth=AUTH, expected=EXPECTED)
    rng = lambda i, j, b=blob: b[head.span(i, j)[0] : sum(head.span(i, j))]  # noqa: E731
    for k in range(3):
        at, n = head.span(k, k + 1)
        for pos in (0, n // 2, n - 1):  # one flipped byte in one layer: that layer is refused, the others pass
            bad = bytearray(rng(0, 3))
            bad[at - head.start + pos] ^= 0x10
            with pytest.raises(FormatError, match=f"layer {k} segment digest"):
                head.check(0, 3, bytes(bad))
            for m in {0, 1, 2} - {k}:
                lo = head.offsets[m]
                head.check(m, m + 1, bytes(bad[lo : head.offsets[m + 1]]))
    with pytest.raises(FormatError, match="layer 0 segment digest"):  # layer 1's bytes where layer 0's belong
        head.check(0, 1, rng(1, 2)[: head.span(0, 1)[1]])
    assert len(rng(0, 1)) == len(rng(1, 2))  # int8 segments of one shape: a swap keeps the lengths
    with pytest.raises(FormatError, match="digest"):
        head.check(0, 2, rng(1, 2) + rng(0, 1))
    with pytest.raises(FormatError, match="bytes, the header says"):  # a short (truncated) range
        head.check(1, 3, rng(1, 3)[:-1])
    with pytest.raises(FormatError, match="digest"):  # the same layer of another object
        head.check(2, 3, rng(2, 3, other))
    with pytest.raises(ValueError):
        head.span(2, 4)


def test_the_mac_covers_every_layer_digest():
    codec = get_codec("int8")
    blob = encode_chunk(KEY, chunk(), codec, AUTH)
    header, start = read_header(blob)
    header["layer_digests"][1] = "00" * 32  # what a forger would change with a segment of its own
    forged = seal(KEY, header, len(blob) - start) + blob[start:]  # valid checksums, no MAC key
    with pytest.raises(FormatError, match="no MAC"):
        open_head(forged, KEY, codec, auth=AUTH)
    # with a MAC from another secret, and with ours over the unchanged header: only the latter opens
    with pytest.raises(FormatError, match="MAC mismatch"):
        open_head(seal(KEY, header, len(blob) - start, ObjectAuth.from_secret("x" * 20)), KEY, codec, auth=AUTH)
    resealed = seal(KEY, read_header(blob)[0], len(blob) - start, AUTH)
    assert open_head(resealed, KEY, codec, auth=AUTH, expected=EXPECTED).size == len(blob)


def test_the_head_must_agree_with_the_payload_length_and_digest_list():
    codec = get_codec("none")
    blob = encode_chunk(KEY, chunk(), codec)
    header, start = read_header(blob)
    n = len(blob) - start
    with pytest.raises(FormatError, match="payload is"):
        open_head(seal(KEY, header, n + 1), KEY, codec)
    for digests in (header["layer_digests"][:2], [*header["layer_digests"][:2], "ab"], [1, 2, 3]):
        with pytest.raises(FormatError, match="digest"):
            open_head(seal(KEY, {**header, "layer_digests": digests}, n), KEY, codec)
    with pytest.raises(FormatError, match="truncated"):
        open_head(blob[: start - 1], KEY, codec)
    assert head_size(blob[:PREFIX_SIZE]) == start


def test_the_digest_kind_follows_the_mac_flag():
    """BLAKE3-256 digests in an object with a MAC, xxh3-128 in one without: the other kind is refused."""
    codec = get_codec("int8")
    plain, signed = encode_chunk(KEY, chunk(), codec), encode_chunk(KEY, chunk(), codec, AUTH)
    (h_plain, s_plain), (h_signed, s_signed) = read_header(plain), read_header(signed)
    assert {len(d) for d in h_plain["layer_digests"]} == {32} and {len(d) for d in h_signed["layer_digests"]} == {64}
    n = len(plain) - s_plain
    with pytest.raises(FormatError, match="16 bytes"):
        open_head(seal(KEY, {**h_plain, "layer_digests": ["ab" * 32] * 3}, n), KEY, codec)
    with pytest.raises(FormatError, match="32 bytes"):
        bad = {**h_signed, "layer_digests": ["ab" * 16] * 3}
        open_head(seal(KEY, bad, len(signed) - s_signed, AUTH), KEY, codec, auth=AUTH)


@pytest.mark.parametrize("size", [0, 1, (64 << 10) - 1, 64 << 10, (64 << 10) + 1, 400_000])
def test_a_segment_digest_is_xxh3_128_of_the_segment_whichever_hasher_computes_it(size):
    import xxhash

    from kvshelf.storage import digests
    from kvshelf.storage import format as fmt

    assert digests._RELEASED_DIGEST == 64 << 10 and fmt.segment_digest is digests.segment_digest
    data = memoryview(random.Random(size).randbytes(size))
    assert fmt.segment_digest(data, False) == xxhash.xxh3_128_digest(data)  # large ones: the GIL-releasing hasher
    assert fmt.segment_digest(data[1:], False) == xxhash.xxh3_128_digest(bytes(data[1:]))  # a view at an offset
