"""GPU decoding of cachegen's calibrated segments: the rANS parts (kvshelf.codecs.rans) decoded by a Triton
kernel from the very bytes the CPU decoder reads; then the escapes, steps, inverse transform and RoPE run
there too (CacheGenCodec._finish_calibrated).

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

import functools
import threading

import numpy as np
import torch

from kvshelf.codecs import rans
from kvshelf.codecs.base import tensor_view
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


def _pinned(nbytes: int) -> tuple[torch.Tensor, list]:
    """A pinned buffer of at least `nbytes` whose previous copy to the device has finished, and its slot:
    the caller records there the event of the copy it queues next, and marks the slot free."""
    with _pool_lock:
        for slot in sorted(_pool, key=lambda s: s[0].numel()):
            if not slot[2] and slot[0].numel() >= nbytes and (slot[1] is None or slot[1].query()):
                slot[2] = True
                return slot[0][:nbytes], slot
        busy = sum(s[2] or (s[1] is not None and not s[1].query()) for s in _pool)
        if len(_pool) - busy == 0 or len(_pool) < 4:  # grow: at most a few buffers idle at any time
            slot = [torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8).pin_memory(), None, True]
            _pool.append(slot)
            return slot[0][:nbytes], slot
        slot = max((s for s in _pool if not s[2]), key=lambda s: s[0].numel())  # too small or still copying
        slot[2] = True
    if slot[1] is not None:
        slot[1].synchronize()
    if slot[0].numel() < nbytes:
        slot[0] = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    return slot[0][:nbytes], slot


def stage(segments: list, shape: tuple, level: int, device) -> tuple:
    """Copy calibrated segments into one (pinned, on CUDA) staging buffer, check them there and write the
    kernel's block descriptors and the escapes beside them (rans.scan_segments, one compiled call), then
    copy it all to `device` at once."""
    _, heads, tokens, dim = shape
    device = torch.device(device)
    rows = heads * dim
    width, per_lane, blocks = rans.layout(rows, tokens)
    lengths = np.fromiter((len(memoryview(s)) for s in segments), np.int64, len(segments))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    base = int(lengths.sum())
    n_desc = len(segments) * 2 * blocks
    max_esc = min(base // 8, len(segments) * 2 * rows * tokens)  # an escape takes 8 bytes of a segment
    align = lambda n: (n + 7) // 8 * 8  # noqa: E731
    offs = np.cumsum([0, align(base), align(n_desc * _DESC * 8), align(max_esc * 8), align(max_esc * 4)])
    if device.type == "cuda":
        host, slot = _pinned(int(offs[-1]))
    else:
        host, slot = torch.empty(int(offs[-1]), dtype=torch.uint8), None
    try:
        view = host.numpy()
        for at, n, data in zip(starts.tolist(), lengths.tolist(), segments, strict=True):
            view[at : at + n] = np.frombuffer(data, np.uint8)
        desc = view[offs[1] : offs[2]].view(np.int64).reshape(-1, _DESC)[:n_desc]
        esc_pos = view[offs[2] : offs[3]].view(np.int64)[:max_esc]
        esc_val = view[offs[3] : offs[4]].view(np.int32)[:max_esc]
        head = np.frombuffer(calibrated_head(level), np.uint8)
        n_esc, err = rans.scan_segments(
            view[:base], starts, lengths, head, heads, tokens, dim, width, per_lane, desc, esc_pos, esc_val
        )
        if err:
            raise rans.RansError(f"cachegen segment does not parse (code {err})")
        end = int(offs[3]) + 4 * n_esc if n_esc else int(offs[2])
        dev = host[:end].to(device, non_blocking=True)
    finally:
        if slot is not None:  # the buffer goes back to the pool; reusable once this copy (if any) has run
            slot[1] = torch.cuda.Event()
            slot[1].record()  # on the current stream: the one the copy was queued on
            with _pool_lock:
                slot[2] = False
    return (
        dev[:base],
        dev[offs[1] : offs[1] + n_desc * _DESC * 8].view(torch.int64),
        (
            dev[offs[2] : offs[2] + 8 * n_esc].view(torch.int64),
            dev[offs[3] : offs[3] + 4 * n_esc].view(torch.int32),
        ),
        (len(segments), 2, heads, tokens, dim),
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


def decode_run(segments: list[list], shape: tuple, level: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """segments[l][c]: a layer of consecutive chunks -> their symbols [layers, 2, heads, chunks * tokens, dim]
    (each layer's tokens in order) and an error flag (a boolean tensor on `device`), without waiting for
    the GPU: the caller must see the flag False before it uses what the symbols decode to."""
    chunks = len(segments[0])
    q, err = run_staged(stage([seg for row in segments for seg in row], shape, level, device), check=False)
    _, two, heads, tokens, dim = q.shape  # [layers * chunks, 2, heads, tokens, dim]
    q = q.view(len(segments), chunks, two, heads, tokens, dim).permute(0, 2, 3, 1, 4, 5)
    return q.reshape(len(segments), two, heads, chunks * tokens, dim), err.any()


# -- chunks staged on the device as they arrive, decoded later layer group by layer group --------------------
class StagedChunk:
    """One chunk's verified payload (every layer's segment) checked on the CPU and copied to the device once:
    its kernel descriptors and escapes are kept per layer, relative to the chunk, so that any group of layers
    of any set of staged chunks decodes later without touching the host bytes again."""

    def __init__(self, data, offsets, desc, esc_at, esc_pos, esc_val, host=None):
        self.host = host  # the pinned payload copied from, kept until the copy has surely run (release)
        self.data = data  # uint8 payload on the device
        self.offsets = offsets  # int64 [layers + 1]: segment bounds in it
        self.desc = desc  # int64 [layers, 2 * blocks, _DESC]: offsets within the payload, out0 within the segment
        self.esc_at = esc_at  # int64 [layers + 1]: each layer's escapes in esc_pos / esc_val
        self.esc_pos = esc_pos  # int64: positions within the layer's segment output [2, heads, tokens, dim]
        self.esc_val = esc_val  # int32


def _staging(nbytes: int, device: torch.device):
    """A host buffer the copy to `device` can be queued from without waiting (pinned on CUDA) and its pool slot."""
    if device.type == "cuda":
        return _pinned(nbytes)
    return torch.empty(nbytes, dtype=torch.uint8), None


def _queued(slot) -> None:
    """The staging slot's copy was queued on the current stream: reusable once it has run."""
    if slot is not None:
        slot[1] = torch.cuda.Event()
        slot[1].record()
        with _pool_lock:
            slot[2] = False


