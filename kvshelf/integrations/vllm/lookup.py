"""Scheduler-to-worker cache lookups across processes.

`vllm serve` runs the scheduler in its engine-core process and, on some executors (the CPU one among
them), the model worker in another. Only the worker holds kvshelf's engine (its CPU tier lives there), so
the scheduler asks it over a Unix socket: (salt, token ids) in, cached prefix length out. The socket is
private to the user (mode 0600) and every request carries an HMAC keyed with the vLLM engine id; frames
are raw bytes, never pickles. Every wait has a timeout: a slow, dead or refusing worker is a miss,
logged, never a stuck scheduler.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_HIT = struct.Struct("<q")
_MAC = 32
_MAX_FRAME = 64 << 20


def socket_path(engine_id: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"kvshelf-{os.getuid()}-{engine_id[:36]}.sock")


def encode_request(tokens: list[int], salt: str | None) -> bytes:
    salt_bytes = b"" if salt is None else salt.encode()
    flag = 0 if salt is None else 1
    return struct.pack("<BI", flag, len(salt_bytes)) + salt_bytes + np.asarray(tokens, dtype="<i8").tobytes()


def decode_request(blob: bytes) -> tuple[list[int], str | None]:
    flag, n = struct.unpack_from("<BI", blob)
    salt = blob[5 : 5 + n].decode() if flag else None
    body = blob[5 + n :]
    if len(body) % 8:
        raise ValueError("token ids must be 8-byte integers")
    return np.frombuffer(body, dtype="<i8").tolist(), salt


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError("peer closed the connection")
        buf += part
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is larger than allowed")
    return _recv_exact(sock, n)


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)


class LookupServer:
    """Answers lookups from the engine in this (worker) process, one thread per connection."""

    def __init__(self, path: str, authkey: bytes, lookup: Callable[[list[int], str | None], int]):
        self.path, self._key, self._lookup = path, authkey, lookup
        if os.path.exists(path):  # left by a process that died: nobody can be listening on it
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._sock.settimeout(0.2)  # the accept loop checks for close() this often
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="kvshelf-lookup-server", daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if not self._closed.is_set():
                    log.warning("kvshelf lookup server: accept failed: %s", err)
                return
            conn.settimeout(0.2)
            thread = threading.Thread(target=self._serve, args=(conn,), name="kvshelf-lookup-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while not self._closed.is_set():
                try:
                    frame = _recv_frame(conn)
                except TimeoutError:
                    continue
                except (EOFError, OSError, ValueError):
                    return
                mac, body = frame[:_MAC], frame[_MAC:]
                if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()):
                    log.warning("kvshelf lookup server: dropped a connection with a bad signature")
                    return
                try:
                    tokens, salt = decode_request(body)
                    hit = self._lookup(tokens, salt)
                except Exception as err:  # answer a miss; the scheduler goes on
                    log.warning("kvshelf lookup server: lookup failed: %s", err)
                    hit = 0
                try:
                    _send_frame(conn, _HIT.pack(hit))
                except OSError:
                    return

    def close(self) -> None:
        self._closed.set()
        self._accept.join()
        self._sock.close()
        for thread in self._threads:
            thread.join()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class LookupClient:
    """The scheduler's end: one connection, opened on first use and reopened after a failure."""

    def __init__(self, path: str, authkey: bytes, *, timeout_s: float = 2.0):
        self.path, self._key, self.timeout_s = path, authkey, timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    def lookup(self, tokens: list[int], salt: str | None) -> int:
        body = encode_request(tokens, salt)
        frame = hmac.new(self._key, body, hashlib.sha256).digest() + body
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self.timeout_s)
                    sock.connect(self.path)
                    self._sock = sock
                _send_frame(self._sock, frame)
                (hit,) = _HIT.unpack(_recv_frame(self._sock))
                self._warned = False
                return hit
            except (OSError, EOFError, ValueError, struct.error) as err:
                if not self._warned:
                    log.warning("kvshelf: no answer from the worker's lookup socket %s (%s): misses", self.path, err)
                    self._warned = True
                self._close_locked()
                return 0

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()
