"""Calibrated cachegen on the CPU with the least Python per byte: whole segments decoded and encoded by
single numba calls that release the GIL, and layers batched into one matmul, so that threads scale.

Decoding a segment here is one compiled call: it checks the segment as kvshelf.codecs.rans.Part does
(header, class bytes, counts, sizes, escape positions), runs the rANS decoder of both parts and writes the
symbols, escapes included, as float32 straight into the batch that the inverse transform multiplies (the
same values as int32 symbols then `.float()`). Encoding a segment is one compiled call too: classes,
escapes, clipping, the rANS coder and the byte layout, the bytes equal to kvshelf.codecs.rans.encode_part's.
The stored format is kvshelf.codecs.rans's, unchanged; the lanes' loops (kvshelf.codecs.rans_lanes) are
faster copies of its reference coder (tests check both against the reference, bytes and symbols).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import njit

from kvshelf.codecs import cachegen_casts, cachegen_encoder, rans
from kvshelf.codecs import calibration as calib
from kvshelf.codecs.cachegen_encoder import _put32
from kvshelf.codecs.rans import CUM, FREQ, LOW_BITS, RADIUS, SPREAD_CLASSES, SYMBOL, _u32
from kvshelf.codecs.rans_lanes import _decode_lanes, _encode_lanes

_ERRORS = {
    1: "cachegen segment is truncated",
    2: "cachegen segment header does not match the codec parameters",
    3: "cachegen spread class out of range",
    4: "cachegen segment has more escapes than values",
    5: "cachegen block has more words than its symbols can use",
    6: "cachegen escape index out of range",
    7: "cachegen segment has trailing bytes",
}


@njit(nogil=True, cache=True)
def _decode_part(buf, off, stop, heads, tokens, dim, width, per_lane, symbol, freq, cum, low_bits, radius, out):
    """Check and decode the part at buf[off:]; returns (end of the part, 0) or (0, error code)."""  # pragma: no cover
    end, err = _part_end(buf, off, stop, heads, tokens, dim, width, per_lane)
    if err:
        return 0, err
    rows = heads * dim
    blocks = rows // (width * per_lane)
    classes = buf[off : off + rows]
    at = off + rows
    n_esc = _u32(buf, at)
    at += 4
    word_start = np.empty(blocks + 1, np.int64)
    word_start[0] = 0
    for b in range(blocks):
        word_start[b + 1] = word_start[b] + _u32(buf, at + 4 * b)
    states_at = at + 4 * blocks
    words_at = states_at + 4 * blocks * width
    esc_at = words_at + 2 * word_start[blocks]
    err = _decode_lanes(buf, states_at, words_at, word_start, classes, width, per_lane, tokens, dim, symbol, freq, cum,
                  low_bits, radius, out)  # fmt: skip
    if err:
        return 0, 10 + err
    for e in range(n_esc):
        pos = _u32(buf, esc_at + 4 * e)
        if pos >= rows * tokens:  # an i32 below 0 reads as >= 2**31 here
            return 0, 6
        v = _u32(buf, esc_at + 4 * n_esc + 4 * e)
        out[pos] = v - (np.int64(1) << 32) if v >= np.int64(1) << 31 else v
    return end, 0


@njit(nogil=True, cache=True)
def _part_end(buf, off, stop, heads, tokens, dim, width, per_lane):  # pragma: no cover - compiled
    """Where the part at buf[off:] ends, checked before anything is decoded (its classes, counts, sizes and
    escape count; not its stream or escape positions): (end, 0), or (0, error code)."""
    rows = heads * dim
    blocks = rows // (width * per_lane)
    if off + rows + 4 + 4 * blocks + 4 * blocks * width > stop:
        return 0, 1
    for r in range(rows):
        if buf[off + r] >= SPREAD_CLASSES:
            return 0, 3
    at = off + rows
    n_esc = _u32(buf, at)
    if n_esc > rows * tokens:
        return 0, 4
    at += 4
    words = 0
    for b in range(blocks):
        count = _u32(buf, at + 4 * b)
        if count > width * per_lane * tokens * 2:
            return 0, 5
        words += count
    end = at + 4 * blocks + 4 * blocks * width + 2 * words + 8 * n_esc
    if end > stop:
        return 0, 1
    return end, 0


@njit(nogil=True, cache=True)
def _decode_halves(buf, ends, h0, h1, head, heads, tokens, dim, width, per_lane, symbol, freq, cum, low_bits, radius,
                   out):  # fmt: skip  # pragma: no cover - compiled
    """Halves h0..h1-1 of calibrated segments lying back to back in buf (segment k ends at ends[k]; half h is
    segment h // 2's K part when h is even, its V part when odd) into out, [(h1 - h0) * heads * tokens * dim]
    float32 or int32: (-1, 0), or (the segment that failed, its error code: see _ERRORS; 11-13: the stream
    does not decode). Every check of a whole segment is made by the half that reads that piece: the header by
    both, the K part's stream by the K half, the trailing bytes by the V half (after K's sizes)."""
    size = heads * tokens * dim
    for h in range(h0, h1):
        k = h // 2
        seg = buf[ends[k - 1] if k else 0 : ends[k]]
        stop = seg.shape[0]
        if stop < 4:
            return k, 1
        for i in range(4):
            if seg[i] != head[i]:
                return k, 2
        off, err = 4, 0
        if h % 2:
            off, err = _part_end(seg, off, stop, heads, tokens, dim, width, per_lane)
            if err:
                return k, err
        off, err = _decode_part(seg, off, stop, heads, tokens, dim, width, per_lane, symbol, freq, cum, low_bits,
                                radius, out[(h - h0) * size : (h - h0 + 1) * size])  # fmt: skip
        if err:
            return k, err
        if h % 2 and off != stop:
            return k, 7
    return -1, 0


def raise_error(err: int) -> None:
    """The RansError of a compiled decoder's error code (0: none)."""
    if err > 10:
        raise rans.RansError(f"cachegen entropy stream does not decode (code {err - 10})")
    if err:
        raise rans.RansError(_ERRORS[err])


