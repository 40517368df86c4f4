"""Load a request's cached KV layer by layer in a background thread while the model computes.

The loader writes layer i into the request's KV (a `LayerTarget`) and signals it; the model runner waits
for layer i just before computing it (`wait`, used as the runner's pre-layer hook), so loading layers
i+1.. overlaps computing layer i. At most `buffer_size` layers are loaded ahead of the compute. On a
GPU each chunk's layer group goes from pinned host memory (staged there if needed) to the device on a
separate CUDA stream, as one 2-D memcpy (kvmath/strided_copy.py), and the compute stream waits on that group's
event: no device-wide synchronisation. Issuing the copies from this thread keeps them off the thread
that launches the model's kernels (the driver call releases the GIL), which on a launch-bound prefill is
what decides whether the load hides.

Chunks decoded on the GPU itself (a `DeviceDecoding`) may come streamed: located but not read. The loader
then reads every chunk's head, layer 0's byte range of every chunk, and the later groups' in ranges of a few
groups each (device_decode.read_groups; several reads side by side, each range verified on its own: format
version 3), so the request's compute starts at once, layer 0 waits only for layer 0's bytes, and later groups
are read while earlier layers compute; a chunk or range that cannot be read or checked makes the request
recompute.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Protocol

import torch

from kvshelf.cache.device_decode import DeviceDecoding
from kvshelf.cache.engine import LayerwiseRetrieval
from kvshelf.kvmath.strided_copy import ChunkRowCopier
from kvshelf.layerwise.stats import LayerwiseStats
from kvshelf.metrics import Metrics

log = logging.getLogger(__name__)


class LayerTarget(Protocol):
    """Where loaded layers go: kvshelf's own KV buffer, or a serving engine's paged KV cache."""

    device: torch.device

    def write_layers(self, i: int, j: int, start: int, part: torch.Tensor, *, non_blocking: bool = False) -> None:
        """Write layers i..j-1 of cached tokens [start, start + n) from `part` [j - i, 2, heads, n, dim]."""

    def row_copier(self, chunks: list[tuple[int, torch.Tensor, int]]) -> ChunkRowCopier | None:
        """A 2-D memcpy copier of pinned host chunks (first token, tensor, tokens) into this target on a
        GPU, or None where the target has no such fast path (the loader then writes layer groups)."""


_streams: dict[torch.device, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def _load_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's load stream, one for every request: PyTorch's allocator reuses freed blocks only on the
    stream they were used on, so a new stream per request would allocate a GPU decoder's buffers anew."""
    with _streams_lock:
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device=device)
        return _streams[device]


# Whether a layerwise forward on a GPU runs on a stream of the device's highest priority (issue #17, eleventh session):
# the loader's decode kernels (rANS, the fused finish) then take only the SMs the forward's kernels leave free. H200,
# Llama-3-8B shape, alternated in one process: layerwise 171.2 vs 176.6 ms (4 of 5 rounds faster) with the default
# read plan, 176.0 vs 175.1 with layers 1-4 read alone (BENCHMARKS.md).
PRIORITY_COMPUTE = True
_compute_streams: dict[torch.device, torch.cuda.Stream] = {}


@contextlib.contextmanager
def prioritized(device: torch.device):
    """Run the block's CUDA work on `device`'s highest-priority stream (PRIORITY_COMPUTE), ordered after what the
    current stream queued before and before what it queues after; elsewhere (CPU, or off) a no-op."""
    device = torch.device(device)
    if device.type != "cuda" or not PRIORITY_COMPUTE:
        yield
        return
    with _streams_lock:
        if device not in _compute_streams:
            _compute_streams[device] = torch.cuda.Stream(device=device, priority=torch.cuda.Stream.priority_range()[1])
        stream = _compute_streams[device]
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        current.wait_stream(stream)


def layer_groups(num_layers: int, buffer_size: int) -> list[tuple[int, int]]:
    """Layer ranges moved together: layer 0 alone (the compute starts as soon as it is in), then groups of
    up to 4 (one copy per chunk per group: per-copy overhead, not bandwidth, is what a layer-at-a-time loop
    pays for on a GPU), never larger than the buffer."""
    group = max(1, min(buffer_size, 4))
    bounds = [0, *range(1, num_layers, group), num_layers] if num_layers > 1 else [0, num_layers]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class LayerLoadError(RuntimeError):
    """A layer could not be loaded; the request must recompute instead of using partial KV."""


