"""The cachegen codec: lossless entropy coding of the quantised KV, bounded error, layer precision."""

import pytest
import torch

from kvshelf.codecs import get_codec
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.errors import ConfigError
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.format import FormatError, decode_chunk, encode_chunk, read_header

KEY = b"k" * 16


def kv_like(layers=6, heads=2, tokens=64, dim=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=g)
    kv[:, 0, :, :, 5] *= 40.0  # an outlier K channel
    # neighbouring tokens alike, as in real KV
    return kv + torch.cumsum(0.1 * torch.randn(kv.shape, generator=g), dim=3)


def chunk_of(kv):
    return StoredChunk(ChunkMeta(b"\0" * 32, kv.shape[3], tuple(kv.shape), kv.dtype), kv)


@pytest.mark.parametrize("delta", [False, True])
def test_round_trip_error_is_within_half_a_step_and_outliers_are_exact(delta):
    codec = CacheGenCodec(bits=4, early_bits=6, delta=delta)
    kv = kv_like()
    kv[:, :, :, 0, :] *= 100.0  # an attention-sink token: far beyond 16 RMS in V, kept as escapes
    back = decode_chunk(encode_chunk(KEY, chunk_of(kv), codec), KEY).kv
    for layer in range(kv.shape[0]):
        bk, bv = codec.layer_bits(layer, kv.shape[0])
        k, v = kv[layer, 0], kv[layer, 1]
        step_k = k.pow(2).mean(dim=1, keepdim=True).sqrt() / (1 << (bk - 3))
        step_v = v.pow(2).mean(dim=2, keepdim=True).sqrt() / (1 << (bv - 3))
        assert ((back[layer, 0] - k).abs() <= step_k * 0.51 + 1e-2).all()
        assert ((back[layer, 1] - v).abs() <= step_v * 0.51 + 1e-2).all()


def test_delta_coding_is_lossless_on_the_quantised_values():
    kv = kv_like(seed=1)
    plain = decode_chunk(encode_chunk(KEY, chunk_of(kv), CacheGenCodec(delta=False)), KEY).kv
    delta = decode_chunk(encode_chunk(KEY, chunk_of(kv), CacheGenCodec(delta=True)), KEY).kv
    assert torch.equal(plain, delta)


def test_layer_dependent_precision_and_size():
    codec = CacheGenCodec(bits=3, early_bits=6, early_fraction=0.34)
    assert [codec.layer_bits(i, 6) for i in range(6)] == [(6, 6), (6, 6), (3, 3), (3, 3), (3, 3), (3, 3)]
    assert CacheGenCodec(bits=4, v_bits=3, early_fraction=0).layer_bits(0, 6) == (4, 3)
    kv = kv_like(tokens=256)
    raw = kv.numel() * 2  # fp16 bytes
    blob = encode_chunk(KEY, chunk_of(kv), codec)
    header, _ = read_header(blob)
    assert header["codec"] == "cachegen" and header["codec_params"]["bits"] == 3
    assert len(blob) < raw / 2.5  # entropy-coded symbols: well under half of fp16


def test_decoding_uses_the_parameters_in_the_header():
    kv = kv_like()
    blob = encode_chunk(KEY, chunk_of(kv), get_codec("cachegen", {"bits": 3, "early_bits": 4}))
    # Whatever the reader's configuration, the header's parameters decode it.
    assert decode_chunk(blob, KEY).kv.shape == kv.shape


def test_damage_is_detected():
    blob = bytearray(encode_chunk(KEY, chunk_of(kv_like()), CacheGenCodec()))
    blob[len(blob) // 2] ^= 0x40
    with pytest.raises(FormatError):
        decode_chunk(bytes(blob), KEY)


def test_bad_parameters_name_the_codec():
    with pytest.raises(ConfigError, match="cachegen.*bits"):
        get_codec("cachegen", {"bits": 1})
    with pytest.raises(ConfigError, match="cachegen"):
        get_codec("cachegen", {"nonsense": 1})


def test_bf16_kv():
    kv = kv_like().to(torch.bfloat16)
    back = decode_chunk(encode_chunk(KEY, chunk_of(kv), CacheGenCodec(bits=8, early_bits=8)), KEY).kv
    assert back.dtype == torch.bfloat16
    err = (back.float() - kv.float()).abs()
    # 8 bits: step = rms / 32 (K: per channel over tokens, V: per token over channels), plus bf16 rounding
    rms_k = kv[:, 0].float().pow(2).mean(dim=2, keepdim=True).sqrt()
    rms_v = kv[:, 1].float().pow(2).mean(dim=3, keepdim=True).sqrt()
    assert (err[:, 0] <= rms_k / 60 + 0.01 * kv[:, 0].float().abs()).all()
    assert (err[:, 1] <= rms_v / 60 + 0.01 * kv[:, 1].float().abs()).all()


def test_worker_processes_code_exactly_what_one_process_codes():
    from kvshelf.codecs.pool import CodecProcesses

    kv = kv_like(layers=6, tokens=128)
    codec = CacheGenCodec()
    key = b"k" * 16
    alone = encode_chunk(key, chunk_of(kv), codec)
    processes = CodecProcesses(2)
    try:
        spread = encode_chunk(key, chunk_of(kv), CacheGenCodec(processes=processes))
        assert spread == alone  # encoding never depends on the pool
        decoded = decode_chunk(spread, key, CacheGenCodec(processes=processes)).kv
    finally:
        processes.close()
    assert torch.equal(decoded, decode_chunk(alone, key).kv)
    with pytest.raises(ValueError, match="codec_workers"):
        CodecProcesses(-1)
