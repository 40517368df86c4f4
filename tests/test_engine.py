"""The cache engine alone: no model, random KV tensors."""

import dataclasses

import pytest
import torch

from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.errors import ConfigError
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.memory import MemoryBackend

FP = ModelFingerprint("tiny", "w0", "float32", num_layers=3, num_kv_heads=2, head_dim=4)


def make_engine(fp=FP, backend=None, **kw) -> CacheEngine:
    return CacheEngine(
        fp, backend if backend is not None else MemoryBackend(1 << 26), chunk_size=kw.pop("chunk_size", 16), **kw
    )


def random_kv(n: int, fp=FP) -> torch.Tensor:
    return torch.randn(fp.num_layers, 2, fp.num_kv_heads, n, fp.head_dim)


def test_store_lookup_retrieve_round_trip():
    engine = make_engine()
    tokens = list(range(40))
    kv = random_kv(40)
    assert engine.lookup(tokens) == 0
    assert engine.store(tokens, kv) == 40
    assert engine.lookup(tokens) == 40
    got = engine.retrieve(tokens)
    assert got.num_tokens == 40 and torch.equal(got.kv, kv)
    # Storing again stores nothing new.
    assert engine.store(tokens, kv) == 0
    assert engine.stats.stored_tokens == 40


def test_prefix_hit_stops_at_first_differing_chunk():
    engine = make_engine()
    tokens = list(range(64))
    kv = random_kv(64)
    engine.store(tokens, kv)
    other = tokens[:40] + [999] * 24
    assert engine.lookup(other) == 32  # chunks 0-15 and 16-31 match, chunk 32-47 differs
    got = engine.retrieve(other)
    assert got.num_tokens == 32 and torch.equal(got.kv, kv[:, :, :, :32])


def test_max_tokens_slices_the_last_chunk():
    engine = make_engine()
    tokens = list(range(40))
    kv = random_kv(40)
    engine.store(tokens, kv)
    got = engine.retrieve(tokens, max_tokens=39)
    assert got.num_tokens == 39 and torch.equal(got.kv, kv[:, :, :, :39])
    got = engine.retrieve(tokens, max_tokens=20)
    assert got.num_tokens == 20


def test_partial_chunks_optional():
    engine = make_engine(save_unfull_chunk=False)
    assert engine.store(list(range(40)), random_kv(40)) == 32
    assert engine.lookup(list(range(40))) == 32


def test_salt_isolates_tenants():
    engine = make_engine()
    tokens = list(range(32))
    engine.store(tokens, random_kv(32), salt="tenant-a")
    assert engine.lookup(tokens, salt="tenant-a") == 32
    assert engine.lookup(tokens, salt="tenant-b") == 0
    assert engine.lookup(tokens) == 0


def test_other_model_fingerprint_is_a_miss():
    backend = MemoryBackend(1 << 26)
    a = make_engine(backend=backend)
    tokens = list(range(32))
    a.store(tokens, random_kv(32))
    for change in ({"weights_digest": "w1"}, {"dtype": "bfloat16"}, {"model_id": "other"}, {"extra": {"rope": 1}}):
        b = make_engine(fp=dataclasses.replace(FP, **change), backend=backend)
        assert b.lookup(tokens) == 0
        assert b.retrieve(tokens).num_tokens == 0


def test_object_with_wrong_fingerprint_under_right_key_is_rejected_and_deleted():
    backend = MemoryBackend(1 << 26)
    engine = make_engine(backend=backend)
    tokens = list(range(16))
    key = engine.keys(tokens)[0]
    kv = random_kv(16)
    foreign = StoredChunk(ChunkMeta(b"x" * 32, 16, tuple(kv.shape), kv.dtype), kv)
    backend.put(key.digest, foreign)
    assert engine.lookup(tokens) == 16  # contains() alone cannot tell ...
    assert engine.retrieve(tokens).num_tokens == 0  # ... but nothing wrong is ever served
    assert not backend.contains(key.digest)
    assert engine.stats.rejected_chunks == 1


@pytest.mark.parametrize(
    "bad",
    [
        lambda kv: StoredChunk(ChunkMeta(FP.digest(), 15, tuple(kv.shape), kv.dtype), kv),  # token count
        lambda kv: StoredChunk(ChunkMeta(FP.digest(), 16, (3, 2, 2, 16, 2), kv.dtype), kv[..., :2]),  # shape
        lambda kv: StoredChunk(ChunkMeta(FP.digest(), 16, tuple(kv.shape), torch.float16), kv.half()),  # dtype
    ],
)
def test_malformed_objects_are_misses(bad):
    backend = MemoryBackend(1 << 26)
    engine = make_engine(backend=backend)
    tokens = list(range(16))
    backend.put(engine.keys(tokens)[0].digest, bad(random_kv(16)))
    assert engine.retrieve(tokens).num_tokens == 0
    assert engine.stats.rejected_chunks == 1


def test_store_validates_kv_shape():
    engine = make_engine()
    with pytest.raises(ValueError, match="tokens"):
        engine.store(list(range(20)), random_kv(10))
    with pytest.raises(ValueError, match="fingerprint"):
        engine.store(list(range(10)), torch.randn(3, 2, 1, 10, 4))


def test_eviction_between_lookup_and_retrieve_returns_what_is_left():
    backend = MemoryBackend(1 << 26)
    engine = make_engine(backend=backend)
    tokens = list(range(48))
    engine.store(tokens, random_kv(48))
    backend.delete(engine.keys(tokens)[1].digest)
    assert engine.retrieve(tokens).num_tokens == 16


@pytest.mark.parametrize("size", [0, 8, 15, 8193, -1])
def test_chunk_size_out_of_range(size):
    with pytest.raises(ConfigError, match="chunk_size"):
        make_engine(chunk_size=size)


def test_chunk_size_must_be_int():
    with pytest.raises(ConfigError, match="chunk_size"):
        make_engine(chunk_size=16.5)


def test_stats_count_hits_and_requests():
    engine = make_engine()
    tokens = list(range(32))
    engine.store(tokens, random_kv(32))
    engine.retrieve(tokens)
    engine.retrieve(list(range(100, 132)))
    assert engine.stats.requested_tokens == 64 and engine.stats.hit_tokens == 32 and engine.stats.lookups == 2


def test_a_prefix_chunk_computed_at_another_position_is_rejected():
    backend = MemoryBackend(1 << 26)
    engine = make_engine(backend=backend)
    tokens = list(range(32))
    engine.store(tokens, random_kv(32))
    second = engine.keys(tokens)[1]  # starts at 16
    kv = random_kv(16)
    shifted = StoredChunk(ChunkMeta(FP.digest(), 16, tuple(kv.shape), kv.dtype, position=15), kv)
    backend.put(second.digest, shifted)
    assert engine.retrieve(tokens).num_tokens == 16  # the first chunk only: the second's RoPE is off by one
    assert not backend.contains(second.digest) and engine.stats.rejected_chunks == 1
