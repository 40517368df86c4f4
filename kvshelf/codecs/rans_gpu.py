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

import numpy as np
import torch

from kvshelf.codecs import rans

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


def decode_segments(segments: list, shape: tuple, level: int, device) -> torch.Tensor:
    """Calibrated segments (one chunk-layer each, all of `shape`) -> their integer symbols on `device`,
    int32 [len(segments), 2, heads, tokens, dim]; one host-to-device copy, one kernel, one check."""
    from kvshelf.codecs.cachegen import calibrated_parts

    _, heads, tokens, dim = shape
    device = torch.device(device)
    part_size = heads * tokens * dim
    descs, escapes, bufs, base = [], [], [], 0
    for s, data in enumerate(segments):
        buf, parts = calibrated_parts(data, shape, level)
        for kind, part in enumerate(parts):
            width, per_lane, blocks = part.layout
            cls_at = base + (part.classes.ctypes.data - buf.ctypes.data)
            out0 = (2 * s + kind) * part_size
            for b in range(blocks):
                descs.append(
                    (
                        base + part.states_at + 4 * b * width,
                        base + part.words_at + 2 * int(part.word_start[b]),
                        base + part.words_at + 2 * int(part.word_start[b + 1]),
                        cls_at,
                        b * width * per_lane,
                        out0,
                        width,
                        per_lane,
                        tokens,
                        dim,
                    )
                )
            if len(part.esc_pos):
                escapes.append((part.esc_pos.astype(np.int64) + out0, part.esc_val.astype(np.int32)))
        bufs.append(buf)
        base += len(buf)
    host = torch.from_numpy(np.concatenate(bufs) if len(bufs) > 1 else bufs[0].copy())
    desc = torch.tensor(descs, dtype=torch.int64)
    if device.type == "cuda":  # pinned: the copies run asynchronously
        host, desc = host.pin_memory(), desc.pin_memory()
    data = host.to(device, non_blocking=True)
    desc = desc.to(device, non_blocking=True)
    out = torch.empty((len(segments), 2, heads, tokens, dim), dtype=torch.int32, device=device)
    err = torch.empty(len(descs), dtype=torch.int32, device=device)
    symbol, freq, cum, low_bits, radius = _tables(str(device))
    _kernel()[(len(descs),)](data, desc, symbol, freq, cum, low_bits, radius, out, err, FW=freq.shape[1])
    if escapes:
        pos = torch.from_numpy(np.concatenate([p for p, _ in escapes])).to(device, non_blocking=True)
        val = torch.from_numpy(np.concatenate([v for _, v in escapes])).to(device, non_blocking=True)
        out.view(-1)[pos] = val
    if bool(err.any()):  # a cache never serves what did not decode exactly
        raise rans.RansError("cachegen entropy stream does not decode (GPU)")
    return out


def decode_segment(data, shape: tuple, level: int, device) -> torch.Tensor:
    """One calibrated segment's integer symbols [2, heads, tokens, dim] on `device`."""
    return decode_segments([data], shape, level, device)[0]
