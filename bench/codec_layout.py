"""Calibrated cachegen's CPU codec by thread layout: K caller threads each coding whole chunks through the stored
format, on one codec pool of N threads (`codec_workers` = N), optionally against another pool implementation in
the same process, passes interleaved (A/B on a noisy machine).

    python bench/codec_layout.py --kv kv.safetensors --calibration FILE.kvcal [--tokens 12288]
        [--layouts 1x16 4x16 16x16] [--kinds decode encode] [--repeats 5]
        [--before OTHER/kvshelf/codecs/pool.py] [--json OUT] [--switch-interval S]
        [--output-pool-mb MB] [--reuse-output]

A layout KxN: K callers (1: one retrieval at a time; N: bench/codec_speed.py's "N cores"), N codec threads.
`--before` loads that file as the pool module for the "before" rows (e.g. main's pool.py); the codec itself is
this checkout's (so the pool must have this checkout's interface: `CodecProcesses(workers, output_pool_bytes)`
and `.outputs`, issue #17 eleventh session on). Per row: MB/s of fp16 KV, median of `--repeats` timed passes (each after one warm pass) with
all passes listed; `unit cpu/wall` the codec's work units' CPU share while they ran (below 1: a unit waited
for the GIL or its core); `cpu/wall/N` the process's CPU over N x wall; `vol` voluntary context switches per
chunk (hand-offs that slept); `us cpu/layer` the process's CPU time per layer; `minflt` minor page faults per
chunk (fresh memory touched); `runq/N` the threads' time runnable but waiting for a core over N x wall (from
/proc schedstat: above 0, more threads wanted to run than there were cores); `sys` the kernel's share of the
process's CPU. Time a unit spends neither running nor waiting for a core, it sleeps (the GIL, a lock).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from codec_speed import chunks_of
from codec_threads import Units
from safetensors.torch import load_file

from kvshelf.codecs import cachegen_threads as ct
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import pool as codec_pool
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.storage.format import encode_chunk, open_chunk


def load_pool(path: str):
    spec = importlib.util.spec_from_file_location("kvshelf_pool_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sched_ns() -> tuple[int, int]:
    """(ns running, ns runnable but waiting for a core) summed over this process's threads (/proc schedstat;
    threads that ended are not counted: the bench keeps its caller threads across passes)."""
    run = wait = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                r, w, _ = f.read().split()
        except (OSError, ValueError):  # a thread that just ended
            continue
        run, wait = run + int(r), wait + int(w)
    return run, wait


def reuse_outputs() -> None:
    """torch.empty of a chunk's output shape (5 dimensions) returns the calling thread's tensor of that shape
    made before (a diagnostic: never two such tensors alive at once in one thread here)."""
    real, local = torch.empty, threading.local()

    def empty(*shape, **kw):
        if len(shape) != 1 or len(shape[0]) != 5:
            return real(*shape, **kw)
        key = (tuple(shape[0]), kw.get("dtype"))
        got = getattr(local, "out", None)
        if got is None or got[0] != key:
            got = local.out = (key, real(*shape, **kw))
        return got[1]

    torch.empty = empty


def one_pass(kind: str, callers: int, codec, keys, items, outer: ThreadPoolExecutor) -> None:
    if kind == "encode":

        def one(k, x):
            return encode_chunk(k, x, codec)
    else:

        def one(k, x):
            return open_chunk(x, k, codec).decode_all()

    if callers == 1:
        for k, x in zip(keys, items, strict=True):
            one(k, x)
    else:
        list(outer.map(one, keys, items))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--layouts", nargs="+", default=["1x16", "4x16", "16x16"], help="KxN: K callers, N codec threads")
    ap.add_argument("--kinds", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", help="another pool.py for 'before' rows, passes interleaved with this checkout's")
    ap.add_argument("--json")
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval for this run (an experiment)")
    ap.add_argument("--output-pool-mb", type=int, default=256, help="config codec_output_pool_mb (0: fresh memory)")
    ap.add_argument("--reuse-output", action="store_true",
                    help="a diagnostic, decode only: each caller thread's decoded chunks share one output tensor "
                    "(what fresh output memory costs)")  # fmt: skip
    args = ap.parse_args()
    if args.reuse_output:
        reuse_outputs()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    torch.set_num_threads(1)
    cal = calib.load(args.calibration)
    chunks = chunks_of(load_file(args.kv)["kv"], args.tokens)
    nbytes, layers = sum(c.nbytes for c in chunks), chunks[0].kv.shape[0]
    keys = [i.to_bytes(16, "little") for i in range(len(chunks))]
    blobs = [encode_chunk(k, c, CacheGenCodec(calibration=cal)) for k, c in zip(keys, chunks, strict=True)]
    pools = {"after": codec_pool} | ({"before": load_pool(args.before)} if args.before else {})
    units = Units()
    ct._decode_unit, ct._encode_unit = units.wrap(ct._decode_unit), units.wrap(ct._encode_unit)
    rows = []
    for layout in args.layouts:
        callers, workers = (int(v) for v in layout.split("x"))
        for kind in args.kinds:
            items = blobs if kind == "decode" else chunks
            procs = {name: module.CodecProcesses(workers, args.output_pool_mb << 20) for name, module in pools.items()}
            codecs = {name: CacheGenCodec(calibration=cal, processes=p) for name, p in procs.items()}
            stats = {name: [] for name in pools}
            outer = ThreadPoolExecutor(callers)  # the callers, kept across passes (their schedstat counted)
            for name in pools:  # warm: threads, per-thread buffers
                one_pass(kind, callers, codecs[name], keys, items, outer)
            for r in range(args.repeats):
                for name in pools if r % 2 == 0 else reversed(pools):  # alternate who goes first
                    units.wall = units.cpu = 0.0
                    s0, r0, w0 = sched_ns(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    one_pass(kind, callers, codecs[name], keys, items, outer)
                    wall, r1, s1 = time.perf_counter() - w0, resource.getrusage(resource.RUSAGE_SELF), sched_ns()
                    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
                    stats[name].append(
                        (
                            nbytes / wall / 1e6,
                            units.cpu / max(units.wall, 1e-9),
                            cpu / wall / workers,
                            (r1.ru_nvcsw - r0.ru_nvcsw) / len(keys),
                            cpu / (len(keys) * layers) * 1e6,
                            (r1.ru_minflt - r0.ru_minflt) / len(keys),
                            (s1[1] - s0[1]) / 1e9 / wall / workers,
                            (r1.ru_stime - r0.ru_stime) / max(cpu, 1e-9),
                        )  # fmt: skip
                    )
            outer.shutdown()
            for p in procs.values():
                p.close()
            for name, got in stats.items():
                row = {
                    "pool": name,
                    "layout": layout,
                    "kind": kind,
                    "MB/s median": statistics.median(g[0] for g in got),
                }
                row |= {
                    "unit cpu/wall": statistics.median(g[1] for g in got),
                    "cpu/wall/N": statistics.median(g[2] for g in got),
                    "vol": statistics.median(g[3] for g in got),
                    "us cpu/layer": statistics.median(g[4] for g in got),
                    "minflt": statistics.median(g[5] for g in got),
                    "runq/N": statistics.median(g[6] for g in got),
                    "sys": statistics.median(g[7] for g in got),
                    "MB/s all": [round(g[0], 1) for g in got],
                }
                rows.append(row)
                print(
                    " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
                )
            if args.json:  # after every layout: a run stopped by a timeout keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"tokens": args.tokens, "layers": layers, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
