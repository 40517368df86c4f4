"""cachegen's rANS lane loops for the CPU codec (kvshelf.codecs.cachegen_cpu): faster copies of the reference
coder's loops in kvshelf.codecs.rans (same arguments, same bytes, same symbols; tests check them against it),
with 32-bit states, flat tables indexed by unsigned integers (no negative-index fix-ups) and fewer
hard-to-predict branches. The stored format is kvshelf.codecs.rans's."""

from __future__ import annotations

import numpy as np
from numba import njit

from kvshelf.codecs.rans import PROB_BITS, STATE_LOW, _u32


@njit(nogil=True, cache=True)
def _decode_lanes(
    buf, states_at, words_at, word_start, cls, width, per_lane, tokens, dim, symbol, freq, cum, low_bits, radius, out
):  # pragma: no cover - compiled  # noqa: E501
    """kvshelf.codecs.rans._decode's loops (same arguments, same symbols, 0 or an error code), faster: 32-bit
    states, and each step reads the next word whether it needs it or not (a clamped index: never outside
    buf), so that the compiler can select instead of branching."""
    rows = cls.shape[0]
    blocks = rows // (width * per_lane)
    mask = np.uint32((1 << PROB_BITS) - 1)
    bits, low = np.uint32(PROB_BITS), np.uint32(STATE_LOW)
    x = np.empty(width, np.uint32)
    lane_sym = np.empty(width, np.uint64)  # where the lane's class starts in the flat tables
    lane_tab = np.empty(width, np.uint64)
    lane_low = np.empty(width, np.uint32)
    lane_rad = np.empty(width, np.int64)
    lane_at = np.empty(width, np.int64)
    lane_h = np.empty(width, np.int64)
    flat_symbol, flat_freq, flat_cum = symbol.ravel(), freq.ravel(), cum.ravel()
    last = buf.shape[0] - 2
    if last < 0:
        return 1
    for b in range(blocks):
        for j in range(width):
            o = states_at + 4 * (b * width + j)
            x[j] = np.uint32(_u32(buf, o))
        p = words_at + 2 * word_start[b]
        end = words_at + 2 * word_start[b + 1]
        base = b * width * per_lane
        for i in range(per_lane):
            any_low = False
            for j in range(width):  # per lane: its row's class, low bits, radius and place in out
                row = base + j + width * i
                lane_sym[j] = np.uint64(cls[row]) * np.uint64(symbol.shape[1])
                lane_tab[j] = np.uint64(cls[row]) * np.uint64(freq.shape[1])
                lane_low[j] = low_bits[cls[row]]
                lane_rad[j] = radius[cls[row]]
                lane_at[j] = (row // dim) * tokens * dim + row % dim
                any_low |= lane_low[j] > 0
            for t in range(tokens):
                for j in range(width):  # every lane's high symbol...
                    s = x[j]
                    slot = s & mask
                    h = flat_symbol[lane_sym[j] + np.uint64(slot)]
                    e = lane_tab[j] + np.uint64(h)
                    s = flat_freq[e] * (s >> bits) + slot - flat_cum[e]
                    q = min(p, last)
                    w = np.uint32(buf[q]) | (np.uint32(buf[q + 1]) << np.uint32(8))
                    if s < low:
                        s = (s << np.uint32(16)) | w
                        p += 2
                    x[j] = s
                    lane_h[j] = h
                    out[lane_at[j] + t * dim] = np.int64(h) - lane_rad[j]
                if not any_low:
                    continue
                for j in range(width):  # ...then the low bits of the lanes that have them
                    k = lane_low[j]
                    if k > 0:
                        s = x[j]
                        slot = s & mask
                        sh = bits - k
                        s = ((s >> bits) << sh) + (slot & ((np.uint32(1) << sh) - np.uint32(1)))
                        q = min(p, last)
                        w = np.uint32(buf[q]) | (np.uint32(buf[q + 1]) << np.uint32(8))
                        if s < low:
                            s = (s << np.uint32(16)) | w
                            p += 2
                        x[j] = s
                        out[lane_at[j] + t * dim] = ((lane_h[j] << k) | np.int64(slot >> sh)) - lane_rad[j]
        if p > end:  # it read words past its block's: the reference stops there (code 1)
            return 1
        if p != end:
            return 2
        for j in range(width):
            if x[j] != low:
                return 3
    return 0


@njit(nogil=True, cache=True)
def _encode_lanes(u, cls, width, per_lane, tokens, dim, freq, cum, low_bits):  # pragma: no cover - compiled
    """kvshelf.codecs.rans._encode's loops (same arguments and results, the same bytes): _encode_lanes_into with
    buffers of its own."""
    blocks = cls.shape[0] // (width * per_lane)
    cap = width * per_lane * tokens * 2
    buf = np.empty(blocks * cap + 1, np.uint16)
    counts = np.zeros(blocks, np.uint32)
    states = np.empty(blocks * width, np.uint32)
    _encode_lanes_into(u, cls, width, per_lane, tokens, dim, freq, cum, low_bits, buf, counts, states)
    return buf, counts, states, cap


@njit(nogil=True, cache=True)
def _encode_lanes_into(u, cls, width, per_lane, tokens, dim, freq, cum, low_bits, buf, counts, states):  # noqa: E501  # pragma: no cover - compiled
    """kvshelf.codecs.rans._encode's loops into the caller's buffers (buf: at least blocks * cap + 1 uint16,
    cap = width * per_lane * tokens * 2; counts: blocks, states: blocks * width, uint32), the same bytes,
    faster: 32-bit divisions, flat tables indexed by unsigned integers (no negative-index fix-ups), a word
    stored before knowing whether it is emitted and the emission done without a branch (the position and
    the state moved by the comparison's 0 or 1: -6% CPU on an AMD EPYC). Block b's words end up at
    buf[b * cap : b * cap + counts[b]]. Returns cap."""
    rows = cls.shape[0]
    blocks = rows // (width * per_lane)
    cap = width * per_lane * tokens * 2  # at most one word per (high or low) symbol
    # one spare word in front: a step stores its word before knowing whether it emits one, so it may write
    # just below its block's slot, into the spare word or the previous slot's unused tail
    x = np.empty(width, np.uint32)
    lane_low = np.empty(width, np.uint32)
    lane_row = np.empty(width, np.int64)
    lane_base = np.empty(width, np.uint64)
    flat_freq, flat_cum, table = freq.ravel(), cum.ravel(), np.uint64(freq.shape[1])
    for b in range(blocks):
        end = (b + 1) * cap + 1
        pos = end
        for j in range(width):
            x[j] = STATE_LOW
        base = b * width * per_lane
        for i in range(per_lane - 1, -1, -1):
            any_low = False
            for j in range(width):
                row = base + j + width * i
                lane_low[j] = low_bits[cls[row]]
                lane_row[j] = (row // dim) * tokens * dim + row % dim
                lane_base[j] = np.uint64(cls[row]) * table
                any_low |= lane_low[j] > 0
            for t in range(tokens - 1, -1, -1):
                if any_low:  # a step decodes every lane's high symbol, then the low bits: coded in reverse
                    for j in range(width - 1, -1, -1):
                        k = np.int64(lane_low[j])
                        if k > 0:
                            y = np.int64(x[j])
                            sh = PROB_BITS - k
                            buf[pos - 1] = y & 0xFFFF
                            emit = np.int64(y >= np.int64(1) << (sh + 32 - PROB_BITS))
                            pos -= emit
                            y >>= emit << 4
                            lo = np.int64(u[lane_row[j] + t * dim]) & ((np.int64(1) << k) - 1)
                            x[j] = ((y >> sh) << PROB_BITS) + (y & ((np.int64(1) << sh) - 1)) + (lo << sh)
                for j in range(width - 1, -1, -1):
                    e = lane_base[j] + (np.uint64(u[lane_row[j] + t * dim]) >> np.uint64(lane_low[j]))
                    f = np.int64(flat_freq[e])
                    s = np.int64(x[j])
                    buf[pos - 1] = s & 0xFFFF
                    emit = np.int64(s >= f << (32 - PROB_BITS))
                    pos -= emit
                    s >>= emit << 4
                    q = np.int64(np.uint32(s) // np.uint32(f))  # s < 2**32 here
                    x[j] = (q << PROB_BITS) + (s - q * f) + flat_cum[e]
        counts[b] = end - pos
        for j in range(width):
            states[b * width + j] = x[j]
        n = end - pos  # the block's words to the front of its slot: the caller cuts [b * cap, b * cap + count)
        for w in range(n):
            buf[b * cap + w] = buf[pos + w]
    return cap
