"""Put/get throughput of each tier against the raw ceiling of the same medium, measured in one run.

    python bench/tiers.py [--iters 20] [--tokens 256] [--json bench/results/tiers.json]

Values are chunk-sized KV of the default model's shape (18 layers x K/V x 1 head x 256 tokens x 256 dims,
fp32: 9.4 MB). Ceilings move the same bytes with no kvshelf code: a memcpy for the CPU tier, a plain file
write/read for disk, redis-py SET/GET for Redis, boto3 put_object/get_object for S3 (moto on loopback).
Services are started by the benchmark on loopback ports (needs Debian's redis-server and moto[server]).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import save_results  # noqa: E402
from services import RedisServer, S3Server, s3_env  # noqa: E402

from kvshelf.codecs import get_codec  # noqa: E402
from kvshelf.storage.base import ChunkMeta, StoredChunk  # noqa: E402
from kvshelf.storage.disk import DiskBackend  # noqa: E402
from kvshelf.storage.format import encode_chunk  # noqa: E402
from kvshelf.storage.memory import MemoryBackend  # noqa: E402
from kvshelf.storage.redis import RedisBackend  # noqa: E402
from kvshelf.storage.s3 import S3Backend  # noqa: E402


def timed_pair(ours, ceiling, n: int) -> tuple[float, float]:
    """Median seconds of n calls of each, alternated call by call so machine noise hits both alike."""
    a, b = [], []
    for i in range(n):
        for fn, times in ((ours, a), (ceiling, b)):
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def key(i: int) -> bytes:
    return i.to_bytes(4, "big") * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--json", default="bench/results/tiers.json")
    args = ap.parse_args()
    n = args.iters
    shape = (18, 2, 1, args.tokens, 256)
    kv = torch.randn(shape)
    chunk = StoredChunk(ChunkMeta(b"\0" * 32, args.tokens, shape, kv.dtype), kv)
    nbytes = chunk.nbytes
    raw = get_codec("none")
    blob = encode_chunk(key(0), chunk, raw)
    rows = []

    def add(tier, op, pair, codec="none"):
        ours, ceiling = pair
        rows.append(
            {
                "tier": tier,
                "op": op,
                "codec": codec,
                "mb_s": nbytes / ours / 1e6,
                "ceiling_mb_s": nbytes / ceiling / 1e6 if ceiling else None,
                "ratio": ceiling / ours if ceiling else None,
            }
        )

    work = Path(tempfile.mkdtemp(prefix="kvshelf-bench-"))
    redis_server = RedisServer(work / "redis").start()
    s3_env()
    s3_server = S3Server().start()
    console = Console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("tiers", total=5)

        # CPU: storing a chunk is a copy into new host memory that stays alive, loading one is a copy into
        # the KV buffer. The ceilings do exactly those copies with no tier around them.
        mem = MemoryBackend(4 * n * nbytes)
        dest = torch.empty(shape)
        kept, sources = [], [torch.randn(shape) for _ in range(n)]

        def mem_put(i):
            host = torch.empty(shape)
            host.copy_(kv)
            mem.put(key(i), StoredChunk(chunk.meta, host))

        def copy_kept(i):
            host = torch.empty(shape)
            host.copy_(kv)
            kept.append(host)

        add("cpu", "put", timed_pair(mem_put, copy_kept, n))
        add("cpu", "get", timed_pair(lambda i: dest.copy_(mem.get(key(i)).kv), lambda i: dest.copy_(sources[i]), n))
        del kept[:], sources[:]
        progress.advance(task)

        # Disk, same filesystem for both.
        plain = work / "plain"
        plain.mkdir()

        def file_write(i):
            with open(plain / f"{i}.bin", "wb", buffering=0) as f:
                f.write(blob)

        def file_read(i):
            with open(plain / f"{i}.bin", "rb", buffering=0) as f:
                f.read()

        def evict(path: Path) -> None:
            """Push a file out of the page cache so the next read comes from the device."""
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

        def cold(read, path_of):
            def run(i):
                evict(path_of(i))
                read(i)

            return run

        for codec in ("none", "int8"):
            disk = DiskBackend(work / f"disk-{codec}", 64 * nbytes, get_codec(codec))

            add("disk", "put", timed_pair(lambda i, d=disk: d.put(key(i), chunk), file_write, n), codec)
            add("disk", "get", timed_pair(lambda i, d=disk: d.get(key(i)), file_read, n), codec)
            add(
                "disk (uncached)",
                "get",
                timed_pair(
                    cold(lambda i, d=disk: d.get(key(i)), lambda i, d=disk: d._path(key(i).hex())),
                    cold(file_read, lambda i: plain / f"{i}.bin"),
                    n,
                ),
                codec,
            )
        progress.advance(task)

        # Redis: same server, same client library.
        client = redis_server.client()
        for codec in ("none", "int8"):
            red = RedisBackend(redis_server.url, get_codec(codec), prefix=f"b{codec}:")
            add(
                "redis",
                "put",
                timed_pair(lambda i, r=red: r.put(key(i), chunk), lambda i: client.set(f"plain:{i}", blob), n),
                codec,
            )
            add(
                "redis",
                "get",
                timed_pair(lambda i, r=red: r.get(key(i)), lambda i: client.get(f"plain:{i}"), n),
                codec,
            )
            red.close()
        progress.advance(task)

        # S3 (moto on loopback).
        import boto3

        s3c = boto3.client("s3", endpoint_url=s3_server.endpoint)
        s3c.create_bucket(Bucket="bench")
        for codec in ("none", "int8"):
            s3 = S3Backend.from_url(f"s3://bench/{codec}?endpoint={s3_server.endpoint}", get_codec(codec))
            add(
                "s3",
                "put",
                timed_pair(
                    lambda i, s=s3: s.put(key(i), chunk),
                    lambda i: s3c.put_object(Bucket="bench", Key=f"plain/{i}", Body=blob),
                    n,
                ),
                codec,
            )
            add(
                "s3",
                "get",
                timed_pair(
                    lambda i, s=s3: s.get(key(i)),
                    lambda i: s3c.get_object(Bucket="bench", Key=f"plain/{i}")["Body"].read(),
                    n,
                ),
                codec,
            )
            s3.close()
        progress.advance(task)

    redis_server.kill()
    s3_server.kill()
    table = Table(title=f"tier throughput, {nbytes / 1e6:.1f} MB fp32 chunks, median of {n}")
    for col in ["tier", "op", "codec", "kvshelf MB/s", "raw ceiling MB/s", "kvshelf / ceiling"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["tier"], r["op"], r["codec"], f"{r['mb_s']:.0f}", f"{r['ceiling_mb_s']:.0f}", f"{r['ratio'] * 100:.0f}%"
        )
    console.print(table)
    console.print("MB/s count the uncompressed fp32 KV bytes moved; int8 rows move ~4x fewer bytes per chunk.")
    save_results(args.json, rows)


if __name__ == "__main__":
    main()
