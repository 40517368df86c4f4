"""cachegen's uncalibrated segments (no calibration: e.g. inside vLLM, which runs the model itself): one
self-contained segment per layer, coded and decoded here; kvshelf.codecs.cachegen describes the layout and
picks each layer's bits.

Uniform quantisation with a step tied to the RMS (one step per (head, channel) for K, per (head, token) for V),
values beyond the range kept exactly as escapes, optional token deltas (`delta`, anchors every `group`
tokens), the symbols entropy-coded (constriction's ANS) against a histogram stored in the segment.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvshelf.codecs.entropy import decode_symbols, encode_symbols

_HEAD = struct.Struct("<2sBBBBHHII")
_ESC = struct.Struct("<II")  # escape counts for K and V
_DELTA = 1


def encode(kv: torch.Tensor, bits_k: int, bits_v: int, delta: bool, group: int) -> bytes:
    """A layer's KV [2, heads, tokens, dim] -> its segment."""
    qk, sk, ik, ek = quantize(kv[0], dim=1, bits=bits_k)  # step per (head, channel)
    qv, sv, iv, ev = quantize(kv[1], dim=2, bits=bits_v)  # step per (head, token)
    sym_k, alpha_k = _to_symbols(qk, 1 << (bits_k + 1), delta, group)
    sym_v, alpha_v = _to_symbols(qv, 1 << (bits_v + 1), delta, group)
    ck, wk = encode_symbols(sym_k, alpha_k)
    cv, wv = encode_symbols(sym_v, alpha_v)
    head = _HEAD.pack(b"CG", bits_k, bits_v, _DELTA if delta else 0, 0, alpha_k, alpha_v, len(wk), len(wv))
    escapes = _ESC.pack(len(ik), len(iv))
    arrays = [sk, sv, ck, cv, wk, wv, ik, iv, ek, ev]
    return b"".join([head, escapes, *(a.tobytes() for a in arrays)])


def quantize(x: torch.Tensor, dim: int, bits: int):
    """Uniform quantisation with a step tied to the RMS along `dim` (not the absmax, so a few outliers
    do not coarsen everything else): step = rms / 2**(bits - 3), symbols within +-2**(bits + 1).
    Values beyond that range (attention-sink tokens, outlier channels) are kept exactly, as escapes."""
    xf = x.float()
    levels = 1 << (bits + 1)
    rms = xf.pow(2).mean(dim=dim, keepdim=True).sqrt()
    step = (rms / (1 << (bits - 3)) if bits >= 3 else rms * (1 << (3 - bits))).to(torch.float16).float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round(xf / step)
    escape = q.abs() > levels
    q = torch.where(escape, torch.zeros_like(q), q).to(torch.int32)
    idx = escape.reshape(-1).nonzero().view(-1).to(torch.int32)
    vals = x.reshape(-1)[idx.long()].to(torch.float16)
    return q.numpy(), step.to(torch.float16).numpy(), idx.numpy(), vals.numpy()


def _to_symbols(q: np.ndarray, levels: int, delta: bool, group: int) -> tuple[np.ndarray, int]:
    """[heads, tokens, dim] ints -> flat non-negative symbols (after optional token deltas), alphabet size."""
    if delta:
        t = q.shape[1]
        anchors = np.repeat(q[:, ::group], group, axis=1)[:, :t]
        d = q - anchors
        d[:, ::group] = q[:, ::group]  # anchors themselves are coded as they are
        return (d + 2 * levels).reshape(-1), 4 * levels + 1
    return (q + levels).reshape(-1), 2 * levels + 1


def _alphabet(levels: int, delta: bool) -> int:
    return 4 * levels + 1 if delta else 2 * levels + 1


def _from_symbols(sym: np.ndarray, levels: int, shape, delta: bool, group: int) -> np.ndarray:
    if delta:
        d = sym.astype(np.int32).reshape(shape) - 2 * levels
        t = shape[1]
        anchors = np.repeat(d[:, ::group], group, axis=1)[:, :t]
        q = d + anchors
        q[:, ::group] = d[:, ::group]
        return q
    return sym.astype(np.int32).reshape(shape) - levels


def decode_parts(data, shape, bits: tuple[int, int], delta: bool, group: int):
    """A segment of a layer coded with `bits` (K, V) -> (K symbols, V symbols, K steps, V steps, escapes:
    (K positions, V positions, K values, V values)); ValueError naming what is wrong with it."""
    _, heads, tokens, dim = shape
    buf = memoryview(data)
    magic, bits_k, bits_v, flags, _, alpha_k, alpha_v, nk, nv = _HEAD.unpack_from(buf)
    if magic != b"CG" or (bits_k, bits_v) != tuple(bits) or flags != (_DELTA if delta else 0):
        raise ValueError("cachegen segment header does not match the codec parameters")
    n_ek, n_ev = _ESC.unpack_from(buf, _HEAD.size)
    lk, lv = 1 << (bits_k + 1), 1 << (bits_v + 1)
    if (alpha_k, alpha_v) != (_alphabet(lk, delta), _alphabet(lv, delta)):
        raise ValueError("cachegen alphabet sizes do not match the codec parameters")
    n = heads * tokens * dim
    if max(n_ek, n_ev) > n:
        raise ValueError("cachegen segment has more escapes than values")
    sizes = [
        heads * dim * 2,
        heads * tokens * 2,
        alpha_k * 4,
        alpha_v * 4,
        nk * 4,
        nv * 4,
        n_ek * 4,
        n_ev * 4,
        n_ek * 2,
        n_ev * 2,
    ]
    start = _HEAD.size + _ESC.size
    if len(buf) != start + sum(sizes):
        raise ValueError(f"cachegen segment has {len(buf)} bytes, expected {start + sum(sizes)}")
    parts, off = [], start
    for size in sizes:
        parts.append(buf[off : off + size])
        off += size
    sk = np.frombuffer(parts[0], np.float16).reshape(heads, 1, dim)
    sv = np.frombuffer(parts[1], np.float16).reshape(heads, tokens, 1)
    ck, cv = np.frombuffer(parts[2], np.uint32), np.frombuffer(parts[3], np.uint32)
    if not ck.any() or not cv.any():
        raise ValueError("cachegen symbol histogram is empty")
    escapes = (
        np.frombuffer(parts[6], np.int32),
        np.frombuffer(parts[7], np.int32),
        np.frombuffer(parts[8], np.float16),
        np.frombuffer(parts[9], np.float16),
    )
    if any((e >= n).any() or (e < 0).any() for e in escapes[:2]):
        raise ValueError("cachegen escape index out of range")
    shape3 = (heads, tokens, dim)
    qk = _from_symbols(decode_symbols(np.frombuffer(parts[4], np.uint32), ck, n), lk, shape3, delta, group)
    qv = _from_symbols(decode_symbols(np.frombuffer(parts[5], np.uint32), cv, n), lv, shape3, delta, group)
    return qk, qv, sk, sv, escapes


def dequantize(parts, shape) -> np.ndarray:
    """decode_parts' result -> the layer's values, float32 [2, heads, tokens, dim]."""
    qk, qv, sk, sv, (ik, iv, ek, ev) = parts
    k = (qk * sk.astype(np.float32)).reshape(-1)
    v = (qv * sv.astype(np.float32)).reshape(-1)
    k[ik] = ek
    v[iv] = ev
    return np.stack((k, v)).reshape(shape).astype(np.float32)
