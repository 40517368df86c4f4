"""A loopback TCP proxy that plays an unlucky network between kvshelf and a real service (test helper).

Modes, switchable while connections are open (they apply to bytes from the service to the client):
- "pass": forward as is;
- "delay": hold each reply `delay_s` before forwarding it (a reply: the first bytes after a request);
- "trickle": forward one byte every `trickle_s` (each recv well under any socket timeout, so only a
  total deadline ends the wait); reads shorter than `trickle_min_bytes` pass at once (small replies
  quick, large values trickling: a link with little bandwidth);
- "stall": forward nothing (the connection stays open, the client waits).

Bounded: at most `max_connections` open at once (more are refused), two threads per connection; it stops
by itself after `lifetime_s`, and stop() closes every socket and joins every thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

MODES = ("pass", "delay", "trickle", "stall")


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        *,
        mode: str = "pass",
        delay_s: float = 0.5,
        trickle_s: float = 0.005,
        trickle_min_bytes: int = 0,
        max_connections: int = 64,
        lifetime_s: float = 300.0,
        target_host: str = "127.0.0.1",
    ):
        self.target = (target_host, target_port)
        self.delay_s, self.trickle_s, self.trickle_min_bytes = delay_s, trickle_s, trickle_min_bytes
        self.max_connections = max_connections
        self.lifetime_s = lifetime_s
        self.set_mode(mode)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.connections = 0  # accepted so far
        self.refused = 0

    def set_mode(
        self,
        mode: str,
        *,
        delay_s: float | None = None,
        trickle_s: float | None = None,
        trickle_min_bytes: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if trickle_min_bytes is not None:
            self.trickle_min_bytes = trickle_min_bytes
        if delay_s is not None:
            self.delay_s = delay_s
        if trickle_s is not None:
            self.trickle_s = trickle_s
        self.mode = mode

    # -- life -------------------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._started = time.monotonic()
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._close(self._listener)
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            self._close(s)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(5.0)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, target, name, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    @staticmethod
    def _close(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()

    def _open(self) -> int:
        with self._lock:
            return len(self._sockets) // 2

    # -- forwarding ---------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            if time.monotonic() - self._started > self.lifetime_s:
                threading.Thread(target=self.stop, daemon=True).start()  # stops by itself
                return
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if self._open() >= self.max_connections:
                self.refused += 1
                self._close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._close(client)
                continue
            upstream.settimeout(0.1)
            client.settimeout(0.1)
            with self._lock:
                self._sockets |= {client, upstream}
            self.connections += 1
            pending = threading.Event()  # a request was sent and its reply not yet begun
            self._spawn(self._pump_up, "proxy-up", client, upstream, pending)
            self._spawn(self._pump_down, "proxy-down", upstream, client, pending)

    def _recv(self, s: socket.socket, n: int) -> bytes | None:
        """Bytes, b"" when the peer closed, None on a quiet interval (to look at the stop flag)."""
        try:
            return s.recv(n)
        except TimeoutError:
            return None
        except OSError:
            return b""

    def _send(self, s: socket.socket, data: bytes) -> bool:
        try:
            s.settimeout(5)
            s.sendall(data)
            s.settimeout(0.1)
            return True
        except OSError:
            return False

    def _pump_up(self, client, upstream, pending) -> None:
        try:
            while not self._stop.is_set():
                data = self._recv(client, 65536)
                if data is None:
                    continue
                if not data or not self._send(upstream, data):
                    return
                pending.set()
        finally:
            self._drop(client, upstream)

    def _pump_down(self, upstream, client, pending) -> None:
        try:
            while not self._stop.is_set():
                if self.mode == "stall":
                    time.sleep(0.01)
                    continue
                data = self._recv(upstream, 65536)
                if data is None:
                    continue
                if not data:
                    return
                if self.mode == "delay" and pending.is_set():
                    self._stop.wait(self.delay_s)
                pending.clear()
                if self.mode == "trickle" and len(data) >= self.trickle_min_bytes:
                    for i in range(len(data)):
                        if self._stop.is_set() or self.mode != "trickle":
                            if not self._send(client, data[i:]):
                                return
                            break
                        if not self._send(client, data[i : i + 1]):
                            return
                        self._stop.wait(self.trickle_s)
                elif not self._send(client, data):
                    return
        finally:
            self._drop(client, upstream)

    def _drop(self, *sockets) -> None:
        for s in sockets:
            self._close(s)
        with self._lock:
            self._sockets -= set(sockets)


class ProxyProcess:
    """A FaultProxy in a child process: its forwarding threads then take no interpreter time from the
    process under test (a slow network does not slow the client's own Python). Same verbs."""

    def __init__(self, target_port: int, **kw):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._ctl, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(target_port, kw, child), daemon=True)
        self.port: int | None = None

    def start(self) -> ProxyProcess:
        self._proc.start()
        if not self._ctl.poll(30):
            self._proc.kill()
            raise RuntimeError("the fault proxy process did not start")
        self.port = self._ctl.recv()
        return self

    def set_mode(self, mode: str, **kw) -> None:
        self._ctl.send((mode, kw))
        reply = self._ctl.recv()
        if reply != "ok":
            raise ValueError(reply)

    def stop(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError, EOFError):
                self._ctl.send(None)
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _serve(target_port: int, kw: dict, ctl) -> None:
    proxy = FaultProxy(target_port, **kw).start()
    ctl.send(proxy.port)
    try:
        while True:
            try:
                msg = ctl.recv()
            except EOFError:  # the parent is gone
                return
            if msg is None:
                return
            try:
                proxy.set_mode(msg[0], **msg[1])
                ctl.send("ok")
            except ValueError as err:
                ctl.send(str(err))
    finally:
        proxy.stop()
