"""Calibrated cachegen's chunks on the codec's threads: a chunk's layers cut into balanced work units, each unit
three calls that release the GIL and almost no Python between them.

Why: with Python between compiled calls, threads queue for the GIL. Measured on a 16-core host (the
previous code: runs of >= 3 layers, each ~10 GIL hand-offs, tables rebuilt per run): at 16 threads the units
spent 42% of their time waiting (units' CPU / wall 0.58, 8x the voluntary context switches of 8 threads),
and decoding fell from 1.38 GB/s at 12 threads to 0.95 at 16 (BENCHMARKS.md, issue #17, fourth session).

A unit is a range of consecutive *halves*: half 2k is layer k's K part, 2k + 1 its V part (the inverse
transform is one matrix per (layer, K|V, head), so halves batch like layers). Decoding a unit: one compiled
call checks and decodes its parts' symbols into the thread's own float32 buffer, one `torch.baddbmm` (out=
the thread's other buffer) applies the inverse transforms, and one compiled call puts RoPE back on K halves
and casts the unit straight into its slice of the chunk's output (kvshelf.codecs.cachegen_casts.finish: as
fast as torch's vector cast, and one GIL round trip less than RoPE and `copy_` apart). Encoding mirrors it:
one compiled call casts to float32 and takes RoPE off K (cachegen_casts.start), one matmul, one compiled call
rounds and codes each half into its part's bytes (kvshelf.codecs.cachegen_encoder, in buffers the thread
keeps); the caller joins each segment (header, K part, V part). The bytes and the float arithmetic are
kvshelf.codecs.cachegen_cpu's: the same segments, the same KV bit for bit. The RoPE tables are built once
per chunk, not per unit. Another output dtype, or a strided input, takes torch's casts instead.
"""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import torch

from kvshelf.codecs import cachegen_casts as cf
from kvshelf.codecs import cachegen_cpu as cc
from kvshelf.codecs import cachegen_encoder as ce
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import rans
from kvshelf.codecs.base import BackToBack
from kvshelf.codecs.pool import CodecProcesses
from kvshelf.codecs.rans import CUM, FREQ, LOW_BITS, RADIUS, SYMBOL

# Halves a unit holds at most: 6 (3 layers of 256 tokens x 256 dims: 1.5 MB of float32 per buffer) stay in a
# core's L2 between the four calls; measured, runs of 18 layers decoded ~10% slower than runs of 3.
MOST_HALVES = 6


def units(layers: list[int], workers: int, most: int = MOST_HALVES, spread: bool = False) -> list[tuple[int, int]]:
    """Half ranges [a, b) over the 2 * len(layers) halves of `layers` (list positions), one per unit: units
    as small as giving each of `workers` threads one allows (ceil(halves / workers), at most `most`: then
    the threads finish together), as few as that size needs (`spread`: one for each thread where there are
    enough halves), sizes differing by one at most, the larger ones first; never across a gap in the layer
    numbers (a unit's transforms are one slice). 18 layers on 16 threads: 12 units of 3 halves; spread: 4
    units of 3, then 12 of 2, so that the threads that start last (codec threads as they wake) get less work
    and finish about with the first. The codec cuts for the threads free when a chunk starts
    (CodecProcesses.free_threads), spread on an idle pool: one caller gets 16-way units, each of 16 busy
    callers 6 units of 6 halves (half the GIL hand-offs)."""
    n = 2 * len(layers)
    if n == 0:
        return []
    size = min(most, max(1, math.ceil(n / max(workers, 1))))
    pieces = math.ceil(n / size)
    if spread:
        pieces = max(pieces, min(workers, n))
    small, larger = divmod(n, pieces)
    cuts = {0} | set(itertools.accumulate([small + 1] * larger + [small] * (pieces - larger)))
    cuts |= {2 * k for k in range(1, len(layers)) if layers[k] != layers[k - 1] + 1}
    cuts = sorted(cuts)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _cuts(layers: list[int], processes: CodecProcesses) -> list[tuple[int, int]]:
    """A chunk's units for the threads free now; spread over all of them when the pool is idle (one caller)."""
    free = processes.free_threads()
    return units(layers, free, spread=free == processes.workers)


