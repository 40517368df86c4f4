"""Host buffers that other processes can write into and a GPU can copy from without waiting.

A layerwise loader's layer ranges may be read and checked by worker processes (kvshelf.storage.range_procs) rather
than by threads of the serving process, whose Python per chunk took the GIL from the forward's kernel launches
(issue #17, twelfth session). Those processes must write straight into the loader's staging buffer, so that buffer
is a memfd mapped here, page-locked with cudaHostRegister on a GPU (a copy from it is then asynchronous, as from
torch's pinned memory), and handed to a worker as a file descriptor (SCM_RIGHTS over its socket).
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading

import torch

_lock = threading.Lock()
_serials = itertools.count(1)
_by_address: dict[int, SharedHost] = {}  # a buffer's first byte -> the buffer: tensors cut from it find it (handle)
_retired: set[int] = set()  # serials of buffers closed: worker processes that mapped them drop their mapping


class SharedHost:
    """`nbytes` of shared memory (a memfd), mapped here as a uint8 tensor; pinned for CUDA copies with `pin`. A
    staging pool holds these until it replaces one by a larger one (close)."""

    def __init__(self, nbytes: int, pin: bool):
        if nbytes <= 0:
            raise ValueError(f"a shared host buffer needs >= 1 byte, not {nbytes}")
        self.nbytes = nbytes
        self.fd = os.memfd_create("kvshelf-staging", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, nbytes)
            self._map = mmap.mmap(self.fd, nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.serial = next(_serials)  # names it to the worker processes (an fd number may be reused)
        self.pinned = False
        self.tainted = False  # a worker that may still write into it outlived its kill: never reused (taint)
        if pin:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(err) != 0:
                os.close(self.fd)
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes of shared memory failed: {err}")
            self.pinned = True
        with _lock:
            _by_address[self.tensor.data_ptr()] = self

    def taint(self) -> None:
        """A worker process handed this buffer could not be stopped and may write into it later: whatever is
        staged in it now or later could change after its check, so its pool drops it (and leaks it, rather than
        unpin memory a copy may still read)."""
        self.tainted = True

    def close(self) -> None:
        """Done with it (no copy from it may still be queued, no read may still write into it): unpinned and its
        descriptor closed; the memory goes once the tensor is dropped here and worker processes have dropped their
        mapping (they do when next called: retired)."""
        with _lock:
            if _by_address.pop(self.tensor.data_ptr(), None) is not self:
                return
            _retired.add(self.serial)
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        os.close(self.fd)


def allocate(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 tensor of `nbytes` over a new SharedHost (handle() finds it again)."""
    return SharedHost(nbytes, pin).tensor


def handle(tensor: torch.Tensor) -> SharedHost | None:
    """The SharedHost a tensor starts at the beginning of (a staging pool's buffer, or a view of it from byte 0), or
    None for any other memory."""
    with _lock:
        return _by_address.get(tensor.data_ptr())


def retired(serials: set[int]) -> set[int]:
    """Those of `serials` whose buffers were closed."""
    with _lock:
        return serials & _retired
