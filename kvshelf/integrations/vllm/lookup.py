"""Scheduler-to-worker cache lookups across processes.

`vllm serve` runs the scheduler in its engine-core process and, on some executors (the CPU one among
them), the model worker in another. Only the worker holds kvshelf's engine (its CPU tier lives there), so
the scheduler asks it over a Unix socket: (salt, token ids) in, cached prefix length out. Frames are raw
bytes, never pickles. Every wait has a timeout: a slow, dead or refusing worker is a miss, logged, never
a stuck scheduler.

Who may ask: the socket and its key live in a private directory (0700, owned by this user; the socket
0600, created under a umask so it is never open to others, not even for a moment). The worker makes a
random 32-byte key per engine and writes it to a 0600 file there (or takes one from the config); each
request carries an HMAC over a per-connection nonce, a sequence number and the body, so a recorded
request cannot be replayed. A live socket is never taken over by a second server.
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


_NONCE = 32
KEY_BYTES = 32


def private_dir(base: str | None = None) -> str:
    """This user's private directory for lookup sockets and keys, made 0700 if missing; refuses one that
    another user owns or others can enter."""
    base = base or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"kvshelf-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory owned by this user with mode 0700")
    return path


def engine_paths(engine_id: str, base: str | None = None) -> tuple[str, str]:
    """(socket path, key file path) of an engine; the names do not reveal the engine id."""
    tag = hashlib.sha256(engine_id.encode()).hexdigest()[:24]
    folder = private_dir(base)
    return os.path.join(folder, f"lookup-{tag}.sock"), os.path.join(folder, f"lookup-{tag}.key")


def socket_path(engine_id: str) -> str:
    return engine_paths(engine_id)[0]


def write_key(path: str) -> bytes:
    """A fresh random key, written to `path` with mode 0600 (replacing an old one atomically)."""
    key = os.urandom(KEY_BYTES)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.hex().encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


def read_key(path: str) -> bytes | None:
    """The key in `path`, or None when there is none (yet); refuses a file others can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            raise PermissionError(f"lookup key file {path} is readable by others")
        return bytes.fromhex(f.read().decode())


def _mac(key: bytes, nonce: bytes, seq: int, kind: bytes, body: bytes) -> bytes:
    return hmac.new(key, nonce + seq.to_bytes(8, "little") + kind + body, hashlib.sha256).digest()


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


class _FrameReader:
    """Reads length-prefixed frames; bytes of a frame that is still arriving are kept across timeouts."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def read(self) -> bytes:
        """The next frame; TimeoutError (nothing lost) when it has not fully arrived yet."""
        while True:
            if len(self.buf) >= _LEN.size:
                (n,) = _LEN.unpack_from(self.buf)
                if n > _MAX_FRAME:
                    raise ValueError(f"frame of {n} bytes is larger than allowed")
                if len(self.buf) >= _LEN.size + n:
                    frame = bytes(self.buf[_LEN.size : _LEN.size + n])
                    del self.buf[: _LEN.size + n]
                    return frame
            part = self.sock.recv(1 << 16)
            if not part:
                raise EOFError("peer closed the connection")
            self.buf += part


def _claim(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to replace one a live server answers on."""
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody listens: left by a process that died
        return
    except OSError as err:
        raise RuntimeError(f"cannot tell whether {path} is in use ({err}); not replacing it") from None
    finally:
        probe.close()
    raise RuntimeError(f"another kvshelf worker serves lookups on {path}; not taking it over")