def decode_segments_into(segments, heads: int, tokens: int, dim: int, level: int, out: np.ndarray) -> None:
    """Decode calibrated segments' symbols into `out` (C-contiguous [len(segments), 2, heads, tokens, dim],
    float32 or int32) in one compiled call; ValueError (RansError) naming what is wrong when one is not a
    sound segment of that shape."""
    if not out.flags.c_contiguous or out.shape != (len(segments), 2, heads, tokens, dim):
        want = (len(segments), 2, heads, tokens, dim)
        raise ValueError(f"cachegen decodes into a C-contiguous {want} array, not {out.shape}")
    if not segments:
        return
    buf = np.frombuffer(segments[0] if len(segments) == 1 else b"".join(segments), np.uint8)[:]
    buf.flags.writeable = False  # one array type for the compiled decoder, whatever held the bytes
    ends = np.cumsum([memoryview(s).nbytes for s in segments], dtype=np.int64)
    width, per_lane, _ = rans.layout(heads * dim, tokens)
    args = (_head(level), heads, tokens, dim, width, per_lane, SYMBOL, FREQ, CUM, LOW_BITS, RADIUS)
    raise_error(_decode_halves(buf, ends, 0, 2 * len(segments), *args, out.reshape(-1))[1])


def decode_segment_into(data, heads: int, tokens: int, dim: int, level: int, out: np.ndarray) -> None:
    """One segment into `out` [2, heads, tokens, dim] (see decode_segments_into)."""
    if not out.flags.c_contiguous or out.shape != (2, heads, tokens, dim):
        raise ValueError(f"cachegen decodes into a C-contiguous {(2, heads, tokens, dim)} array, not {out.shape}")
    decode_segments_into([data], heads, tokens, dim, level, out[None])


_HEADS: dict[int, np.ndarray] = {}


def _head(level: int) -> np.ndarray:
    if level not in _HEADS:
        from kvshelf.codecs.cachegen import calibrated_head

        _HEADS[level] = np.frombuffer(calibrated_head(level), np.uint8).copy()
    return _HEADS[level]


# -- encoding --------------------------------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def _code_part(q, width, per_lane, freq, cum, low_bits, radius):  # pragma: no cover - compiled
    """A part's classes, escape count and rANS words from symbols q [heads, tokens, dim] int32, and its size."""
    heads, tokens, dim = q.shape
    rows = heads * dim
    flat = q.reshape(-1)
    # classes: the spread (RMS) of each row in float64, as rans.classes_of; sums of squared integers are exact
    # in float64 in any order (below 2**53), so the classes are numpy's
    sq = np.zeros(rows, np.float64)
    for h in range(heads):
        for t in range(tokens):
            base = (h * tokens + t) * dim
            for d in range(dim):
                v = np.float64(flat[base + d])
                sq[h * dim + d] += v * v
    cls = np.empty(rows, np.uint8)
    for r in range(rows):
        spread = math.sqrt(sq[r] / tokens)
        c = np.round(4 * (np.log2(max(spread, 2.0**-3)) + 3))
        cls[r] = np.uint8(min(max(c, 0), SPREAD_CLASSES - 1))
    # symbols shifted by the radius, clipped to it; what lies at or beyond it is an escape (in q's order)
    u = np.empty(flat.shape[0], np.int32)
    n_esc = 0
    for h in range(heads):
        for t in range(tokens):
            base = (h * tokens + t) * dim
            for d in range(dim):
                r = radius[cls[h * dim + d]]
                v = flat[base + d]
                if v >= r or v <= -r:
                    n_esc += 1
                    v = r if v > 0 else -r
                u[base + d] = v + r
    buf, counts, states, cap = _encode_lanes(u, cls, width, per_lane, tokens, dim, freq, cum, low_bits)
    size = rows + 4 + 4 * counts.shape[0] + 4 * states.shape[0] + 2 * np.int64(counts.sum()) + 8 * n_esc
    return cls, n_esc, buf, counts, states, cap, size


