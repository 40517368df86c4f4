"""GPU decoding of cachegen's calibrated segments: the rANS parts (kvshelf.codecs.rans) decoded by a Triton
kernel from the very bytes the CPU decoder reads; then the escapes, steps, inverse transform and RoPE run
there too: for a layer group, in one more kernel (finish, kvshelf.codecs.finish_triton) that writes the KV in its
dtype straight from the symbols; elsewhere through torch (CacheGenCodec._finish_layers, the reference).

One program decodes one block: its W lanes are a warp's worth of vector elements that step together,
each lane reading the 16-bit words it needs from the block's shared stream at its exclusive prefix sum
(the layout the encoder wrote for that). Segments are checked on the CPU first (header, counts, classes,
escape positions, lengths: kvshelf.codecs.rans.scan_segments, the checks of rans.Part compiled), and the
kernel bounds every word it reads by
its block's end, so hostile bytes cannot make it read or write outside its buffers; a stream that does not
decode exactly (words left or missing, a state not back at its start) is refused as on the CPU.

Importing this module needs neither CUDA nor Triton (CI has neither): both load on first use.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np
import torch

from kvshelf.codecs import rans, shared_host
from kvshelf.codecs.cachegen import calibrated_head

_WARPS = 1  # a block's 32 lanes are one warp: prefix sums by shuffles, no shared memory
_DESC = 10  # int64 fields per block: states, words, end, classes, first row, output base, W, R, T, dim


def available(device) -> bool:
    """True where a CUDA device and Triton are there to decode on."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    from kvshelf.codecs import rans_triton  # imports Triton: only here, on first use

    return rans_triton.decode_blocks


@functools.cache
def _finish_kernel():
    from kvshelf.codecs import finish_triton  # imports Triton: only here, on first use

    return finish_triton.finish_blocks


FUSED = True  # symbols -> KV in one kernel (finish); False: the torch reference (the bench's A/B switch)
_TOKEN_BLOCK = 64  # tokens per program of finish()
_FINISH_WARPS = 4
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fuses(dim: int, dtype: torch.dtype) -> bool:
    """True where finish() handles this head size and dtype (tl.dot wants halves of >= 16 columns, powers of 2)."""
    return FUSED and dim >= 32 and dim & (dim - 1) == 0 and dtype in _FUSED_DTYPES


