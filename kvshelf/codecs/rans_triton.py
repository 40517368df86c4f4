"""The Triton kernel of cachegen's GPU rANS decoder (kvshelf.codecs.rans_gpu stages its input and checks its
output). A module of its own because it imports Triton at once: rans_gpu loads it on first use only."""

import triton
import triton.language as tl


@triton.jit
def refill(buf, x, need, p, end, bad):
    """The lanes whose state fell below LOW (`need`) each read the next 16-bit word of the block's
    stream, in lane order (a lane's word sits at the exclusive prefix sum of the needs before it);
    a read past the block's end is flagged in `bad`, never made."""
    n = need.to(tl.int32)
    at = p + 2 * (tl.cumsum(n, 0) - n)
    ok = need & (at + 2 <= end)
    w = tl.load(buf + at, mask=ok, other=0).to(tl.int64)
    w |= tl.load(buf + at + 1, mask=ok, other=0).to(tl.int64) << 8
    bad |= (need & (at + 2 > end)).to(tl.int32)
    x = tl.where(need, (x << 16) | w, x)
    return x, p + 2 * tl.sum(n, 0), bad


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
            x, p, bad = refill(buf, x, (x < LOW) & active, p, end, bad)
            slot = x & ((1 << P) - 1)
            low = slot >> shift
            x = tl.where(has_low, ((x >> P) << shift) + (slot & ((1 << shift) - 1)), x)
            x, p, bad = refill(buf, x, (x < LOW) & has_low, p, end, bad)
            v = tl.where(has_low, (h << k) | low, h) - rad
            tl.store(dst + t * dim, v.to(tl.int32), mask=active)
    bad |= ((x != LOW) & active).to(tl.int32)
    code = tl.max(bad, 0) + 2 * (p != end).to(tl.int32)
    tl.store(err + pid, code)