@njit(nogil=True, cache=True)
def _write_part(q, coded, radius, out, at):  # pragma: no cover - compiled
    """A part's bytes (rans.encode_part's layout) into out from `at`; returns the end."""
    cls, n_esc, buf, counts, states, cap, _ = coded
    heads, tokens, dim = q.shape
    rows = heads * dim
    flat = q.reshape(-1)
    o = at
    out[o : o + rows] = cls
    o += rows
    o = _put32(out, o, n_esc)
    for b in range(counts.shape[0]):
        o = _put32(out, o, counts[b])
    for j in range(states.shape[0]):
        o = _put32(out, o, states[j])
    for b in range(counts.shape[0]):
        for w in range(counts[b]):
            x = buf[b * cap + w]
            out[o] = x & 0xFF
            out[o + 1] = x >> 8
            o += 2
    e = o
    o += 4 * n_esc
    for h in range(heads):
        for t in range(tokens):
            base = (h * tokens + t) * dim
            for d in range(dim):
                v = flat[base + d]
                r = radius[cls[h * dim + d]]
                if v >= r or v <= -r:
                    _put32(out, e, base + d)
                    _put32(out, o, v)
                    e += 4
                    o += 4
    return o


@njit(nogil=True, cache=True)
def _encode_segment(q, head, width, per_lane, freq, cum, low_bits, radius):  # pragma: no cover - compiled
    """A calibrated segment's bytes from symbols q [2, heads, tokens, dim] int32 (an array of its exact size)."""
    k = _code_part(q[0], width, per_lane, freq, cum, low_bits, radius)
    v = _code_part(q[1], width, per_lane, freq, cum, low_bits, radius)
    out = np.empty(4 + k[6] + v[6], np.uint8)
    out[:4] = head
    _write_part(q[1], v, radius, out, _write_part(q[0], k, radius, out, 4))
    return out


def encode_segment(q: np.ndarray, level: int) -> bytes:
    """A calibrated segment from integer symbols [2, heads, tokens, dim] (the bytes of
    cachegen._code_calibrated, in one compiled call)."""
    q = np.ascontiguousarray(q, np.int32)
    width, per_lane, _ = rans.layout(q.shape[1] * q.shape[3], q.shape[2])
    return _encode_segment(q, _head(level), width, per_lane, FREQ, CUM, LOW_BITS, RADIUS).tobytes()


# -- symbols, transforms and RoPE (kvshelf.codecs.cachegen_threads codes chunks with them; the GPU path's checks) --
def symbols_of(cal: calib.Calibration, level: int, kv: torch.Tensor, layers: list[int], position: int) -> np.ndarray:
    """Consecutive layers' KV [n, 2, heads, tokens, dim] -> their integer symbols (int32), as the codec codes
    them (the coefficients rounded in torch here)."""
    cal.check_fits(tuple(kv.shape[1:]))
    n, two, heads, tokens, dim = kv.shape
    x = kv.to(torch.float32, copy=True).numpy()
    rope_(cal, x, layers, position, -1.0)
    scaled, bias = _batch(cal, "encode", level, 2 * layers[0], 2 * n, heads, tokens, dim)
    coeffs = torch.baddbmm(bias, torch.from_numpy(x.reshape(n * two * heads, tokens, dim)), scaled)
    return coeffs.round_().clamp_(-(2**30), 2**30).to(torch.int32).reshape(kv.shape).numpy()


def _batch(cal: calib.Calibration, kind: str, level: int, first: int, n: int, heads: int, tokens: int, dim: int):
    """The transforms of the model's halves first..first+n-1 (half 2k: layer k's K, 2k + 1 its V) as a batch of
    matrices [n * heads, dim, dim] and their bias expanded over the tokens, cached: a unit of threads makes no
    tensor calls (each would pass the GIL on) for them."""
    key = ("cpu-halves", kind, level, first, n, tokens)
    got = cal._cache.get(key)
    if got is None:
        scaled, bias = (cal.decode_transform if kind == "decode" else cal.encode_transform)(level, "cpu")
        b = n * heads
        scaled = scaled.reshape(-1, dim, dim)[first * heads : first * heads + b]
        bias = bias.reshape(-1, 1, dim)[first * heads : first * heads + b].expand(b, tokens, dim)
        got = cal._cache[key] = (scaled, bias)
    return got