def finish(q: torch.Tensor, layers: int, scaled, mean, inv_freq, cal_layers: list[int], position: int, dtype):
    """Integer symbols as decode_run's kernel wrote them, [layers * chunks, 2, heads, tokens, dim] (chunk-major),
    -> KV [layers, 2, heads, chunks * tokens, dim] in `dtype`: the inverse transforms (steps folded in, `scaled`
    [cal layers, 2, heads, dim, dim]), the means, RoPE on K from `position` and the cast in one kernel (what
    CacheGenCodec._finish_layers computes through float32 tensors), on q's stream."""
    runs, two, heads, tokens, dim = q.shape
    chunks = runs // layers
    n = chunks * tokens
    out = torch.empty((layers, two, heads, n, dim), dtype=dtype, device=q.device)
    picks = torch.tensor(cal_layers, dtype=torch.int64).to(q.device, non_blocking=True)
    grid = (layers * two * heads, -(-n // _TOKEN_BLOCK))
    _finish_kernel()[grid](
        q, scaled, mean, inv_freq.float(), picks, out, position, n, tokens, chunks, heads,
        *out.stride()[:4], D=dim, HALF=dim // 2, BT=_TOKEN_BLOCK, BK=32, num_warps=_FINISH_WARPS, num_stages=1,
    )  # fmt: skip
    return out


@functools.cache
def _tables(device: str) -> tuple[torch.Tensor, ...]:
    to = functools.partial(torch.as_tensor, device=device)
    return (
        to(rans.SYMBOL),
        to(rans.FREQ.astype(np.int32)),
        to(rans.CUM.astype(np.int32)),
        to(rans.LOW_BITS.astype(np.int64)),
        to(rans.RADIUS.astype(np.int64)),
    )


_pool_lock = threading.Lock()
# Pinned staging buffers shared by every thread (a layerwise loader runs on a new thread per request, and
# pinning memory costs milliseconds per MB): [buffer, event of its last copy to a device, in use].
_pool: list[list] = []
# The same of shared memory (shared_host: worker processes read layer ranges into them), pinned on CUDA
_shared_pool: list[list] = []


def _new_buffer(nbytes: int, shared: bool, pin: bool) -> torch.Tensor:
    if shared:
        return shared_host.allocate(nbytes, pin)
    return torch.empty(nbytes, dtype=torch.uint8).pin_memory()


def _pinned(nbytes: int, shared: bool = False, pin: bool = True) -> tuple[torch.Tensor, list]:
    """A pinned buffer of at least `nbytes` (of shared memory with `shared`; `pin` False: not pinned, shared only)
    whose previous copy to the device has finished, and its slot: the caller records there the event of the copy it
    queues next, and marks the slot free."""
    pool = _shared_pool if shared else _pool
    with _pool_lock:
        for slot in sorted(pool, key=lambda s: s[0].numel()):
            if not slot[2] and slot[0].numel() >= nbytes and (slot[1] is None or slot[1].query()):
                slot[2] = True
                return slot[0][:nbytes], slot
        busy = sum(s[2] or (s[1] is not None and not s[1].query()) for s in pool)
        if len(pool) - busy == 0 or len(pool) < 4:  # grow: at most a few buffers idle at any time
            slot = [_new_buffer(max(nbytes, 1 << 20), shared, pin), None, True]
            pool.append(slot)
            return slot[0][:nbytes], slot
        slot = max((s for s in pool if not s[2]), key=lambda s: s[0].numel())  # too small or still copying
        slot[2] = True
    if slot[1] is not None:
        slot[1].synchronize()
    if slot[0].numel() < nbytes:
        try:
            new = _new_buffer(nbytes, shared, pin)
        except BaseException:
            with _pool_lock:
                slot[2] = False  # its buffer is as it was: free again
            raise
        old, slot[0] = slot[0], new
        if shared:  # unpinned and unmapped now (its last copy has run: waited for above)
            shared_host.handle(old).close()
    return slot[0][:nbytes], slot


def _staging(nbytes: int, device: torch.device, shared: bool = False):
    """A host buffer the copy to `device` can be queued from without waiting (pinned on CUDA; of shared memory with
    `shared`) and its pool slot."""
    if device.type == "cuda" or shared:
        return _pinned(nbytes, shared, pin=device.type == "cuda")
    return torch.empty(nbytes, dtype=torch.uint8), None


def _queued(slot, free: bool = True) -> None:
    """The staging slot's copy was queued on the current stream: reusable once it has run (and once freed)."""
    if slot is not None:
        slot[1] = torch.cuda.Event()
        slot[1].record()
        if free:
            with _pool_lock:
                slot[2] = False


class _Owned(np.ndarray):
    """The numpy view of a HostRange's buffer: memoryviews cut from it name their HostRange (`.obj.owner`)."""

    owner: HostRange


class HostRange:
    """One staging buffer (pinned on CUDA, from the pool) that a loader's tier reads write layer ranges into
    straight away (LayerRanges.read_into), so that the segments cut from them are staged without a copy: stage()
    sees that they lie here, checks them where they lie and sends the buffer to the device once, whole (issue #17:
    the staging copy was most of a layerwise loader's CPU work).

    Reads may run on other threads (or, `shared`, in other processes: kvshelf.storage.range_procs): `view` hands out
    parts for them, each taken back by `done`; `close` gives the buffer back to the pool only once every part handed
    out is done (a read still writing into it keeps it)."""

    def __init__(self, nbytes: int, device, shared: bool = False):
        self.device = torch.device(device)
        self.nbytes = nbytes
        self._host, self._slot = _staging(max(nbytes, 1), self.device, shared)
        # where other processes may write it (`shared`: kvshelf.storage.range_procs), else None
        self.shared = shared_host.handle(self._host) if shared else None
        self.array = self._host.numpy().view(_Owned)
        self.array.owner = self
        self._on_device: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._out = 0  # parts handed out, not done
        self._closed = False
        self._returned = False

    def view(self, start: int, n: int) -> memoryview | None:
        """A writable part [start, start + n) for one read (None once closed: nothing may be written then)."""
        if start < 0 or start + n > self.nbytes:
            raise ValueError(f"part {start}+{n} lies outside a buffer of {self.nbytes} bytes")
        with self._lock:
            if self._closed:
                return None
            self._out += 1
        return memoryview(self.array)[start : start + n]

    def done(self) -> None:
        """A part handed out by view() is written (or its read failed)."""
        with self._lock:
            self._out -= 1
            give_back = self._closed and self._out == 0
        if give_back:
            self._give_back()

    def offset(self, segment) -> int:
        """Where a memoryview cut from this buffer starts in it."""
        return np.frombuffer(segment, np.uint8).ctypes.data - self.array.ctypes.data

    def offsets(self, segments: list) -> np.ndarray:
        """offset() of each of `segments` (writable memoryviews cut from this buffer), ~15x faster: a loader
        stages ~200 segments per group with the GIL held, while the forward's thread waits to launch kernels."""
        base = self.array.ctypes.data
        at = ctypes.c_char.from_buffer  # the address of a writable buffer without a numpy array made for it
        try:
            return np.fromiter((ctypes.addressof(at(s)) - base for s in segments), np.int64, len(segments))
        except (TypeError, ValueError):  # a read-only or empty view among them: the slow way
            return np.fromiter((self.offset(s) for s in segments), np.int64, len(segments))

    def on_device(self) -> torch.Tensor:
        """The whole buffer on its device, copied once (on the current stream: the caller's load stream)."""
        if self._on_device is None:
            self._on_device = self._host[: max(self.nbytes, 1)].to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                _queued(self._slot, free=False)  # the event of this copy: the host bytes are reusable once it ran
        return self._on_device

    def close(self) -> None:
        """Done with the buffer: back to the pool once no read writes into it any more (its copy to the device, if
        queued, still runs: the pool waits for that copy's event before reusing it)."""
        with self._lock:
            self._closed = True
            give_back = self._out == 0
        self._on_device = None
        if give_back:
            self._give_back()

    def _give_back(self) -> None:
        with self._lock:
            if self._returned:
                return
            self._returned = True
        if self._slot is not None:
            with _pool_lock:
                if self.shared is not None and self.shared.tainted:  # a worker that outlived its kill may write there
                    _shared_pool[:] = [s for s in _shared_pool if s is not self._slot]
                self._slot[2] = False


def _owner(segments: list) -> HostRange | None:
    """The HostRange every one of `segments` was cut from, or None (then they are copied to a staging buffer)."""
    objs = {id(obj): obj for obj in (memoryview(s).obj for s in segments)}
    if len(objs) != 1:
        return None
    obj = objs.popitem()[1]
    return obj.owner if isinstance(obj, _Owned) else None


def _scan(data, starts, lengths, view, offs, n_desc: int, max_esc: int, level: int, shape: tuple) -> int:
    """Check the segments at `starts` in `data` (rans.scan_segments: compiled) and write the kernel's block
    descriptors at view[offs[0]:] and the escapes' positions and values at offs[1] and offs[2]: their count."""
    _, heads, tokens, dim = shape
    width, per_lane, _ = rans.layout(heads * dim, tokens)
    desc = view[offs[0] : offs[1]].view(np.int64).reshape(-1, _DESC)[:n_desc]
    head = np.frombuffer(calibrated_head(level), np.uint8)
    pos, val = np.empty(max_esc, dtype=np.int64), np.empty(max_esc, dtype=np.int32)
    n_esc, err = rans.scan_segments(data, starts, lengths, head, heads, tokens, dim, width, per_lane, desc, pos, val)
    if err:
        raise rans.RansError(f"cachegen segment does not parse (code {err})")
    if n_esc:
        view[offs[1] : offs[1] + 8 * n_esc] = pos[:n_esc].view(np.uint8)
        view[offs[2] : offs[2] + 4 * n_esc] = val[:n_esc].view(np.uint8)
    return n_esc


def _stage_in_place(owner: HostRange, segments: list, lengths: np.ndarray, shape: tuple, level: int) -> tuple:
    """stage() of segments that lie in `owner` already: checked there, the descriptors and escapes in a small
    staging buffer of their own; the segments' bytes go to the device with the whole buffer, once."""
    _, heads, tokens, dim = shape
    rows = heads * dim
    blocks = rans.layout(rows, tokens)[2]
    starts = owner.offsets(segments)
    if len(segments) and (starts.min() < 0 or int((starts + lengths).max()) > owner.nbytes):
        raise ValueError("segments lie outside the staging buffer they name")  # never read past it (compiled)
    n_desc = len(segments) * 2 * blocks
    max_esc = min(int(lengths.sum()) // 8, len(segments) * 2 * rows * tokens)  # an escape takes 8 bytes
    offs = np.cumsum([0, n_desc * _DESC * 8, max_esc * 8, max_esc * 4])
    host, slot = _staging(int(offs[-1]) or 8, owner.device)
    try:
        view = host.numpy()
        data = owner.array.view(np.ndarray)[: owner.nbytes]
        n_esc = _scan(data, starts, lengths, view, offs[0:3], n_desc, max_esc, level, shape)
        end = int(offs[2]) + 4 * n_esc if n_esc else int(offs[1])
        dev = host[: max(end, 8)].to(owner.device, non_blocking=True)
        data_dev = owner.on_device()
    finally:
        _queued(slot)
    return (
        data_dev,
        dev[: n_desc * _DESC * 8].view(torch.int64),
        (
            dev[offs[1] : offs[1] + 8 * n_esc].view(torch.int64),
            dev[offs[2] : offs[2] + 4 * n_esc].view(torch.int32),
        ),
        (len(segments), 2, heads, tokens, dim),
    )


def stage(segments: list, shape: tuple, level: int, device) -> tuple:
    """Copy calibrated segments into one (pinned, on CUDA) staging buffer, check them there and write the
    kernel's block descriptors and the escapes beside them (rans.scan_segments: compiled), then copy it all
    to `device` at once."""
    lengths = np.fromiter((memoryview(s).nbytes for s in segments), np.int64, len(segments))
    owner = _owner(segments)
    if owner is not None:  # read into a staging buffer already: no copy
        return _stage_in_place(owner, segments, lengths, shape, level)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return _stage_copied(segments, starts, starts, lengths, shape, level, device)


def stage_spans(spans: list, offsets: np.ndarray, shape: tuple, level: int, device) -> tuple:
    """stage() of a layer group whose chunks' layers each lie back to back in one buffer (codecs.base.SegmentRows:
    spans[c] holds chunk c's layers, layer l at offsets[c, l]): one copy per chunk, not per layer and chunk;
    the segments in the same order as stage() takes them (layer by layer, each layer's chunks in order)."""
    sizes = offsets[:, -1]
    if len(spans) != len(offsets) or (offsets[:, 0] != 0).any() or (np.diff(offsets, axis=1) < 0).any():
        raise ValueError("span offsets do not start at 0 and ascend, one row per span")
    if [memoryview(b).nbytes for b in spans] != sizes.tolist():
        raise ValueError("spans are not as long as their offsets say")
    bases = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    starts = (bases[:, None] + offsets[:, :-1]).T.reshape(-1)  # [layers, chunks], flattened layer-major
    lengths = np.diff(offsets, axis=1).T.reshape(-1)
    return _stage_copied(spans, bases, starts, lengths, shape, level, device)


def _copy_all(view: np.ndarray, at: list[int], buffers: list) -> None:
    """Each of `buffers` into `view` at its offset in `at` (threads sharing these copies were slower on the H200:
    issue #17, eleventh session, Gemma 3's loader 16.5-17.9 vs 18.3-20.6 GB/s per layer)."""
    for k, data in enumerate(buffers):
        src = np.frombuffer(data, np.uint8)
        view[at[k] : at[k] + src.size] = src


def _stage_copied(buffers, at, starts, lengths, shape, level, device) -> tuple:
    """stage()'s work once the segments' places are known: `buffers` copied to offsets `at` of one staging buffer
    (the segments, or spans holding several of them), the segments then lying at `starts` with `lengths`."""
    _, heads, tokens, dim = shape
    device = torch.device(device)
    rows = heads * dim
    blocks = rans.layout(rows, tokens)[2]
    base = int(lengths.sum())
    n_seg = len(lengths)
    n_desc = n_seg * 2 * blocks
    max_esc = min(base // 8, n_seg * 2 * rows * tokens)  # an escape takes 8 bytes of a segment
    align = lambda n: (n + 7) // 8 * 8  # noqa: E731
    offs = np.cumsum([0, align(base), align(n_desc * _DESC * 8), align(max_esc * 8), align(max_esc * 4)])
    host, slot = _staging(int(offs[-1]), device)
    try:
        view = host.numpy()
        _copy_all(view, at.tolist(), buffers)
        n_esc = _scan(view[:base], starts, lengths, view, offs[1:4], n_desc, max_esc, level, shape)
        end = int(offs[3]) + 4 * n_esc if n_esc else int(offs[2])
        dev = host[:end].to(device, non_blocking=True)
    finally:
        _queued(slot)  # the buffer goes back to the pool, reusable once this copy (if any) has run
    return (
        dev[:base],
        dev[offs[1] : offs[1] + n_desc * _DESC * 8].view(torch.int64),
        (
            dev[offs[2] : offs[2] + 8 * n_esc].view(torch.int64),
            dev[offs[3] : offs[3] + 4 * n_esc].view(torch.int32),
        ),
        (n_seg, 2, heads, tokens, dim),
    )


def run_staged(staged: tuple, check: bool = True):
    """Decode staged segments: int32 symbols [segments, 2, heads, tokens, dim] on their device. With
    check=False nothing waits for the GPU: returns (symbols, error flags), and the caller must see that
    no flag is set (err.any() is False) before it uses the symbols."""
    data, desc, (pos, val), out_shape = staged
    n_blocks = desc.numel() // _DESC
    out = torch.empty(out_shape, dtype=torch.int32, device=data.device)
    err = torch.empty(n_blocks, dtype=torch.int32, device=data.device)
    symbol, freq, cum, low_bits, radius = _tables(str(data.device))
    _kernel()[(n_blocks,)](
        data,
        desc,
        symbol,
        freq,
        cum,
        low_bits,
        radius,
        out,
        err,
        FW=freq.shape[1],
        P=rans.PROB_BITS,
        LOW=rans.STATE_LOW,
        num_warps=_WARPS,
    )
    if pos.numel():
        out.view(-1)[pos] = val
    if not check:
        return out, err
    if bool(err.any()):  # a cache never serves what did not decode exactly
        raise rans.RansError("cachegen entropy stream does not decode (GPU)")
    return out


def decode_segments(segments: list, shape: tuple, level: int, device) -> torch.Tensor:
    """Calibrated segments (one chunk-layer each, all of `shape`) -> their integer symbols on `device`,
    int32 [len(segments), 2, heads, tokens, dim]; one host-to-device copy, one kernel, one check."""
    return run_staged(stage(segments, shape, level, device))


def decode_segment(data, shape: tuple, level: int, device) -> torch.Tensor:
    """One calibrated segment's integer symbols [2, heads, tokens, dim] on `device`."""
    return decode_segments([data], shape, level, device)[0]


def decode_staged_raw(staged: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The symbols of a layer group's staged segments (stage: every layer's chunks, layer by layer) as the kernel
    wrote them, [layers * chunks, 2, heads, tokens, dim] (chunk-major, no copy), and its error flag: what finish()
    reads. Nothing waits for the GPU."""
    q, err = run_staged(staged, check=False)
    return q, err.any()


def decode_staged(staged: tuple, layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_staged_raw's symbols as [layers, 2, heads, chunks * tokens, dim] (each layer's tokens in order)."""
    q, err = decode_staged_raw(staged)
    runs, two, heads, tokens, dim = q.shape
    chunks = runs // layers
    q = q.view(layers, chunks, two, heads, tokens, dim).permute(0, 2, 3, 1, 4, 5)
    return q.reshape(layers, two, heads, chunks * tokens, dim), err


def decode_run_raw(segments: list[list], shape: tuple, level: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_staged_raw of segments[l][c] (a layer of consecutive chunks), staged here."""
    return decode_staged_raw(stage([seg for row in segments for seg in row], shape, level, device))


def decode_run(segments: list[list], shape: tuple, level: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """segments[l][c]: a layer of consecutive chunks -> their symbols [layers, 2, heads, chunks * tokens, dim]
    (each layer's tokens in order) and an error flag (a boolean tensor on `device`), without waiting for
    the GPU: the caller must see the flag False before it uses what the symbols decode to."""
    return decode_staged(stage([seg for row in segments for seg in row], shape, level, device), len(segments))