class LayerwiseLoader:
    def __init__(
        self,
        retrieval: LayerwiseRetrieval,
        kv: LayerTarget,
        *,
        buffer_size: int,
        stats: LayerwiseStats,
        use_async_load: bool = True,
        metrics: Metrics | None = None,
        decoding: DeviceDecoding | None = None,
    ):
        self.retrieval = retrieval
        # Chunks decoded on the KV's own device (LayerwiseRetrieval.device_decoding), else on the CPU
        self.decoding = decoding
        self.open_s = 0.0  # time the loader spent reading the chunks' heads before the first group
        self.kv = kv
        self.n = retrieval.num_tokens
        self.buffer_size = max(1, buffer_size)  # layers loaded ahead of the compute, at most
        self.stats = stats
        self.metrics = metrics  # the owner's; None: waits are not observed as a metric
        self.num_layers = retrieval.num_layers
        self._ready = [threading.Event() for _ in range(self.num_layers)]
        self._consumed = 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._cuda = kv.device.type == "cuda"
        self._stream = _load_stream(kv.device) if self._cuda else None
        if self._stream is not None:
            # Copies start after everything already queued for this KV (its allocation and zeroing, a
            # serving engine's block zeroing, index tensors built for the target).
            self._stream.wait_stream(torch.cuda.current_stream(kv.device))
        self._events: list = [None] * self.num_layers
        self._thread = threading.Thread(target=self._run, name="kvshelf-layer-loader", daemon=True)
        if use_async_load:  # a background thread loads while the model computes
            self._thread.start()
        else:  # synchronous loading (use_async_load=false): everything now, on this thread, so no buffer limit
            self.buffer_size = self.num_layers
            self._run()

    def _run(self) -> None:
        with torch.inference_mode():  # per thread; the request's tensors were made under it
            self._load_all()

    def _load_all(self) -> None:
        pinned: list[bool] | None = None
        try:
            if self.decoding is not None:
                # Decoding on the device: groups of half the buffer, so that one group can be staged on the CPU
                # while the device decodes the one before without running past the buffer
                self._load_on_device(layer_groups(self.num_layers, max(1, self.buffer_size // 2)))
                return
            copier = self._row_copier() if self._cuda else None
            for i, j in layer_groups(self.num_layers, self.buffer_size):
                with self._room:
                    while j > self._consumed + self.buffer_size and not self._closed:
                        self._room.wait()
                if self._closed:
                    return
                t0 = time.perf_counter()
                if copier is not None:  # pinned CPU-tier chunks: pointer arithmetic and 2-D memcpys only
                    copier.copy(i, j, self._stream)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                    nbytes = copier.nbytes_per_layer * (j - i)
                    self.retrieval.count_retrieved(nbytes)
                    per_layer = (time.perf_counter() - t0) / (j - i)
                    for k in range(i, j):
                        self._events[k] = (event, copier.keep_alive)
                        self.stats.record(k, load_s=per_layer, nbytes=nbytes // (j - i))
                        self._ready[k].set()
                    continue
                parts = self.retrieval.layer_parts(i, j)
                nbytes = sum(p.numel() * p.element_size() for _, _, p in parts)
                if self._cuda:
                    if pinned is None:  # asking CUDA whether memory is pinned is slow: once per chunk
                        pinned = [p.is_pinned() for _, _, p in parts]
                    keep_alive = []
                    with torch.cuda.stream(self._stream):
                        for (start, _end, part), is_pinned in zip(parts, pinned, strict=True):
                            if not is_pinned:  # pageable memory cannot be copied asynchronously
                                part = torch.empty(part.shape, dtype=part.dtype, pin_memory=True).copy_(part)
                            self.kv.write_layers(i, j, start, part, non_blocking=True)
                            keep_alive.append(part)  # until the copy has run
                        event = torch.cuda.Event()
                        event.record(self._stream)
                    for k in range(i, j):
                        self._events[k] = (event, keep_alive)
                else:
                    for start, _end, part in parts:
                        self.kv.write_layers(i, j, start, part)
                per_layer = (time.perf_counter() - t0) / (j - i)
                for k in range(i, j):
                    self.stats.record(k, load_s=per_layer, nbytes=nbytes // (j - i))
                    self._ready[k].set()
        except BaseException as err:  # reported to the request through wait(); it then recomputes
            self._error = err
            log.warning("layerwise load failed: %s: %s", type(err).__name__, err)
            for event in self._ready:
                event.set()
        finally:
            if self.decoding is not None:
                if self._stream is not None:
                    self._stream.synchronize()  # the staged host bytes are copied before they are let go
                self.decoding.release()  # reads still in flight end

    def _load_on_device(self, groups: list[tuple[int, int]]) -> None:
        """Decode `groups` on the device in order: each group's CPU share (its reads waited for, checks, staging:
        DeviceDecoding.stage) runs while the device decodes the group before, and its device work is queued once
        the buffer has room for it. A decoded group is marked ready once its error flag is seen clear: at once for
        layer 0 (the compute starts with it), before staging waits for reads, else once the next one is queued."""
        self._open_on_device(groups)
        pending: tuple | None = None  # the last group queued on the device, not yet known to be sound
        staged, staged_s = None, 0.0  # the next group staged, and the seconds its staging took
        for n, (i, j) in enumerate(groups):
            if staged is None:
                staged, staged_s = self._stage_on_device(i, j)
            with self._room:  # this group must wait for the compute, which may be waiting for the pending one
                due = pending is not None and j > self._consumed + self.buffer_size
            if due:
                pending = self._release(pending)
            with self._room:
                while j > self._consumed + self.buffer_size and not self._closed:
                    self._room.wait()
            if self._closed:
                return
            # its load time: staging and queueing, not the waits for the compute between them
            decoded = self._decode_on_device(i, j, time.perf_counter() - staged_s, staged)
            staged = None
            if pending is not None:  # checked while the device works on this group
                self._release(pending)
            pending = decoded
            if n + 1 < len(groups):
                a, b = groups[n + 1]
                if i == 0 or not self.decoding.ready(a, b) or pending[2] is None or pending[2].query():
                    pending = self._release(pending)  # not held behind the next group's reads and staging
                staged, staged_s = self._stage_on_device(a, b)
        if pending is not None:
            self._release(pending)

    def _stage_on_device(self, i: int, j: int) -> tuple:
        """The CPU's share of decoding layers i..j-1 (DeviceDecoding.stage), copies queued on the load stream, and
        the seconds it took."""
        t0 = time.perf_counter()
        with torch.cuda.stream(self._stream) if self._cuda else contextlib.nullcontext():
            return self.decoding.stage(i, j), time.perf_counter() - t0

    def _decode_on_device(self, i: int, j: int, t0: float, staged=None) -> tuple:
        """Queue layers i..j-1 of every chunk (`staged`: by _stage_on_device): decoded on the device (on the load
        stream) into the KV. Returns what _release needs to check the decoder's error flag and mark the layers
        ready; the flag is copied back behind the decode: the loader waits for it, the compute not."""
        stream = torch.cuda.stream(self._stream) if self._cuda else contextlib.nullcontext()
        with stream:
            parts, flag = self.decoding.decode(i, j, staged)
            for start, _end, part in parts:
                self.kv.write_layers(i, j, start, part, non_blocking=True)
            host_flag = None
            if flag is not None:
                host_flag = torch.empty((), dtype=torch.bool, pin_memory=self._cuda)
                host_flag.copy_(flag, non_blocking=True)
            event = None
            if self._cuda:
                event = torch.cuda.Event()
                event.record(self._stream)
        nbytes = self.decoding.num_tokens_bytes(i, j)
        self.retrieval.count_retrieved(nbytes)
        per_layer = (time.perf_counter() - t0) / (j - i)
        for k in range(i, j):
            self.stats.record(k, load_s=per_layer, nbytes=nbytes // (j - i))
        return i, j, event, host_flag

    def _open_on_device(self, groups: list[tuple[int, int]]) -> None:
        """A streamed plan: read and verify every chunk's head, in order, and start reading the layer ranges of
        `groups` (read side by side on the tier's workers as the groups decode)."""
        t0 = time.perf_counter()
        self.decoding.open(groups)
        self.open_s = time.perf_counter() - t0
        self.stats.record(0, load_s=self.open_s)

    def _release(self, pending: tuple) -> None:
        """Mark a device-decoded group ready once its decode is known to be exact: a cache never serves KV
        that did not decode (the request then recomputes)."""
        i, j, event, host_flag = pending
        if event is not None:
            event.synchronize()
        if host_flag is not None and bool(host_flag):
            raise LayerLoadError(f"layers {i}..{j - 1} did not decode (damaged stored bytes)")
        for k in range(i, j):
            self._events[k] = (event, None) if event is not None else None
            self._ready[k].set()
        return None

    def _row_copier(self) -> ChunkRowCopier | None:
        """The fast path when every chunk is a pinned tensor in memory and the target offers it."""
        chunks = self.retrieval.in_memory()
        if chunks is None or not all(kv.is_pinned() for _, kv, _ in chunks):
            return None
        try:
            return self.kv.row_copier(chunks)
        except (ValueError, RuntimeError) as err:
            log.info("layerwise: no 2-D memcpy fast path (%s)", err)
            return None

    def wait(self, i: int, *_args) -> None:
        """Block until layer i's cached KV is in the buffer (pre-layer hook of the model runner)."""
        t0 = time.perf_counter()
        self._ready[i].wait()
        if self._error is not None:
            raise LayerLoadError(f"layer {i} could not be loaded: {self._error}") from self._error
        if self._cuda:
            event, _buffers = self._events[i]
            torch.cuda.current_stream(self.kv.device).wait_event(event)
        waited = time.perf_counter() - t0
        self.stats.record(i, wait_s=waited)
        if self.metrics is not None:
            self.metrics.layerwise_load_latency.observe(waited)
        with self._room:
            self._consumed = i + 1
            self._room.notify_all()

    @property
    def error(self) -> BaseException | None:
        """Why loading stopped early, if it did (after close(): final)."""
        return self._error

    def close(self) -> None:
        """Stop loading (if still running) and join the thread."""
        with self._room:
            self._closed = True
            self._room.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        if self._cuda and self._stream is not None:
            self._stream.synchronize()  # staging buffers may be freed only after their copies ran
