"""Property-based fuzzing of the stored-object format and every codec (issue #15).

Whatever the bytes: only FormatError escapes; with a MAC no altered or forged object is accepted; and
decoding never makes more than the validated shape (checked on the output, and on the memory numpy
allocates while decoding, with tracemalloc).
"""

from __future__ import annotations

import json
import re
import struct
import tracemalloc

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvshelf.storage.format as format_module
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import get_codec
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.storage.auth import ObjectAuth
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.expect import Expected
from kvshelf.storage.format import (
    FLAG_MAC,
    FORMAT_VERSION,
    MAGIC,
    PREFIX_SIZE,
    FormatError,
    encode_chunk,
    open_chunk,
    open_head,
    segment_digest,
)

KEY = bytes(range(16))
FP = b"\x42" * 32
LAYERS, HEADS, TOKENS, DIM = 2, 1, 16, 8
SHAPE = (LAYERS, 2, HEADS, TOKENS, DIM)
EXPECTED = Expected(LAYERS, HEADS, DIM, "float32", TOKENS, position=0, fingerprint=FP)
AUTH = ObjectAuth.from_secret("a shared secret of the trusted fleet")
OTHER_AUTH = ObjectAuth.from_secret("someone else's secret, not ours")
PREFIX = struct.Struct("<4sHHIQQ32s")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _calibration() -> calib.Calibration:
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(DIM).expand(LAYERS, 2, HEADS, DIM, DIM).clone()
    return calib.Calibration(
        inv_freq=torch.rand(LAYERS, DIM // 2, generator=g),
        mean=torch.zeros(LAYERS, 2, HEADS, DIM),
        forward=eye,
        inverse=eye.clone(),
        step=torch.full((LAYERS, 2), 0.05),
        info={"test": "fuzz"},
    )


CAL = _calibration()
calib.register(CAL)
CODECS = {
    "none": get_codec("none"),
    "int8": get_codec("int8"),
    "cachegen": CacheGenCodec(),
    "cachegen-calibrated": CacheGenCodec(calibration=CAL.digest),
}


def kv(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def blob_of(codec: str, auth=None, seed: int = 0) -> bytes:
    chunk = StoredChunk(ChunkMeta(FP, TOKENS, SHAPE, torch.float32), kv(seed))
    return encode_chunk(KEY, chunk, CODECS[codec], auth)


VALID = {(c, a is not None): blob_of(c, a) for c in CODECS for a in (None, AUTH)}


def forge(head: bytes, payload: bytes, *, auth: ObjectAuth | None = None, key: bytes = KEY) -> bytes:
    """An object with valid checksums (and a MAC under `auth`): what a writer without our key can make."""
    flags = FLAG_MAC if auth else 0
    prefix = bytearray(
        PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(head), xxhash.xxh3_64_intdigest(head), len(payload), bytes(32))
    )
    if auth is not None:
        prefix[28:] = auth.mac(key, bytes(prefix[:28]) + head)
    return bytes(prefix) + head + payload


def split(blob: bytes) -> tuple[dict, bytes]:
    head_len = struct.unpack_from("<I", blob, 8)[0]
    return json.loads(blob[PREFIX_SIZE : PREFIX_SIZE + head_len]), blob[PREFIX_SIZE + head_len :]


def read(blob: bytes, codec: str | None, auth=None, expected=EXPECTED):
    """Open and decode; returns the KV or raises. Any exception but FormatError fails the caller's test.
    Also returns the peak of numpy/Python memory allocated while decoding."""
    tracemalloc.start()
    try:
        chunk = open_chunk(blob, KEY, CODECS[codec] if codec else None, auth=auth, expected=expected).decode_all()
        return chunk.kv, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


KV_BYTES = LAYERS * 2 * HEADS * TOKENS * DIM * 4
# Decoding may hold a few copies of the KV (symbols, values, steps) plus the coder's tables: bounded by
# the validated shape, never by what the header or payload announce.
MEMORY_BOUND = 64 * KV_BYTES + (4 << 20)


def only_format_errors(blob: bytes, codec: str | None, auth=None, expected=EXPECTED) -> torch.Tensor | None:
    try:
        out, peak = read(blob, codec, auth, expected)
    except FormatError:
        return None
    assert tuple(out.shape) == SHAPE and out.dtype == torch.float32, "decoded beyond the validated shape"
    assert peak <= MEMORY_BOUND, f"decoding allocated {peak} bytes"
    return out


codec_names = st.sampled_from(sorted(CODECS))


@st.composite
def mutations(draw, blob: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    pos = draw(st.integers(0, len(blob) - 1))
    if kind == "flip":
        return blob[:pos] + bytes([blob[pos] ^ (1 << draw(st.integers(0, 7)))]) + blob[pos + 1 :]
    if kind == "truncate":
        return blob[:pos]
    extra = draw(st.binary(min_size=1, max_size=64))
    if kind == "insert":
        return blob[:pos] + extra + blob[pos:]
    return blob[:pos] + extra + blob[pos + len(extra) :]


@FUZZ
@given(codec=codec_names, data=st.data())
def test_damaged_objects_raise_format_errors_and_never_pass_the_mac(codec, data):
    original = VALID[(codec, True)]
    damaged = data.draw(mutations(original))
    if damaged == original:
        return
    with pytest.raises(FormatError):
        read(damaged, codec, AUTH)
    plain = data.draw(mutations(VALID[(codec, False)]))
    only_format_errors(plain, codec)


HOSTILE = st.one_of(
    st.sampled_from(["00" * 32, "AB" * 32, "0" * 63, "g" * 64, "00" * 33]),  # digests that only look right
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 2**31, 2**32 - 1, 2**63, 10**30]),
    st.sampled_from([0.0, 1.0, 2.0, 16.0, True, False]),  # equal to a valid int in Python, yet not one
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-(2**40), 2**40), max_size=6),
    st.dictionaries(st.text(max_size=6), st.integers(-(2**40), 2**40), max_size=3),
)


