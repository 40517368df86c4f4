"""Where calibrated cachegen's CPU codec loses its threads: decode/encode speed through the stored format on N
threads, with what the process did meanwhile (CPU time, context switches, page faults) and how busy the
codec's own work units kept their threads.

    python bench/codec_threads.py --kv kv.safetensors --calibration FILE.kvcal [--tokens 12288]
                                  [--threads 1 2 8 12 16] [--modes chunks single] [--json OUT]

Modes (MB/s of fp16 KV, 256-token chunks, codec_workers = N, torch at one thread):
- `chunks`: N threads decode (encode) chunks side by side, each chunk's layers split over the codec's N threads
  (bench/codec_speed.py's "N cores");
- `single`: chunks one after another, each on the codec's N threads (what one retrieval does);
- `stages`: the codec's two big compiled stages alone, N threads each calling one on its own buffers over and
  over (no format, no pool, no allocation): the rANS decoder (`decode_segments_into`, 3 layers a call) and the
  inverse transform (`torch.baddbmm`, 3 layers a call): how far the hardware itself scales.
Per row: `MB/s` is the best of `--repeats` timed passes, `MB/s median` their median; `cpu/wall/N` is the share of the N cores the process used; `unit cpu/wall` the CPU share of the
codec's work units while they ran (below 1: a unit waited for the GIL or its core); `unit busy` the units'
summed wall time over N x wall (below 1: threads had no unit to run); `us cpu/layer` the process's CPU time per
layer (rising with N: the cores slow each other, or threads spin); `invol`, `vol`, `faults` per chunk;
`steal` and `idle`: the machine's shares of CPU time stolen by the hypervisor (a VM's vCPU not running) and
idle, from /proc/stat (steal above 0: the host runs other work on these cores).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from codec_speed import chunks_of
from safetensors.torch import load_file

from kvshelf.codecs import calibration as calib
from kvshelf.codecs import pool as codec_pool
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.storage.format import encode_chunk, open_chunk


class Units:
    """Wall and thread CPU time of every work unit the codec runs on its threads (wrapping its unit calls)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.wall = self.cpu = 0.0
        self.count = 0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                dc, dw = time.thread_time() - c, time.perf_counter() - w
                with self.lock:
                    self.wall += dw
                    self.cpu += dc
                    self.count += 1

        return timed


