"""Store a request's new KV layer by layer: layer i is copied out while the model computes layer i+1.

`HostChunks` is the one layer-by-layer save: host copies of a request's new chunks, filled one layer
at a time, handed to the engine only when every layer was written. The HF path fills it from kvshelf's
KV buffer through `LayerwiseSaver`; the vLLM worker fills it from vLLM's paged cache (`save_kv_layer`).

`LayerwiseSaver`: the runner calls `on_layer(i)` after computing layer i (its post-layer hook); a
background thread copies that layer of every new chunk into host memory (pinned, on a separate CUDA
stream, on a GPU). `finish` waits for the last layer and stores the complete chunks.
"""

from __future__ import annotations

import logging
import queue
import threading

import torch

from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.keys import ChunkKey
from kvshelf.model.kv_buffer import KVBuffer

log = logging.getLogger(__name__)

_DONE = None


class IncompleteSaveError(RuntimeError):
    """Some layer of the chunks was never written: storing them would serve wrong KV."""


class HostChunks:
    """A request's new chunks (`keys`) in host memory, [layers, 2, heads, tokens, dim] each."""

    def __init__(
        self,
        engine: CacheEngine,
        keys: list[ChunkKey],
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        pin: bool,
        allocate: bool = True,
    ):
        self.engine, self.keys = engine, keys
        self.num_layers = num_layers
        self._shape = (num_layers, 2, num_kv_heads, head_dim)
        self.dtype, self.pin = dtype, pin
        self.hosts: list[torch.Tensor] = []
        self.layers_done: set[int] = set()
        if allocate:
            self.allocate()

    def allocate(self) -> None:
        """Allocate the host copies (pinning memory is slow: a saver thread does it off the compute)."""
        layers, two, heads, dim = self._shape
        self.hosts = [
            torch.empty((layers, two, heads, k.num_tokens, dim), dtype=self.dtype, pin_memory=self.pin)
            for k in self.keys
        ]

    def write_layer(self, i: int, layer_kv: torch.Tensor, first_token: int, *, non_blocking: bool = False) -> None:
        """Copy layer i of every chunk out of `layer_kv` [2, heads, tokens, dim], which holds the tokens
        from `first_token` on."""
        for key, host in zip(self.keys, self.hosts, strict=True):
            a, b = key.start - first_token, key.end - first_token
            host[i].copy_(layer_kv[:, :, a:b], non_blocking=non_blocking)
        self.layers_done.add(i)

    @property
    def missing_layers(self) -> int:
        return self.num_layers - len(self.layers_done)

    def store(self) -> int:
        """Hand the chunks to the engine; returns the tokens stored. Refuses chunks with an unwritten layer."""
        if not self.keys:
            return 0
        if self.missing_layers:
            raise IncompleteSaveError(f"{self.missing_layers} of {self.num_layers} layer(s) were not written")
        return self.engine.put_chunks(self.keys, self.hosts)


class LayerwiseSaver:
    def __init__(self, engine: CacheEngine, tokens: list[int], salt: str | None, start: int, kv: KVBuffer):
        self.kv = kv
        _, _, heads, _, dim = kv.data.shape
        self.chunks = HostChunks(
            engine,
            engine.keys_to_store(tokens, salt, start=start),
            num_layers=kv.data.shape[0],
            num_kv_heads=heads,
            head_dim=dim,
            dtype=kv.data.dtype,
            pin=engine.pin_memory and kv.data.is_cuda,
            allocate=False,  # on the saver thread
        )
        self._stream = torch.cuda.Stream(device=kv.data.device) if kv.data.is_cuda else None
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvshelf-layer-saver", daemon=True)
        self._thread.start()

    @property
    def keys(self) -> list[ChunkKey]:
        return self.chunks.keys

    def on_layer(self, i: int, *_args) -> None:
        if not self.chunks.keys:
            return
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.kv.data.device))
            self._queue.put((i, event))
        else:
            self._queue.put((i, None))

    def _run(self) -> None:
        with torch.inference_mode():  # per thread; the request's tensors were made under it
            self._copy_layers()

    def _copy_layers(self) -> None:
        try:
            self.chunks.allocate()
            while (item := self._queue.get()) is not _DONE:
                i, event = item
                if self._stream is not None:
                    self._stream.wait_event(event)  # layer i is computed before we read it
                    with torch.cuda.stream(self._stream):
                        self.chunks.write_layer(i, self.kv.data[i], 0, non_blocking=True)
                else:
                    self.chunks.write_layer(i, self.kv.data[i], 0)
        except BaseException as err:
            self._error = err

    def _join(self) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        if self._stream is not None:
            self._stream.synchronize()

    def abort(self) -> None:
        """Stop without storing anything (the request is being recomputed)."""
        self._join()

    def finish(self) -> int:
        """Wait for every layer, then store the chunks; returns the tokens stored (0 when a layer is missing)."""
        self._join()
        if self._error is not None:
            raise RuntimeError("layerwise store failed") from self._error
        try:
            return self.chunks.store()
        except IncompleteSaveError as err:
            log.warning("layerwise store: not storing %d chunk(s): %s", len(self.chunks.keys), err)
            return 0
