"""The Triton kernel that turns cachegen's decoded integer symbols into KV in one pass (issue #17): the inverse
transform with the steps folded in, the mean, RoPE on K and the cast to the KV's dtype, read straight from the
rANS kernel's chunk-major output and written once, with no float32 intermediates in memory. The torch path
(CacheGenCodec._finish_layers) is the reference it is checked against. A module of its own because it imports
Triton at once: kvshelf.codecs.rans_gpu loads it on first use only."""

import triton
import triton.language as tl

_TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def finish_blocks(
    q,  # int32 symbols [layers * chunks, 2, heads, chunk_tokens, D]
    scaled,  # float32 inverse transforms, steps folded in, transposed: [cal layers, 2, heads, D, D]
    mean,  # float32 [cal layers, 2, heads, D]
    inv_freq,  # float32 [cal layers, D / 2]
    cal_layer,  # int64 [layers]: the calibration's layer of each decoded layer
    out,  # [layers, 2, heads, tokens, D] in the KV's dtype (strides given; the last dimension contiguous)
    position,
    tokens,
    chunk_tokens,
    chunks,
    heads,
    so_l,
    so_k,
    so_h,
    so_t,
    D: tl.constexpr,
    HALF: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)  # (layer, K|V, head)
    layer = pid // (2 * heads)
    kind = (pid // heads) % 2
    h = pid % heads
    g = tl.program_id(1) * BT + tl.arange(0, BT)  # the run's tokens of this block
    valid = g < tokens
    c = g // chunk_tokens
    row = ((((layer * chunks + c) * 2 + kind) * heads + h) * chunk_tokens + g % chunk_tokens).to(tl.int64) * D
    cl = tl.load(cal_layer + layer)
    mat = ((cl * 2 + kind) * heads + h) * D * D
    cols = tl.arange(0, HALF)
    lo = tl.zeros([BT, HALF], dtype=tl.float32)
    hi = tl.zeros([BT, HALF], dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(q + row[:, None] + kk[None, :], mask=valid[:, None], other=0).to(tl.float32)
        s_lo = tl.load(scaled + mat + kk[:, None] * D + cols[None, :])
        s_hi = tl.load(scaled + mat + kk[:, None] * D + HALF + cols[None, :])
        # symbols are small integers (exact in tf32), the matrices are not: three tf32 products ~ float32
        lo = tl.dot(a, s_lo, lo, input_precision="tf32x3")
        hi = tl.dot(a, s_hi, hi, input_precision="tf32x3")
    bias = mean + ((cl * 2 + kind) * heads + h) * D
    lo += tl.load(bias + cols)[None, :]
    hi += tl.load(bias + HALF + cols)[None, :]
    if kind == 0:  # K: RoPE again, at the tokens' positions
        inv = tl.load(inv_freq + cl * HALF + cols).to(tl.float64)
        # the reference's angle (float64 product rounded to float32), reduced to [-pi, pi] in float64 so that
        # a fast float32 cos/sin stays exact at long positions
        angle = ((position + g).to(tl.float64)[:, None] * inv[None, :]).to(tl.float32).to(tl.float64)
        angle = (angle - _TWO_PI * tl.floor(angle / _TWO_PI + 0.5)).to(tl.float32)
        cos, sin = tl.cos(angle), tl.sin(angle)
        lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
    at = layer.to(tl.int64) * so_l + kind.to(tl.int64) * so_k + h.to(tl.int64) * so_h  # int64: large buffers
    dst = out + at + g.to(tl.int64)[:, None] * so_t
    ty = out.dtype.element_ty
    tl.store(dst + cols[None, :], lo.to(ty), mask=valid[:, None])
    tl.store(dst + HALF + cols[None, :], hi.to(ty), mask=valid[:, None])
