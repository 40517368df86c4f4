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
    import triton
    import triton.language as tl

    @triton.jit
    def decode_blocks(
        buf, desc, symbol, freq, cum, low_bits, radius, out, err, FW: tl.constexpr, P: tl.constexpr, LOW: tl.constexpr
    ):
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
            shift = P - k
            has_low = (k > 0) & active
            dst = out + out0 + (row // dim) * tokens * dim + row % dim
            for t in range(tokens):
                slot = x & ((1 << P) - 1)
                h = tl.load(symbol + c * (1 << P) + slot).to(tl.int64)
                f = tl.load(freq + c * FW + h).to(tl.int64)
                x = f * (x >> P) + slot - tl.load(cum + c * FW + h).to(tl.int64)
                need = (x < LOW) & active
                n = need.to(tl.int32)
                at = p + 2 * (tl.cumsum(n, 0) - n)
                ok = need & (at + 2 <= end)
                w = tl.load(buf + at, mask=ok, other=0).to(tl.int64)
                w |= tl.load(buf + at + 1, mask=ok, other=0).to(tl.int64) << 8
                bad |= (need & (at + 2 > end)).to(tl.int32)
                x = tl.where(need, (x << 16) | w, x)
                p += 2 * tl.sum(n, 0)
                slot = x & ((1 << P) - 1)
                low = slot >> shift
                x = tl.where(has_low, ((x >> P) << shift) + (slot & ((1 << shift) - 1)), x)
                need = (x < LOW) & has_low
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
        bad |= ((x != LOW) & active).to(tl.int32)
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


_local = threading.local()  # each thread's pinned staging buffer and the event of its last copy


def _pinned(nbytes: int) -> torch.Tensor:
    buf = getattr(_local, "pinned", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8).pin_memory()
        _local.pinned, _local.copied = buf, None
    if _local.copied is not None:
        _local.copied.synchronize()  # the previous copy out of this buffer has finished
    return buf[:nbytes]


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
    host = _pinned(int(offs[-1])) if device.type == "cuda" else torch.empty(int(offs[-1]), dtype=torch.uint8)
    view = host.numpy()
    for at, data in zip(starts, segments, strict=True):
        view[at : at + len(memoryview(data))] = np.frombuffer(data, np.uint8)
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
    if device.type == "cuda":
        _local.copied = torch.cuda.Event()
        _local.copied.record()
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
