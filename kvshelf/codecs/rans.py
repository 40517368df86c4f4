"""Interleaved rANS over spread classes: cachegen's calibrated entropy coder, decodable on a CPU (numba,
without Python's GIL) and on a GPU (kvshelf.codecs.rans_gpu reads the same bytes).

The model is the one the constriction coder used (kvshelf.codecs.entropy): every coefficient row (one
(head, channel) over a chunk's tokens) gets a spread class (quarter octaves of its RMS, one byte stored)
and is coded against a discretised Gaussian of that spread over [-r, r], r = ceil(8 spread) + 2; symbols
at or beyond r are coded at the edge and kept exactly as escapes. Here the Gaussians are STATIC tables of
14-bit frequencies computed from the class alone (nothing but the class bytes is stored). For wide classes
(spread > 8) a symbol u = v + r is split into `u >> k`, coded against the Gaussian's mass per bin of 2**k,
and k uniform low bits, so that no table has more than ~135 symbols.

Interleaving: the rows of one (K|V) part are cut into blocks of W lanes (W = gcd(rows, 32)); lane j of a
block codes R rows (rows j, j + W, ...), token after token, all W lanes in lock step sharing one stream of
16-bit words (as GPU rANS coders do: a warp decodes a block, each lane reading the words it needs in lane
order; a step reads every lane's word for its high symbol, then every lane's word for its low bits).
Per block: one word count and W final states (u32) are stored; decoding must end with every state
back at its initial value and every word consumed, or the segment is refused.

Part layout (little-endian): classes u8 [rows], escapes u32, word counts u32 [blocks], states u32
[blocks * W], words u16 [sum of counts], escape positions i32 [escapes], escape values i32 [escapes].
"""

from __future__ import annotations

import hashlib
import math
import struct
from math import gcd

import numpy as np
from numba import njit

PROB_BITS = 14
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = 1 << 16  # states live in [2**16, 2**32); words are 16 bits
SPREAD_CLASSES = 64  # spreads 2**-3 .. 2**12.75, in quarter octaves (as kvshelf.codecs.entropy)
LANES = 32
# Rows per lane are chosen to give each lane about this many symbols: fewer cost size (each lane ends
# with a 32-bit state: on Gemma 3 270M's KV 2048 -> 1024 -> 512 -> 256 cost +0.4, +0.9, +2.0, +4.2% vs one
# stream), more leave a GPU idle (a 12K-token layer of Gemma 3 270M: 10 GB/s at 2048, 33 GB/s at 512).
SYMBOLS_PER_LANE = 512
_ESC = struct.Struct("<I")
# The tables come from floating-point maths (erfc): a platform whose libm rounds differently would build
# other tables and decode garbage. They are pinned: a mismatch refuses to code at all.
TABLES_DIGEST = "095a560742246aad79d9d7973bffe944"


class RansError(ValueError):
    """A rANS part is malformed: truncated, inconsistent counts, or a stream that does not decode."""


def spread_of(cls: int) -> float:
    return 2.0 ** (cls / 4 - 3)


def _class_table(cls: int) -> tuple[np.ndarray, int, int]:
    """(14-bit frequencies of the high symbols, radius r, low bits k) for a spread class."""
    sigma = spread_of(cls)
    r = int(math.ceil(8 * sigma)) + 2
    k = max(0, math.ceil(math.log2(sigma)) - 3)
    width = 1 << k
    n = (2 * r >> k) + 1
    probs = []
    for h in range(n):
        lo, hi = h * width - r, min(h * width + width - 1, 2 * r) - r  # values v of this bin
        cdf = lambda x: 0.5 * math.erfc(-x / (sigma * math.sqrt(2)))  # noqa: E731
        probs.append(cdf(hi + 0.5) - cdf(lo - 0.5))
    p = np.array(probs, np.float64)
    p /= p.sum()
    freq = 1 + np.floor(p * (PROB_SCALE - n)).astype(np.int64)  # every symbol decodable
    freq[int(np.argmax(p))] += PROB_SCALE - int(freq.sum())
    return freq, r, k


