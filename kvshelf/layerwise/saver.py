"""Store a request's new KV layer by layer: layer i is copied out while the model computes layer i+1.

The runner calls `on_layer(i)` after computing layer i (its post-layer hook); a background thread copies
that layer of every new chunk into host memory (pinned, on a separate CUDA stream, on a GPU). `finish`
waits for the last layer and hands the complete chunks to the engine.
"""

from __future__ import annotations

import queue
import threading

import torch

from kvshelf.cache.engine import CacheEngine
from kvshelf.model.kv_buffer import KVBuffer

_DONE = None


class LayerwiseSaver:
    def __init__(self, engine: CacheEngine, tokens: list[int], salt: str | None, start: int, kv: KVBuffer):
        self.engine, self.tokens, self.salt = engine, tokens, salt
        self.kv = kv
        self.keys = engine.keys_to_store(tokens, salt, start=start)
        self._pin = engine.pin_memory and kv.data.is_cuda
        self.host: list[torch.Tensor] = []  # allocated by the saver thread: pinning memory is slow
        self._stream = torch.cuda.Stream(device=kv.data.device) if kv.data.is_cuda else None
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvshelf-layer-saver", daemon=True)
        self._thread.start()

    def on_layer(self, i: int, *_args) -> None:
        if not self.keys:
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
            shape = self.kv.data.shape
            self.host = [
                torch.empty(
                    (shape[0], 2, shape[2], k.num_tokens, shape[4]), dtype=self.kv.data.dtype, pin_memory=self._pin
                )
                for k in self.keys
            ]
            while (item := self._queue.get()) is not _DONE:
                i, event = item
                if self._stream is not None:
                    self._stream.wait_event(event)  # layer i is computed before we read it
                    with torch.cuda.stream(self._stream):
                        for key, host in zip(self.keys, self.host, strict=True):
                            host[i].copy_(self.kv.data[i, :, :, key.start : key.end], non_blocking=True)
                else:
                    for key, host in zip(self.keys, self.host, strict=True):
                        host[i].copy_(self.kv.data[i, :, :, key.start : key.end])
        except BaseException as err:
            self._error = err

    def abort(self) -> None:
        """Stop without storing anything (the request is being recomputed)."""
        self._queue.put(_DONE)
        self._thread.join()
        if self._stream is not None:
            self._stream.synchronize()

    def finish(self) -> int:
        """Wait for every layer, then store the chunks; returns the tokens stored."""
        self._queue.put(_DONE)
        self._thread.join()
        if self._stream is not None:
            self._stream.synchronize()
        if self._error is not None:
            raise RuntimeError("layerwise store failed") from self._error
        return self.engine.put_chunks(self.keys, self.host)
