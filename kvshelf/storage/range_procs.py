"""Layer ranges of local files read and checked in worker processes, straight into shared staging memory.

A layerwise loader on a GPU reads every chunk's layer ranges on the tier's worker threads while the model's forward
launches kernels on another thread. On the disk tier each chunk's range cost Python steps under the GIL (open, fstat,
preadv, close, a digest per layer segment, each releasing and taking back the GIL), ~3,000 per 12K-token request of
the Llama-3-8B shape, and the forward's thread, which holds the GIL to launch, lost it to them (issue #17, eleventh
session: layers computed while ranges were read took 2-4x their time). Here a tier worker hands a batch of chunks'
ranges (FileRange: path, place, segment lengths and digests) to a process of its own, which opens, reads (os.preadv
into the loader's staging buffer: shared memory, kvshelf.codecs.shared_host) and checks every segment's digest, and
answers once per batch: the serving process does one hand-off per batch, and waits for it without the GIL.

Nothing is used unchecked: a segment whose digest does not match is reported as damage (the caller deletes the
object, as a read in the serving process would) and the read fails as a miss; a missing file is a miss; other I/O
errors are raised to the caller (a tier fault). A worker that dies or answers nonsense fails the call loudly and
is replaced. Messages are JSON over a Unix socket pair (the staging buffer's descriptor passed with SCM_RIGHTS the
first time a worker sees it); no stored byte is ever unpickled.

This module is also each worker's program (`python -m kvshelf.storage.range_procs FD`): it imports only the
digests at module level, so that a worker starts in a fraction of a second.
"""

from __future__ import annotations

import atexit
import hmac
import json
import logging
import mmap
import os
import queue
import socket
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from kvshelf.storage.digests import segment_digest

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kvshelf.codecs.shared_host import SharedHost
    from kvshelf.storage.base import FileRange

# What the workers need: memfd staging (shared_host), SCM_RIGHTS, SOCK_SEQPACKET, os.preadv (Linux)
SUPPORTED = sys.platform.startswith("linux")
_MESSAGE = 1 << 20  # the largest message a worker receives (its answers to a message stay far below)
# A SOCK_SEQPACKET message is sent whole or refused (EMSGSIZE above the socket's send buffer, net.core.wmem_default,
# ~208 KiB): a batch goes out in messages of at most this many bytes of jobs (~60 ranges of 8 layers each).
_SEND = 48 << 10
GONE, DAMAGED, ERROR = "gone", "damaged", "error"
# Every wait on a worker is bounded: a batch of a local disk's ranges takes milliseconds, so a worker silent this
# long is stuck (a hung file system); its call fails (the request recomputes) and it is killed and replaced.
WAIT_S = 30.0


class NotRead(Exception):
    """A job after a failed one in its batch: not read (neither a miss of its own nor damage)."""


class RangeWorkerError(RuntimeError):
    """A range reader process ended or answered what it was not asked: the request that waited on it recomputes."""