class LookupServer:
    """Answers lookups from the engine in this (worker) process, one thread per connection."""

    def __init__(
        self,
        path: str,
        authkey: bytes,
        lookup: Callable[[list[int], str | None], int],
        *,
        key_file: str | None = None,
    ):
        self.path, self._key, self._lookup, self.key_file = path, authkey, lookup, key_file
        _claim(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: no moment where others may connect
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._sock.settimeout(0.2)  # the accept loop checks for close() this often
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="kvshelf-lookup-server", daemon=True)
        self._accept.start()

    @classmethod
    def for_engine(cls, engine_id: str, lookup, *, key: bytes | None = None, base: str | None = None):
        """The server of an engine: a fresh random key in a 0600 file beside the socket, unless `key` is
        given (from the config, shared with the scheduler another way)."""
        path, key_file = engine_paths(engine_id, base)
        _claim(path)
        if key is None:
            return cls(path, write_key(key_file), lookup, key_file=key_file)
        return cls(path, key, lookup)

    @property
    def connections(self) -> int:
        return sum(t.is_alive() for t in self._threads)

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
            self._threads = [t for t in self._threads if t.is_alive()]  # finished connections
            thread = threading.Thread(target=self._serve, args=(conn,), name="kvshelf-lookup-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        nonce = os.urandom(_NONCE)
        seq = 0
        with conn:
            try:
                _send_frame(conn, nonce)
            except OSError:
                return
            reader = _FrameReader(conn)
            while not self._closed.is_set():
                try:
                    frame = reader.read()
                except TimeoutError:
                    continue  # a frame may be half-way: its bytes stay in the reader
                except (EOFError, OSError, ValueError):
                    return
                mac, body = frame[:_MAC], frame[_MAC:]
                if not hmac.compare_digest(mac, _mac(self._key, nonce, seq, b"Q", body)):
                    log.warning("kvshelf lookup server: dropped a connection with a bad or replayed signature")
                    return
                try:
                    tokens, salt = decode_request(body)
                    hit = self._lookup(tokens, salt)
                except Exception as err:  # answer a miss; the scheduler goes on
                    log.warning("kvshelf lookup server: lookup failed: %s", err)
                    hit = 0
                answer = _HIT.pack(hit)
                try:
                    _send_frame(conn, _mac(self._key, nonce, seq, b"A", answer) + answer)
                except OSError:
                    return
                seq += 1

    def close(self) -> None:
        self._closed.set()
        self._accept.join()
        self._sock.close()
        for thread in self._threads:
            thread.join()
        for path in (self.path, self.key_file):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


class LookupClient:
    """The scheduler's end: one connection, opened on first use and reopened after a failure. `authkey` is
    the key, or a function that reads it (the worker writes a new one each time it starts)."""

    def __init__(self, path: str, authkey: bytes | Callable[[], bytes | None], *, timeout_s: float = 2.0):
        self.path, self._authkey, self.timeout_s = path, authkey, timeout_s
        self._sock: socket.socket | None = None
        self._session: tuple[bytes, bytes] | None = None  # (key, nonce) of the open connection
        self._seq = 0
        self._lock = threading.Lock()
        self._warned = False

    def _connect(self) -> None:
        key = self._authkey() if callable(self._authkey) else self._authkey
        if key is None:
            raise FileNotFoundError("the worker has not written its lookup key yet")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.path)
            nonce = _recv_frame(sock)
        except BaseException:
            sock.close()
            raise
        if len(nonce) != _NONCE:
            sock.close()
            raise ValueError("the lookup server sent no valid nonce")
        self._sock, self._session, self._seq = sock, (key, nonce), 0

    def lookup(self, tokens: list[int], salt: str | None) -> int:
        body = encode_request(tokens, salt)
        with self._lock:
            try:
                if self._sock is None:
                    self._connect()
                key, nonce = self._session
                _send_frame(self._sock, _mac(key, nonce, self._seq, b"Q", body) + body)
                reply = _recv_frame(self._sock)
                mac, answer = reply[:_MAC], reply[_MAC:]
                if not hmac.compare_digest(mac, _mac(key, nonce, self._seq, b"A", answer)):
                    raise ValueError("the answer's signature is wrong")
                (hit,) = _HIT.unpack(answer)
                self._seq += 1
                self._warned = False
                return hit
            except (OSError, EOFError, ValueError, struct.error, PermissionError) as err:
                if not self._warned:
                    log.warning("kvshelf: no answer from the worker's lookup socket %s (%s): misses", self.path, err)
                    self._warned = True
                self._close_locked()
                return 0

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._session = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()
