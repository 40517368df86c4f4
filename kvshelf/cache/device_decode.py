"""Decoding a request's cached prefix on the device its KV goes to, layer group by layer group.

Where a codec decodes on the target device itself (calibrated cachegen on a CUDA GPU: Codec.decodes_on), a
layerwise loader hands it the chunks' verified stored bytes rather than decoding them on the CPU and
copying the result. The chunks are cut into runs (consecutive chunks of one codec, shape and dtype) whose
layers i..j-1 decode in one batched call (one entropy kernel, one inverse transform for all of them).

A plan is made either from chunks opened already (`plan`: each group's segments are checked and staged
as it decodes, Codec.decode_run_on) or from chunks located but not yet read (`streamed`): the loader
thread then reads each chunk's head (StorageBackend.open_ranges: prefix and header, verified), and for each
layer group the byte range of that group in every chunk (several reads in flight on the tier's workers,
driven by a read-ahead thread so that they go on while the loader decodes; each range's segments verified
against the digests of its head as it arrives: format version 3). Every chunk's range of the same layers is
read straight into one staging buffer (rans_gpu.HostRange, pinned on a GPU: LayerRanges.read_into, os.preadv on
the disk tier; cache.range_reads) and verified there, so the staging that follows neither copies the bytes again
nor holds the loader thread: the buffer goes to the device once, whole. The disk tier's ranges are read and checked
by worker processes (READ_PROCESSES, kvshelf.storage.range_procs), so that their Python does not take the GIL from
the forward's kernel launches. A group's segments are decoded as
those of chunks opened already are (Codec.decode_run_on) as soon as they are there, while later groups
are still being read, so layer 0 waits only for layer 0's bytes, not for every chunk's whole object.

The reads need not be as fine as the decoding (`read_groups`): each range read costs a call on a tier worker
and a verification pass besides its bytes, so after the first group (what the compute waits on) consecutive
decode groups are read as one range per chunk of up to `read_layers` layers (their segments lie back to back
in the payload; every layer's digest is still checked before any of its bytes are used). `read_layers` 0
reads whole objects instead of heads and ranges (every chunk read and verified before layer 0 decodes).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from kvshelf.cache.range_reads import RangeReads
from kvshelf.codecs.base import Codec, SegmentRows
from kvshelf.storage import range_procs

# Layers per range read after the first group (issue #17, read granularity): 0 reads whole objects, a value >= the
# model's layers one range per chunk for all the rest. 8: the shortest layerwise TTFT at the same reads in flight in
# the A/B on the H200 (Llama-3-8B shape, 48 chunks of 32 layers, groups of 4: 232 ms vs 257-269 for a range per
# group, 250 for the rest in one range, 238 for whole objects; BENCHMARKS.md, "Read granularity").
READ_LAYERS = 8
# Decode groups read alone, each its own range, at the start (the compute waits on them in turn). 1: layer 0 alone,
# then ranges of READ_LAYERS. 2 (layers 1-4 alone too, so that they wait for 4 layers' reads, not 8) was slower on
# the H200 (issue #17 second pass, Llama-3-8B shape, medians of 3 on one host: layerwise 249 vs 229 ms at Python's
# 5 ms switch interval, 229 vs 219 at 1 ms; BENCHMARKS.md).
READ_ALONE = 1
# Bytes of read results queued ahead of the decoder at most (one result is always let through).
READ_AHEAD_BYTES = 512 << 20
# Calls each layer range of every chunk is read in (side by side on the tier's workers, within its read window), a
# call reading its share of the chunks one after the other. Every call is a future, a hand-off to a worker and back
# and a result queued for the decoder: Python steps that take the GIL from the forward's kernel launches while the
# first layers compute (issue #17, ninth session: one call per chunk was 240 calls per request on the Llama-3-8B
# shape, 48 chunks x 5 ranges, and the read-ahead thread's share of them alone ~20 ms of CPU). 4: the default read
# window of the benchmarks, so that a range is still read 4 calls side by side.
READ_CALLS = 4
# Worker processes that read and check the disk tier's layer ranges for a streamed plan (kvshelf.storage.range_procs),
# into staging buffers of shared memory; 0: the tier's worker threads do it in this process (their Python per chunk
# takes the GIL from the forward's kernel launches: issue #17, twelfth session; BENCHMARKS.md).
READ_PROCESSES = 4


def batches(n: int, calls: int) -> list[tuple[int, int]]:
    """[a, b) bounds of `n` items cut into `calls` (at least 1) consecutive batches of near-equal size."""
    calls = max(1, min(calls, n))
    bounds = [n * c // calls for c in range(calls + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def read_groups(groups: list[tuple[int, int]], read_layers: int, alone: int | None = None) -> list[tuple[int, int]]:
    """The layer ranges read from every chunk for decode `groups` (consecutive, in order): the first `alone`
    groups (default READ_ALONE, at least 1) as they are (the compute waits on them first), then consecutive groups
    merged while the merge spans at most `read_layers` layers (a group larger than that is read alone);
    `read_layers` 0: one range of every layer (whole objects)."""
    alone = max(1, READ_ALONE if alone is None else alone)
    if read_layers < 0:
        raise ValueError(f"read_layers must be >= 0, not {read_layers}")
    if not groups:
        return []
    for (_, b), (c, _) in zip(groups, groups[1:], strict=False):
        if b != c:
            raise ValueError(f"layer groups are not consecutive: {groups}")
    if read_layers == 0:
        return [(groups[0][0], groups[-1][1])]
    reads = [groups[0]]
    for i, j in groups[1:]:
        a, b = reads[-1]
        if len(reads) > alone and j - a <= read_layers:
            reads[-1] = (a, j)
        else:
            reads.append((i, j))
    return reads


class ChunkNotDecodable(RuntimeError):
    """A chunk of a streamed plan was missing, damaged or not what the plan expected: the request recomputes."""


@dataclass(frozen=True)
class _Run:
    codec: Codec
    first: int  # index of its first chunk among the request's
    count: int  # consecutive chunks, each of `shape`
    start: int  # first token of the run in the prompt
    end: int  # one past its last token used (the last chunk may be used in part)
    position: int  # RoPE position of its first chunk
    shape: tuple  # a layer of one chunk: [2, kv_heads, tokens, head_dim]
    dtype: torch.dtype
    num_layers: int


def _runs(specs: list[tuple]) -> list[_Run]:
    """specs: (codec, start, end, position, shape, dtype, num_layers) per chunk in prompt order."""
    runs: list[_Run] = []
    for k, (codec, start, end, position, shape, dtype, layers) in enumerate(specs):
        last = runs[-1] if runs else None
        tokens = shape[2]
        if (
            last is not None
            and last.codec is codec
            and last.shape == shape
            and last.dtype == dtype
            and last.end == start == last.start + last.count * tokens
            and position == last.position + last.count * tokens
        ):
            runs[-1] = _Run(codec, last.first, last.count + 1, last.start, end, last.position, shape, dtype, layers)
        else:
            runs.append(_Run(codec, k, 1, start, end, position, shape, dtype, layers))
    return runs


@dataclass(frozen=True)
class Staged:
    """A layer group i..j-1 staged (DeviceDecoding.stage): per run, the callable that queues its device work."""

    i: int
    j: int
    launches: list


class DeviceDecoding:
    """The runs of one request's chunks (opened already, or read here: heads, then layer ranges), decoded
    group of layers by group onto `device`."""

    def __init__(
        self,
        runs: list[_Run],
        device: torch.device,
        readers: list | None,
        opener: Callable | None,
        fetch: Callable | None = None,
        read_layers: int = READ_LAYERS,
        read_calls: int = READ_CALLS,
        read_processes: int = READ_PROCESSES,
    ):
        self.runs, self.device = runs, device
        self.read_processes = read_processes  # streamed: worker processes reading local files' ranges (READ_PROCESSES)
        self.read_layers = read_layers  # streamed: layers per range read after the first group (read_groups)
        self.read_calls = read_calls  # streamed: calls each range of every chunk is read in (READ_CALLS)
        self.num_chunks = sum(r.count for r in runs)
        self._readers = readers  # opened already (plan), or None: opener() yields them in order (streamed)
        self._opener, self._fetch = opener, fetch
        self._ranges: list = [None] * self.num_chunks  # streamed: each chunk's LayerRanges, once its head is read
        self._reads: _ReadAhead | None = None  # streamed: the layer ranges being read, group by group, chunk by chunk
        self._groups: collections.deque[tuple[int, int]] = collections.deque()  # streamed: still to decode
        # streamed: the ranges still to be read (read_groups)
        self._plan: collections.deque[tuple[int, int]] = collections.deque()
        self._held: tuple | None = None  # streamed: (first, end, [bytes of every chunk]) of the range decoding
        self._buffers: collections.deque[RangeReads] = collections.deque()  # streamed: a buffer per range to read
        self._done_buffer: RangeReads | None = None  # streamed: the buffer of the range decoding
        self._run_of = [r for r in runs for _ in range(r.count)]

    @classmethod
    def plan(cls, chunks: list, device) -> DeviceDecoding | None:
        """A plan for `chunks` ((ChunkKey, reader) pairs in prompt order, opened), or None unless every chunk
        is held as stored bytes by a codec that decodes on `device`."""
        device = torch.device(device)
        specs = []
        for key, reader in chunks:
            encoded = reader.encoded_layer(0)
            if encoded is None or not encoded[0].decodes_on(device):
                return None
            meta = reader.meta
            specs.append(
                (encoded[0], key.start, key.end, meta.position, tuple(meta.shape[1:]), meta.dtype, meta.shape[0])
            )
        return cls(_runs(specs), device, [r for _, r in chunks], None) if specs else None

    @classmethod
    def streamed(
        cls,
        specs: list[tuple],
        device,
        opener: Callable[[], Generator],
        fetch: Callable[[list], Generator],
        read_layers: int = READ_LAYERS,
        read_calls: int = READ_CALLS,
        read_processes: int = READ_PROCESSES,
    ) -> DeviceDecoding:
        """A plan for chunks located but not read: specs as _runs takes them; opener() yields each chunk's
        LayerRanges in order (None: it could not be read or verified; with `read_layers` 0 chunks read whole);
        fetch(calls) yields the results of (LayerRanges.read, (i, j)) calls in order, several read side by
        side; `read_layers`: see read_groups; `read_calls`: the calls each range of every chunk is read in;
        `read_processes`: READ_PROCESSES."""
        return cls(_runs(specs), torch.device(device), None, opener, fetch, read_layers, read_calls, read_processes)

    @property
    def streaming(self) -> bool:
        return self._opener is not None

    def open(self, groups: list[tuple[int, int]]) -> None:
        """A streamed plan: read and verify every chunk's head, in order, then start reading the layer ranges of
        `groups` (the loader's layer groups, in the order it decodes them); raises ChunkNotDecodable for a
        chunk missing, damaged or unlike the plan. A plan of chunks opened already has nothing to do: each
        layer group stages its segments as it decodes (decode_run_on)."""
        if self._opener is None:
            return
        heads = self._opener()
        try:
            for k in range(self.num_chunks):
                self._ranges[k] = self._checked(k, next(heads, None))
        finally:
            heads.close()  # ends the reads still in flight (on an error)
        self._groups = collections.deque(groups)
        self._plan = collections.deque(read_groups(list(groups), self.read_layers))
        # each range of every chunk is read straight into one staging buffer per range (its segments are then
        # staged where they lie: no copy on this thread)
        # reader processes where the ranges lie in local files (the disk tier; its last range is never in the head)
        local = self.read_processes > 0 and range_procs.SUPPORTED and self._ranges[0].file_range(*self._plan[-1])
        procs = range_procs.pool(self.read_processes) if local else None
        self._buffers = collections.deque(RangeReads(self._ranges, i, j, self.device, procs) for i, j in self._plan)
        cuts = batches(self.num_chunks, self.read_calls)
        calls = [(buf.read, cut) for buf in self._buffers for cut in cuts]
        self._reads = _ReadAhead(self._fetch(calls))

    def _checked(self, k: int, ranges):
        run = self._run_of[k]
        if ranges is None:
            raise ChunkNotDecodable(f"chunk {k} of the prefix could not be read (a miss or a damaged object)")
        meta = ranges.meta
        if ranges.codec is not run.codec or tuple(meta.shape[1:]) != run.shape or meta.dtype != run.dtype:
            raise ChunkNotDecodable(f"chunk {k} is not coded as planned ({ranges.codec.name}, {tuple(meta.shape)})")
        return ranges

    def _group_segments(self, i: int, j: int) -> list[list]:
        """Every chunk's layers i..j-1 as read (within the range of the plan being read, read_groups) and
        verified: segments[l][k], layer i + l of chunk k, as decode_run_on takes them."""
        if not self._groups or self._groups[0] != (i, j):
            raise ChunkNotDecodable(f"layers {i}..{j - 1} asked for out of the order they are read in")
        self._groups.popleft()
        if self._held is None or j > self._held[1]:
            self._held = None  # what the last range held is staged already: let it go
            if self._done_buffer is not None:
                self._done_buffer.close()  # back to the pool once its copy to the device has run
                self._done_buffer = None
            if not self._plan or self._plan[0][0] != i or self._plan[0][1] < j:
                raise ChunkNotDecodable(
                    f"layers {i}..{j - 1} are not the start of a range read ({list(self._plan)[:1]})"
                )
            a, b = self._plan.popleft()
            self._done_buffer = self._buffers.popleft()
            data: list = []
            while len(data) < self.num_chunks:  # the range's calls, each the bytes of a batch of chunks
                got = self._reads.next()
                if got is None or None in got:
                    k = len(data) + (0 if got is None else got.index(None))
                    raise ChunkNotDecodable(
                        f"layers {a}..{b - 1} of chunk {k} could not be read (a miss or damaged bytes)"
                    )
                data.extend(got)
            if len(data) != self.num_chunks:
                raise ChunkNotDecodable(f"layers {a}..{b - 1}: {len(data)} chunks read, not {self.num_chunks}")
            self._held = (a, b, data)
        a, _, data = self._held
        segments: list[list] = [[] for _ in range(i, j)]
        for k in range(self.num_chunks):
            offs, got = self._ranges[k].offsets, data[k]
            for m in range(i, j):
                segments[m - i].append(got[offs[m] - offs[a] : offs[m + 1] - offs[a]])
        return segments

    def ready(self, i: int, j: int) -> bool:
        """Whether stage(i, j) would find its bytes read already (a plan of opened chunks always does), so that a
        loader knows whether staging the next group may keep it waiting for reads."""
        if self._readers is not None or (self._held is not None and j <= self._held[1]):
            return True
        return self._reads is not None and self._reads.queued() >= len(batches(self.num_chunks, self.read_calls))

    def stage(self, i: int, j: int) -> Staged:
        """The CPU's share of decoding layers i..j-1 of every chunk (for a streamed plan: waiting for their reads;
        then the codec's checks and staging, Codec.stage_run_on, with the copies to the device queued on the current
        stream); decode(i, j, staged) queues the rest. A streamed plan stages the groups given to open, in order."""
        group = self._group_segments(i, j) if self._readers is None else None
        launches = []
        for run in self.runs:
            a, b = run.first, run.first + run.count
            if group is None:  # opened already: each chunk's layers i..j-1, back to back in its payload
                payloads = [self._readers[k].encoded_payload() for k in range(a, b)]
                if None in payloads:  # a reader without its payload whole: segment by segment
                    segments = [[self._readers[k].encoded_layer(m)[1] for k in range(a, b)] for m in range(i, j)]
                else:
                    segments = SegmentRows.of([p[1:] for p in payloads], i, j)
            else:  # read as ranges
                segments = [row[a:b] for row in group]
            # checked and staged by the codec per group (one pinned buffer, one copy, one kernel on a GPU)
            launches.append(
                run.codec.stage_run_on(
                    segments, run.shape, run.dtype, list(range(i, j)), run.num_layers, self.device, run.position
                )
            )
        return Staged(i, j, launches)

    def decode(self, i: int, j: int, staged: Staged | None = None) -> tuple[list, torch.Tensor | None]:
        """Layers i..j-1 of every chunk on the device: ([(start, end, [j - i, 2, heads, end - start, dim])], an
        error flag on the device that must be seen False before the KV is used, or None). `staged`: what
        stage(i, j) returned (staged here if None)."""
        if staged is None:
            staged = self.stage(i, j)
        if (staged.i, staged.j) != (i, j):
            raise ValueError(f"layers {i}..{j - 1} asked for with layers {staged.i}..{staged.j - 1} staged")
        parts, flags = [], []
        for run, launch in zip(self.runs, staged.launches, strict=True):
            kv, err = launch()
            parts.append((run.start, run.end, kv[:, :, :, : run.end - run.start]))
            if err is not None:
                flags.append(err.reshape(1))
        return parts, (torch.cat(flags).any() if flags else None)

    def num_tokens_bytes(self, i: int, j: int) -> int:
        """Bytes of layers i..j-1 of every chunk's used tokens in their decoded dtype."""
        total = 0
        for run in self.runs:
            two, heads, _, dim = run.shape
            total += (j - i) * two * heads * (run.end - run.start) * dim * run.dtype.itemsize
        return total

    def release(self) -> None:
        """Stop the reads still in flight and drop what they hold, once every layer is decoded (or on an error)
        and the device is done with the staged bytes (the caller synchronised the stream they were queued on)."""
        if self._reads is not None:
            self._reads.close()
            self._reads = None
        for buf in [*self._buffers, *([self._done_buffer] if self._done_buffer is not None else [])]:
            buf.close()  # a read still writing into one keeps it until that read ends (HostRange)
        self._buffers.clear()
        self._done_buffer = None
        self._ranges = [None] * self.num_chunks
        self._held = None


