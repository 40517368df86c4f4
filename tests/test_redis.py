"""Redis/Valkey tier against real redis-server processes: single node, AUTH, unix socket, cluster."""

import pytest
import torch
from helpers import key, make_chunk
from services import RedisServer

from kvshelf.codecs import get_codec
from kvshelf.errors import ConfigError
from kvshelf.storage.redis import RedisBackend

RAW = get_codec("none")


@pytest.fixture
def backend(redis_server):
    b = RedisBackend(redis_server.url, RAW, prefix="t:")
    b.clear()
    yield b
    b.clear()
    b.close()


def test_round_trip_contains_many_delete(backend):
    chunks = {key(i): make_chunk(seed=i) for i in range(3)}
    for k, c in chunks.items():
        assert backend.put(k, c)
    assert backend.contains_many([key(0), key(5), key(2)]) == [True, False, True]
    for k, c in chunks.items():
        assert torch.equal(backend.get(k).kv, c.kv)
    backend.delete(key(0))
    assert backend.get(key(0)) is None and not backend.contains(key(0))


def test_large_values_are_split_into_parts(redis_server):
    b = RedisBackend(redis_server.url, RAW, prefix="parts:", part_bytes=4096)
    c = make_chunk(tokens=64, dim=32)  # ~100 KB: 25 parts
    b.put(key(1), c)
    client = redis_server.client()
    assert len(list(client.scan_iter(match="parts:*"))) > 20
    assert torch.equal(b.get(key(1)).kv, c.kv)
    # A lost part (evicted, expired) makes the chunk a miss, and the remains are cleaned up.
    part = next(k for k in client.scan_iter(match="parts:*:3"))
    client.delete(part)
    assert b.get(key(1)) is None
    assert list(client.scan_iter(match="parts:*")) == [] and b.corrupt_objects == 1


def test_ttl_is_set(redis_server):
    b = RedisBackend(redis_server.url, RAW, prefix="ttl:", ttl_s=100)
    b.put(key(1), make_chunk())
    ttl = redis_server.client().ttl(b._key(b.name_of(key(1))))
    assert 0 < ttl <= 100
    b.clear()


def test_corrupted_or_foreign_values_are_misses_and_deleted(backend, redis_server):
    client = redis_server.client()
    backend.put(key(1), make_chunk(seed=1))
    raw = bytearray(client.get(backend._key(backend.name_of(key(1)))))
    raw[len(raw) // 2] ^= 0x10
    client.set(backend._key(backend.name_of(key(1))), bytes(raw))
    assert backend.get(key(1)) is None and not backend.contains(key(1))
    client.set(backend._key(backend.name_of(key(2))), b"not a chunk at all")
    assert backend.get(key(2)) is None
    # A valid object copied under another key's name is caught by the key in its header.
    backend.put(key(3), make_chunk(seed=3))
    client.set(backend._key(backend.name_of(key(4))), client.get(backend._key(backend.name_of(key(3)))))
    assert backend.get(key(4)) is None and backend.get(key(3)) is not None
    assert backend.corrupt_objects == 3


def test_auth_and_valkey_and_unix_urls(tmp_path):
    sock = tmp_path / "r.sock"
    server = RedisServer(tmp_path / "auth", password="s3cret", extra_args=["--unixsocket", str(sock)]).start()
    try:
        for url in (server.url, server.url.replace("redis://", "valkey://"), f"unix://:s3cret@{sock}?db=0"):
            b = RedisBackend(url, RAW, prefix="auth:")
            b.put(key(1), make_chunk())
            assert b.get(key(1)) is not None
            b.clear()
            b.close()
        wrong = RedisBackend(server.url.replace("s3cret", "wrong"), RAW)
        with pytest.raises(Exception, match="(?i)auth|password|WRONGPASS|invalid"):
            wrong.get(key(1))
    finally:
        server.kill()


def test_bad_urls_name_the_key():
    with pytest.raises(ConfigError, match="remote_url"):
        RedisBackend("memcached://x:1", RAW)
    with pytest.raises(ConfigError, match="remote_url"):
        RedisBackend("redis-cluster://hostonly", RAW)


def test_cluster_round_trip_and_parts(redis_cluster):
    b = RedisBackend(redis_cluster.url, RAW, prefix="c:", part_bytes=4096)
    chunks = {key(i): make_chunk(seed=i, tokens=32) for i in range(12)}
    for k, c in chunks.items():
        b.put(k, c)
    assert all(b.contains_many(list(chunks)))
    for k, c in chunks.items():
        assert torch.equal(b.get(k).kv, c.kv)
    # The keys spread over the masters: the cluster is really in use.
    counts = [n.client().dbsize() for n in redis_cluster.nodes]
    assert sum(1 for c in counts if c > 0) >= 2, counts
    b.clear()
    assert not any(b.contains_many(list(chunks)))
    b.close()


def test_tls_with_auth(tmp_path):
    """rediss:// with a CA bundle and a password, against a TLS-only redis-server."""
    import subprocess

    from services import free_port, redis_bin, wait_for

    cert, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key_file),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            redis_bin(),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key_file),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "pw",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"rediss://:pw@127.0.0.1:{port}/0"
        b = RedisBackend(url, RAW, prefix="tls:", ssl_ca_certs=str(cert))
        wait_for(lambda: b.client.ping(), what="TLS redis-server")
        b.put(key(1), make_chunk(seed=1))
        assert torch.equal(b.get(key(1)).kv, make_chunk(seed=1).kv)
        # Without the CA bundle the server's self-signed certificate is refused.
        untrusting = RedisBackend(url, RAW, prefix="tls:")
        with pytest.raises(Exception, match="(?i)certificate|ssl"):
            untrusting.get(key(1))
        b.close()
    finally:
        proc.kill()
        proc.wait()
