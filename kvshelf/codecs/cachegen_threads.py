"""Calibrated cachegen's chunks on the codec's threads: a chunk's layers cut into balanced work units, each unit
one compiled call that never takes the GIL.

Why: with Python between compiled calls, threads queue for the GIL. Measured on a 16-core host: with ~10 GIL
hand-offs per unit the units spent 42% of their time waiting at 16 threads (BENCHMARKS.md, issue #17, fourth
session); with four (symbols, matmul, RoPE, cast) still ~40%. Now one.

A unit is a range of consecutive *halves*: half 2k is layer k's K part, 2k + 1 its V part (the inverse
transform is one matrix per (layer, K|V, head), so halves batch like layers). Decoding a unit is one numba call
(`_decode_fused`): check and decode its parts' symbols into the thread's own float32 buffer
(cachegen_cpu._decode_halves), the inverse transforms by MKL's sgemm_batch from torch's own library
(kvshelf.codecs.native: bias first, then beta = 1, torch.baddbmm's results bit for bit), RoPE back on K halves in
place, and the cast straight into the unit's slice of the chunk's output tensor (fp16 by F16C, bf16 by torch's
bit arithmetic, float32 copied). Encoding mirrors it (`_encode_fused`): the cast to float32, RoPE off K, the
forward matmul, rounding and coding each half into its part's bytes; the caller joins each segment (header, K
part, V part). The bytes and the float arithmetic are kvshelf.codecs.cachegen_cpu's: the same segments, the
same KV bit for bit.

Where that matmul is slower than torch's (measured once per process, native.fast_blas: on the H200 host's Xeon
torch's baddbmm took 1.55x less CPU) or absent (no MKL in torch), a unit is four calls instead: symbols,
torch.baddbmm, RoPE, torch's cast (one numba call each, GIL taken between them). The RoPE tables are built once
per chunk, not per unit.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from numba import njit

from kvshelf.codecs import cachegen_cpu as cc
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import native, rans
from kvshelf.codecs.pool import CodecProcesses
from kvshelf.codecs.rans import CUM, FREQ, LOW_BITS, RADIUS, SYMBOL

# Halves a unit holds at most: 6 (3 layers of 256 tokens x 256 dims: 1.5 MB of float32 per buffer) stay in a
# core's L2 between the four calls; measured, runs of 18 layers decoded ~10% slower than runs of 3.
MOST_HALVES = 6


def units(layers: list[int], workers: int, most: int = MOST_HALVES) -> list[tuple[int, int]]:
    """Half ranges [a, b) over the 2 * len(layers) halves of `layers` (list positions), one per unit: units
    as small as giving each of `workers` threads one allows (ceil(halves / workers), at most `most`: then
    the threads finish together), as few as that size needs, sizes differing by one at most; never across a
    gap in the layer numbers (a unit's transforms are one slice). 18 layers on 16 threads: 12 units of 3."""
    n = 2 * len(layers)
    if n == 0:
        return []
    size = min(most, max(1, math.ceil(n / max(workers, 1))))
    pieces = math.ceil(n / size)
    cuts = {n * k // pieces for k in range(pieces + 1)}
    cuts |= {2 * k for k in range(1, len(layers)) if layers[k] != layers[k - 1] + 1}
    cuts = sorted(cuts)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


# -- decoding ------------------------------------------------------------------------------------------------
def decode_layers(cal: calib.Calibration, level: int, segments, shape: tuple, dtype, layers: list[int],
                  position: int, processes: CodecProcesses) -> torch.Tensor:  # fmt: skip
    """Calibrated segments of `layers` -> their KV, one tensor [len(layers), *shape] of `dtype`, decoded in
    units on `processes`' threads (inline without workers). RansError names what is wrong in a segment."""
    two, heads, tokens, dim = shape
    out = torch.empty((len(layers), two, heads, tokens, dim), dtype=dtype)
    if not layers:
        return out
    rows = out.view(-1, tokens, dim)  # [halves * heads, tokens, dim]: a unit's slice is its matmul's shape
    buf = np.frombuffer(segments[0] if len(segments) == 1 else b"".join(segments), np.uint8)[:]
    buf.flags.writeable = False  # one array type for the compiled decoder, whatever held the bytes
    ends = np.cumsum([memoryview(s).nbytes for s in segments], dtype=np.int64)
    cos, sin, which = cc._tables(cal, layers, position, tokens)
    width, per_lane, _ = rans.layout(heads * dim, tokens)
    fused = _fused(cal, "decode", level, dtype, out, processes.workers)
    job = (cal, level, layers, buf, ends, (cc._head(level), heads, tokens, dim, width, per_lane), cos, sin, which,
           fused)  # fmt: skip
    cuts = units(layers, processes.workers)
    processes.map_threads(_decode_unit, [(job, a, b, rows[a * heads : b * heads]) for a, b in cuts])
    return out


def _decode_unit(job, h0: int, h1: int, out: torch.Tensor) -> None:
    """Halves h0..h1-1 into `out`: one compiled call (`_decode_fused`), or four where torch has no sgemm of
    its own, nothing allocated."""
    cal, level, layers, buf, ends, (head, heads, tokens, dim, width, per_lane), cos, sin, which, fused = job
    q, q_t, x, x_t, params = _scratch(h1 - h0, heads, tokens, dim)
    if fused is not None:
        fn, threads, mats, bias, kind, out16, out32 = fused
        m0 = (2 * layers[h0 // 2] + h0 % 2) * heads
        _, err = _decode_fused(buf, ends, h0, h1, head, heads, tokens, dim, width, per_lane, SYMBOL, FREQ, CUM,
                               LOW_BITS, RADIUS, fn, threads, params, mats, bias, m0, cos, sin, which, q, x, kind,
                               out16, out32)  # fmt: skip
        cc.raise_error(err)
        if kind == native.OTHER:
            out.copy_(x_t)
        return
    _, err = cc._decode_halves(buf, ends, h0, h1, head, heads, tokens, dim, width, per_lane, SYMBOL, FREQ, CUM,
                               LOW_BITS, RADIUS, q)  # fmt: skip
    cc.raise_error(err)
    scaled, bias = cc._batch(cal, "decode", level, 2 * layers[h0 // 2] + h0 % 2, h1 - h0, heads, tokens, dim)
    torch.baddbmm(bias, q_t, scaled, out=x_t)
    cc._rope(x, h0, h1, heads, tokens, dim, cos, sin, which, np.float32(1.0))
    out.copy_(x_t)


@njit(nogil=True, cache=True)
def _decode_fused(buf, ends, h0, h1, head, heads, tokens, dim, width, per_lane, symbol, freq, cum, low_bits, radius,
                  fn, threads, params, mats, bias, m0, cos, sin, which, q, x, kind, out16, out32):  # fmt: skip  # pragma: no cover
    """A decoding unit in one call: symbols (cachegen_cpu._decode_halves) into q, x = bias + q @ the inverse
    transforms (matrices m0... of mats, by the sgemm at fn), RoPE on K halves, x cast into out16 / out32 at the
    unit's place (kind: native.F32 / F16 / BF16; OTHER: left in x). (-1, 0), or the failed segment and its
    error code (cachegen_cpu._ERRORS)."""
    k, err = cc._decode_halves(buf, ends, h0, h1, head, heads, tokens, dim, width, per_lane, symbol, freq, cum,
                               low_bits, radius, q)  # fmt: skip
    if err:
        return k, err
    count = (h1 - h0) * heads
    native.affine(fn, threads, params, q, 0, mats, m0 * dim * dim, bias, m0 * dim, x, 0, count, tokens, dim)
    cc._rope(x, h0, h1, heads, tokens, dim, cos, sin, which, np.float32(1.0))
    native.cast_out(x, 0, count * tokens * dim, kind, out16, out32, h0 * heads * tokens * dim)
    return -1, 0


# -- encoding ------------------------------------------------------------------------------------------------
def encode_layers(cal: calib.Calibration, level: int, kv: torch.Tensor, layers: list[int], position: int,
                  processes: CodecProcesses) -> list[bytes]:  # fmt: skip
    """KV [len(layers), 2, heads, tokens, dim] of `layers` -> their calibrated segments, coded in units on
    `processes`' threads (inline without workers)."""
    cal.check_fits(tuple(kv.shape[1:]))
    n, two, heads, tokens, dim = kv.shape
    if not n:
        return []
    rows = kv.reshape(-1, tokens, dim)  # [halves * heads, tokens, dim] (a copy only where kv is not contiguous)
    cos, sin, which = cc._tables(cal, layers, position, tokens)
    width, per_lane, _ = rans.layout(heads * dim, tokens)
    plain = rows.device.type == "cpu" and rows.is_contiguous() and not rows.requires_grad
    fused = _fused(cal, "encode", level, rows.dtype, rows if plain else None, processes.workers)
    job = (cal, level, layers, (heads, tokens, dim, width, per_lane), cos, sin, which, fused)
    cuts = units(layers, processes.workers)
    coded = processes.map_threads(_encode_unit, [(job, a, b, rows[a * heads : b * heads]) for a, b in cuts])
    head = cc._head(level).tobytes()
    parts = [memoryview(out)[a:b] for out, ends in coded for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    return [b"".join((head, parts[2 * k], parts[2 * k + 1])) for k in range(n)]


def _encode_unit(job, h0: int, h1: int, kv: torch.Tensor):
    """Halves h0..h1-1 of KV: one compiled call (`_encode_fused`; with torch's cast first where the compiled
    casts lack the dtype), or four where torch has no sgemm of its own: (the halves' part bytes back to back,
    where each ends)."""
    cal, level, layers, (heads, tokens, dim, width, per_lane), cos, sin, which, fused = job
    q, q_t, x, x_t, params = _scratch(h1 - h0, heads, tokens, dim)
    if fused is not None:
        fn, threads, mats, bias, kind, in16, in32 = fused
        if kind == native.OTHER:
            q_t.copy_(kv)
        m0 = (2 * layers[h0 // 2] + h0 % 2) * heads
        return _encode_fused(kind, in16, in32, h0, h1, heads, tokens, dim, cos, sin, which, fn, threads, params, mats,
                             bias, m0, q, x, width, per_lane, FREQ, CUM, LOW_BITS, RADIUS)  # fmt: skip
    q_t.copy_(kv)
    cc._rope(q, h0, h1, heads, tokens, dim, cos, sin, which, np.float32(-1.0))
    scaled, bias = cc._batch(cal, "encode", level, 2 * layers[h0 // 2] + h0 % 2, h1 - h0, heads, tokens, dim)
    torch.baddbmm(bias, q_t, scaled, out=x_t)
    return cc._encode_halves(x[: (h1 - h0) * heads * tokens * dim].reshape(h1 - h0, heads, tokens, dim), width,
                             per_lane, FREQ, CUM, LOW_BITS, RADIUS)  # fmt: skip


@njit(nogil=True, cache=True)
def _encode_fused(kind, in16, in32, h0, h1, heads, tokens, dim, cos, sin, which, fn, threads, params, mats, bias, m0, q, x,
                  width, per_lane, freq, cum, low_bits, radius):  # fmt: skip  # pragma: no cover - compiled
    """An encoding unit in one call: the unit's KV (in16 / in32 at its place, kind: native.F32 / F16 / BF16;
    OTHER: already in q) into q as float32, RoPE off K halves, x = bias + q @ the forward transforms (matrices
    m0... of mats, by the sgemm at fn), then rounding and coding (cachegen_cpu._encode_halves)."""
    count = (h1 - h0) * heads
    n = count * tokens * dim
    native.cast_in(kind, in16, in32, h0 * heads * tokens * dim, n, q)
    cc._rope(q, h0, h1, heads, tokens, dim, cos, sin, which, np.float32(-1.0))
    native.affine(fn, threads, params, q, 0, mats, m0 * dim * dim, bias, m0 * dim, x, 0, count, tokens, dim)
    return cc._encode_halves(x[:n].reshape(h1 - h0, heads, tokens, dim), width, per_lane, freq, cum, low_bits,
                             radius)  # fmt: skip


def _fused(cal: calib.Calibration, kind: str, level: int, dtype, tensor: torch.Tensor | None, workers: int):
    """What a fused unit needs besides its own (the BLAS addresses, MKL's thread count: one on the codec's
    threads, torch's inline, as torch's own matmul would take; the transforms and biases of every half as flat
    float32 arrays, the KV's kind and flat views), or None where the unit takes torch's matmul instead (no
    such sgemm; or KV that is not a plain CPU tensor)."""
    fn = native.fast_blas()
    if fn is None or tensor is None:
        return None
    key = ("cpu-fused", kind, level)
    if key not in cal._cache:
        scaled, bias = (cal.decode_transform if kind == "decode" else cal.encode_transform)(level, "cpu")
        cal._cache[key] = (
            scaled.float().contiguous().numpy().reshape(-1),
            bias.float().contiguous().numpy().reshape(-1),
        )
    mats, bias = cal._cache[key]
    threads = 1 if workers else torch.get_num_threads()
    return (fn, threads, mats, bias, native.kind_of(dtype), *native.flat_views(tensor))


# -- per-thread buffers -----------------------------------------------------------------------------------------
_local = threading.local()


def _scratch(halves: int, heads: int, tokens: int, dim: int):
    """This thread's two float32 buffers for a unit (q: symbols / input, x: the matmul's output), as numpy
    arrays (flat) and as the matmul's [halves * heads, tokens, dim] tensors, and the sgemm's argument scratch
    (native.affine); reused, so that a unit allocates
    nothing (fresh memory costs page faults, and the kernel serialises those of one process's threads). They
    live as long as the thread: 2 x 6 halves' values (Gemma 3 270M: 3 MB; a Llama-3-8B layout: 12.6 MB)."""
    n = halves * heads * tokens * dim
    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].shape[0] < n:
        size = max(n, MOST_HALVES * heads * tokens * dim)
        bufs = _local.bufs = (np.empty(size, np.float32), np.empty(size, np.float32), {})
    q, x, views = bufs
    key = (halves, heads, tokens, dim)
    if key not in views:
        shape = (halves * heads, tokens, dim)
        with torch.inference_mode(False):  # normal tensors: made under inference mode, later writes outside it fail
            views[key] = (q, torch.from_numpy(q[:n]).view(shape), x, torch.from_numpy(x[:n]).view(shape),
                          np.zeros(8 + 3 * halves * heads, np.int64))  # fmt: skip
    return views[key]


def warm_up() -> None:
    """Compile (or load from numba's cache) the fused units, with the argument types the codec passes them
    (rans.warm_up calls it; cachegen_cpu.warm_up compiles what they call)."""
    fn = native.fast_blas()  # compiles native.affine, checks it against torch.baddbmm and times both
    if fn is None:
        return
    heads, tokens, dim = 1, 4, 2
    q = np.zeros((2, heads, tokens, dim), np.int32)
    buf = np.frombuffer(cc.encode_segment(q, 5), np.uint8)[:]
    buf.flags.writeable = False
    ends = np.array([buf.shape[0]], np.int64)
    width, per_lane, _ = rans.layout(heads * dim, tokens)
    cos, sin, which = (
        np.ones((1, tokens, dim // 2), np.float32),
        np.zeros((1, tokens, dim // 2), np.float32),
        np.zeros(1, np.int64),
    )  # noqa: E501
    mats, bias = np.zeros(2 * heads * dim * dim, np.float32), np.zeros(2 * heads * dim, np.float32)
    n = 2 * heads * tokens * dim
    values, x, params = np.empty(n, np.float32), np.empty(n, np.float32), np.zeros(8 + 3 * 2 * heads, np.int64)
    kv16, none32 = np.zeros(n, np.uint16), np.empty(0, np.float32)
    _decode_fused(buf, ends, 0, 2, cc._head(5), heads, tokens, dim, width, per_lane, SYMBOL, FREQ, CUM, LOW_BITS,
                  RADIUS, fn, 1, params, mats, bias, 0, cos, sin, which, values, x, native.F16, kv16, none32)  # fmt: skip
    _encode_fused(native.F16, kv16, none32, 0, 2, heads, tokens, dim, cos, sin, which, fn, 1, params, mats, bias, 0,
                  values, x, width, per_lane, FREQ, CUM, LOW_BITS, RADIUS)  # fmt: skip
