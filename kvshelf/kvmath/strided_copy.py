"""Host-to-GPU copies into a strided slice of the KV buffer as a single cudaMemcpy2DAsync.

A chunk's layers i..j land in `kv[i:j, :, :, start:end]`: (j - i) * 2 * heads rows of `tokens * head_dim`
contiguous values, a fixed pitch apart. PyTorch copies into such a slice through a temporary (an
allocation, a memcpy and a copy kernel per call); on a GPU whose prefill is bound by how fast the host
launches work, those launches cost time the layerwise loader is meant to hide. One 2-D memcpy per chunk
and layer group does the same copy with one driver call. Falls back to PyTorch where it does not apply.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

log = logging.getLogger(__name__)

_HOST_TO_DEVICE = 1
_lock = threading.Lock()
_memcpy2d = None
_looked = False


def _load_memcpy2d():
    """cudaMemcpy2DAsync from the CUDA runtime PyTorch already loaded (never a second copy of it)."""
    global _memcpy2d, _looked
    with _lock:
        if _looked:
            return _memcpy2d
        _looked = True
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
            for path in sorted(paths):
                fn = ctypes.CDLL(path).cudaMemcpy2DAsync
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
                fn.argtypes += [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
                fn.restype = ctypes.c_int
                _memcpy2d = fn
                break
        except (OSError, AttributeError) as err:
            log.info("cudaMemcpy2DAsync unavailable (%s); using PyTorch copies", err)
        return _memcpy2d


def row_layout(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, values per row, pitch in values) when `t` is equally spaced contiguous rows, else None."""
    dims = [(n, s) for n, s in zip(t.shape, t.stride(), strict=True) if n != 1]
    row = 1
    k = len(dims)
    while k and dims[k - 1][1] == row:
        row *= dims[k - 1][0]
        k -= 1
    if k == 0:
        return 1, row, row
    pitch = expected = dims[k - 1][1]
    rows = 1
    for n, s in reversed(dims[:k]):
        if s != expected:
            return None
        rows *= n
        expected = s * n
    return (rows, row, pitch) if pitch >= row else None


def copy_to_device(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
    """dst.copy_(src, non_blocking=True) for a CPU `src` (pinned, to be asynchronous) and a CUDA `dst`,
    as one 2-D memcpy when dst's layout allows. `src` must stay alive until the copy has run."""
    fn = _load_memcpy2d() if dst.is_cuda and src.device.type == "cpu" else None
    layout = row_layout(dst) if fn is not None and src.is_contiguous() and src.dtype == dst.dtype else None
    if layout is None or src.shape != dst.shape:
        dst.copy_(src, non_blocking=True)
        return
    rows, row, pitch = layout
    size = dst.element_size()
    handle = (stream or torch.cuda.current_stream(dst.device)).cuda_stream
    err = fn(dst.data_ptr(), pitch * size, src.data_ptr(), row * size, row * size, rows, _HOST_TO_DEVICE, handle)
    if err != 0:
        raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err}")


class ChunkRowCopier:
    """Many chunks' layer groups into one contiguous [layers, 2, heads, capacity, dim] GPU tensor, each as
    one 2-D memcpy computed from pointers and strides: no tensor slicing, no temporaries, a few
    microseconds of Python per copy (the loader thread holds the GIL that much less)."""

    def __init__(self, dst: torch.Tensor, chunks: list[tuple[int, torch.Tensor, int]]):
        """chunks: (first token, pinned contiguous host tensor [layers, 2, heads, n, dim], tokens to copy)."""
        self._fn = _load_memcpy2d()
        if self._fn is None or not dst.is_cuda or not dst.is_contiguous():
            raise ValueError("2-D memcpy copies need a CUDA runtime and a contiguous CUDA destination")
        size = dst.element_size()
        _, two, heads, capacity, dim = dst.shape
        self.keep_alive = [src for _, src, _ in chunks]
        self._rows_per_layer = two * heads
        self._dpitch = capacity * dim * size
        self._dlayer = self._rows_per_layer * self._dpitch
        self._items = []
        for start, src, tokens in chunks:
            if not src.is_contiguous() or src.dtype != dst.dtype or src.shape[1:3] != dst.shape[1:3]:
                raise ValueError(f"chunk at token {start} does not match the destination layout")
            spitch = src.shape[3] * dim * size
            self._items.append((dst.data_ptr() + start * dim * size, src.data_ptr(), spitch, tokens * dim * size))
        self.nbytes_per_layer = sum(width for *_, width in self._items) * self._rows_per_layer

    def copy(self, i: int, j: int, stream: torch.cuda.Stream) -> None:
        """Layers i..j-1 of every chunk, queued on `stream`."""
        handle, rows, fn = stream.cuda_stream, (j - i) * self._rows_per_layer, self._fn
        for dst_ptr, src_ptr, spitch, width in self._items:
            err = fn(
                dst_ptr + i * self._dlayer,
                self._dpitch,
                src_ptr + i * self._rows_per_layer * spitch,
                spitch,
                width,
                rows,
                _HOST_TO_DEVICE,
                handle,
            )
            if err != 0:
                raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err}")
