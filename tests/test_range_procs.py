"""Layer ranges read and checked by worker processes into shared staging memory (kvshelf.storage.range_procs,
kvshelf.codecs.shared_host), on the CPU: the bytes land where asked, every segment's digest is checked there, a
damaged or missing file is reported (never used), a dead worker fails its call loudly and is replaced, and a
streamed layerwise load through them decodes as whole loading does."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from test_device_decode import HereBatched, prompt, setup

from kvshelf.codecs import rans_gpu, shared_host
from kvshelf.storage import range_procs
from kvshelf.storage.base import FileRange
from kvshelf.storage.digests import segment_digest
from kvshelf.storage.format import FormatError


@pytest.fixture(scope="module")
def procs():
    pool = range_procs.RangeProcesses(2)
    yield pool
    pool.close()


def stored(tmp_path, name: str, lengths: list[int], mac: bool, seed: int, pad: int = 7):
    """A file of `pad` bytes, then segments of `lengths` random bytes: its FileRange and the segments' bytes."""
    data = np.random.default_rng(seed).integers(0, 256, sum(lengths), dtype=np.uint8).tobytes()
    path = tmp_path / name
    path.write_bytes(b"h" * pad + data)
    cuts = np.cumsum([0, *lengths])
    digests = tuple(segment_digest(data[a:b], mac) for a, b in zip(cuts[:-1], cuts[1:], strict=True))
    return FileRange(str(path), pad, len(data), pad + len(data), tuple(lengths), digests, mac, 3), data


@pytest.mark.parametrize("mac", [False, True])
def test_ranges_are_read_into_shared_memory_and_checked(tmp_path, procs, mac):
    buf = shared_host.SharedHost(1 << 17, pin=False)
    a, a_bytes = stored(tmp_path, "a", [100, 5000, 1], mac, 1)
    b, b_bytes = stored(tmp_path, "b", [70_000], mac, 2, pad=0)
    assert procs.read(buf, [(a, 10), (b, 6000)]) == [None, None]
    got = buf.tensor.numpy()
    assert got[10 : 10 + a.n].tobytes() == a_bytes and got[6000 : 6000 + b.n].tobytes() == b_bytes
    assert shared_host.handle(buf.tensor) is buf and shared_host.handle(buf.tensor[1:]) is None
    # a byte flipped in the file: its segment's digest fails there; the jobs after it are not read
    raw = bytearray((tmp_path / "a").read_bytes())
    raw[7 + 100 + 42] ^= 1
    (tmp_path / "a").write_bytes(bytes(raw))
    bad, after = procs.read(buf, [(a, 0), (b, 6000)])
    assert isinstance(bad, FormatError) and "layer 4 segment digest mismatch" in str(bad)
    assert isinstance(after, range_procs.NotRead)
    # shorter than its header says, larger than any chunk may be, gone
    (tmp_path / "a").write_bytes(bytes(raw[:-1]))
    assert "are 5100 bytes, the header says 5101" in str(procs.read(buf, [(a, 0)])[0])
    (tmp_path / "a").write_bytes(bytes(raw) + b"x")
    assert "no expected chunk is larger" in str(procs.read(buf, [(a, 0)])[0])
    (tmp_path / "a").unlink()
    assert isinstance(procs.read(buf, [(a, 0)])[0], FileNotFoundError)
    with pytest.raises(ValueError, match="outside a buffer"):
        procs.read(buf, [(b, (1 << 17) - 100)])
    # a buffer closed: each worker that mapped it is told to drop it with its next call, and then forgets it
    buf.close()
    assert shared_host.handle(buf.tensor) is None and shared_host.retired({buf.serial}) == {buf.serial}
    other = shared_host.SharedHost(1 << 17, pin=False)
    for _ in range(2 * procs.processes):
        assert procs.read(other, [(b, 0)]) == [None]
    assert all(buf.serial not in w._known for w in procs._workers)


def test_a_worker_that_dies_fails_its_call_and_is_replaced(tmp_path, procs):
    buf = shared_host.SharedHost(1 << 12, pin=False)
    r, data = stored(tmp_path, "c", [300], False, 3)
    for worker in list(procs._workers):
        worker.proc.kill()
        worker.proc.wait()
    with pytest.raises(range_procs.RangeWorkerError, match="ended"):
        procs.read(buf, [(r, 0)])
    assert len(procs._workers) == 1  # the one that failed dropped, replaced by the next call
    with pytest.raises(range_procs.RangeWorkerError, match="ended"):  # the other dead one fails its call too
        procs.read(buf, [(r, 0)])
    assert procs.read(buf, [(r, 0)]) == [None] and buf.tensor.numpy()[:300].tobytes() == data
    assert len(procs._workers) == 2 and all(w.proc.poll() is None for w in procs._workers)