class RangeProcesses:
    """`processes` worker processes (started now; each call takes an idle one, waiting for one if none is; a worker
    that failed is replaced when the next call comes)."""

    def __init__(self, processes: int):
        if processes < 1:
            raise ValueError(f"range reader processes must be >= 1, not {processes}")
        self.processes = processes
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self._fill()

    def _fill(self) -> None:
        """Workers started up to `processes` (replacements of those that failed), under the lock so that calls
        side by side start each one once; a start that fails raises, loudly."""
        with self._lock:
            for _ in range(self.processes - len(self._workers)):
                worker = _Worker()
                self._workers.append(worker)
                self._idle.put(worker)

    def read(self, buffer: SharedHost, jobs: list[tuple[FileRange, int]]) -> list[Exception | None]:
        """Each (range, its first byte in `buffer`) read there and checked, in order, on one worker: per job None
        (read, every segment's digest matched), FileNotFoundError (no such file: a miss) or a FormatError (damaged:
        the caller refuses the object); the jobs after a failed one are not read (NotRead). Other I/O errors raise
        OSError."""
        from kvshelf.storage.format import FormatError  # here: a worker process imports no torch

        if self._closed:
            raise RangeWorkerError("the range reader processes are closed")
        self._fill()
        for r, at in jobs:
            if at < 0 or at + r.n > buffer.nbytes:
                raise ValueError(f"a range of {r.n} bytes at {at} lies outside a buffer of {buffer.nbytes} bytes")
        encoded = [_job(r, at) for r, at in jobs]
        if max(map(len, encoded), default=0) > _SEND:
            raise ValueError(f"a range of {max(len(r.lengths) for r, _ in jobs)} segments is too long to hand over")
        try:
            worker = self._idle.get(timeout=WAIT_S)
        except queue.Empty:
            raise RangeWorkerError(f"all {self.processes} range reader processes busy for {WAIT_S:g} s") from None
        try:
            answers = worker.call(buffer, encoded)
        except BaseException:
            if not worker.stop(kill=True):  # it failed its call: nothing to wait for
                buffer.taint()  # it may still write there once its read returns: never staged from again
            with self._lock:
                self._workers.remove(worker)  # replaced by the next call
            raise
        self._idle.put(worker)
        out: list[Exception | None] = []
        for answer in answers:
            if answer is None:
                out.append(None)
            elif answer[0] == DAMAGED:
                out.append(FormatError(answer[1]))
            elif answer[0] == GONE:
                out.append(FileNotFoundError(answer[1]))
            else:
                raise OSError(f"range reader: {answer[1]}")
        failed = len(answers) - 1
        return out + [NotRead(f"not read: range {failed} of the batch failed") for _ in jobs[len(answers) :]]

    def close(self) -> None:
        """Stop every worker (each ends when its socket closes) and wait for them."""
        self._closed = True
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()