# -- decoding ------------------------------------------------------------------------------------------------
def decode_layers(cal: calib.Calibration, level: int, segments, shape: tuple, dtype, layers: list[int],
                  position: int, processes: CodecProcesses) -> torch.Tensor:  # fmt: skip
    """Calibrated segments of `layers` -> their KV, one tensor [len(layers), *shape] of `dtype`, decoded in
    units on `processes`' threads (inline without workers). RansError names what is wrong in a segment."""
    two, heads, tokens, dim = shape
    # a normal tensor (codec threads, outside inference mode, write into it), in recycled memory where kept
    out = processes.outputs.empty((len(layers), two, heads, tokens, dim), dtype)
    if not layers:
        return out
    if isinstance(segments, BackToBack):  # a stored chunk's layers: no copy
        buf, ends = np.frombuffer(segments.joined, np.uint8)[:], np.array(segments.ends, np.int64)
    else:
        buf = np.frombuffer(segments[0] if len(segments) == 1 else b"".join(segments), np.uint8)[:]
        ends = np.cumsum([memoryview(s).nbytes for s in segments], dtype=np.int64)
    buf.flags.writeable = False  # one array type for the compiled decoder, whatever held the bytes
    cos, sin, which = cc._tables(cal, layers, position, tokens)
    width, per_lane, _ = rans.layout(heads * dim, tokens)
    job = (cal, level, layers, buf, ends, (cc._head(level), heads, tokens, dim, width, per_lane), cos, sin, which)
    cuts = _cuts(layers, processes)  # all threads busy (many callers): fewer, larger units
    half = heads * tokens * dim  # values of a half
    if dtype in cf.KINDS:  # the unit's last step writes the output's bits (RoPE and the cast in one call)
        bits, kind = cf.bits_view(out), cf.KINDS[dtype]
        calls = [(job, a, b, bits[a * half : b * half], kind) for a, b in cuts]
    else:  # another dtype: torch casts
        rows = out.view(-1, tokens, dim)  # [halves * heads, tokens, dim]
        calls = [(job, a, b, rows[a * heads : b * heads], -1) for a, b in cuts]
    processes.map_threads(_decode_unit, calls)
    return out


