"""Load a request's cached KV layer by layer in a background thread while the model computes.

The loader writes layer i into the request's KV buffer and signals it; the model runner waits for layer
i just before computing it (`wait`, used as the runner's pre-layer hook), so loading layers i+1.. overlaps
computing layer i. At most `buffer_layers` layers are loaded ahead of the compute. On a GPU the copy of
each layer goes through a pinned host buffer on a separate CUDA stream, and the compute stream waits on
that layer's event: no device-wide synchronisation.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from kvshelf.cache.engine import LayerwiseRetrieval
from kvshelf.layerwise.stats import LayerwiseStats
from kvshelf.metrics import metrics
from kvshelf.model.kv_buffer import KVBuffer

log = logging.getLogger(__name__)


class LayerLoadError(RuntimeError):
    """A layer could not be loaded; the request must recompute instead of using partial KV."""


class LayerwiseLoader:
    def __init__(
        self,
        retrieval: LayerwiseRetrieval,
        kv: KVBuffer,
        *,
        buffer_layers: int,
        stats: LayerwiseStats,
        start_thread: bool = True,
    ):
        self.retrieval = retrieval
        self.kv = kv
        self.n = retrieval.num_tokens
        self.buffer_layers = max(1, buffer_layers)
        self.stats = stats
        self.num_layers = retrieval.num_layers
        self._ready = [threading.Event() for _ in range(self.num_layers)]
        self._consumed = 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._cuda = kv.data.is_cuda
        self._stream = torch.cuda.Stream(device=kv.data.device) if self._cuda else None
        self._events: list = [None] * self.num_layers
        self._thread = threading.Thread(target=self._run, name="kvshelf-layer-loader", daemon=True)
        if start_thread:
            self._thread.start()
        else:  # synchronous loading (use_async_load=false): everything now, on this thread
            self._run()

    def _run(self) -> None:
        with torch.inference_mode():  # per thread; the request's tensors were made under it
            self._load_all()

    def _load_all(self) -> None:
        try:
            for i in range(self.num_layers):
                with self._room:
                    while i >= self._consumed + self.buffer_layers and not self._closed:
                        self._room.wait()
                if self._closed:
                    return
                t0 = time.perf_counter()
                nbytes = 0
                keep_alive = []
                if self._cuda:
                    with torch.cuda.stream(self._stream):
                        for start, end, part in self.retrieval.layer_parts(i):
                            if not part.is_pinned():  # pageable memory cannot be copied asynchronously
                                staged = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
                                part = staged.copy_(part)
                            self.kv.data[i, :, :, start:end].copy_(part, non_blocking=True)
                            keep_alive.append(part)  # until the copy has run
                            nbytes += part.numel() * part.element_size()
                        event = torch.cuda.Event()
                        event.record(self._stream)
                    self._events[i] = (event, keep_alive)
                else:
                    for start, end, part in self.retrieval.layer_parts(i):
                        self.kv.data[i, :, :, start:end].copy_(part)
                        nbytes += part.numel() * part.element_size()
                self.stats.record(i, load_s=time.perf_counter() - t0, nbytes=nbytes)
                self._ready[i].set()
        except BaseException as err:  # reported to the request through wait(); it then recomputes
            self._error = err
            log.warning("layerwise load failed: %s: %s", type(err).__name__, err)
            for event in self._ready:
                event.set()

    def wait(self, i: int, *_args) -> None:
        """Block until layer i's cached KV is in the buffer (pre-layer hook of the model runner)."""
        t0 = time.perf_counter()
        self._ready[i].wait()
        if self._error is not None:
            raise LayerLoadError(f"layer {i} could not be loaded: {self._error}") from self._error
        if self._cuda:
            event, _staging = self._events[i]
            torch.cuda.current_stream(self.kv.data.device).wait_event(event)
            self._events[i] = (event, None)
        waited = time.perf_counter() - t0
        self.stats.record(i, wait_s=waited)
        metrics().layerwise_load_latency.observe(waited)
        with self._room:
            self._consumed = i + 1
            self._room.notify_all()

    def close(self) -> None:
        """Stop loading (if still running) and join the thread."""
        with self._room:
            self._closed = True
            self._room.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        if self._cuda and self._stream is not None:
            self._stream.synchronize()  # staging buffers may be freed only after their copies ran