class _Worker:
    """One worker process and the parent's end of its socket."""

    def __init__(self):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvshelf.storage.range_procs", str(child.fileno())],
                pass_fds=[child.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        parent.settimeout(WAIT_S)
        self.sock = parent
        self._known: set[int] = set()  # serials of the buffers this worker was handed

    def call(self, buffer: SharedHost, jobs: list[str]) -> list:
        """`jobs` (each _job's JSON) read into `buffer` by this worker, in messages of at most _SEND bytes of jobs:
        the answers in order, up to the first job that failed."""
        answers: list = []
        for batch in _batches(jobs):
            answers += self._send(buffer, batch)
            if answers[-1] is not None:  # a failed job ends the call: those after it are not read
                break
        return answers

    def _send(self, buffer: SharedHost, batch: list[str]) -> list:
        from kvshelf.codecs import shared_host  # here: a worker process imports no torch

        drop = shared_host.retired(self._known)  # buffers closed since: the worker unmaps them
        self._known -= drop
        head = json.dumps({"drop": sorted(drop), "buffer": buffer.serial, "size": buffer.nbytes})
        data = (head[:-1] + ', "jobs": [' + ", ".join(batch) + "]}").encode()
        try:
            if buffer.serial in self._known:
                self.sock.send(data)
            else:
                socket.send_fds(self.sock, [data], [buffer.fd])
                self._known.add(buffer.serial)
            reply = self.sock.recv(_MESSAGE)
        except (BrokenPipeError, ConnectionResetError):
            reply = b""
        except TimeoutError:
            raise RangeWorkerError(f"range reader process {self.proc.pid} did not answer in {WAIT_S:g} s") from None
        if not reply:
            raise RangeWorkerError(f"range reader process {self.proc.pid} ended (exit status {self.proc.poll()})")
        answers = json.loads(reply)
        sound = (
            isinstance(answers, list)
            and 0 < len(answers) <= len(batch)
            and all(a is None for a in answers[:-1])
            and (len(answers) == len(batch) or answers[-1] is not None)  # all, or up to a failure
        )
        if not sound:
            raise RangeWorkerError(f"range reader process {self.proc.pid} answered {len(reply)} bytes of nonsense")
        return answers

    def stop(self, kill: bool = False) -> bool:
        """End the worker: close its socket (its recv sees the end and it exits), then wait for it; a worker that
        does not end in 5 s, or one that failed (`kill`), is killed. False: it still runs (a read the kernel does
        not interrupt), and may write into the buffers it was handed when that read returns."""
        self.sock.close()
        if not kill:
            try:
                self.proc.wait(timeout=5)
                return True
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        try:
            self.proc.wait(timeout=5)
            return True
        except subprocess.TimeoutExpired:
            log.error("range reader process %d did not end after SIGKILL; left behind", self.proc.pid)
            return False


def _job(r: FileRange, at: int) -> str:
    """One range to read into a worker's buffer at `at`, as the worker's message carries it."""
    return json.dumps([r.path, r.at, r.n, r.limit, list(r.lengths), [d.hex() for d in r.digests], r.mac, r.first, at])


def _batches(jobs: list[str]):
    """`jobs` in runs of at most _SEND bytes (one job longer than that alone)."""
    batch: list[str] = []
    size = 0
    for job in jobs:
        if batch and size + len(job) > _SEND:
            yield batch
            batch, size = [], 0
        batch.append(job)
        size += len(job) + 2
    if batch:
        yield batch


_pools: dict[int, RangeProcesses] = {}
_pools_lock = threading.Lock()


def pool(processes: int) -> RangeProcesses:
    """The process-wide pool of `processes` workers (started on first use, stopped at exit)."""
    with _pools_lock:
        if processes not in _pools:
            if not _pools:
                atexit.register(_close_pools)
            _pools[processes] = RangeProcesses(processes)
        return _pools[processes]


def _close_pools() -> None:
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.close()


# -- the worker's side -----------------------------------------------------------------------------------------------
def read_checked(buf: memoryview, job: list) -> list | None:
    """One job into `buf`: None once read and every segment's digest matched, else [GONE | DAMAGED | ERROR, why]."""
    path, at, n, limit, lengths, digests, mac, first, dest = job
    if sum(lengths) != n or len(digests) != len(lengths) or dest < 0 or dest + n > len(buf):
        return [ERROR, f"a job of {n} bytes at {dest} that does not add up ({len(lengths)} segments)"]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return [GONE, f"{path} is gone"]
    except OSError as err:
        return [ERROR, f"{path}: {err}"]
    out = buf[dest : dest + n]
    got = 0
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            return [DAMAGED, f"file of {size} bytes; no expected chunk is larger than {limit}"]
        want = max(0, min(n, size - at))
        while got < want:  # preadv may return fewer bytes than asked
            step = os.preadv(fd, [out[got:want]], at + got)
            if step == 0:
                break
            got += step
    except OSError as err:
        return [ERROR, f"{path}: {err}"]
    finally:
        os.close(fd)
    last = first + len(lengths) - 1
    if got != n:
        return [DAMAGED, f"layers {first}..{last} are {got} bytes, the header says {n}"]
    pos = 0
    for k, (length, digest) in enumerate(zip(lengths, digests, strict=True)):
        if not hmac.compare_digest(segment_digest(out[pos : pos + length], mac), bytes.fromhex(digest)):
            return [DAMAGED, f"layer {first + k} segment digest mismatch"]
        pos += length
    return None


def serve(fd: int) -> None:
    """A worker's loop: each message a batch of jobs, answered in order; a failed job ends its batch."""
    sock = socket.socket(fileno=fd)
    maps: dict[int, mmap.mmap] = {}
    while True:
        data, fds, _, _ = socket.recv_fds(sock, _MESSAGE, 1)
        if not data:
            return  # the parent closed its end
        message = json.loads(data)
        for serial in message["drop"]:
            maps.pop(serial).close()
        if fds:
            maps[message["buffer"]] = mmap.mmap(fds[0], message["size"])
            os.close(fds[0])
        buf = memoryview(maps[message["buffer"]])
        answers = []
        for job in message["jobs"]:
            answers.append(read_checked(buf, job))
            if answers[-1] is not None:
                break
        buf.release()
        sock.send(json.dumps(answers).encode())


if __name__ == "__main__":
    serve(int(sys.argv[1]))