def _build_tables():
    tabs = [_class_table(c) for c in range(SPREAD_CLASSES)]
    width = max(len(f) for f, _, _ in tabs)
    freq = np.zeros((SPREAD_CLASSES, width), np.uint32)
    cum = np.zeros((SPREAD_CLASSES, width), np.uint32)
    symbol = np.zeros((SPREAD_CLASSES, PROB_SCALE), np.uint8)
    radius = np.zeros(SPREAD_CLASSES, np.int32)
    low_bits = np.zeros(SPREAD_CLASSES, np.int32)
    for c, (f, r, k) in enumerate(tabs):
        freq[c, : len(f)] = f
        cum[c, : len(f)] = np.concatenate(([0], np.cumsum(f)[:-1]))
        symbol[c] = np.repeat(np.arange(len(f)), f)
        radius[c], low_bits[c] = r, k
    return freq, cum, symbol, radius, low_bits


FREQ, CUM, SYMBOL, RADIUS, LOW_BITS = _build_tables()


def tables_digest() -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in (FREQ, RADIUS, LOW_BITS):
        h.update(t.tobytes())
    return h.hexdigest()


def check_tables() -> None:
    if tables_digest() != TABLES_DIGEST:
        raise RuntimeError(
            f"cachegen's rANS tables built here ({tables_digest()}) differ from the pinned ones ({TABLES_DIGEST}):"
            " this platform's floating-point maths would code other bytes"
        )