def cpu_times() -> list[int]:
    """The machine's CPU time counters (/proc/stat: user nice system idle iowait irq softirq steal ...)."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def measure(kind: str, mode: str, threads: int, codec, units: Units, keys, items, layers: int, nbytes: int,
            repeats: int = 3) -> dict:  # fmt: skip
    if kind == "encode":

        def one(k, c):
            return encode_chunk(k, c, codec)
    else:

        def one(k, b):
            return open_chunk(b, k, codec).decode_all()

    def go():
        if mode == "single" or threads == 1:
            for k, x in zip(keys, items, strict=True):
                one(k, x)
        else:
            with ThreadPoolExecutor(threads) as outer:
                list(outer.map(one, keys, items))

    go()  # warm: thread pools, caches
    best, rates = None, []
    for _ in range(repeats):
        units.wall = units.cpu = 0.0
        units.count = 0
        r0, w0, s0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), cpu_times()
        go()
        wall = time.perf_counter() - w0
        r1, s1 = resource.getrusage(resource.RUSAGE_SELF), cpu_times()
        ds = [b - a for a, b in zip(s0, s1, strict=True)]
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        row = {
            "MB/s": nbytes / wall / 1e6,
            "cpu/wall/N": cpu / wall / threads,
            "sys share": (r1.ru_stime - r0.ru_stime) / max(cpu, 1e-9),
            "unit cpu/wall": units.cpu / max(units.wall, 1e-9),
            "unit busy": units.wall / (wall * threads),
            "units/chunk": units.count / len(keys),
            "us cpu/layer": cpu / (len(keys) * layers) * 1e6,
            "invol": (r1.ru_nivcsw - r0.ru_nivcsw) / len(keys),
            "vol": (r1.ru_nvcsw - r0.ru_nvcsw) / len(keys),
            "faults": (r1.ru_minflt - r0.ru_minflt) / len(keys),
            "os threads": len(os.listdir("/proc/self/task")),
            "steal": ds[7] / max(sum(ds[:8]), 1),
            "idle": ds[3] / max(sum(ds[:8]), 1),
        }
        rates.append(row["MB/s"])
        if best is None or row["MB/s"] > best["MB/s"]:
            best = row
    return best | {"MB/s median": statistics.median(rates), "MB/s all": [round(r, 1) for r in rates]}


def stages(cal, blobs, keys, threads: int, layers: int, label: str) -> list[dict]:
    """MB/s of fp16 KV through each big compiled stage alone on `threads` threads (see the module's doc)."""
    import numpy as np

    from kvshelf.codecs import cachegen_cpu as cc

    run = 3
    opened = [open_chunk(b, k, CacheGenCodec(calibration=cal)) for k, b in zip(keys, blobs, strict=True)]
    two, heads, tokens, dim = opened[0].meta.shape[1:]
    segs = []
    for enc in opened:
        _, payload, offsets = enc.encoded_payload()
        segs += [[payload[offsets[k] : offsets[k + 1]] for k in range(a, a + run)] for a in range(0, layers, run)]
    nbytes = len(segs) * run * two * heads * tokens * dim * 2
    scaled, bias = cc._batch(cal, "decode", 5, 0, 2 * run, heads, tokens, dim)

    def symbols(part):
        q = np.empty((run, two, heads, tokens, dim), np.float32)
        for s in part:
            cc.decode_segments_into(s, heads, tokens, dim, 5, q)

    def matmul(part):
        q = torch.zeros(run * two * heads, tokens, dim)
        x = torch.empty_like(q)
        for _ in part:
            torch.baddbmm(bias, q, scaled, out=x)

    out = []
    for name, fn in (("rANS symbols", symbols), ("baddbmm", matmul)):
        parts = [segs[i::threads] for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, parts))
            w, s0 = time.perf_counter(), cpu_times()
            list(pool.map(fn, parts))
            wall, ds = time.perf_counter() - w, [b - a for a, b in zip(s0, cpu_times(), strict=True)]
        row = {"label": label, "kind": name, "mode": "stages", "threads": threads, "MB/s": nbytes / wall / 1e6}
        out.append(row | {"steal": ds[7] / max(sum(ds[:8]), 1), "idle": ds[3] / max(sum(ds[:8]), 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 8, 12, 16])
    ap.add_argument("--modes", nargs="+", default=["chunks", "single"], choices=["chunks", "single", "stages"])
    ap.add_argument("--kinds", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per row (best and median reported)")
    ap.add_argument("--label", default="")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cal = calib.load(args.calibration)
    chunks = chunks_of(load_file(args.kv)["kv"], args.tokens)
    layers = chunks[0].kv.shape[0]
    nbytes = sum(c.nbytes for c in chunks)
    keys = [i.to_bytes(16, "little") for i in range(len(chunks))]
    blobs = [encode_chunk(k, c, CacheGenCodec(calibration=cal)) for k, c in zip(keys, chunks, strict=True)]
    rows = []
    for threads in args.threads:
        if "stages" in args.modes:
            for row in stages(cal, blobs, keys, threads, layers, args.label):
                rows.append(row)
                print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        modes = [m for m in args.modes if m != "stages"]
        for mode in modes if threads > 1 else modes[:1]:
            processes = codec_pool.CodecProcesses(0 if threads == 1 else threads)
            codec = CacheGenCodec(calibration=cal, processes=processes)
            units = Units()
            try:  # the codec's work units: (layer, K|V) halves...
                from kvshelf.codecs import cachegen_threads as ct

                ct._decode_unit, ct._encode_unit = (units.wrap(getattr(ct, f"_{k}_unit")) for k in ("decode", "encode"))
            except ImportError:  # ...or, before those, runs of layers
                codec._decode_calibrated = units.wrap(codec._decode_calibrated)
                codec._encode_calibrated = units.wrap(codec._encode_calibrated)
            for kind in args.kinds:
                items = blobs if kind == "decode" else chunks
                row = {"label": args.label, "kind": kind, "mode": mode, "threads": threads}
                row |= measure(kind, mode, threads, codec, units, keys, items, layers, nbytes, args.repeats)
                rows.append(row)
                print(
                    " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                    flush=True,
                )
            processes.close()
            if "ct" in locals():
                ct._decode_unit, ct._encode_unit = ct._decode_unit.__wrapped__, ct._encode_unit.__wrapped__
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
