"""The vLLM lookup socket: private directory and key file, no replay, partial frames, no takeover."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import time

import pytest

from kvshelf.integrations.vllm import lookup as lk
from kvshelf.integrations.vllm.lookup import LookupClient, LookupServer


def hits(tokens, salt):
    return len(tokens) if salt == "ok" else 0


@pytest.fixture
def base():
    # Unix socket paths are short (108 bytes): pytest's tmp_path is too deep for them.
    folder = tempfile.mkdtemp(prefix="kvl", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def served(base):
    server = LookupServer.for_engine("engine-1", hits, base=base)
    yield server
    server.close()


def key_of(server) -> bytes:
    return lk.read_key(server.key_file)


def test_private_directory_key_file_and_socket_modes(served, base, tmp_path):
    folder = os.path.dirname(served.path)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(served.key_file).st_mode) == 0o600
    assert "engine-1" not in served.path  # the engine id is no secret, but no longer the key either
    key = key_of(served)
    assert len(key) == 32 and key != b"engine-1"
    other = LookupServer.for_engine("engine-2", hits, base=base)
    try:
        assert key_of(other) != key  # one random key per engine
    finally:
        other.close()
    assert not os.path.exists(other.path) and not os.path.exists(other.key_file)
    # a directory others can enter is refused
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f"kvshelf-{os.getuid()}").mkdir(mode=0o755)
    os.chmod(shared / f"kvshelf-{os.getuid()}", 0o755)
    with pytest.raises(PermissionError, match="0700"):
        lk.private_dir(str(shared))


def test_the_client_reads_the_key_file_and_a_wrong_key_is_a_miss(served):
    client = LookupClient(served.path, lambda: lk.read_key(served.key_file))
    assert client.lookup([1, 2, 3], "ok") == 3
    assert LookupClient(served.path, os.urandom(32)).lookup([1, 2, 3], "ok") == 0
    client.close()


def _handshake(path: str) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s, lk._recv_frame(s)


def test_a_recorded_request_cannot_be_replayed(served):
    key = key_of(served)
    body = lk.encode_request([1, 2, 3, 4], "ok")
    s, nonce = _handshake(served.path)
    frame = lk._mac(key, nonce, 0, b"Q", body) + body
    lk._send_frame(s, frame)
    reply = lk._recv_frame(s)
    assert lk._HIT.unpack(reply[32:]) == (4,)
    lk._send_frame(s, frame)  # the same frame again on the same connection: refused (sequence number)
    with pytest.raises((EOFError, ConnectionError)):
        lk._recv_frame(s)
    s.close()
    s2, nonce2 = _handshake(served.path)  # on a new connection: refused (another nonce)
    assert nonce2 != nonce
    lk._send_frame(s2, frame)
    with pytest.raises((EOFError, ConnectionError)):
        lk._recv_frame(s2)
    s2.close()


def test_a_frame_that_pauses_midway_is_still_read_whole(served):
    key = key_of(served)
    body = lk.encode_request(list(range(50)), "ok")
    s, nonce = _handshake(served.path)
    payload = lk._mac(key, nonce, 0, b"Q", body) + body
    data = lk._LEN.pack(len(payload)) + payload
    s.sendall(data[:2])  # inside the length prefix
    time.sleep(0.5)  # longer than the server's 0.2 s read timeout
    s.sendall(data[2:40])
    time.sleep(0.5)
    s.sendall(data[40:])
    assert lk._HIT.unpack(lk._recv_frame(s)[32:]) == (50,)
    s.close()


def test_finished_connection_threads_are_pruned(served):
    key = key_of(served)
    for _ in range(30):
        c = LookupClient(served.path, key)
        assert c.lookup([1], "ok") == 1
        c.close()
    time.sleep(0.5)  # the closed connections' threads notice EOF
    c = LookupClient(served.path, key)
    c.lookup([1], "ok")
    assert len(served._threads) <= 3 and served.connections <= 2
    c.close()


def test_a_live_socket_is_never_taken_over_but_a_dead_one_is(served, base):
    key = key_of(served)
    with pytest.raises(RuntimeError, match="not taking it over"):
        LookupServer.for_engine("engine-1", hits, base=base)
    assert key_of(served) == key  # its key file was left alone too
    assert LookupClient(served.path, key_of(served)).lookup([1, 2], "ok") == 2  # the first still serves
    dead = os.path.join(base, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(dead)
    s.close()  # the file stays, nobody listens
    server = LookupServer(dead, b"k" * 32, hits)
    try:
        assert LookupClient(dead, b"k" * 32).lookup([1, 2, 3], "ok") == 3
    finally:
        server.close()