def test_a_worker_that_stops_answering_fails_its_call_in_bounded_time_and_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(range_procs, "WAIT_S", 0.5)
    pool = range_procs.RangeProcesses(1)
    try:
        buf = shared_host.SharedHost(1 << 12, pin=False)
        r, data = stored(tmp_path, "d", [300], False, 4)
        stuck = pool._workers[0].proc
        os.kill(stuck.pid, signal.SIGSTOP)  # alive, never answers (a hung file system)
        with pytest.raises(range_procs.RangeWorkerError, match="did not answer in 0.5 s"):
            pool.read(buf, [(r, 0)])
        assert stuck.poll() is not None  # killed
        assert pool.read(buf, [(r, 0)]) == [None] and buf.tensor.numpy()[:300].tobytes() == data
        # every worker busy: a call waits for one no longer than WAIT_S
        pool._idle.get()
        with pytest.raises(range_procs.RangeWorkerError, match="busy for 0.5 s"):
            pool.read(buf, [(r, 0)])
    finally:
        pool.close()


def test_a_batch_larger_than_one_socket_message_goes_in_several(tmp_path, procs):
    r, data = stored(tmp_path, "e", [16] * 8, True, 5)
    buf = shared_host.SharedHost(2000 * r.n, pin=False)
    jobs = [(r, k * r.n) for k in range(2000)]  # ~1 MB of jobs: one message would be refused (EMSGSIZE)
    assert sum(len(b) for b in range_procs._batches([range_procs._job(*j) for j in jobs])) == 2000
    assert procs.read(buf, jobs) == [None] * 2000 and len(procs._workers) == procs.processes
    assert buf.tensor.numpy()[1999 * r.n : 2000 * r.n].tobytes() == data


def test_a_buffer_a_killed_worker_may_still_write_is_never_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(rans_gpu, "_shared_pool", [])
    monkeypatch.setattr(range_procs._Worker, "stop", lambda self, kill=False: self.proc.kill() or False)
    pool = range_procs.RangeProcesses(1)
    try:
        host = rans_gpu.HostRange(4096, "cpu", shared=True)
        r, _ = stored(tmp_path, "f", [300], False, 6)
        pool._workers[0].proc.kill()
        pool._workers[0].proc.wait()
        with pytest.raises(range_procs.RangeWorkerError):
            pool.read(host.shared, [(r, 0)])
        assert host.shared.tainted
        host.close()
        assert rans_gpu._shared_pool == []  # dropped, not handed out again
    finally:
        pool.close()


def test_a_shared_staging_buffer_comes_from_its_own_pool(monkeypatch):
    monkeypatch.setattr(rans_gpu, "_shared_pool", [])  # this test's own
    host = rans_gpu.HostRange(5000, "cpu", shared=True)
    assert host.shared is not None and host.shared.nbytes >= 5000
    plain = rans_gpu.HostRange(5000, "cpu")
    assert plain.shared is None
    host.close()
    again = rans_gpu.HostRange(3000, "cpu", shared=True)  # the same buffer again, once given back
    assert again.shared is host.shared
    again.close()
    plain.close()
    taken = [rans_gpu.HostRange(5000, "cpu", shared=True) for _ in range(5)]  # the pool holds no more than 4
    for h in taken:
        h.close()
    larger = rans_gpu.HostRange(8 << 20, "cpu", shared=True)  # a slot's buffer replaced by a larger one: closed
    assert larger.shared.nbytes >= 8 << 20 and sum(shared_host.handle(h._host) is None for h in taken) == 1
    larger.close()


def test_streamed_layerwise_reads_through_worker_processes_decode_as_whole_loading(tmp_path, tiny_models, monkeypatch):
    calls = []
    read = range_procs.RangeProcesses.read
    monkeypatch.setattr(
        range_procs.RangeProcesses, "read", lambda self, b, jobs: calls.append(len(jobs)) or read(self, b, jobs)
    )
    tiers, whole, layered = setup(tmp_path, tiny_models("llama"), HereBatched())
    layered.engine.read_processes = 2
    tiers.tiers[0].backend.head_probe = 128  # no object comes whole with its head
    ids = prompt(100, 6)
    whole.generate(ids, max_new_tokens=1)
    tiers.flush()
    a = whole.generate(ids, max_new_tokens=4, stop_at_eos=False)
    b = layered.generate(ids, max_new_tokens=4, stop_at_eos=False)
    assert a.hit_tokens == b.hit_tokens == 99 and a.token_ids == b.token_ids
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-5)
    assert layered.layerwise_stats.as_dict()["fallbacks"] == 0
    # every range of the 7 chunks but what came with their heads was read by a worker process
    assert calls and sum(calls) >= 7
    tiers.close()