@st.composite
def hostile_headers(draw, header: dict) -> dict:
    """The header with one to three fields (or elements of shape / layer_offsets / layer_digests / codec_params)
    changed."""
    header = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(1, 3))):
        fields = ["shape[]", "layer_offsets[]", "layer_digests[]", "codec_params{}", "extra"]
        field = draw(st.sampled_from(sorted(header) + fields))
        value = draw(HOSTILE)
        target = header.get(field[:-2])
        if field.endswith("[]") and isinstance(target, list) and target:
            target[draw(st.integers(0, len(target) - 1))] = value
        elif field == "codec_params{}" and isinstance(target := header.get("codec_params"), dict):
            name = draw(st.sampled_from([*sorted(target), "bits", "group", "calibration", "delta", "other"]))
            target[name] = value
        elif field == "extra":
            header[draw(st.text(min_size=1, max_size=8))] = value
        else:
            header[field] = value
    return header


@FUZZ
@given(codec=codec_names, data=st.data())
def test_rechecksummed_forgeries_of_hostile_headers(codec, data):
    header, payload = split(VALID[(codec, False)])
    forged = hostile_headers(header)
    head = json.dumps(data.draw(forged)).encode()
    # Checksums recomputed: only the header's checks stand between the forgery and a decoder.
    only_format_errors(forge(head, payload), codec)
    only_format_errors(forge(head, payload), None)  # decoding with whatever codec the header names
    only_format_errors(forge(head, payload), codec, expected=None)  # generic limits only
    # With a MAC required, no forgery passes: neither unsigned nor signed with another key.
    for forged_blob in (forge(head, payload), forge(head, payload, auth=OTHER_AUTH)):
        with pytest.raises(FormatError):
            read(forged_blob, codec, AUTH)


@FUZZ
@given(codec=codec_names, data=st.data())
def test_random_payloads_under_valid_headers_decode_within_the_shape(codec, data):
    header, _ = split(VALID[(codec, False)])
    segments = [data.draw(st.binary(max_size=600)) for _ in range(LAYERS)]
    if data.draw(st.booleans()):  # keep the real segment heads, random bodies: deeper into the decoders
        _, payload = split(VALID[(codec, False)])
        offs = header["layer_offsets"]
        segments = [payload[offs[i] : offs[i] + 24] + segments[i] for i in range(LAYERS)]
    offsets = [0]
    for seg in segments:
        offsets.append(offsets[-1] + len(seg))
    header["layer_offsets"] = offsets
    header["layer_digests"] = [
        segment_digest(seg, False).hex() for seg in segments
    ]  # digests that match: decoders next
    only_format_errors(forge(json.dumps(header).encode(), b"".join(segments)), codec)


@pytest.mark.parametrize("depth", [4, 100, 100_000])
def test_deep_or_huge_json_is_a_format_error(depth):
    _, payload = split(VALID[("int8", False)])
    with pytest.raises(FormatError):
        read(forge(b"[" * depth + b"]" * depth, payload), "int8")
    with pytest.raises(FormatError, match="header of"):
        read(forge(b" " * (64 * 1024 + 1), payload), "int8")


def test_sound_objects_decode_with_and_without_a_mac():
    for codec in CODECS:
        for auth in (None, AUTH):
            out, _ = read(VALID[(codec, auth is not None)], codec, auth)
            assert out.shape == SHAPE
        # A reader with the key refuses unsigned objects; one without it refuses signed ones.
        with pytest.raises(FormatError, match="no MAC"):
            read(VALID[(codec, False)], codec, AUTH)
        with pytest.raises(FormatError, match="has no remote_auth_key"):
            read(VALID[(codec, True)], codec, None)
        with pytest.raises(FormatError, match="MAC mismatch"):
            read(VALID[(codec, True)], codec, OTHER_AUTH)


