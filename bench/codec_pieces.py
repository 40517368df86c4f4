"""CPU time of each step of calibrated cachegen's work units, one thread (us per layer of fp16 KV).

    python bench/codec_pieces.py --kv kv.safetensors --calibration FILE.kvcal [--tokens 3072]

Decoding a unit: rANS symbols (`_decode_halves`), the inverse transform (`torch.baddbmm`), RoPE (`_rope`), the
cast to fp16 (`copy_`), or the last two in one call (`cachegen_casts.finish`, what the codec runs; `start`: the
cast to float32 and RoPE off, encoding's first step). Encoding: the cast to float32 and RoPE back, the forward transform, then rounding,
classes, escapes, the rANS lanes and the byte layout (`cachegen_encoder._code_halves`), and the lanes alone
(`_encode_lanes_into`, inputs not in cache: an upper bound). Units of 6 halves (3 layers), as kvshelf.codecs.cachegen_threads cuts them; best of 3 by `time.process_time`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from codec_speed import chunks_of
from safetensors.torch import load_file

from kvshelf.codecs import cachegen_casts as cf
from kvshelf.codecs import cachegen_cpu as cc
from kvshelf.codecs import cachegen_encoder as ce
from kvshelf.codecs import cachegen_threads as ct
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import rans
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.codecs.rans import CUM, FREQ, LOW_BITS, RADIUS, SYMBOL


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        c = time.process_time()
        fn()
        times.append(time.process_time() - c)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--tokens", type=int, default=3072)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cal = calib.load(args.calibration)
    codec = CacheGenCodec(calibration=cal)
    chunks = chunks_of(load_file(args.kv)["kv"], args.tokens)
    n, two, heads, tokens, dim = chunks[0].kv.shape
    width, per_lane, _ = rans.layout(heads * dim, tokens)
    head = cc._head(codec.bits)
    jobs = []  # per chunk: segments joined, their ends, the KV as rows, RoPE tables
    for c in chunks:
        segs = codec.encode_layers(c.kv, c.meta.position)
        buf = np.frombuffer(b"".join(segs), np.uint8)
        ends = np.cumsum([len(s) for s in segs], dtype=np.int64)
        jobs.append(
            (buf, ends, c.kv.reshape(-1, tokens, dim), *cc._tables(cal, list(range(n)), c.meta.position, tokens))
        )
    step = ct.MOST_HALVES
    spans = [(a, min(a + step, 2 * n)) for a in range(0, 2 * n, step)]
    q, q_t, x, x_t, qb, xb = ct._scratch(step, heads, tokens, dim)
    out = torch.empty(2 * n * heads, tokens, dim, dtype=torch.float16)
    out_bits, half = cf.bits_view(out), heads * tokens * dim
    layers = len(jobs) * n
    one = np.float32(1.0)

    def forward(job, a, b):  # the coefficients encoding codes
        q_t.copy_(job[2][a * heads : b * heads])
        cc._rope(q, a, b, heads, tokens, dim, *job[3:], -one)
        sc, bias = cc._batch(cal, "encode", codec.bits, a, b - a, heads, tokens, dim)
        torch.baddbmm(bias, q_t, sc, out=x_t)
        return x[: (b - a) * heads * tokens * dim].reshape(b - a, heads, tokens, dim).copy()

    coeffs = [forward(jobs[0], a, b) for a, b in spans]
    lanes_in = []
    for co in coeffs:  # the lanes' own input: shifted, clipped symbols and classes per half
        for k in range(co.shape[0]):
            sym = np.clip(np.rint(co[k]), -(2**30), 2**30).astype(np.int32)
            cls = rans.classes_of(sym.transpose(0, 2, 1).reshape(heads * dim, tokens))
            r = RADIUS[cls].reshape(heads, 1, dim).astype(np.int32)
            lanes_in.append(((np.clip(sym, -r, r) + r).astype(np.int32).reshape(-1), cls))

    def steps(which):
        for buf, ends, kv_rows, cos, sin, rows in jobs:
            for a, b in spans:
                if which == "symbols":
                    cc._decode_halves(buf, ends, a, b, head, heads, tokens, dim, width, per_lane, SYMBOL, FREQ, CUM,
                                      LOW_BITS, RADIUS, q)  # fmt: skip
                elif which in ("inverse", "forward"):
                    sc, bias = cc._batch(cal, "decode" if which == "inverse" else "encode", codec.bits,
                                         a, b - a, heads, tokens, dim)  # fmt: skip
                    torch.baddbmm(bias, q_t, sc, out=x_t)
                elif which == "rope":
                    cc._rope(x, a, b, heads, tokens, dim, cos, sin, rows, one)
                elif which == "cast to fp16":
                    out[a * heads : b * heads].copy_(x_t)
                elif which == "cast to fp32":
                    q_t.copy_(kv_rows[a * heads : b * heads])
                elif which == "rope + cast (fused)":
                    cf.finish(x, xb, a, b, heads, tokens, dim, cos, sin, rows, out_bits[a * half : b * half], 1)
                elif which == "cast + rope (fused)":
                    kv_bits = cf.bits_view(kv_rows[a * heads : b * heads])
                    cf.start(kv_bits, 1, q, qb, a, b, heads, tokens, dim, cos, sin, rows)

    scratch = ce.Scratch.make(heads * dim, tokens, step, width, per_lane)
    counts, states = (
        np.zeros(heads * dim // (width * per_lane), np.uint32),
        np.empty(heads * dim // per_lane, np.uint32),
    )

    def code():
        for _ in jobs:
            for co in coeffs:
                ce._code_halves(co, width, per_lane, FREQ, CUM, LOW_BITS, RADIUS, *scratch)

    def lanes():
        for _ in jobs:
            for u, cls in lanes_in:
                ce._encode_lanes_into(u, cls, width, per_lane, tokens, dim, FREQ, CUM, LOW_BITS, scratch.words,
                                      counts, states)  # fmt: skip

    code()  # compiled code warm
    names = ("symbols", "inverse", "rope", "cast to fp16", "rope + cast (fused)", "cast to fp32", "cast + rope (fused)",
             "forward")  # fmt: skip
    got = {name: best(lambda name=name: steps(name)) for name in names}
    got["code (all)"] = best(code)
    got["  of which rANS lanes"] = best(lanes)
    for name, t in got.items():
        print(f"{name:22s} {t / layers * 1e6:7.1f} us/layer")
    dec = got["symbols"] + got["inverse"] + got["rope"] + got["cast to fp16"]
    enc = got["cast to fp32"] + got["rope"] + got["forward"] + got["code (all)"]
    print(f"decode steps {dec / layers * 1e6:7.1f} us/layer, encode steps {enc / layers * 1e6:7.1f} us/layer")
    dec = got["symbols"] + got["inverse"] + got["rope + cast (fused)"]
    enc = got["cast + rope (fused)"] + got["forward"] + got["code (all)"]
    print(f"fused: decode steps {dec / layers * 1e6:7.1f} us/layer, encode steps {enc / layers * 1e6:7.1f} us/layer")


if __name__ == "__main__":
    main()