def rope_(cal: calib.Calibration, x: np.ndarray, layers: list[int], position: int, sign: float) -> None:
    """Rotate the keys x[:, 0] (C-contiguous float32 [n, 2, heads, tokens, dim], consecutive layers) in place by
    sign times their positions' angles (_rope)."""
    if not x.flags.c_contiguous:
        raise ValueError("rope_ rotates a C-contiguous array in place")
    n, two, heads, tokens, dim = x.shape
    cos, sin, which = _tables(cal, layers, position, tokens)
    _rope(x.reshape(-1), 0, two * n, heads, tokens, dim, cos, sin, which, np.float32(sign))


def _tables(cal: calib.Calibration, layers: list[int], position: int, tokens: int):
    """RoPE's cos and sin [rows, tokens, dim / 2] for the distinct frequency rows of `layers` at `position`,
    and each layer's row among them."""
    rows, index = _freq_rows(cal)
    used = sorted({index[k] for k in layers})
    cos, sin = _cos_sin(tuple(rows[u] for u in used), position, tokens)
    return cos, sin, np.array([used.index(index[k]) for k in layers], np.int64)


def _freq_rows(cal: calib.Calibration) -> tuple[list[bytes], list[int]]:
    """The calibration's distinct RoPE frequency rows (as bytes) and each layer's row among them."""
    if "cpu-rope-rows" not in cal._cache:
        rows = [r.numpy().tobytes() for r in cal.inv_freq.float()]
        distinct = list(dict.fromkeys(rows))
        cal._cache["cpu-rope-rows"] = (distinct, [distinct.index(r) for r in rows])
    return cal._cache["cpu-rope-rows"]


@functools.lru_cache(maxsize=64)  # chunks sit at multiples of their size: few positions recur
def _cos_sin(rows: tuple[bytes, ...], position: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [len(rows), tokens, dim / 2] (float32) of the angles of frequency rows at positions
    position..., computed as rotate_keys does; cached, so that threads do not copy tables holding the GIL."""
    inv = torch.stack([torch.frombuffer(bytearray(r), dtype=torch.float32) for r in rows]).double()
    pos = torch.arange(position, position + tokens, dtype=torch.float64)
    angles = (pos[:, None] * inv[:, None, :]).float()
    return angles.cos().numpy(), angles.sin().numpy()


@njit(nogil=True, cache=True)
def _rope(x, h0, h1, heads, tokens, dim, cos, sin, which, sign):  # pragma: no cover - compiled
    """Rotate the K halves among halves h0..h1-1 of x (float32, flat: [(h1 - h0), heads, tokens, dim]; half h
    takes the tables cos[which[h // 2]], sin[which[h // 2]]) in place by sign times their positions' angles:
    kvshelf.kvmath.rope.rotate_keys's arithmetic (angles in float64, then float32 cos/sin, x * cos +
    rotate_half(x) * sin)."""
    half = dim // 2
    xs = x[: (h1 - h0) * heads * tokens * dim].reshape(h1 - h0, heads, tokens, dim)
    for h in range(h0 + h0 % 2, h1, 2):
        c, s = cos[which[h // 2]], sin[which[h // 2]]
        for g in range(heads):
            for t in range(tokens):
                row = xs[h - h0, g, t]
                for i in range(half):
                    x1, x2 = row[i], row[i + half]
                    si = s[t, i] * sign
                    row[i] = x1 * c[t, i] + (-x2) * si
                    row[i + half] = x2 * c[t, i] + x1 * si


def warm_up() -> None:
    """Compile (or load from numba's cache) what the codec calls: the whole-segment coder (float32 symbols), the
    unit encoder (kvshelf.codecs.cachegen_encoder), the unit decoder's last step (kvshelf.codecs.cachegen_casts)
    and the RoPE kernel (rans.warm_up calls it). On a fresh machine ~10-20 s, from numba's cache well under 1 s."""
    q = np.zeros((2, 1, 4, 2), np.int32)
    decode_segment_into(encode_segment(q, 5), 1, 4, 2, 5, np.empty(q.shape, np.float32))
    cachegen_encoder.warm_up()
    cachegen_casts.warm_up()
    cos, sin, which = np.ones((1, 4, 1), np.float32), np.zeros((1, 4, 1), np.float32), np.zeros(1, np.int64)
    _rope(np.zeros(2 * 4 * 2, np.float32), 0, 2, 1, 4, 2, cos, sin, which, np.float32(1.0))
