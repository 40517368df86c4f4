"""GPU decoding of cachegen's calibrated segments: the rANS parts (kvshelf.codecs.rans) decoded by a Triton
kernel from the very bytes the CPU decoder reads; then the escapes, steps, inverse transform and RoPE run
there too (CacheGenCodec._finish_calibrated).

One program decodes one block: its W lanes are a warp's worth of vector elements that step together,
each lane reading the 16-bit words it needs from the block's shared stream at its exclusive prefix sum
(the layout the encoder wrote for that). Segments are checked on the CPU first (header, counts, classes,
escape positions: kvshelf.codecs.cachegen.calibrated_parts), and the kernel bounds every word it reads by
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
from kvshelf.codecs.cachegen import calibrated_parts

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
    import triton
    import triton.language as tl

    @triton.jit
    def decode_blocks(buf, desc, symbol, freq, cum, low_bits, radius, out, err, FW: tl.constexpr):
        pid = tl.program_id(0)
        d = desc + pid * 10
        states_at = tl.load(d)
        p = tl.load(d + 1)
        end = tl.load(d + 2)
        cls_at = tl.load(d + 3)
        row0 = tl.load(d + 4)
        out0 = tl.load(d + 5)
        width = tl.load(d + 6)
        per_lane = tl.load(d + 7)
        tokens = tl.load(d + 8)
        dim = tl.load(d + 9)
        j = tl.arange(0, 32)
        active = j < width
        o = states_at + 4 * j
        x = tl.load(buf + o, mask=active, other=0).to(tl.int64)
        x |= tl.load(buf + o + 1, mask=active, other=0).to(tl.int64) << 8
        x |= tl.load(buf + o + 2, mask=active, other=0).to(tl.int64) << 16
        x |= tl.load(buf + o + 3, mask=active, other=0).to(tl.int64) << 24
        bad = tl.zeros([32], dtype=tl.int32)
        for i in range(per_lane):
            row = row0 + j + width * i
            c = tl.load(buf + cls_at + row, mask=active, other=0).to(tl.int64)
            k = tl.load(low_bits + c)
            rad = tl.load(radius + c)
            shift = 14 - k
            has_low = (k > 0) & active
            dst = out + out0 + (row // dim) * tokens * dim + row % dim
            for t in range(tokens):
                slot = x & 16383
                h = tl.load(symbol + c * 16384 + slot).to(tl.int64)
                f = tl.load(freq + c * FW + h).to(tl.int64)
                x = f * (x >> 14) + slot - tl.load(cum + c * FW + h).to(tl.int64)
                need = (x < 65536) & active
                n = need.to(tl.int32)
                at = p + 2 * (tl.cumsum(n, 0) - n)
                ok = need & (at + 2 <= end)
                w = tl.load(buf + at, mask=ok, other=0).to(tl.int64)
                w |= tl.load(buf + at + 1, mask=ok, other=0).to(tl.int64) << 8
                bad |= (need & (at + 2 > end)).to(tl.int32)
                x = tl.where(need, (x << 16) | w, x)
                p += 2 * tl.sum(n, 0)
                slot = x & 16383
                low = slot >> shift
                x = tl.where(has_low, ((x >> 14) << shift) + (slot & ((1 << shift) - 1)), x)
                need = (x < 65536) & has_low
                n = need.to(tl.int32)
                at = p + 2 * (tl.cumsum(n, 0) - n)
                ok = need & (at + 2 <= end)
                w = tl.load(buf + at, mask=ok, other=0).to(tl.int64)
                w |= tl.load(buf + at + 1, mask=ok, other=0).to(tl.int64) << 8
                bad |= (need & (at + 2 > end)).to(tl.int32)
                x = tl.where(need, (x << 16) | w, x)
                p += 2 * tl.sum(n, 0)
                v = tl.where(has_low, (h << k) | low, h) - rad
                tl.store(dst + t * dim, v.to(tl.int32), mask=active)
        bad |= ((x != 65536) & active).to(tl.int32)
        code = tl.max(bad, 0) + 2 * (p != end).to(tl.int32)
        tl.store(err + pid, code)

    return decode_blocks


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


_local = threading.local()  # each thread's pinned staging buffer (a call syncs before it returns)


def _pinned(nbytes: int) -> torch.Tensor:
    buf = getattr(_local, "pinned", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8).pin_memory()
        _local.pinned = buf
    return buf[:nbytes]


def stage(segments: list, shape: tuple, level: int, device) -> tuple:
    """Check calibrated segments on the CPU, build the kernel's block descriptors and copy both, with the
    bytes, to `device` (through pinned memory on CUDA)."""
    _, heads, tokens, dim = shape
    device = torch.device(device)
    part_size = heads * tokens * dim
    descs, esc_pos, esc_val, bufs, base = [], [], [], [], 0
    for s, data in enumerate(segments):
        buf, parts = calibrated_parts(data, shape, level)
        for kind, part in enumerate(parts):
            width, per_lane, blocks = part.layout
            cls_at = base + (part.classes.ctypes.data - buf.ctypes.data)
            out0 = (2 * s + kind) * part_size
            d = np.empty((blocks, _DESC), np.int64)
            d[:, 0] = base + part.states_at + 4 * width * np.arange(blocks)
            d[:, 1] = base + part.words_at + 2 * part.word_start[:-1]
            d[:, 2] = base + part.words_at + 2 * part.word_start[1:]
            d[:, 3] = cls_at
            d[:, 4] = width * per_lane * np.arange(blocks)
            d[:, 5:] = (out0, width, per_lane, tokens, dim)
            descs.append(d)
            if len(part.esc_pos):
                esc_pos.append(part.esc_pos.astype(np.int64) + out0)
                esc_val.append(part.esc_val.astype(np.int32))
        bufs.append(buf)
        base += len(buf)
    desc = np.concatenate(descs).reshape(-1)
    escapes = (np.concatenate(esc_pos), np.concatenate(esc_val)) if esc_pos else None
    n_esc = 0 if escapes is None else len(escapes[0])
    # one copy: segment bytes, descriptors, escape positions and values, each 8-byte aligned
    sizes = [base, desc.nbytes, 8 * n_esc, 4 * n_esc]
    offs = np.concatenate(([0], np.cumsum([(n + 7) // 8 * 8 for n in sizes])))
    host = _pinned(int(offs[-1])) if device.type == "cuda" else torch.empty(int(offs[-1]), dtype=torch.uint8)
    view = host.numpy()
    at = 0
    for buf in bufs:
        view[at : at + len(buf)] = buf
        at += len(buf)
    view[offs[1] : offs[1] + desc.nbytes] = desc.view(np.uint8)
    if escapes is not None:
        view[offs[2] : offs[2] + 8 * n_esc] = escapes[0].view(np.uint8)
        view[offs[3] : offs[3] + 4 * n_esc] = escapes[1].view(np.uint8)
    dev = host.to(device, non_blocking=True)
    return (
        dev[: offs[0] + base],
        dev[offs[1] : offs[1] + desc.nbytes].view(torch.int64),
        (dev[offs[2] : offs[2] + 8 * n_esc].view(torch.int64), dev[offs[3] : offs[3] + 4 * n_esc].view(torch.int32)),
        (len(segments), 2, heads, tokens, dim),
    )


def run_staged(staged: tuple) -> torch.Tensor:
    """Decode staged segments: int32 symbols [segments, 2, heads, tokens, dim] on their device."""
    data, desc, (pos, val), out_shape = staged
    n_blocks = desc.numel() // _DESC
    out = torch.empty(out_shape, dtype=torch.int32, device=data.device)
    err = torch.empty(n_blocks, dtype=torch.int32, device=data.device)
    symbol, freq, cum, low_bits, radius = _tables(str(data.device))
    _kernel()[(n_blocks,)](
        data, desc, symbol, freq, cum, low_bits, radius, out, err, FW=freq.shape[1], num_warps=_WARPS
    )
    if pos.numel():
        out.view(-1)[pos] = val
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
