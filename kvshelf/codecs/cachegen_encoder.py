"""Calibrated cachegen's CPU encoder for a work unit: float coefficients of a few K or V parts -> their stored
bytes in one compiled call with few passes and no allocation but its result.

Why: the first unit coder (cachegen_cpu's _code_part per part) made four passes over a part's values besides
the rANS lanes (round, sum squares, clip and count escapes, find the escapes again while writing), and
allocated ~1 MB of fresh arrays per part (fresh memory costs page faults, which a process's threads take in
turn). On the 16-core H200 host that was ~410 us of CPU per layer beside the lanes' ~660 (BENCHMARKS.md, issue
#17, fourth session). Here a part is two passes over its values (round and sum squares; clip, shift and note
the escapes) and the lanes, into buffers the thread keeps (`Scratch`), then its bytes are laid out once.

The bytes are cachegen_cpu._code_part + _write_part's (kvshelf.codecs.rans.encode_part's layout): the same
rounding (as torch: half to even, clamp to +-2**30, NaN as the x86 cast's -2**31), the same sums of squares
in the same order (so the same classes), escapes in the same order. Tests check them byte for byte.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from kvshelf.codecs.rans import CUM, FREQ, LOW_BITS, RADIUS, SPREAD_CLASSES
from kvshelf.codecs.rans_lanes import _encode_lanes_into


class Scratch(NamedTuple):
    """A thread's buffers for coding parts of `values` symbols each (rows x tokens), `halves` parts a call."""

    u: np.ndarray  # int32 [values]: the part's symbols, then shifted and clipped for the lanes
    esc_at: np.ndarray  # int32 [values]: escapes' positions (in the part's order)
    esc_val: np.ndarray  # int32 [values]: their values
    words: np.ndarray  # uint16 [2 * values + 1]: the lanes' words (blocks * cap + 1)
    stage: np.ndarray  # uint8: the parts' bytes back to back (their largest possible size)

    @classmethod
    def make(cls, rows: int, tokens: int, halves: int, width: int, per_lane: int) -> Scratch:
        values = rows * tokens
        blocks = rows // (width * per_lane)
        most = rows + 4 + 4 * blocks + 4 * blocks * width + 2 * 2 * values + 8 * values  # every value an escape
        return cls(np.empty(values, np.int32), np.empty(values, np.int32), np.empty(values, np.int32),
                   np.empty(2 * values + 1, np.uint16), np.empty(halves * most, np.uint8))  # fmt: skip


@njit(nogil=True, cache=True)
def _code_halves(coeffs, width, per_lane, freq, cum, low_bits, radius, u, esc_at, esc_val, words, stage):  # noqa: E501  # pragma: no cover - compiled
    """Parts of float coefficients [n, heads, tokens, dim] (K or V parts of segments) -> (their bytes back to
    back, a new array; where each ends). u, esc_at, esc_val, words, stage: the caller's Scratch."""
    n, heads, tokens, dim = coeffs.shape
    rows = heads * dim
    values = rows * tokens
    blocks = rows // (width * per_lane)
    sq = np.empty(rows, np.float64)
    cls = np.empty(rows, np.uint8)
    rad = np.empty(rows, np.int32)
    counts = np.zeros(blocks, np.uint32)
    states = np.empty(blocks * width, np.uint32)
    ends = np.empty(n, np.int64)
    o = 0
    for k in range(n):
        flat = coeffs[k].reshape(-1)
        # pass 1: round as torch (half to even, clamp, NaN -> -2**31) and sum each row's squares in token order
        # (float64: the classes of rans.classes_of, summed as _code_part sums them)
        sq[:] = 0.0
        for h in range(heads):
            for t in range(tokens):
                base = (h * tokens + t) * dim
                for d in range(dim):
                    v = flat[base + d]
                    q = np.int32(-(2**31)) if v != v else np.int32(min(max(np.rint(v), -(2.0**30)), 2.0**30))
                    u[base + d] = q
                    w = np.float64(q)
                    sq[h * dim + d] += w * w
        for r in range(rows):
            spread = math.sqrt(sq[r] / tokens)
            c = np.round(4 * (np.log2(max(spread, 2.0**-3)) + 3))
            cls[r] = np.uint8(min(max(c, 0), SPREAD_CLASSES - 1))
            rad[r] = radius[cls[r]]
        # pass 2: shift by the radius, clipped to it; what lies at or beyond it is an escape, noted in order.
        # Escapes are rare (5 in 9.4M values of real Gemma KV): a token's row is checked without a branch per
        # value (the compiler vectorises both loops) and only a row with escapes takes the value-by-value loop
        n_esc = 0
        for h in range(heads):
            rr = rad[h * dim : (h + 1) * dim]
            for t in range(tokens):
                base = (h * tokens + t) * dim
                row = u[base : base + dim]
                hits = 0
                for d in range(dim):
                    hits += (row[d] >= rr[d]) | (row[d] <= -rr[d])
                if hits == 0:
                    for d in range(dim):
                        row[d] += rr[d]
                    continue
                for d in range(dim):
                    r = rr[d]
                    v = row[d]
                    if v >= r or v <= -r:
                        esc_at[n_esc] = base + d
                        esc_val[n_esc] = v
                        n_esc += 1
                        v = r if v > 0 else -r
                    row[d] = v + r
        cap = _encode_lanes_into(u[:values], cls, width, per_lane, tokens, dim, freq, cum, low_bits, words, counts,
                                 states)  # fmt: skip
        # the part's bytes: classes, escape count, word counts, states, words, escape positions, escape values
        stage[o : o + rows] = cls
        o += rows
        o = _put32(stage, o, n_esc)
        for b in range(blocks):
            o = _put32(stage, o, counts[b])
        for j in range(blocks * width):
            o = _put32(stage, o, states[j])
        for b in range(blocks):
            src = words[b * cap : b * cap + counts[b]]
            for w in range(src.shape[0]):
                x = src[w]
                stage[o] = x & 0xFF
                stage[o + 1] = x >> 8
                o += 2
        for e in range(n_esc):
            o = _put32(stage, o, esc_at[e])
        for e in range(n_esc):
            o = _put32(stage, o, esc_val[e])
        ends[k] = o
    return stage[:o].copy(), ends


@njit(nogil=True, cache=True, inline="always")
def _put32(out, o, v):  # pragma: no cover - compiled
    v = np.int64(v) & 0xFFFFFFFF
    out[o] = v & 0xFF
    out[o + 1] = (v >> 8) & 0xFF
    out[o + 2] = (v >> 16) & 0xFF
    out[o + 3] = v >> 24
    return o + 4


def encode_halves(coeffs: np.ndarray, width: int, per_lane: int, scratch: Scratch | None = None):
    """Parts of float32 coefficients [n, heads, tokens, dim] -> (their bytes back to back, where each ends), in
    `scratch` (made here if None; its parts of at least n halves of this shape)."""
    n, heads, tokens, dim = coeffs.shape
    if scratch is None:
        scratch = Scratch.make(heads * dim, tokens, n, width, per_lane)
    return _code_halves(coeffs, width, per_lane, FREQ, CUM, LOW_BITS, RADIUS, *scratch)


def warm_up() -> None:
    """Compile (or load from numba's cache) the unit encoder."""
    encode_halves(np.zeros((1, 1, 4, 2), np.float32), 2, 1)
