"""The edges of a calibrated cachegen work unit on the CPU, each one compiled call that releases the GIL: the
last step of decoding (`finish`: RoPE put back on the K halves and every value cast into the chunk's output,
fp16, bf16 or fp32, half by half while the half is in L2) and the first of encoding (`start`: the KV cast to
float32 and RoPE taken off the K halves).

Why: each replaces two calls (torch's `copy_` for the cast and a compiled RoPE kernel), each of which released
the GIL for only some tens of microseconds and then took it back. With 16 threads, every such short release
is a chance for a running thread to take the GIL ahead of one that waits (CPython's GIL is not fair to
sleeping waiters): the units' CPU share fell to 0.6-0.75 of their wall time at 4-16 callers (BENCHMARKS.md,
issue #17, eleventh session). numba has no float16 type: fp16 goes through LLVM's half conversions (F16C's
vcvtps2ph / vcvtph2ps on x86, as fast as torch's), bf16 through its bits (rounded to nearest even, NaN as
torch's vector cast writes it). The same bytes as `torch.Tensor.to` for every finite float32 and infinity,
and exact widening of every fp16 / bf16 pattern (tests check both). A NaN cannot come out of the inverse
transform of integer symbols.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# output kinds: how a unit's float32 values are written (the output array's integer view)
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_VIEWS = {0: (torch.int32, np.uint32), 1: (torch.int16, np.uint16), 2: (torch.int16, np.uint16)}


def bits_view(out: torch.Tensor) -> np.ndarray:
    """`out` (C-contiguous, a dtype of KINDS) as a flat numpy array of unsigned integers of its width: what
    `finish` writes into."""
    torch_int, np_uint = _VIEWS[KINDS[out.dtype]]
    return out.view(torch_int).numpy().reshape(-1).view(np_uint)


@intrinsic
def _f16_bits(typingctx, f):
    """fp16 bits of a float32, rounded to nearest even: LLVM's fptrunc to half (one vcvtps2ph per 8 or 16 values
    where the CPU has F16C, as torch's cast)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@intrinsic
def _f16_value(typingctx, h):
    """The float32 value of fp16 bits (exact: LLVM's fpext from half)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def _bf16_bits(w):  # pragma: no cover - compiled
    """bf16 bits of the float32 with bits w, rounded to nearest even, as torch casts (NaN: 0xFFFF)."""
    r = (w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.uint16(r if (w & np.uint32(0x7FFFFFFF)) <= np.uint32(0x7F800000) else np.uint32(0xFFFF))


@njit(nogil=True, cache=True, inline="always")
def _rope_half(vals, c, s, heads, tokens, dim, sign):  # pragma: no cover - compiled
    """RoPE on one K half in place (`vals`: flat [heads * tokens * dim]; tables c, s [tokens, dim / 2]): sign +1
    puts it back, -1 takes it off, with kvshelf.codecs.cachegen_cpu._rope's arithmetic (s * 1.0 is s exactly)."""
    half = dim // 2
    for g in range(heads):
        for t in range(tokens):
            row, ct, st = vals[(g * tokens + t) * dim : (g * tokens + t + 1) * dim], c[t], s[t]
            for i in range(half):
                x1, x2 = row[i], row[i + half]
                si = st[i] * sign
                row[i] = x1 * ct[i] + (-x2) * si
                row[i + half] = x2 * ct[i] + x1 * si


@njit(nogil=True, cache=True)
def finish(x, xb, h0, h1, heads, tokens, dim, cos, sin, which, out, kind):  # pragma: no cover - compiled
    """Halves h0..h1-1 of a unit (x: float32, flat [(h1 - h0) * heads * tokens * dim], the inverse transform's
    output; xb: the same memory as uint32): RoPE back on K halves (even h; tables cos[which[h // 2]],
    sin[which[h // 2]]; kvshelf.codecs.cachegen_cpu._rope's arithmetic with sign +1, in place), then every value
    cast into `out` (the unit's slice of the output, flat, as bits_view gives it; `kind` from KINDS)."""
    size = heads * tokens * dim
    for h in range(h0, h1):  # views from index 0: the compiler drops negative-index checks and vectorises
        at = (h - h0) * size
        vals, bits, dst = x[at : at + size], xb[at : at + size], out[at : at + size]
        if h % 2 == 0:
            _rope_half(vals, cos[which[h // 2]], sin[which[h // 2]], heads, tokens, dim, np.float32(1.0))
        if kind == 1:  # the half is in L2 (256 tokens x 256 dims: 256 KB)
            for i in range(size):
                dst[i] = _f16_bits(vals[i])
        elif kind == 2:
            for i in range(size):
                dst[i] = _bf16_bits(bits[i])
        else:
            for i in range(size):
                dst[i] = bits[i]


@njit(nogil=True, cache=True)
def start(kv, kind, x, xb, h0, h1, heads, tokens, dim, cos, sin, which):  # pragma: no cover - compiled
    """The first step of encoding halves h0..h1-1: the unit's KV (`kv`: flat bits as bits_view gives them, `kind`
    from KINDS) as float32 into x (xb: the same memory as uint32), then RoPE taken off K halves (even h):
    kvshelf.codecs.cachegen_cpu._rope's arithmetic with sign -1, in place."""
    size = heads * tokens * dim
    for h in range(h0, h1):  # views from index 0 (see finish)
        at = (h - h0) * size
        src, vals, bits = kv[at : at + size], x[at : at + size], xb[at : at + size]
        if kind == 1:
            for i in range(size):
                vals[i] = _f16_value(src[i])
        elif kind == 2:  # bf16: the top half of a float32
            for i in range(size):
                bits[i] = np.uint32(src[i]) << np.uint32(16)
        else:
            for i in range(size):
                bits[i] = src[i]
        if h % 2 == 0:
            _rope_half(vals, cos[which[h // 2]], sin[which[h // 2]], heads, tokens, dim, np.float32(-1.0))


def warm_up() -> None:
    """Compile (or load from numba's cache) `finish` and `start` for the three kinds."""
    x = np.zeros(2 * 4 * 2, np.float32)
    cos, sin, which = np.ones((1, 4, 1), np.float32), np.zeros((1, 4, 1), np.float32), np.zeros(1, np.int64)
    for dtype, kind in KINDS.items():
        bits = bits_view(torch.zeros(16, dtype=dtype))
        finish(x, x.view(np.uint32), 0, 2, 1, 4, 2, cos, sin, which, bits, kind)
        start(bits, kind, x, x.view(np.uint32), 0, 2, 1, 4, 2, cos, sin, which)