def test_a_signed_object_moved_to_another_key_fails_the_mac():
    blob = VALID[("none", True)]
    with pytest.raises(FormatError, match="MAC"):
        open_chunk(blob, b"\x01" * 16, CODECS["none"], auth=AUTH)


def test_expected_shape_is_checked_before_any_decoding(monkeypatch):
    calls = []
    codec = CODECS["cachegen"]
    monkeypatch.setattr(type(codec), "decode_layers", lambda *a, **k: calls.append(a) or [])
    monkeypatch.setattr(type(codec), "decode_stacked", lambda *a, **k: calls.append(a) or [])
    for exp in (
        Expected(LAYERS, HEADS, DIM, "float32", TOKENS - 1, fingerprint=FP),  # tokens
        Expected(LAYERS + 1, HEADS, DIM, "float32", TOKENS, fingerprint=FP),  # layers
        Expected(LAYERS, HEADS, DIM, "bfloat16", TOKENS, fingerprint=FP),  # dtype
        Expected(LAYERS, HEADS, DIM, "float32", TOKENS, position=5, fingerprint=FP),  # position
        Expected(LAYERS, HEADS, DIM, "float32", TOKENS, fingerprint=b"\x43" * 32),  # model
    ):
        with pytest.raises(FormatError):
            read(VALID[("cachegen", False)], "cachegen", expected=exp)
    assert calls == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("shape", [LAYERS, 2, True, TOKENS, DIM]),  # True == 1 in Python: not a head count
        ("shape", [float(LAYERS), 2, HEADS, TOKENS, DIM]),
        ("num_tokens", float(TOKENS)),
        ("position", False),
        ("layer_offsets", "first float"),
    ],
)
def test_numbers_that_only_look_right_are_refused(field, value):
    header, payload = split(VALID[("none", False)])
    header[field] = [0.0, *header["layer_offsets"][1:]] if value == "first float" else value
    with pytest.raises(FormatError, match="integer"):
        read(forge(json.dumps(header).encode(), payload), "none")


@FUZZ
@given(codec=codec_names, auth=st.booleans(), data=st.data())
def test_damaged_layer_ranges_are_refused_on_their_own(codec, auth, data):
    """Layer ranges fetched apart (a reader of byte ranges): any change to one is a FormatError, and what
    passes is exactly the stored segments."""
    blob = VALID[(codec, auth)]
    head = open_head(blob, KEY, CODECS[codec], auth=AUTH if auth else None, expected=EXPECTED)
    i = data.draw(st.integers(0, LAYERS - 1))
    j = data.draw(st.integers(i + 1, LAYERS))
    at, n = head.span(i, j)
    sound = blob[at : at + n]
    assert bytes(head.check(i, j, sound)) == sound
    if not sound:
        return
    damaged = data.draw(mutations(sound))
    if damaged != sound:
        with pytest.raises(FormatError):
            head.check(i, j, damaged)


def _json_depth_by_tokens(head: bytes) -> int:
    """The header nesting check as it was before issue #17's faster one: every string or bracket token walked."""
    depth = deepest = 0
    for m in re.finditer(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', head):
        tok = m.group()
        if tok in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > format_module._MAX_DEPTH:
                break
        elif tok in (b"]", b"}"):
            depth -= 1
    return deepest


_JSONISH = st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b",", b":", b"1"]), max_size=60)


@given(_JSONISH.map(b"".join) | st.binary(max_size=80))
@settings(max_examples=400, deadline=None)
def test_the_header_nesting_check_equals_the_token_walk(head):
    assert format_module._json_depth(head) == _json_depth_by_tokens(head)


def test_the_header_nesting_check_on_a_real_header_and_escaped_strings():
    blob = encode_chunk(KEY, StoredChunk(ChunkMeta(FP, TOKENS, (LAYERS, 2, HEADS, TOKENS, DIM), torch.float16, 0),
                                         torch.zeros(LAYERS, 2, HEADS, TOKENS, DIM, dtype=torch.float16)),
                        get_codec("none"))  # fmt: skip
    head = bytes(blob[PREFIX_SIZE : PREFIX_SIZE + struct.unpack_from("<I", blob, 8)[0]])
    for h in (head, b'{"a": "[[[[\\"]]", "b": [[[1]]]}', b'"\\\\"[[[[', b'[[[["]]]]'):
        assert format_module._json_depth(h) == _json_depth_by_tokens(h), h
