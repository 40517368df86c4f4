"""Shared tiers that trust no one (issue #15), against real redis-server and an S3 endpoint (moto).

A writer of the shared store who lacks `remote_auth_key` can plant, overwrite and inflate values; none of
it is loaded, none of it costs more than a miss, and what failed is removed.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
import tracemalloc

import boto3
import pytest
import torch
import xxhash

from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import get_codec, pool
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.codecs.pool import CodecPoolError
from kvshelf.storage.auth import ObjectAuth, model_tag
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.disk import DiskBackend
from kvshelf.storage.expect import Expected, expecting
from kvshelf.storage.format import FORMAT_VERSION, MAGIC, encode_chunk, segment_digest
from kvshelf.storage.redis import RedisBackend
from kvshelf.storage.s3 import S3Backend

LAYERS, HEADS, DIM = 2, 1, 256
FPRINT = ModelFingerprint("tiny", "weights", "float32", LAYERS, HEADS, DIM)
FP = FPRINT.digest()
AUTH = ObjectAuth.from_secret("the fleet's shared secret, 32 bytes")
EVIL = ObjectAuth.from_secret("an attacker's secret: not the fleet's")
CHUNK = 16
PREFIX = struct.Struct("<4sHHIQQ32s")


def expected(tokens: int = CHUNK) -> Expected:
    return Expected(LAYERS, HEADS, DIM, "float32", tokens, position=0, fingerprint=FP)


def chunk_of(value: float | None = None, tokens: int = CHUNK, seed: int = 0) -> StoredChunk:
    shape = (LAYERS, 2, HEADS, tokens, DIM)
    kv = (
        torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if value is None else torch.full(shape, value)
    )
    return StoredChunk(ChunkMeta(FP, tokens, shape, torch.float32, 0), kv)


def forge(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(head), xxhash.xxh3_64_intdigest(head), len(payload), bytes(32))
    return prefix + head + payload


def bounded(fn, limit_bytes: int = 8 << 20):
    """fn() with numpy/Python allocations traced; fails if their peak passes `limit_bytes`."""
    tracemalloc.start()
    try:
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit_bytes, f"peak allocation {peak} bytes"
    return out


@pytest.fixture
def redis_pair(redis_server):
    """The victim's tier (with the fleet's key) and the raw client an attacker uses."""
    victim = RedisBackend(redis_server.url, get_codec("none"), prefix="victim:", auth=AUTH)
    yield victim, redis_server.client()
    victim.clear()
    victim.close()


# -- authenticated objects -----------------------------------------------------------------------------
def test_a_planted_object_is_loaded_without_a_key_and_refused_and_removed_with_one(redis_server):
    """The attack of the issue: a value planted under a prompt's key. Without remote_auth_key it works
    (the store is trusted as is); with one it is a miss, and the planted value is deleted."""
    tokens = list(range(100, 100 + CHUNK))
    for auth in (None, AUTH):
        backend = RedisBackend(redis_server.url, get_codec("none"), prefix="plant:", auth=auth)
        engine = CacheEngine(FPRINT, backend, chunk_size=CHUNK)
        key = engine.keys(tokens)[0]
        name = backend._key(backend.name_of(key.digest))
        # The attacker knows the model (public weights) and guesses the prompt: it computes the chunk key,
        # the tag and checksums, and, for the keyed instance, reads the name from SCAN after a real store.
        engine.store(tokens, chunk_of(1.0).kv)
        assert redis_server.client().exists(name)
        evil = encode_chunk(key.digest, chunk_of(666.0), get_codec("none"), EVIL if auth else None)
        redis_server.client().set(name, evil)
        loaded = engine.retrieve(tokens)
        if auth is None:
            assert loaded.num_tokens == CHUNK and float(loaded.kv[0, 0, 0, 0, 0]) == 666.0  # trusted as is
        else:
            assert loaded.num_tokens == 0 and not redis_server.client().exists(name)
            assert backend.corrupt_objects == 1
        backend.clear()
        backend.close()


def test_values_overwritten_in_place_or_copied_between_names_fail_the_mac(redis_pair):
    victim, client = redis_pair
    k1, k2 = b"\x01" * 16, b"\x02" * 16
    victim.put(k1, chunk_of(seed=1))
    victim.put(k2, chunk_of(seed=2))
    n1, n2 = victim._key(victim.name_of(k1)), victim._key(victim.name_of(k2))
    # A sound signed value moved to another name: the MAC covers the chunk key.
    client.set(n2, client.get(n1))
    # A signed value with one payload byte changed (and its checksum recomputed would not help).
    raw = bytearray(client.get(n1))
    raw[-1] ^= 1
    client.set(n1, bytes(raw))
    with expecting(expected()):
        assert victim.get(k1) is None and victim.get(k2) is None
    assert victim.corrupt_objects == 2 and not client.exists(n1) and not client.exists(n2)


def test_the_store_reveals_no_chunk_key_and_no_fingerprint(redis_pair):
    victim, client = redis_pair
    k = b"\x07" * 16
    victim.put(k, chunk_of())
    names = [n.decode() for n in client.scan_iter(match="victim:*")]
    assert len(names) == 1 and k.hex() not in names[0]
    unkeyed = RedisBackend(client_url(client), get_codec("none"))
    assert victim.name_of(k) != unkeyed.name_of(k)  # names are keyed: not computable without the secret
    unkeyed.close()
    value = client.get(names[0])  # nor do the values: no chunk key, no fingerprint
    assert k.hex().encode() not in value
    assert FP.hex().encode() not in value and model_tag(FP, k, None).encode() not in value


def client_url(client) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


# -- Redis: manifests, sizes, types --------------------------------------------------------------------
def test_manifest_bombs_end_fast_without_allocating(redis_pair, redis_server):
    victim, client = redis_pair
    name = victim._key(victim.name_of(b"\x03" * 16))
    bombs = [
        struct.pack("<4sIQ", b"KVSP", 2**32 - 1, 2**40),  # the 16-byte value (version 1 manifest)
        struct.pack("<4sIIQ", b"KVS2", 2**32 - 1, 1024, 2**40),  # announces a petabyte in 4 G parts
        struct.pack("<4sIIQ", b"KVS2", 2**32 - 1, 1024, 4096),  # parts that do not add up
    ]
    calls_before = redis_server.client().info("commandstats")
    for bomb in bombs:
        client.set(name, bomb)
        with expecting(expected()):
            assert bounded(lambda: victim.get(b"\x03" * 16), 1 << 20) is None
        assert not client.exists(name)
    assert victim.corrupt_objects == len(bombs)
    stats = redis_server.client().info("commandstats")

    def calls(st, cmd):
        return st.get(f"cmdstat_{cmd}", {}).get("calls", 0)

    # One GET per bomb (the manifest itself, inside the read script); no part was ever asked for.
    assert calls(stats, "get") - calls(calls_before, "get") == len(bombs)
    assert calls(stats, "mget") == calls(calls_before, "mget")
    assert calls(stats, "strlen") - calls(calls_before, "strlen") == len(bombs)


def test_an_oversized_value_is_refused_before_it_is_read(redis_pair, redis_server):
    victim, client = redis_pair
    name = victim._key(victim.name_of(b"\x04" * 16))
    client.set(name, b"\0" * (48 << 20))  # 48 MB; a 16-token chunk of this model is ~70 KB signed
    admin = redis_server.client()
    sent_before = admin.info("stats")["total_net_output_bytes"]
    with expecting(expected()):
        assert bounded(lambda: victim.get(b"\x04" * 16)) is None
    sent = admin.info("stats")["total_net_output_bytes"] - sent_before
    assert sent < 1 << 20, f"the server sent {sent} bytes"
    assert not client.exists(name) and victim.corrupt_objects == 1


def test_another_type_under_a_name_is_a_miss_and_removed_not_a_fault(redis_pair):
    victim, client = redis_pair
    name = victim._key(victim.name_of(b"\x05" * 16))
    client.rpush(name, b"x", b"y")
    assert victim.get(b"\x05" * 16) is None and not client.exists(name)
    victim.put(b"\x05" * 16, chunk_of())
    assert victim.get(b"\x05" * 16) is not None  # the name is usable again


def test_parts_expire_with_their_manifest_and_a_crashed_write_leaves_nothing_for_long(redis_server):
    client = redis_server.client()
    with_ttl = RedisBackend(redis_server.url, get_codec("none"), prefix="pt:", part_bytes=4096, ttl_s=300)
    with_ttl.put(b"\x06" * 16, chunk_of())
    keys = list(client.scan_iter(match="pt:*"))
    assert len(keys) > 5 and all(0 < client.ttl(k) <= 300 for k in keys)
    with_ttl.clear()
    no_ttl = RedisBackend(redis_server.url, get_codec("none"), prefix="pt:", part_bytes=4096)
    no_ttl.put(b"\x06" * 16, chunk_of())
    assert all(client.ttl(k) == -1 for k in client.scan_iter(match="pt:*"))  # kept as long as the value
    # A writer dying between its parts and its manifest: the parts carry the grace expiry.
    no_ttl.client.set = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("writer died"))
    with pytest.raises(ConnectionError):
        no_ttl.put(b"\x08" * 16, chunk_of(seed=8))
    name = no_ttl._key(no_ttl.name_of(b"\x08" * 16))
    orphans = [k for k in client.scan_iter(match=f"{name}:*")]
    assert orphans and all(0 < client.ttl(k) <= 600 for k in orphans)
    # Deleting a value removes its parts in one UNLINK.
    before = client.info("commandstats").get("cmdstat_unlink", {}).get("calls", 0)
    no_ttl.delete(b"\x06" * 16)
    assert client.info("commandstats")["cmdstat_unlink"]["calls"] == before + 1
    gone = no_ttl._key(no_ttl.name_of(bytes([6]) * 16))
    assert not list(client.scan_iter(match=f"{gone}*"))
    for k in client.scan_iter(match="pt:*"):
        client.delete(k)


# -- S3 ------------------------------------------------------------------------------------------------
@pytest.fixture
def s3_bucket(s3_server, request):
    name = "untrusted-" + request.node.name.replace("_", "-").lower()[:30]
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=name)
    return name


def test_s3_planted_object_is_a_miss_and_removed_and_oversize_is_not_read(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/kv?endpoint={s3_server.endpoint}"
    victim = S3Backend.from_url(url, get_codec("none"), auth=AUTH)
    k = b"\x09" * 16
    victim.put(k, chunk_of(seed=3))
    obj = victim._object(victim.name_of(k))
    victim.client.put_object(Bucket=s3_bucket, Key=obj, Body=encode_chunk(k, chunk_of(666.0), get_codec("none")))
    with expecting(expected()):
        assert victim.get(k) is None
    assert not victim.contains(k) and victim.corrupt_objects == 1
    victim.client.put_object(Bucket=s3_bucket, Key=obj, Body=b"\0" * (24 << 20))
    with expecting(expected()):
        assert bounded(lambda: victim.get(k)) is None  # 24 MB never came into memory
    assert not victim.contains(k) and victim.corrupt_objects == 2
    victim.put(k, chunk_of(seed=3))
    with expecting(expected()):
        assert torch.equal(victim.get(k).kv, chunk_of(seed=3).kv)
    victim.close()


# -- decode bombs (the reproductions) ----------------------------------------------------------
@pytest.fixture(scope="module")
def wide_calibration():
    eye = torch.eye(DIM).expand(LAYERS, 2, HEADS, DIM, DIM).clone()
    cal = calib.Calibration(
        inv_freq=torch.rand(LAYERS, DIM // 2, generator=torch.Generator().manual_seed(1)),
        mean=torch.zeros(LAYERS, 2, HEADS, DIM),
        forward=eye,
        inverse=eye.clone(),
        step=torch.full((LAYERS, 2), 0.05),
        info={"test": "bomb"},
    )
    calib.register(cal)
    return cal


def bomb_header(key: bytes, codec, tokens: int, segments: list[bytes]) -> dict:
    offsets = [0]
    for s in segments:
        offsets.append(offsets[-1] + len(s))
    return {
        "key": key.hex(),
        "model": model_tag(FP, key, None),
        "codec": codec.name,
        "codec_params": codec.params(),
        "dtype": "float32",
        "shape": [LAYERS, 2, HEADS, tokens, DIM],
        "num_tokens": tokens,
        "position": 0,
        "layer_offsets": offsets,
        "layer_digests": [segment_digest(s, False).hex() for s in segments],
    }


def bombs(calibration) -> list[tuple[object, bytes, int]]:
    """(codec, object, tokens announced): a calibrated object of 1.4 KB announcing 4 M tokens (zero ANS
    words: the old decoder made 2 x 4 M x 256 symbols per layer from nothing), and a 37 KB uncalibrated
    one whose per-token steps announce 16 K tokens."""
    calibrated = CacheGenCodec(calibration=calibration.digest)
    seg = struct.pack("<2sBB", b"CG", 5, 2) + (bytes(HEADS * DIM) + struct.pack("<II", 0, 0)) * 2
    key = b"\x0b" * 16
    cal_bomb = forge(bomb_header(key, calibrated, 1 << 22, [seg] * LAYERS), seg * LAYERS)
    plain = CacheGenCodec()
    tokens = 8192
    segs = []
    for layer in range(LAYERS):
        bits = plain.layer_bits(layer, LAYERS)[0]
        alpha = 2 * (1 << (bits + 1)) + 1
        head = struct.pack("<2sBBBBHHII", b"CG", bits, bits, 0, 0, alpha, alpha, 0, 0) + struct.pack("<II", 0, 0)
        segs.append(head + bytes(HEADS * DIM * 2 + HEADS * tokens * 2) + struct.pack("<I", 1) * (2 * alpha))
    plain_bomb = forge(bomb_header(key, plain, tokens, segs), b"".join(segs))
    return [(calibrated, cal_bomb, 1 << 22), (plain, plain_bomb, tokens)]


def test_decode_bombs_are_cheap_misses(wide_calibration, tmp_path):
    key = b"\x0b" * 16
    for codec, bomb, _ in bombs(wide_calibration):
        assert len(bomb) < 40 * 1024
        disk = DiskBackend(tmp_path / codec.params().get("calibration", "plain"), 1 << 30, codec)
        path = disk._path(disk.name_of(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bomb)
        disk._index[disk.name_of(key)] = len(bomb)  # as if it had been there at start
        t0 = time.process_time()
        with expecting(expected(256)):  # what the engine expects for a 256-token chunk
            assert bounded(lambda d=disk: d.get(key), 1 << 20) is None
        assert disk.corrupt_objects == 1 and not path.exists()
        assert time.process_time() - t0 < 5  # generous: it is a header check (the old decoder took minutes)


def test_decode_bombs_within_generic_limits_stay_bounded_without_an_expectation(wide_calibration):
    """A tool decoding with no expectation is held to generic limits (8192 tokens): the calibrated bomb
    is refused, and the uncalibrated one decodes to at most what its shape says."""
    from kvshelf.storage.format import FormatError, decode_chunk

    (cal_codec, cal_bomb, _), (plain_codec, plain_bomb, tokens) = bombs(wide_calibration)
    with pytest.raises(FormatError, match="token count"):
        decode_chunk(cal_bomb, b"\x0b" * 16, cal_codec)
    out = bounded(lambda: decode_chunk(plain_bomb, b"\x0b" * 16, plain_codec).kv, 256 << 20)
    assert out.shape == (LAYERS, 2, HEADS, tokens, DIM)


# -- codec worker pool: a dead worker is a fault, never damage -------------------------------------------
def test_a_killed_worker_is_replaced_and_no_sound_chunk_is_deleted(tmp_path, monkeypatch):
    processes = pool.CodecProcesses(2)
    codec = CacheGenCodec(processes=processes)
    disk = DiskBackend(tmp_path, 1 << 30, codec)
    key = b"\x0c" * 16
    disk.put(key, chunk_of(seed=5))
    try:
        first = disk.get(key).kv
        broken = processes._pool
        for pid in list(broken._processes):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        again = disk.get(key)  # the broken pool is replaced, the chunk decodes
        assert again is not None and torch.equal(again.kv, first) and processes._pool is not broken
        assert disk.corrupt_objects == 0
        # A pool that keeps failing is a tier fault: the read raises, the object stays.
        monkeypatch.setattr(processes, "map_calls", lambda *a: (_ for _ in ()).throw(CodecPoolError("workers died")))
        with pytest.raises(CodecPoolError):
            disk.get(key)
        assert disk.contains(key) and disk.corrupt_objects == 0
    finally:
        processes.close()


# -- the disk index survives any file ------------------------------------------------------------------
def plant_junk(root, disk: DiskBackend) -> int:
    """Files of every kind in a disk tier folder; returns how many are objects that must be removed."""
    sub = root / "ab"
    sub.mkdir(parents=True, exist_ok=True)
    (sub / ("ab" + "0" * 30 + ".kvs")).write_bytes(os.urandom(500))  # garbage
    k = b"\x0d" * 16
    good = chunk_of(seed=9)
    codec = disk.codec
    header = bomb_header(k, codec, CHUNK, [b""] * LAYERS)
    header["layer_offsets"] = [0, "x", 2**70]
    name = disk.name_of(k)
    (root / name[:2]).mkdir(exist_ok=True)
    (root / name[:2] / f"{name}.kvs").write_bytes(forge(header, b""))  # forged header, valid checksum
    deep = b"[" * 50_000 + b"]" * 50_000
    (sub / ("ab" + "1" * 30 + ".kvs")).write_bytes(
        PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(deep), xxhash.xxh3_64_intdigest(deep), 0, bytes(32)) + deep
    )
    (sub / ("ab" + "2" * 30 + ".kvs")).mkdir()  # a directory where a file should be
    (sub / ("ab" + "3" * 30 + ".kvs")).symlink_to("/etc/hostname")  # a link out of the folder
    (root / "stray.kvs").write_bytes(b"in the root folder")
    (root / "not-a-dir").write_bytes(b"x")
    del good
    return 3


def test_index_rebuild_survives_any_file(tmp_path):
    disk = DiskBackend(tmp_path, 1 << 30, get_codec("int8"))
    disk.put(b"\x0e" * 16, chunk_of(seed=1))
    removed = plant_junk(tmp_path, disk)
    again = DiskBackend(tmp_path, 1 << 30, get_codec("int8"))
    assert again.num_chunks == 1 and again.corrupt_objects == removed
    assert again.get(b"\x0e" * 16) is not None
    assert (tmp_path / "ab" / ("ab" + "2" * 30 + ".kvs")).is_dir()  # not a file: left alone
    assert os.path.exists("/etc/hostname")


def test_the_server_starts_with_junk_in_the_disk_folder(tmp_path):
    from test_server import RunningServer, make_shelf

    probe = DiskBackend(tmp_path / "d", 1 << 30, get_codec("int8"))
    plant_junk(tmp_path / "d", probe)
    shelf = make_shelf(local_disk=str(tmp_path / "d"))
    with RunningServer(shelf) as server:
        import httpx

        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "tiny", "prompt": "hello there, a prompt", "max_tokens": 2},
            headers={"Authorization": "Bearer test-key"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    shelf.close()


# -- configuration -------------------------------------------------------------------------------------
def test_remote_auth_key_from_the_environment_and_one_warning_without_it(redis_server, caplog, tmp_path):
    from kvshelf.assembly.tiers import build_tiers
    from kvshelf.config import load_config
    from kvshelf.errors import ConfigError

    secret = "from the environment, long enough"
    cfg = load_config(environ={"KVSHELF_REMOTE_AUTH_KEY": secret, "KVSHELF_REMOTE_URL": redis_server.url})
    assert cfg.remote_auth_key == secret
    with pytest.raises(ConfigError, match="remote_auth_key"):
        load_config(environ={"KVSHELF_REMOTE_AUTH_KEY": "short"})
    with caplog.at_level("WARNING", logger="kvshelf.assembly.tiers"):
        keyed = build_tiers(cfg.model_copy(update={"local_disk": str(tmp_path / "d")}))
        assert not [r for r in caplog.records if "trusted as is" in r.message]
        plain = build_tiers(cfg.model_copy(update={"remote_auth_key": None}))
    warnings = [r for r in caplog.records if "trusted as is" in r.message]
    assert len(warnings) == 1 and "remote_auth_key" in warnings[0].message
    from kvshelf.assembly.tiers import _redacted

    assert _redacted("redis://:s3cret@cache:6379/0") == "redis://cache:6379/0"  # no password in the log
    # The keyed stack signs objects in the shared tier; the process's own disk folder is not a boundary.
    assert [t.backend.auth is not None for t in keyed.tiers[1:]] == [False, True]
    assert plain.tiers[-1].backend.auth is None
    keyed.close()
    plain.close()


def test_config_show_hides_the_secret():
    from typer.testing import CliRunner

    from kvshelf.cli import app

    result = CliRunner().invoke(app, ["config", "show", "--set", "remote_auth_key=a very secret key here"])
    assert result.exit_code == 0, result.output
    assert "a very secret key here" not in result.output and "remote_auth_key" in result.output


def test_files_of_the_previous_format_version_are_removed_quietly_at_start(tmp_path):
    disk = DiskBackend(tmp_path, 1 << 30, get_codec("none"))
    disk.put(b"\x0f" * 16, chunk_of())
    path = disk._path(disk.name_of(b"\x0f" * 16))
    old = bytearray(path.read_bytes())
    struct.pack_into("<H", old, 4, FORMAT_VERSION - 1)  # as written by kvshelf before the upgrade
    path.write_bytes(bytes(old))
    again = DiskBackend(tmp_path, 1 << 30, get_codec("none"))
    assert again.num_chunks == 0 and not path.exists()
    assert again.corrupt_objects == 0 and again._outdated == 1  # an upgrade, not damage


def test_io_errors_stay_tier_faults_and_delete_nothing(tmp_path, monkeypatch):
    disk = DiskBackend(tmp_path, 1 << 30, get_codec("int8"))
    disk.put(b"\x10" * 16, chunk_of())

    def failing_read(name, limit):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(disk, "_get_bytes", failing_read)
    with pytest.raises(OSError):
        disk.get(b"\x10" * 16)  # the tier manager counts it as a fault (breaker), not as damage
    assert disk.contains(b"\x10" * 16) and disk.corrupt_objects == 0


def test_a_read_that_lost_the_engines_expectation_is_a_miss_and_deletes_nothing(redis_server):
    """A tier read moved to a thread without the context (kvshelf.storage.expect) cannot confirm the
    model: the engine treats it as a miss and deletes nothing from the shared store."""
    from concurrent.futures import ThreadPoolExecutor

    from kvshelf.storage.base import StorageBackend

    backend = RedisBackend(redis_server.url, get_codec("none"), prefix="ctx:", auth=AUTH)

    class ThreadHop(StorageBackend):  # what a careless deadline wrapper would do
        name = "hop"

        def __init__(self, inner):
            self.inner, self.pool = inner, ThreadPoolExecutor(1)

        def get(self, key):
            return self.pool.submit(self.inner.get, key).result()

        def put(self, key, chunk):
            return self.inner.put(key, chunk)

        def contains(self, key):
            return self.inner.contains(key)

        def delete(self, key):
            self.inner.delete(key)

        def clear(self):
            self.inner.clear()

        used_bytes = capacity_bytes = None

    engine = CacheEngine(FPRINT, ThreadHop(backend), chunk_size=CHUNK)
    tokens = list(range(CHUNK))
    engine.store(tokens, chunk_of().kv)
    assert engine.retrieve(tokens).num_tokens == 0
    assert backend.contains(engine.keys(tokens)[0].digest) and engine.stats.rejected_chunks == 0
    assert CacheEngine(FPRINT, backend, chunk_size=CHUNK).retrieve(tokens).num_tokens == CHUNK
    backend.clear()
    backend.close()


def test_a_chunk_no_read_would_accept_is_not_written(tmp_path):
    disk = DiskBackend(tmp_path, 1 << 30, get_codec("none"))
    long_doc = StoredChunk(ChunkMeta(FP, 8193, (1, 2, 1, 8193, 1), torch.float32), torch.zeros(1, 2, 1, 8193, 1))
    assert not disk.put(b"\x11" * 16, long_doc) and disk.num_chunks == 0