def layout(rows: int, tokens: int) -> tuple[int, int, int]:
    """(lanes per block W, rows per lane R, blocks) for a part of `rows` rows of `tokens` symbols."""
    width = gcd(rows, LANES)
    per_lane = 1
    while per_lane * 2 * tokens <= SYMBOLS_PER_LANE and (rows // width) % (per_lane * 2) == 0 and per_lane < 1 << 16:
        per_lane *= 2
    return width, per_lane, rows // (width * per_lane)


def classes_of(cols: np.ndarray) -> np.ndarray:
    """Spread class of each row (as kvshelf.codecs.entropy.encode_by_class)."""
    spread = np.sqrt((cols.astype(np.float64) ** 2).mean(axis=1))
    classes = np.clip(np.round(4 * (np.log2(np.maximum(spread, 2.0**-3)) + 3)), 0, SPREAD_CLASSES - 1)
    return classes.astype(np.uint8)


# -- the coder proper (numba: no GIL, so threads decode layers side by side) ----------------------------------
@njit(nogil=True, cache=True)
def _encode(u, cls, width, per_lane, tokens, dim, freq, cum, low_bits):  # pragma: no cover - compiled
    """u: symbols + radius, [heads, tokens, dim] flattened (row = head * dim + channel), as decoded."""
    rows = cls.shape[0]
    blocks = rows // (width * per_lane)
    cap = width * per_lane * tokens * 2  # at most one word per (high or low) symbol
    buf = np.empty(blocks * cap, np.uint16)
    counts = np.zeros(blocks, np.uint32)
    states = np.empty(blocks * width, np.uint32)
    x = np.empty(width, np.uint64)
    lane_cls = np.empty(width, np.int64)
    lane_low = np.empty(width, np.int64)
    lane_row = np.empty(width, np.int64)
    for b in range(blocks):
        end = (b + 1) * cap
        pos = end
        for j in range(width):
            x[j] = STATE_LOW
        base = b * width * per_lane
        for i in range(per_lane - 1, -1, -1):
            any_low = False
            for j in range(width):
                row = base + j + width * i
                lane_cls[j] = cls[row]
                lane_low[j] = low_bits[cls[row]]
                lane_row[j] = (row // dim) * tokens * dim + row % dim
                any_low |= lane_low[j] > 0
            for t in range(tokens - 1, -1, -1):
                # a step decodes every lane's high symbol, then every lane's low bits: coded in reverse
                if any_low:
                    for j in range(width - 1, -1, -1):
                        k = lane_low[j]
                        if k > 0:  # uniform low bits: a power-of-two frequency, no division
                            s = x[j]
                            sh = np.uint64(PROB_BITS - k)
                            if s >= np.uint64(1) << (sh + np.uint64(32 - PROB_BITS)):
                                pos -= 1
                                buf[pos] = s & 0xFFFF
                                s >>= np.uint64(16)
                            low = np.uint64(u[lane_row[j] + t * dim] & ((1 << k) - 1))
                            x[j] = ((s >> sh) << np.uint64(PROB_BITS)) + (s & ((np.uint64(1) << sh) - 1)) + (low << sh)
                for j in range(width - 1, -1, -1):
                    c = lane_cls[j]
                    h = u[lane_row[j] + t * dim] >> lane_low[j]
                    s = x[j]
                    f = freq[c, h]
                    if s >= np.uint64(f) << np.uint64(32 - PROB_BITS):
                        pos -= 1
                        buf[pos] = s & 0xFFFF
                        s >>= np.uint64(16)
                    s32 = np.uint32(s)  # below 2**32 here: a 32-bit division
                    q = s32 // f
                    x[j] = (np.uint64(q) << np.uint64(PROB_BITS)) + np.uint64(s32 - q * f) + np.uint64(cum[c, h])
        counts[b] = end - pos
        for j in range(width):
            states[b * width + j] = x[j]
        # move the block's words to the front of its slot: the caller cuts [b * cap, b * cap + count)
        n = end - pos
        for w in range(n):
            buf[b * cap + w] = buf[pos + w]
    return buf, counts, states, cap


@njit(nogil=True, cache=True)
def _decode(  # the reference decoder (kvshelf.codecs.rans_lanes has a faster copy, tested against it)
    buf, states_at, words_at, word_start, cls, width, per_lane, tokens, dim, symbol, freq, cum, low_bits, radius, out
):  # pragma: no cover - compiled  # noqa: E501
    """Decode a part into out, [heads, tokens, dim] flattened (rows = head * dim + channel). 0 when the stream decoded
    exactly (every word used, every state back to its start), else an error code; never writes outside out."""
    rows = cls.shape[0]
    blocks = rows // (width * per_lane)
    mask = np.uint64(PROB_SCALE - 1)
    x = np.empty(width, np.uint64)
    lane_cls = np.empty(width, np.int64)
    lane_low = np.empty(width, np.int64)
    lane_rad = np.empty(width, np.int64)
    lane_at = np.empty(width, np.int64)
    for b in range(blocks):
        for j in range(width):
            o = states_at + 4 * (b * width + j)
            x[j] = (
                np.uint64(buf[o])
                | (np.uint64(buf[o + 1]) << np.uint64(8))
                | (np.uint64(buf[o + 2]) << np.uint64(16))
                | (np.uint64(buf[o + 3]) << np.uint64(24))
            )
        p = words_at + 2 * word_start[b]
        end = words_at + 2 * word_start[b + 1]
        base = b * width * per_lane
        for i in range(per_lane):
            any_low = False
            for j in range(width):  # per lane: its row's class, low bits, radius and place in out
                row = base + j + width * i
                lane_cls[j] = cls[row]
                lane_low[j] = low_bits[cls[row]]
                lane_rad[j] = radius[cls[row]]
                lane_at[j] = (row // dim) * tokens * dim + row % dim
                any_low |= lane_low[j] > 0
            for t in range(tokens):
                for j in range(width):  # every lane's high symbol...
                    c = lane_cls[j]
                    s = x[j]
                    slot = s & mask
                    h = symbol[c, slot]
                    s = np.uint64(freq[c, h]) * (s >> np.uint64(PROB_BITS)) + slot - np.uint64(cum[c, h])
                    if s < STATE_LOW:
                        if p >= end:
                            return 1
                        s = (s << np.uint64(16)) | np.uint64(buf[p]) | (np.uint64(buf[p + 1]) << np.uint64(8))
                        p += 2
                    x[j] = s
                    out[lane_at[j] + t * dim] = np.int64(h) - lane_rad[j]
                if not any_low:
                    continue
                for j in range(width):  # ...then the low bits of the lanes that have them
                    k = lane_low[j]
                    if k > 0:
                        s = x[j]
                        slot = s & mask
                        sh = np.uint64(PROB_BITS - k)
                        s = ((s >> np.uint64(PROB_BITS)) << sh) + (slot & ((np.uint64(1) << sh) - np.uint64(1)))
                        if s < STATE_LOW:
                            if p >= end:
                                return 1
                            s = (s << np.uint64(16)) | np.uint64(buf[p]) | (np.uint64(buf[p + 1]) << np.uint64(8))
                            p += 2
                        x[j] = s
                        o = lane_at[j] + t * dim
                        out[o] = (((out[o] + lane_rad[j]) << k) | np.int64(slot >> sh)) - lane_rad[j]
        if p != end:
            return 2
        for j in range(width):
            if x[j] != STATE_LOW:
                return 3
    return 0


@njit(nogil=True, cache=True)
def _u32(buf, o):  # pragma: no cover - compiled
    return np.int64(buf[o]) | (np.int64(buf[o + 1]) << 8) | (np.int64(buf[o + 2]) << 16) | (np.int64(buf[o + 3]) << 24)


@njit(nogil=True, cache=True)
def scan_segments(
    buf, starts, lengths, head, heads, tokens, dim, width, per_lane, desc, esc_pos, esc_val
):  # pragma: no cover - compiled  # noqa: E501
    """Check calibrated segments lying in buf at starts/lengths (a 4-byte header equal to `head`, then a K
    and a V part) as Part does, and write the GPU kernel's block descriptors (absolute offsets in buf) into
    desc [segments * 2 * blocks, 10] and the escapes (positions in the output [segments, 2, heads, tokens,
    dim], values) into esc_pos / esc_val. Returns (escapes, 0), or (0, error code)."""
    rows = heads * dim
    blocks = rows // (width * per_lane)
    part_size = rows * tokens
    n_esc_all = 0
    d = 0
    for s in range(starts.shape[0]):
        o = starts[s]
        stop = o + lengths[s]
        if lengths[s] < 4:
            return 0, 1
        for i in range(4):
            if buf[o + i] != head[i]:
                return 0, 2
        off = o + 4
        for kind in range(2):
            if off + rows + 4 + 4 * blocks + 4 * blocks * width > stop:
                return 0, 3
            cls_at = off
            for r in range(rows):
                if buf[off + r] >= SPREAD_CLASSES:
                    return 0, 4
            off += rows
            n_esc = _u32(buf, off)
            if n_esc > part_size:
                return 0, 5
            off += 4
            states_at = off + 4 * blocks
            words_at = states_at + 4 * blocks * width
            out0 = (2 * s + kind) * part_size
            word = 0
            for b in range(blocks):
                count = _u32(buf, off + 4 * b)
                if count > width * per_lane * tokens * 2:
                    return 0, 6
                desc[d, 0] = states_at + 4 * b * width
                desc[d, 1] = words_at + 2 * word
                word += count
                desc[d, 2] = words_at + 2 * word
                desc[d, 3] = cls_at
                desc[d, 4] = b * width * per_lane
                desc[d, 5] = out0
                desc[d, 6] = width
                desc[d, 7] = per_lane
                desc[d, 8] = tokens
                desc[d, 9] = dim
                d += 1
            off = words_at + 2 * word
            if off + 8 * n_esc > stop or n_esc_all + n_esc > esc_pos.shape[0]:
                return 0, 3
            for e in range(n_esc):
                pos = _u32(buf, off + 4 * e)
                if pos >= part_size:  # as an i32, negative positions read as >= 2**31 here
                    return 0, 7
                esc_pos[n_esc_all] = out0 + pos
                v = _u32(buf, off + 4 * n_esc + 4 * e)
                esc_val[n_esc_all] = v - (np.int64(1) << 32) if v >= np.int64(1) << 31 else v
                n_esc_all += 1
            off += 8 * n_esc
        if off != stop:
            return 0, 8
    return n_esc_all, 0


# -- parts: bytes in and out, validated before any decoding -------------------------------------------------------
def encode_part(q: np.ndarray) -> bytes:
    """Integer symbols [heads, tokens, dim] -> one part's bytes."""
    heads, tokens, dim = q.shape
    rows = heads * dim
    cols = q.transpose(0, 2, 1).reshape(rows, tokens)
    classes = classes_of(cols)
    out = np.abs(cols) >= RADIUS[classes][:, None]
    if out.any():
        rr, tt = np.nonzero(out)
        h, d = np.divmod(rr, dim)
        order = np.argsort((h * tokens + tt) * dim + d, kind="stable")
        pos = ((h * tokens + tt) * dim + d)[order].astype(np.int32)
        val = cols[out][order].astype(np.int32)
    else:
        pos = val = np.zeros(0, np.int32)
    r3 = RADIUS[classes].reshape(heads, 1, dim)
    u = (np.clip(q, -r3, r3) + r3).astype(np.int32).reshape(-1)  # in q's own order: lanes read side by side
    width, per_lane, _ = layout(rows, tokens)
    buf, counts, states, cap = _encode(u, classes, width, per_lane, tokens, dim, FREQ, CUM, LOW_BITS)
    words = [buf[b * cap : b * cap + int(n)] for b, n in enumerate(counts)]
    return b"".join(
        [
            classes.tobytes(),
            _ESC.pack(len(pos)),
            counts.astype("<u4").tobytes(),
            states.astype("<u4").tobytes(),
            *(w.astype("<u2").tobytes() for w in words),
            pos.astype("<i4").tobytes(),
            val.astype("<i4").tobytes(),
        ]
    )


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) the coders now rather than on the first chunk: the
    reference coder ~2.4 s on a fresh machine, the codec's whole-segment coder (kvshelf.codecs.cachegen_cpu)
    ~10-20 s more; ~0.5 s to load from the cache. For a server's start-up."""
    from kvshelf.codecs import cachegen_cpu  # whole segments: what the codec calls

    check_tables()
    q = np.zeros((1, 4, 2), np.int32)
    data = np.frombuffer(encode_part(q), np.uint8)
    decode_part(data, Part(data, 0, 1, 4, 2), np.empty_like(q))
    cachegen_cpu.warm_up()


class Part:
    """A validated part inside a segment: offsets of its arrays and what decoding needs."""

    __slots__ = ("classes_at", "classes", "esc_pos", "esc_val", "states_at", "words_at", "word_start", "layout", "end")

    def __init__(self, buf: np.ndarray, off: int, heads: int, tokens: int, dim: int):
        rows = heads * dim
        width, per_lane, blocks = layout(rows, tokens)
        size = len(buf)
        if size < off + rows + _ESC.size + 4 * blocks + 4 * blocks * width:
            raise RansError("cachegen segment is truncated")
        self.classes_at = off
        self.classes = buf[off : off + rows]
        if (self.classes >= SPREAD_CLASSES).any():
            raise RansError("cachegen spread class out of range")
        off += rows
        (n_esc,) = _ESC.unpack_from(buf, off)
        if n_esc > rows * tokens:
            raise RansError("cachegen segment has more escapes than values")
        off += _ESC.size
        counts = buf[off : off + 4 * blocks].view("<u4").astype(np.int64)
        if (counts > width * per_lane * tokens * 2).any():
            raise RansError("cachegen block has more words than its symbols can use")
        self.word_start = np.concatenate(([0], np.cumsum(counts)))
        off += 4 * blocks
        self.states_at = off
        off += 4 * blocks * width
        self.words_at = off
        off += 2 * int(self.word_start[-1])
        self.end = off + 8 * n_esc
        if size < self.end:
            raise RansError("cachegen segment is truncated")
        self.esc_pos = buf[off : off + 4 * n_esc].view("<i4")
        self.esc_val = buf[off + 4 * n_esc : self.end].view("<i4")
        if n_esc and ((self.esc_pos < 0).any() or (self.esc_pos >= rows * tokens).any()):
            raise RansError("cachegen escape index out of range")
        self.layout = (width, per_lane, blocks)


def decode_part(buf: np.ndarray, part: Part, out: np.ndarray) -> None:
    """Decode a validated part into out [heads, tokens, dim] int32 (escapes included)."""
    heads, tokens, dim = out.shape
    if not out.flags.c_contiguous or out.dtype != np.int32:
        raise TypeError("rANS parts decode into a C-contiguous int32 array")
    width, per_lane, _ = part.layout
    err = _decode(
        buf,
        part.states_at,
        part.words_at,
        part.word_start,
        part.classes,
        width,
        per_lane,
        tokens,
        dim,
        SYMBOL,
        FREQ,
        CUM,
        LOW_BITS,
        RADIUS,
        out.reshape(-1),
    )
    if err:
        raise RansError(f"cachegen entropy stream does not decode (code {err})")
    if len(part.esc_pos):
        out.reshape(-1)[part.esc_pos] = part.esc_val
