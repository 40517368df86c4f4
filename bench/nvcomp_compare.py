"""Calibrated cachegen's rANS GPU decoder against NVIDIA nvCOMP's ANS, on the same symbols (GPU machine).

    python bench/nvcomp_compare.py [--chunks 48]        # needs nvidia-nvcomp-cu13 and a CUDA GPU

Symbols: one Llama-3-8B-shaped layer (8 KV heads x 128 dims, K and V) of `--chunks` 256-token chunks,
each coefficient row a rounded Gaussian whose spread class is drawn from CLASS_COUNTS (the classes of
Gemma 3 270M's real KV at level 5, one 256-token chunk x 18 layers). Ours: kvshelf's stored segments
(kvshelf.codecs.rans), decoded by rans_gpu. nvCOMP: the same symbols grouped by spread class into one
byte stream (the high part u >> k of each symbol, at most 135 values; wide classes' k low bits counted as
raw bits), coded by nvCOMP's ANS (its own table per 64 KB chunk); the class bytes and escapes counted as
ours. Reports bytes and decode GB/s of the fp16 KV those symbols stand for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from kvshelf.codecs import rans, rans_gpu
from kvshelf.codecs.cachegen import _code_calibrated

CLASS_COUNTS = [1374, 114, 109, 167, 191, 156, 246, 275, 352, 415, 505, 498, 477, 463, 452, 426, 393, 369, 337, 299]
CLASS_COUNTS += [279, 244, 222, 184, 171, 128, 107, 72, 60, 46, 36, 18, 11, 7, 5, 2, 2, 1, 0, 1, 2] + [0] * 23
HEADS, DIM, TOKENS = 8, 128, 256


def cuda_time(fn, repeats=10) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=48)
    args = ap.parse_args()
    from nvidia import nvcomp

    rng = np.random.default_rng(0)
    probs = np.array(CLASS_COUNTS, np.float64) / sum(CLASS_COUNTS)
    qs = []
    for _ in range(args.chunks):
        cls = rng.choice(64, size=(2, HEADS, 1, DIM), p=probs)
        qs.append(np.round(rng.standard_normal((2, HEADS, TOKENS, DIM)) * 2.0 ** (cls / 4 - 3)).astype(np.int32))
    fp16_bytes = args.chunks * 2 * HEADS * TOKENS * DIM * 2
    segs = [_code_calibrated(q, 5) for q in qs]
    shape = (2, HEADS, TOKENS, DIM)
    dev = torch.device("cuda")
    staged = rans_gpu.stage(segs, shape, 5, dev)
    rans_gpu.run_staged(staged)
    ours_s = cuda_time(lambda: rans_gpu.run_staged(staged))

    # nvCOMP: the same symbols, one byte stream grouped by class
    streams, low_bits, escapes = {}, 0, 0
    for q in qs:
        for kind in range(2):
            cols = q[kind].transpose(0, 2, 1).reshape(HEADS * DIM, TOKENS)
            classes = rans.classes_of(cols)
            for c in np.unique(classes):
                rows = cols[classes == c]
                r, k = int(rans.RADIUS[c]), int(rans.LOW_BITS[c])
                escapes += int((np.abs(rows) >= r).sum())
                u = np.clip(rows, -r, r) + r
                streams.setdefault(int(c), []).append((u >> k).astype(np.uint8).reshape(-1))
                low_bits += k * u.size
    data = torch.from_numpy(np.concatenate([np.concatenate(streams[c]) for c in sorted(streams)])).to(dev)
    codec = nvcomp.Codec(algorithm="ANS")
    enc = codec.encode(nvcomp.as_array(data))
    back = torch.from_dlpack(codec.decode(enc))
    assert torch.equal(back.view(torch.uint8).reshape(-1)[: data.numel()], data), "nvCOMP round trip"
    nv_s = cuda_time(lambda: codec.decode(enc))
    side = args.chunks * 2 * HEADS * DIM + 8 * escapes  # class bytes and escapes, as ours
    out = {
        "symbols": int(data.numel()),
        "ours bytes": sum(map(len, segs)),
        "nvcomp bytes (ANS + raw low bits + classes + escapes)": int(enc.buffer_size) + low_bits // 8 + side,
        "ours decode GB/s (kernel + escapes + check)": fp16_bytes / ours_s / 1e9,
        "nvcomp decode GB/s (ANS only)": fp16_bytes / nv_s / 1e9,
    }
    out["nvcomp size vs ours"] = out["nvcomp bytes (ANS + raw low bits + classes + escapes)"] / out["ours bytes"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
