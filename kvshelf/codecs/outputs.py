"""Decoded chunks' memory, recycled: a chunk that calibrated cachegen decodes on the CPU is written into memory
an earlier decoded chunk of the same size held, once nothing refers to that one any more, not into fresh
memory.

Why: a decoded chunk is large (Gemma 3 270M, 256 tokens: 4.7 MB of fp16). Fresh memory is faulted in page
by page as the codec's threads first write it, and glibc hands it back to the kernel when the chunk is
dropped (unmapping it takes the process's memory-map lock and flushes every core's TLB). On the H200 host
(16 cores) decoding at 4 and 16 callers took 190-610 minor page faults a chunk, and each caller decoding
into one kept tensor instead decoded 5-8% faster (1,435 -> 1,512 MB/s at 4 callers, 1,525 -> 1,648 at 16:
BENCHMARKS.md, issue #17, eleventh session).

Kept: freed buffers up to `keep_bytes` in all (config codec_output_pool_mb), the rest freed as usual; a buffer
goes back only when every tensor on it is gone (the tensor holds the array whose finalizer returns it), so a
buffer is never handed out twice at once. Its previous contents are overwritten completely by the decoder.
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import torch

_ALIGN = 64  # as torch's CPU allocator: whole cache lines, aligned vector stores


class OutputBuffers:
    """Uninitialised CPU tensors whose memory is recycled (see the module's doc); keep_bytes 0: plain
    torch.empty."""

    def __init__(self, keep_bytes: int = 0):
        if keep_bytes < 0:
            raise ValueError(f"output buffers to keep must be >= 0 bytes, got {keep_bytes}")
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[np.ndarray]] = {}  # bytes -> freed buffers of that size
        self._kept = 0
        # re-entrant: a finalizer may run inside a locked section of the same thread (garbage collection)
        self._lock = threading.RLock()

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised C-contiguous tensor (a normal tensor, also when made under inference mode)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if not nbytes or nbytes > self.keep_bytes:
            with torch.inference_mode(False):
                return torch.empty(shape, dtype=dtype)
        with self._lock:
            free = self._free.get(nbytes)
            raw = free.pop() if free else None
            if raw is not None:
                self._kept -= nbytes
        if raw is None:
            base = np.empty(nbytes + _ALIGN - 1, np.uint8)
            at = -base.ctypes.data % _ALIGN
            raw = base[at : at + nbytes]
        view = raw[:]  # the tensor's own array: once it is gone (no tensor on it left), raw comes back
        weakref.finalize(view, self._give_back, raw).atexit = False
        with torch.inference_mode(False):
            return torch.from_numpy(view).view(dtype).view(shape)

    @property
    def kept_bytes(self) -> int:
        """Bytes of freed buffers kept for reuse now."""
        return self._kept

    def _give_back(self, raw: np.ndarray) -> None:
        with self._lock:
            if self._kept + raw.nbytes <= self.keep_bytes:
                self._free.setdefault(raw.nbytes, []).append(raw)
                self._kept += raw.nbytes
