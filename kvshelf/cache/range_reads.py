"""A streamed device-decoding plan's reads of one layer range of every chunk, into one staging buffer.

Layers a..b-1 of every chunk go into one staging buffer (rans_gpu.HostRange, pinned on a GPU), chunk k at its own
place, so that the decoder stages them where they lie and sends the buffer to the device once, whole. The reads run
on the tier's worker threads, a batch of chunks per call (device_decode.READ_CALLS). Each chunk's bytes are verified
where they lie before anything uses them: by the tier's LayerRanges.read_into in this process, or, where the range
lies in a local file and reader processes are given (kvshelf.storage.range_procs), by a worker process that reads
and checks a whole batch into the buffer (then of shared memory) while this process waits without the GIL.
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported on first use: it loads numba, which vLLM's CPU worker start-up must not see
    from kvshelf.codecs import rans_gpu
    from kvshelf.storage.range_procs import RangeProcesses


class RangeReads:
    """Layers a..b-1 of every chunk (`ranges`: their LayerRanges) read into one staging buffer, taken when the first
    of them is read (so that only the ranges being read hold one): read(first, end) runs on a tier worker for a
    batch of chunks. `procs`: worker processes that read and check the ranges that lie in local files."""

    def __init__(self, ranges: list, a: int, b: int, device: torch.device, procs: RangeProcesses | None = None):
        self._ranges, self.a, self.b, self.device, self._procs = ranges, a, b, device, procs
        self._starts = [0, *itertools.accumulate(r.offsets[b] - r.offsets[a] for r in ranges)]
        self._host: rans_gpu.HostRange | None = None
        self._lock = threading.Lock()
        self._closed = False

    def read(self, first: int, end: int) -> list[memoryview | None]:
        """Chunks first..end-1's layers a..b-1, each into its place (None: not read, or not sound; the chunks
        after it are not read then)."""
        got: list[memoryview | None] = [None] * (end - first)
        with self._lock:
            if self._closed:
                return got
            if self._host is None:
                from kvshelf.codecs import rans_gpu

                self._host = rans_gpu.HostRange(self._starts[-1], self.device, shared=self._procs is not None)
            host = self._host
        base = self._starts[first]
        part = host.view(base, self._starts[end] - base)
        if part is None:
            return got
        try:
            elsewhere: list[tuple[int, object]] = []  # (k, its FileRange): read by a worker process
            for k in range(first, end):
                at = self._starts[k] - base
                spot = part[at : self._starts[k + 1] - base]
                where = self._ranges[k].file_range(self.a, self.b) if host.shared is not None else None
                if where is not None:
                    elsewhere.append((k, where))
                    got[k - first] = spot
                    continue
                got[k - first] = self._ranges[k].read_into(self.a, self.b, spot)
                if got[k - first] is None:  # the chunks after it are not read, nor those left to a process
                    left = {j for j, _ in elsewhere}
                    return [None if j >= k or j in left else g for j, g in enumerate(got, first)]
            if elsewhere:
                self._read_elsewhere(host, elsewhere, got, first)
            return got
        finally:
            host.done()

    def _read_elsewhere(self, host, jobs: list[tuple[int, object]], got: list, first: int) -> None:
        """`jobs` read and checked by a worker process into `host` (shared memory); a chunk that failed (and those
        after it) set to None in `got`, a damaged one refused (its object deleted), a gone one forgotten."""
        from kvshelf.storage.range_procs import NotRead

        outcomes = self._procs.read(host.shared, [(where, self._starts[k]) for k, where in jobs])
        for (k, _), err in zip(jobs, outcomes, strict=True):
            if err is not None:
                if not isinstance(err, NotRead):
                    self._ranges[k].refused(None if isinstance(err, FileNotFoundError) else err)
                got[k - first] = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            host, self._host = self._host, None
        if host is not None:
            host.close()
