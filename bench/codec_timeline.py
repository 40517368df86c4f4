"""Where one caller's chunk time goes with calibrated cachegen on N codec threads, through the stored format
(open_chunk + decode_all, encode_chunk): per chunk, the medians over all chunks of all timed passes, in us.

    python bench/codec_timeline.py --kv kv.safetensors --calibration FILE.kvcal [--tokens 12288] [--threads 16]

Columns: `chunk` the whole call; `pre` the format's own work before the codec (header, digests); `prep` the
codec's set-up before its units are handed out (output memory, the segments' buffer, RoPE tables, the cut);
`first` / `laststart` when the first / last unit started after that; `unitwall` / `unitcpu` a unit's mean wall
and CPU time (wall above CPU: it waited for the GIL); `unitmax` the longest unit; `lastend` when the last unit
ended; `mapret` when the caller had them all back; `post` the rest (encode: the segments joined, their
digests, the header, the object joined). One caller, so no other chunk hides any of it (kvshelf's engine retrieves a prompt's chunks one after
the other). Works on any checkout with the unit coder (issue #17, ninth session on): run it with that
checkout first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
from codec_speed import chunks_of
from safetensors.torch import load_file

from kvshelf.codecs import cachegen_threads as ct
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import pool
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.storage.format import encode_chunk, open_chunk

clock = time.perf_counter


class Recorder:
    """Wraps the codec's entry points, its units and the pool's map_threads to note when each step happens."""

    def __init__(self, processes: pool.CodecProcesses):
        self.events: dict[str, float] = {}
        self.units: list[tuple[float, float, float]] = []  # (start, end, CPU seconds)
        self._lock = threading.Lock()
        for name in ("_decode_unit", "_encode_unit"):
            setattr(ct, name, self._unit(getattr(ct, name)))
        for name in ("decode_layers", "encode_layers"):
            setattr(ct, name, self._entry(getattr(ct, name)))
        real_map = processes.map_threads

        def mapped(*args, **kw):
            self.events["map"] = clock()
            result = real_map(*args, **kw)
            self.events["map_end"] = clock()
            return result

        processes.map_threads = mapped

    def _unit(self, real):
        def timed(*args):
            start, cpu = clock(), time.thread_time()
            result = real(*args)
            end, cpu_end = clock(), time.thread_time()
            with self._lock:
                self.units.append((start, end, cpu_end - cpu))
            return result

        return timed

    def _entry(self, real):
        def entered(*args, **kw):
            self.events["codec"] = clock()
            return real(*args, **kw)

        return entered

    def row(self, t0: float, t1: float) -> dict | None:
        e, us = self.events, sorted(self.units)
        if not us or "map" not in e:  # coded inline (one worker)
            return None
        m = e["map"]
        return {
            "chunk": t1 - t0, "pre": e["codec"] - t0, "prep": m - e["codec"], "first": us[0][0] - m,
            "laststart": us[-1][0] - m, "unitwall": statistics.mean(u[1] - u[0] for u in us),
            "unitmax": max(u[1] - u[0] for u in us), "unitcpu": statistics.mean(u[2] for u in us),
            "lastend": max(u[1] for u in us) - m, "mapret": e["map_end"] - m, "post": t1 - e["map_end"],
        }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--threads", type=int, default=16, help="codec_workers (the caller is one of them)")
    ap.add_argument("--passes", type=int, default=3, help="timed passes, each after one warm pass")
    ap.add_argument("--output-pool-mb", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cal = calib.load(args.calibration)
    chunks = chunks_of(load_file(args.kv)["kv"], args.tokens)
    nbytes = sum(c.nbytes for c in chunks)
    processes = pool.CodecProcesses(args.threads, args.output_pool_mb << 20)
    codec = CacheGenCodec(calibration=cal, processes=processes)
    keys = [i.to_bytes(16, "little") for i in range(len(chunks))]
    blobs = [encode_chunk(k, c, codec) for k, c in zip(keys, chunks, strict=True)]
    rec = Recorder(processes)
    for kind in ("decode", "encode"):
        rows, rates = [], []
        for n in range(args.passes + 1):
            start = clock()
            for k, c, b in zip(keys, chunks, blobs, strict=True):
                rec.events.clear()
                rec.units.clear()
                t0 = clock()
                if kind == "decode":
                    open_chunk(b, k, codec).decode_all()
                else:
                    encode_chunk(k, c, codec)
                row = rec.row(t0, clock())
                if n and row:
                    rows.append(row)
            if n:
                rates.append(nbytes / (clock() - start) / 1e6)
        print(f"{kind} 1x{args.threads}, {args.tokens} tokens: {statistics.median(rates):.0f} MB/s of fp16 KV "
              f"(passes {[round(r) for r in rates]}); per chunk, median us:")  # fmt: skip
        if rows:
            print("  " + "  ".join(f"{k} {statistics.median(r[k] for r in rows) * 1e6:.0f}" for k in rows[0]))
    processes.close()


if __name__ == "__main__":
    main()
