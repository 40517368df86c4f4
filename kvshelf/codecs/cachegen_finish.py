"""The last step of decoding a calibrated cachegen work unit on the CPU, in one compiled call that releases the
GIL: RoPE put back on the K halves and every value cast into the chunk's output (fp16, bf16 or fp32), row by
row while the row is in L1.

Why: it replaces two calls (a compiled RoPE kernel, then torch's `copy_` for the cast), each of which released
the GIL for only some tens of microseconds and then took it back. With 16 threads, every such short release
is a chance for a running thread to take the GIL ahead of one that waits (CPython's GIL is not fair to
sleeping waiters): the units' CPU share fell to 0.6-0.75 of their wall time at 4-16 callers (BENCHMARKS.md,
issue #17, ninth and eleventh sessions). numba has no float16 type, so the casts are done on the bits, the
way torch rounds (to nearest, ties to even; fp16 subnormals and overflow to infinity included): the same
bytes as `torch.Tensor.to` for every finite float32 and infinity (tests check it). A NaN cannot come out of
the inverse transform of integer symbols; it would be cast to a quiet NaN.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

# output kinds: how a unit's float32 values are written (the output array's integer view)
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_VIEWS = {0: (torch.int32, np.uint32), 1: (torch.int16, np.uint16), 2: (torch.int16, np.uint16)}

_M = np.float32(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds a float below 2**22 to an integer (RNE)
_S = np.float32(2.0**24)  # fp16's smallest subnormal is 2**-24


def bits_view(out: torch.Tensor) -> np.ndarray:
    """`out` (C-contiguous, a dtype of KINDS) as a flat numpy array of unsigned integers of its width: what
    `finish` writes into."""
    torch_int, np_uint = _VIEWS[KINDS[out.dtype]]
    return out.view(torch_int).numpy().reshape(-1).view(np_uint)


@njit(nogil=True, cache=True, inline="always")
def _half_bits(w, f):  # pragma: no cover - compiled
    """fp16 bits of the float32 f (w: its bits), rounded to nearest even, as torch casts."""
    a = w & np.uint32(0x7FFFFFFF)
    sign = (w >> np.uint32(16)) & np.uint32(0x8000)
    # normal results: rebias the exponent, round the 13 dropped bits (a carry may reach infinity: clamped)
    normal = (a - np.uint32(0x38000000) + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    normal = min(normal, np.uint32(0x7C00))
    # below fp16's smallest normal (2**-14): the subnormal's bits are |f| / 2**-24 rounded (exact in float32)
    sub = np.uint32(np.int32((abs(f) * _S + _M) - _M))
    r = normal if a >= np.uint32(0x38800000) else sub
    r = r if a <= np.uint32(0x7F800000) else np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
    return np.uint16(sign | r)


@njit(nogil=True, cache=True, inline="always")
def _bf16_bits(w):  # pragma: no cover - compiled
    """bf16 bits of the float32 with bits w, rounded to nearest even, as torch casts (NaN: 0xFFFF)."""
    r = (w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.uint16(r if (w & np.uint32(0x7FFFFFFF)) <= np.uint32(0x7F800000) else np.uint32(0xFFFF))


@njit(nogil=True, cache=True)
def finish(x, xb, h0, h1, heads, tokens, dim, cos, sin, which, out, kind):  # pragma: no cover - compiled
    """Halves h0..h1-1 of a unit (x: float32, flat [(h1 - h0) * heads * tokens * dim], the inverse transform's
    output; xb: the same memory as uint32): RoPE back on K halves (even h; tables cos[which[h // 2]],
    sin[which[h // 2]]; kvshelf.codecs.cachegen_cpu._rope's arithmetic with sign +1, in place), then every value
    cast into `out` (the unit's slice of the output, flat, as bits_view gives it; `kind` from KINDS)."""
    half = dim // 2
    for h in range(h0, h1):
        rotate = h % 2 == 0
        c, s = cos[which[h // 2]], sin[which[h // 2]]
        for g in range(heads):
            for t in range(tokens):
                at = (((h - h0) * heads + g) * tokens + t) * dim
                if rotate:
                    for i in range(half):
                        x1, x2 = x[at + i], x[at + i + half]
                        si = s[t, i]
                        x[at + i] = x1 * c[t, i] + (-x2) * si
                        x[at + i + half] = x2 * c[t, i] + x1 * si
                if kind == 1:
                    for i in range(at, at + dim):
                        out[i] = _half_bits(xb[i], x[i])
                elif kind == 2:
                    for i in range(at, at + dim):
                        out[i] = _bf16_bits(xb[i])
                else:
                    for i in range(at, at + dim):
                        out[i] = xb[i]


def warm_up() -> None:
    """Compile (or load from numba's cache) `finish` for the three output kinds."""
    x = np.zeros(2 * 4 * 2, np.float32)
    cos, sin, which = np.ones((1, 4, 1), np.float32), np.zeros((1, 4, 1), np.float32), np.zeros(1, np.int64)
    for dtype, kind in KINDS.items():
        finish(x, x.view(np.uint32), 0, 2, 1, 4, 2, cos, sin, which, bits_view(torch.empty(16, dtype=dtype)), kind)
