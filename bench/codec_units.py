"""Where calibrated cachegen's CPU decoding loses time on many threads, and what its compiled pieces cost.

    python bench/codec_units.py --kv kv.safetensors --calibration FILE.kvcal [--tokens 8192]
                                [--direct 16] [--callers 16x16 4x16] [--pieces]

- `--direct N`: the work units of every chunk (kvshelf.codecs.cachegen_threads) run by N plain threads: no
  codec pool, no callers, no stored format (how far the units themselves scale);
- `--callers KxN`: K caller threads decode whole chunks on the codec's N threads, by `codec.decode_layers`
  ("layers": no format) and by `open_chunk(...).decode_all()` ("format": what bench/codec_threads.py's
  `chunks` mode runs with K = N);
- `--pieces`: one thread, CPU time: the compiled casts and matmul against torch's (6 halves of 256 x 256), and
  whole decoding units fused (one call) against units of torch calls, us of CPU per layer.
Rows: decode MB/s of fp16 KV (median and best of 5 passes) and the units' CPU / wall (below 1: a unit's thread
waited). torch runs on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from codec_speed import chunks_of
from safetensors.torch import load_file

from kvshelf.codecs import cachegen_threads as ct
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import native, pool
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.storage.format import encode_chunk, open_chunk


class Collect:
    """A CodecProcesses stand-in that keeps the units a decode would run instead of running them."""

    def __init__(self, workers: int):
        self.workers, self.tasks = workers, []

    def map_threads(self, fn, args):
        self.tasks += list(args)
        return []


class Timed:
    """Wall and thread CPU time of the units (wrapping cachegen_threads._decode_unit)."""

    def __init__(self):
        self.lock, self.wall, self.cpu, self.real = threading.Lock(), 0.0, 0.0, ct._decode_unit

    def __call__(self, *a):
        w, c = time.perf_counter(), time.thread_time()
        self.real(*a)
        dw, dc = time.perf_counter() - w, time.thread_time() - c
        with self.lock:
            self.wall += dw
            self.cpu += dc


def report(name: str, fn, nbytes: int, timed: Timed, reps: int = 5) -> None:
    fn()
    rates, shares = [], []
    for _ in range(reps):
        timed.wall = timed.cpu = 0.0
        t = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - t) / 1e6)
        shares.append(timed.cpu / max(timed.wall, 1e-9))
    print(f"{name:16s} MB/s median {statistics.median(rates):7.0f} best {max(rates):7.0f}  "
          f"unit cpu/wall {statistics.median(shares):.2f}", flush=True)  # fmt: skip


def cpu_us(fn, reps: int = 30) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times) * 1e6


def pieces(cal, segs, shape) -> None:
    n = 6 * 256 * 256
    x = (np.random.default_rng(0).standard_normal(n) * 10).astype(np.float32)
    o16, none32 = np.empty(n, np.uint16), np.empty(0, np.float32)
    xt, ht = torch.from_numpy(x), torch.empty(n, dtype=torch.float16)
    print(f"cast to fp16, 6 halves: compiled {cpu_us(lambda: native.cast_out(x, 0, n, native.F16, o16, none32, 0)):.0f} us,"
          f" torch {cpu_us(lambda: ht.copy_(xt)):.0f} us")  # fmt: skip
    blas = native.blas()
    if blas is not None:
        q = np.round(x)
        mats = np.random.default_rng(1).standard_normal(n).astype(np.float32)
        bias, out, params = np.zeros(6 * 256, np.float32), np.empty(n, np.float32), np.zeros(8 + 18, np.int64)
        mt, qt = torch.from_numpy(mats).view(6, 256, 256), torch.from_numpy(q).view(6, 256, 256)
        bt, outt = torch.from_numpy(bias).view(6, 1, 256).expand(6, 256, 256), torch.empty(6, 256, 256)
        ours = cpu_us(lambda: native.affine(blas, 1, params, q, 0, mats, 0, bias, 0, out, 0, 6, 256, 256))
        theirs = cpu_us(lambda: torch.baddbmm(bt, qt, mt, out=outt))
        print(f"matmul 6 x 256^3: MKL sgemm_batch from numba {ours:.0f} us, torch.baddbmm {theirs:.0f} us")
    layers = shape[0]
    for name, pick in (("fused", native.blas), ("torch calls", lambda: None)):
        chosen, native.fast_blas = native.fast_blas, pick
        try:
            col = Collect(0)
            ct.decode_layers(cal, 5, segs, shape[1:], torch.float16, list(range(layers)), 0, col)
        finally:
            native.fast_blas = chosen
        us = cpu_us(lambda tasks=col.tasks: [ct._decode_unit(*a) for a in tasks], reps=12) / layers
        print(f"decoding units, {name}: {us:.0f} us of CPU per layer")


def callers_rows(spec, k, n, cal, segs, blobs, keys, positions, shape, nbytes, timed) -> None:
    processes = pool.CodecProcesses(n)
    codec = CacheGenCodec(calibration=cal, processes=processes)
    layers = list(range(shape[0]))

    def one_layers(i):
        return codec.decode_layers(segs[i], shape[1:], torch.float16, layers, shape[0], positions[i])

    def one_format(i):
        return open_chunk(blobs[i], keys[i], codec).decode_all()

    with ThreadPoolExecutor(k) as callers:
        report(f"layers {spec}", lambda: list(callers.map(one_layers, range(len(segs)))), nbytes, timed)
        report(f"format {spec}", lambda: list(callers.map(one_format, range(len(blobs)))), nbytes, timed)
    processes.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--direct", type=int, nargs="*", default=[16])
    ap.add_argument("--callers", nargs="*", default=["16x16", "4x16"])
    ap.add_argument("--pieces", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cal = calib.load(args.calibration)
    chunks = chunks_of(load_file(args.kv)["kv"], args.tokens)
    nbytes = sum(c.nbytes for c in chunks)
    keys = [i.to_bytes(16, "little") for i in range(len(chunks))]
    blobs = [encode_chunk(k, c, CacheGenCodec(calibration=cal)) for k, c in zip(keys, chunks, strict=True)]
    opened = [open_chunk(b, k, CacheGenCodec(calibration=cal)) for k, b in zip(keys, blobs, strict=True)]
    shape = tuple(chunks[0].kv.shape)
    segs = []
    for enc in opened:
        _, payload, off = enc.encoded_payload()
        segs.append([payload[off[i] : off[i + 1]] for i in range(shape[0])])
    if args.pieces:
        pieces(cal, segs[0], shape)
    timed = Timed()
    ct._decode_unit = timed
    positions = [enc.meta.position for enc in opened]
    for n in args.direct:
        col = Collect(n)
        for s, at in zip(segs, positions, strict=True):
            ct.decode_layers(cal, 5, s, shape[1:], torch.float16, list(range(shape[0])), at, col)

        def direct(n=n, tasks=col.tasks):
            threads = [threading.Thread(target=lambda k: [timed(*a) for a in tasks[k::n]], args=(k,)) for k in range(n)]
            [t.start() for t in threads]
            [t.join() for t in threads]

        report(f"direct {n}", direct, nbytes, timed)
    for spec in args.callers:
        k, n = (int(v) for v in spec.split("x"))
        callers_rows(spec, k, n, cal, segs, blobs, keys, positions, shape, nbytes, timed)
    ct._decode_unit = timed.real


if __name__ == "__main__":
    main()
