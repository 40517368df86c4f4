"""Scheduler-to-worker cache lookups across processes.

`vllm serve` runs the scheduler in its engine-core process and, on some executors (the CPU one among
them), the model worker in another. Only the worker holds kvshelf's engine (its CPU tier lives there), so
the scheduler asks it over a Unix socket: (salt, token ids) in, cached prefix length out. The socket is
private to the user (mode 0600) and authenticated with the vLLM engine id (multiprocessing's HMAC
handshake); messages are raw bytes, never pickles. Any failure is a miss, logged, never an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener

import numpy as np

log = logging.getLogger(__name__)

_HIT = struct.Struct("<q")


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


class LookupServer:
    """Answers lookups from the engine in this (worker) process, one thread per connection."""

    def __init__(self, path: str, authkey: bytes, lookup: Callable[[list[int], str | None], int]):
        self.path, self._authkey, self._lookup = path, authkey, lookup
        if os.path.exists(path):  # left by a process that died: nobody can be listening on it
            os.unlink(path)
        self._listener = Listener(address=path, family="AF_UNIX", authkey=authkey)
        os.chmod(path, 0o600)
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="kvshelf-lookup-server", daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except Exception as err:  # a failed handshake, or the listener closing
                if not self._closed:
                    log.warning("kvshelf lookup server: refused a connection: %s", err)
                continue
            if self._closed:
                conn.close()
                break
            thread = threading.Thread(target=self._serve, args=(conn,), name="kvshelf-lookup-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    blob = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                try:
                    tokens, salt = decode_request(blob)
                    hit = self._lookup(tokens, salt)
                except Exception as err:  # answer a miss; the scheduler goes on
                    log.warning("kvshelf lookup server: lookup failed: %s", err)
                    hit = 0
                try:
                    conn.send_bytes(_HIT.pack(hit))
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):  # wake the accept() blocked in its thread
            Client(self.path, family="AF_UNIX", authkey=self._authkey).close()
        self._accept.join(timeout=5)
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)
        if os.path.exists(self.path):
            os.unlink(self.path)


class LookupClient:
    """The scheduler's end: one connection, opened on first use and reopened after a failure."""

    def __init__(self, path: str, authkey: bytes):
        self.path, self._authkey = path, authkey
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._warned = False

    def lookup(self, tokens: list[int], salt: str | None) -> int:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = Client(self.path, family="AF_UNIX", authkey=self._authkey)
                self._conn.send_bytes(encode_request(tokens, salt))
                return _HIT.unpack(self._conn.recv_bytes())[0]
            except Exception as err:
                if not self._warned:
                    log.warning("kvshelf: cannot reach the worker's lookup socket %s (%s): misses", self.path, err)
                    self._warned = True
                self.close_locked()
                return 0

    def close_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()
