"""Where each codec wins: load a cached prompt's KV from Redis through links of capped bandwidth.

    python bench/remote_link.py --kv kv.safetensors --calibration FILE.kvcal [--gbits 0.1 1 3 10] [--threads N]

KV: a file saved by `bench/codec_speed.py --save-kv` (the real model's fp16 KV, 2048 tokens) and the model's
calibration (~/.cache/kvshelf/calibrations/*.kvcal). A real redis-server (tests/services.py) holds the
prompt's 256-token chunks, written once per codec (none / int8 / calibrated cachegen). Reads go through a
loopback TCP proxy with a token bucket on each direction (this file), as a network link of that speed
would; "load" = every chunk fetched through kvshelf's Redis tier (RedisBackend.get: fetch, verify,
decode to CPU tensors), chunks on `--threads` threads (fetch of one overlaps decoding of another), and
cachegen's layers on the codec's worker threads (`codec_workers` = cores).

Also measured: the proxy's uncapped ceiling, each codec's decode time alone (the bytes in memory) and its
stored size; from those, the break-even link speed against raw: codec C loads faster than raw over a link
of bandwidth B when size_C / B + decode_C < size_raw / B (one after the other), i.e. B < (size_raw -
size_C) / decode_C; with fetch and decode overlapped perfectly, B < size_raw / decode_C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import codec_from_spec, save_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from services import RedisServer, free_port  # noqa: E402

from kvshelf.cache.device_decode import DeviceDecoding  # noqa: E402
from kvshelf.cache.keys import ChunkKey  # noqa: E402
from kvshelf.codecs import calibration as calib  # noqa: E402
from kvshelf.codecs import pool as codec_pool  # noqa: E402
from kvshelf.storage.base import ChunkMeta, StoredChunk  # noqa: E402
from kvshelf.storage.format import open_chunk  # noqa: E402
from kvshelf.storage.redis import RedisBackend  # noqa: E402

CHUNK = 256
FP = b"\x07" * 32


class TokenBucket:
    """`rate` bytes/s shared by every connection in one direction: each read books the next slot of the
    link and waits for its end (no credit is banked while the link is idle)."""

    def __init__(self, rate: float):
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = time.perf_counter()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.perf_counter()
            self._free_at = max(self._free_at, now) + n / self.rate
            wait = self._free_at - now
        time.sleep(wait)


class ThrottledProxy:
    """A loopback TCP proxy to `target_port` that lets through at most `rate` bytes/s in each direction,
    over all its connections together; rate None: as fast as it can."""

    def __init__(self, target_port: int, rate: float | None):
        self.target_port = target_port
        self.buckets = (TokenBucket(rate), TokenBucket(rate)) if rate else (None, None)
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name="proxy-accept", daemon=True)
        self._accept.start()

    def _serve(self):
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for (src, dst), bucket in zip(((client, upstream), (upstream, client)), self.buckets, strict=True):
                t = threading.Thread(target=self._pump, args=(src, dst, bucket), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket | None):
        try:
            while data := src.recv(64 << 10):
                if bucket is not None:
                    bucket.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self):
        self._stop.set()
        self._server.close()
        self._accept.join()
        for t in self._threads:
            t.join(timeout=5)


def chunks_of(kv: torch.Tensor) -> list[StoredChunk]:
    out = []
    for s in range(0, kv.shape[3], CHUNK):
        piece = kv[:, :, :, s : s + CHUNK].contiguous()
        out.append(StoredChunk(ChunkMeta(FP, piece.shape[3], tuple(piece.shape), piece.dtype, s), piece))
    return out


def to_device(readers: list, device, threads: int) -> None:
    """Verified chunks (EncodedChunk, in prompt order) -> their KV on the GPU, synchronised: cachegen decoded
    there, all layers of all chunks in one batched call (as the layerwise loader does, group by group);
    other codecs decoded on the CPU (threads) and copied."""
    chunks = [(ChunkKey(bytes(16), i * CHUNK, (i + 1) * CHUNK), r) for i, r in enumerate(readers)]
    plan = DeviceDecoding.plan(chunks, device)
    if plan is not None:
        parts, flag = plan.decode(0, readers[0].meta.shape[0])
        assert flag is None or not bool(flag), "GPU decode failed"
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda r: r.decode_all().kv.to(device), readers))
    torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--gbits", nargs="+", type=float, default=[0.1, 1.0, 3.0, 10.0])
    ap.add_argument("--codecs", nargs="+", default=["none", "int8", "cachegen"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench/results/remote_link.json")
    ap.add_argument(
        "--device",
        default="cpu",
        help="where the KV goes: cuda = to the GPU (cachegen decoded there, batched; none/int8 decoded on the CPU)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    from safetensors.torch import load_file

    kv = load_file(args.kv)["kv"]
    cal = calib.load(args.calibration)
    calib.register(cal)
    chunks = chunks_of(kv)
    raw_bytes = sum(c.nbytes for c in chunks)
    torch.set_num_threads(1)
    processes = codec_pool.CodecProcesses(os.cpu_count() or 1)  # cachegen's layers on threads or processes
    server = RedisServer(Path(f"/tmp/kvshelf-remote-link-{os.getpid()}")).start()
    rows = []
    try:
        ceiling = ThrottledProxy(server.port, None)
        for spec in args.codecs:
            codec = codec_from_spec(spec, cal, processes)
            direct = RedisBackend(server.url, codec, prefix=f"{spec}:", part_bytes=64 << 20)
            keys = [i.to_bytes(16, "little") for i in range(len(chunks))]
            for key, chunk in zip(keys, chunks, strict=True):
                assert direct.put(key, chunk)
            blobs = [direct._get_bytes(direct.name_of(k), 1 << 30) for k in keys]
            stored = sum(len(b) for b in blobs)

            def decode_only(blobs=blobs, keys=keys, codec=codec):
                if device.type == "cuda":
                    to_device([open_chunk(b, k, codec) for k, b in zip(keys, blobs, strict=True)], device, args.threads)
                    return
                with ThreadPoolExecutor(args.threads) as pool:
                    list(
                        pool.map(lambda kb: open_chunk(kb[1], kb[0], codec).decode_all(), zip(keys, blobs, strict=True))
                    )

            decode_only()  # compile / warm
            t_decode = median_time(decode_only, args.repeats)
            row = {"codec": spec, "stored MB": stored / 1e6, "x vs fp16": raw_bytes / stored, "decode s": t_decode}
            for label, rate in [("uncapped", None)] + [(f"{g:g} Gbit/s", g * 1e9 / 8) for g in args.gbits]:
                proxy = ceiling if rate is None else ThrottledProxy(server.port, rate)
                url = f"redis://127.0.0.1:{proxy.port}/0"
                tier = RedisBackend(url, codec, prefix=f"{spec}:", part_bytes=64 << 20, timeout_s=120)

                def load(tier=tier, keys=keys):
                    with ThreadPoolExecutor(args.threads) as pool:
                        got = list(pool.map(tier.open if device.type == "cuda" else tier.get, keys))
                    assert all(g is not None for g in got), "a chunk did not load"
                    if device.type == "cuda":  # fetched and verified: now decoded onto the GPU
                        to_device(got, device, args.threads)

                load()
                row[f"load s {label}"] = median_time(load, args.repeats)
                tier.close()
                if proxy is not ceiling:
                    proxy.close()
            direct.close()
            rows.append(row)
            print(row, flush=True)
        ceiling.close()
    finally:
        server.kill()
        processes.close()
    raw = next((r for r in rows if r["codec"] == "none"), None)
    for r in rows:
        if raw is None or r is raw:
            continue
        saved = raw["stored MB"] - r["stored MB"]
        extra = r["decode s"] - raw["decode s"]
        r["break-even Gbit/s, sequential"] = saved * 8e6 / extra / 1e9 if extra > 0 else float("inf")
        r["break-even Gbit/s, overlapped"] = raw["stored MB"] * 8e6 / r["decode s"] / 1e9
    print_table(rows, args.gbits, raw_bytes, kv.shape)
    save_results(args.json, rows)


def print_table(rows, gbits, raw_bytes, shape):
    from rich.console import Console
    from rich.table import Table

    cols = ["x vs fp16", "decode s", "load s uncapped"] + [f"load s {g:g} Gbit/s" for g in gbits]
    cols += ["break-even Gbit/s, sequential", "break-even Gbit/s, overlapped"]
    table = Table(
        title=f"loading {raw_bytes / 1e6:.1f} MB of fp16 KV ({shape[3]} tokens) from Redis over a capped link"
    )
    table.add_column("codec")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(r["codec"], *[f"{r[c]:.3g}" if c in r else "-" for c in cols])
    Console().print(table)


if __name__ == "__main__":
    main()