def _decode_unit(job, h0: int, h1: int, out, kind: int) -> None:
    """Halves h0..h1-1: symbols (compiled), the inverse transforms (one matmul), RoPE on K and the cast into
    `out` (compiled; `kind` from cachegen_casts.KINDS, `out` the unit's bits): three calls that release the
    GIL, nothing allocated. kind -1: `out` a tensor of another dtype, RoPE compiled and torch's cast."""
    cal, level, layers, buf, ends, (head, heads, tokens, dim, width, per_lane), cos, sin, which = job
    q, q_t, x, x_t, _, xb = _scratch(h1 - h0, heads, tokens, dim)
    _, err = cc._decode_halves(buf, ends, h0, h1, head, heads, tokens, dim, width, per_lane, SYMBOL, FREQ, CUM,
                               LOW_BITS, RADIUS, q)  # fmt: skip
    cc.raise_error(err)
    scaled, bias = cc._batch(cal, "decode", level, 2 * layers[h0 // 2] + h0 % 2, h1 - h0, heads, tokens, dim)
    torch.baddbmm(bias, q_t, scaled, out=x_t)
    if kind >= 0:
        cf.finish(x, xb, h0, h1, heads, tokens, dim, cos, sin, which, out, kind)
    else:
        cc._rope(x, h0, h1, heads, tokens, dim, cos, sin, which, np.float32(1.0))
        out.copy_(x_t)


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
    job = (cal, level, layers, (heads, tokens, dim, width, per_lane), cos, sin, which)
    cuts = _cuts(layers, processes)
    half = heads * tokens * dim  # values of a half
    if kv.dtype in cf.KINDS and rows.is_contiguous():  # the unit's first step reads the KV's bits (cast and RoPE)
        bits, kind = cf.bits_view(rows), cf.KINDS[kv.dtype]
        calls = [(job, a, b, bits[a * half : b * half], kind) for a, b in cuts]
    else:  # another dtype or a strided view: torch casts
        calls = [(job, a, b, rows[a * heads : b * heads], -1) for a, b in cuts]
    coded = processes.map_threads(_encode_unit, calls)
    head = cc._head(level).tobytes()
    parts = [memoryview(out)[a:b] for out, ends in coded for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    return [b"".join((head, parts[2 * k], parts[2 * k + 1])) for k in range(n)]


def _encode_unit(job, h0: int, h1: int, kv, kind: int):
    """Halves h0..h1-1 of KV: the cast to float32 and RoPE off K (compiled; `kind` from cachegen_casts.KINDS,
    `kv` the unit's bits), the forward transforms (one matmul), rounding and coding (compiled): three calls
    that release the GIL; (the halves' part bytes back to back, where each ends). kind -1: `kv` a tensor,
    torch's cast, then RoPE compiled."""
    cal, level, layers, (heads, tokens, dim, width, per_lane), cos, sin, which = job
    q, q_t, x, x_t, qb, _ = _scratch(h1 - h0, heads, tokens, dim)
    if kind >= 0:
        cf.start(kv, kind, q, qb, h0, h1, heads, tokens, dim, cos, sin, which)
    else:
        q_t.copy_(kv)
        cc._rope(q, h0, h1, heads, tokens, dim, cos, sin, which, np.float32(-1.0))
    scaled, bias = cc._batch(cal, "encode", level, 2 * layers[h0 // 2] + h0 % 2, h1 - h0, heads, tokens, dim)
    torch.baddbmm(bias, q_t, scaled, out=x_t)
    coeffs = x[: (h1 - h0) * heads * tokens * dim].reshape(h1 - h0, heads, tokens, dim)
    scratch = _coder_scratch(heads * dim, tokens, width, per_lane)
    return ce._code_halves(coeffs, width, per_lane, FREQ, CUM, LOW_BITS, RADIUS, *scratch)


# -- per-thread buffers -----------------------------------------------------------------------------------------
_local = threading.local()


def _scratch(halves: int, heads: int, tokens: int, dim: int):
    """This thread's two float32 buffers for a unit (q: symbols / input, x: the matmul's output), as numpy
    arrays (flat), as the matmul's [halves * heads, tokens, dim] tensors and as bits (uint32); reused, so
    that a unit allocates nothing (fresh memory costs page faults, and the kernel serialises those of one
    process's threads). They live as long as the thread: 2 x 6 halves' values (Gemma 3 270M: 3 MB; a Llama-3-8B layout: 12.6 MB)."""
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
            q_t, x_t = torch.from_numpy(q[:n]).view(shape), torch.from_numpy(x[:n]).view(shape)
            views[key] = (q, q_t, x, x_t, q.view(np.uint32), x.view(np.uint32))
    return views[key]


def _coder_scratch(rows: int, tokens: int, width: int, per_lane: int) -> ce.Scratch:
    """This thread's buffers for the unit encoder (kvshelf.codecs.cachegen_encoder), for MOST_HALVES parts of
    rows x tokens symbols; reused like _scratch's."""
    key = (rows, tokens, width, per_lane)
    got = getattr(_local, "coder", None)
    if got is None or got[0] != key:
        got = _local.coder = (key, ce.Scratch.make(rows, tokens, MOST_HALVES, width, per_lane))
    return got[1]