def stage_chunk(payload, offsets, shape: tuple, level: int, device) -> StagedChunk:
    """Check every layer's segment of one chunk (rans.scan_segments: the CPU decoder's checks, compiled) and
    queue its payload's copy to `device` (through pinned memory on CUDA: a copy from pageable memory would
    first wait for everything queued on the stream). Raises RansError on a segment that does not parse."""
    _, heads, tokens, dim = shape
    device = torch.device(device)
    rows = heads * dim
    width, per_lane, blocks = rans.layout(rows, tokens)
    offs = np.asarray(offsets, dtype=np.int64)
    layers = len(offs) - 1
    src = np.frombuffer(payload, np.uint8)
    if layers < 1 or offs[0] != 0 or offs[-1] != len(src) or (np.diff(offs) < 0).any():
        raise ValueError("layer offsets do not cut the payload into segments")
    max_esc = min(len(src) // 8, layers * 2 * rows * tokens)
    read_pinned = device.type == "cuda" and len(src) and tensor_view(payload, torch.uint8, (len(src),)).is_pinned()
    if read_pinned:  # read into pinned memory by the tier (StorageBackend.open_into): copied from as it is
        host = tensor_view(payload, torch.uint8, (len(src),))
    else:  # torch's pinned-memory cache: cheap once warm, and kept below until the copy has surely run
        host = torch.empty(len(src), dtype=torch.uint8, pin_memory=device.type == "cuda")
        host.numpy()[:] = src  # the checks read the staged copy: what they pass is exactly what the device gets
    buf = host.numpy()
    desc = np.empty((layers * 2 * blocks, _DESC), dtype=np.int64)
    esc_pos = np.empty(max_esc, dtype=np.int64)
    esc_val = np.empty(max_esc, dtype=np.int32)
    head = np.frombuffer(calibrated_head(level), np.uint8)
    n_esc, err = rans.scan_segments(
        buf, offs[:-1], np.diff(offs), head, heads, tokens, dim, width, per_lane, desc, esc_pos, esc_val
    )
    if err:
        raise rans.RansError(f"cachegen segment does not parse (code {err})")
    data = host.to(device, non_blocking=True)
    part = rows * tokens
    pos = esc_pos[:n_esc]
    layer_of = pos // (2 * part)  # scan_segments writes escapes in segment (= layer) order
    desc = desc.reshape(layers, 2 * blocks, _DESC)
    desc[:, :, 5] -= (np.arange(layers, dtype=np.int64) * 2 * part)[:, None]
    esc_at = np.searchsorted(layer_of, np.arange(layers + 1, dtype=np.int64)).astype(np.int64)
    return StagedChunk(data, offs, desc, esc_at, pos - layer_of * 2 * part, esc_val[:n_esc].copy(), host)


def decode_staged(chunks: list[StagedChunk], i: int, j: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers i..j-1 of consecutive staged chunks -> their symbols [j - i, 2, heads, chunks * tokens, dim] and
    an error flag (a boolean tensor on the device), without waiting for the GPU: the caller must see the
    flag False before it uses what the symbols decode to. One small copy of descriptors and escapes, one
    kernel, which reads each chunk's segments where they were staged: its descriptors' offsets are taken
    from the first chunk's device buffer (all of them are allocations on one device)."""
    _, heads, tokens, dim = shape
    base = chunks[0].data
    device = base.device
    n, c = j - i, len(chunks)
    part = heads * dim * tokens
    shift = np.array([ch.data.data_ptr() - base.data_ptr() for ch in chunks], dtype=np.int64)
    seg = np.arange(n * c, dtype=np.int64).reshape(n, c)  # segment index in the output: layer-major
    desc = np.stack([ch.desc[i:j] for ch in chunks], axis=1)  # [n, c, 2 * blocks, _DESC]
    desc[..., 0:4] += shift[None, :, None, None]
    desc[..., 5] += (seg * 2 * part)[..., None]
    pos, val = [], []
    for k, ch in enumerate(chunks):  # each chunk's escapes of layers i..j-1 lie together, in layer order
        a, b = ch.esc_at[i], ch.esc_at[j]
        if b > a:
            layer = np.repeat(np.arange(n, dtype=np.int64), np.diff(ch.esc_at[i : j + 1]))
            pos.append(ch.esc_pos[a:b] + (layer * c + k) * 2 * part)
            val.append(ch.esc_val[a:b])
    n_esc = sum(len(p) for p in pos)
    align = lambda m: (m + 7) // 8 * 8  # noqa: E731
    offs = np.cumsum([0, align(desc.nbytes), align(8 * n_esc), align(4 * n_esc)])
    host, slot = _staging(int(offs[-1]), device)
    try:
        view = host.numpy()
        view[: desc.nbytes] = desc.reshape(-1).view(np.uint8)
        if n_esc:
            view[offs[1] : offs[1] + 8 * n_esc] = np.concatenate(pos).view(np.uint8)
            view[offs[2] : offs[2] + 4 * n_esc] = np.concatenate(val).view(np.uint8)
        dev = host.to(device, non_blocking=True)
    finally:
        _queued(slot)
    staged = (
        base,
        dev[: desc.nbytes].view(torch.int64),
        (dev[offs[1] : offs[1] + 8 * n_esc].view(torch.int64), dev[offs[2] : offs[2] + 4 * n_esc].view(torch.int32)),
        (n * c, 2, heads, tokens, dim),
    )
    q, err = run_staged(staged, check=False)
    q = q.view(n, c, 2, heads, tokens, dim).permute(0, 2, 3, 1, 4, 5)
    return q.reshape(n, 2, heads, c * tokens, dim), err.any()