class _ReadAhead:
    """Runs a generator of reads on a thread of its own, so that the reads go on (within the tier's read window)
    while the loader stages and decodes what came before; results queue up in order, at most `limit` bytes of
    them (the reads pause beyond that: bounded read-ahead). An exception of the reads is raised to the
    consumer; close() stops the reads and joins the thread."""

    def __init__(self, results: Generator, limit: int = READ_AHEAD_BYTES):
        self._queue: collections.deque = collections.deque()
        self._queued = 0  # bytes of the results queued
        self._limit = limit
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(results,), name="kvshelf-read-ahead", daemon=True)
        self._thread.start()

    def _put(self, item: tuple, nbytes: int = 0) -> bool:
        """Queue a result once there is room (always when nothing is queued); False once stopped."""
        with self._cond:
            while self._queue and self._queued + nbytes > self._limit and not self._stop:
                self._cond.wait()
            self._queue.append((item, nbytes))
            self._queued += nbytes
            self._cond.notify_all()
            return not self._stop

    def _run(self, results: Generator) -> None:
        try:
            for result in results:
                if not self._put((True, result), _nbytes(result)):
                    break
        except BaseException as err:  # handed to the loader, which fails the request loudly
            self._put((False, err))
        finally:
            try:
                results.close()
            finally:  # the end is queued even when close() raises: next() never waits for it in vain
                self._put((False, None))

    def queued(self) -> int:
        """Results queued now (an end or an error counts too: next() would not wait for them)."""
        with self._cond:
            return len(self._queue)

    def next(self):
        """The next result in order; None once the reads have ended."""
        with self._cond:
            while not self._queue:
                self._cond.wait()
            (ok, value), nbytes = self._queue[0]
            if ok or value is not None:  # the end stays queued: every later call sees it too
                self._queue.popleft()
                self._queued -= nbytes
                self._cond.notify_all()
        if ok:
            return value
        if value is not None:
            raise value  # the end is queued behind it (_run)
        return None

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._queue.clear()  # what was read ahead is dropped now
            self._queued = 0
            self._cond.notify_all()
        self._thread.join()


def _nbytes(result) -> int:
    """Bytes a read result holds: a buffer, a list of them (a call's batch of chunks), or None."""
    if result is None:
        return 0
    if isinstance(result, list):
        return sum(memoryview(r).nbytes for r in result if r is not None)
    return memoryview(result).nbytes
