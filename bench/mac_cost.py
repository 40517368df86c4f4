"""What authenticated objects (`remote_auth_key`, issue #15) cost on tier throughput.

    python bench/mac_cost.py [--iters 20] [--tokens 256] [--json bench/results/mac_cost.json]

For each byte tier (disk, Redis on loopback, S3 = moto on loopback) and codec (none, int8), puts and gets
of one chunk of the default model's shape (18 layers x K/V x 1 head x 256 tokens x 256 dims, fp32: 9.4 MB)
with and without a key, alternated call by call so machine noise hits both alike; medians. With a key an
object's head carries a keyed BLAKE3 MAC and its header BLAKE3 digests of the layer segments (xxh3-128
without a key: format version 3), checked before anything is decoded; keyed BLAKE3's own speed on one core
is printed, and HMAC-SHA256's (the usual choice, 5-9x slower here) for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import save_results  # noqa: E402
from services import RedisServer, S3Server, s3_env  # noqa: E402

from kvshelf.codecs import get_codec  # noqa: E402
from kvshelf.storage.auth import ObjectAuth  # noqa: E402
from kvshelf.storage.base import ChunkMeta, StoredChunk  # noqa: E402
from kvshelf.storage.disk import DiskBackend  # noqa: E402
from kvshelf.storage.expect import Expected, expecting  # noqa: E402
from kvshelf.storage.format import PREFIX_SIZE, encode_chunk, read_header, segment_digest  # noqa: E402
from kvshelf.storage.redis import RedisBackend  # noqa: E402
from kvshelf.storage.s3 import S3Backend  # noqa: E402

AUTH = ObjectAuth.from_secret("benchmark secret, 32 bytes long!")


def key(i: int) -> bytes:
    return i.to_bytes(4, "big") * 4


def alternated(fns: list, n: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for i in range(n):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn(i)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def mac_speed(nbytes: int) -> tuple[float, float]:
    """GB/s of keyed BLAKE3 (kvshelf's MAC) and of HMAC-SHA256 over one buffer on one core (median of 9)."""
    data = bytes(nbytes)
    ours = alternated([lambda i: AUTH.mac(b"k" * 16, data)], 9)[0]
    sha = alternated([lambda i: hmac.new(b"k" * 32, data, hashlib.sha256).digest()], 9)[0]
    return nbytes / ours / 1e9, nbytes / sha / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--json", default="bench/results/mac_cost.json")
    args = ap.parse_args()
    shape = (18, 2, 1, args.tokens, 256)
    kv = torch.randn(shape)
    fp = b"\0" * 32
    chunk = StoredChunk(ChunkMeta(fp, args.tokens, shape, kv.dtype), kv)
    expected = Expected(18, 1, 256, "float32", args.tokens, position=0, fingerprint=fp)
    s3_env()
    redis_server = RedisServer(Path(tempfile.mkdtemp()) / "redis").start()
    s3_server = S3Server().start()
    tmp = Path(tempfile.mkdtemp())
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket="bench")
    rows = []
    try:
        for codec_name in ("none", "int8"):
            codec = get_codec(codec_name)
            for tier in ("disk", "redis", "s3"):
                stores = []
                for auth in (None, AUTH):
                    tag = "mac" if auth else "plain"
                    if tier == "disk":
                        stores.append(DiskBackend(tmp / f"{codec_name}-{tag}", 8 << 30, codec, auth=auth))
                    elif tier == "redis":
                        stores.append(RedisBackend(redis_server.url, codec, prefix=f"{codec_name}{tag}:", auth=auth))
                    else:
                        url = f"s3://bench/{codec_name}{tag}?endpoint={s3_server.endpoint}"
                        stores.append(S3Backend.from_url(url, codec, auth=auth))
                puts = alternated([lambda i, s=s: s.put(key(i), chunk) for s in stores], args.iters)

                def get(i, s):
                    with expecting(expected):
                        assert s.get(key(i)) is not None

                gets = alternated([lambda i, s=s: get(i, s) for s in stores], args.iters)
                # What a key makes a put and a get compute (the head's MAC, BLAKE3 digests of the layer
                # segments), timed apart: far less noisy than the difference of two end-to-end medians on a
                # busy machine.
                blob = encode_chunk(key(0), chunk, codec, AUTH)
                header, start = read_header(blob)
                head, payload = blob[:28] + blob[PREFIX_SIZE:start], memoryview(blob)[start:]
                offsets = header["layer_offsets"]
                segments = [payload[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]

                def authenticate(i, h=head, segments=segments):
                    AUTH.mac(key(0), h)
                    for seg in segments:
                        segment_digest(seg, True)

                mac_s = alternated([authenticate], 30)[0]
                for op, (plain, mac) in (("put", puts), ("get", gets)):
                    rows.append(
                        {
                            "tier": tier,
                            "codec": codec_name,
                            "op": op,
                            "object_bytes": len(blob),
                            "plain_mb_s": chunk.nbytes / plain / 1e6,
                            "mac_mb_s": chunk.nbytes / mac / 1e6,
                            "cost_pct": 100 * (mac / plain - 1),
                            "mac_ms": mac_s * 1e3,
                            "mac_share_pct": 100 * mac_s / plain,
                        }
                    )
                for s in stores:
                    s.clear()
                    s.close()
    finally:
        redis_server.kill()
        s3_server.kill()
    speed, hmac_speed = mac_speed(chunk.nbytes)
    table = Table(
        title=f"MAC cost per tier ({chunk.nbytes / 1e6:.1f} MB chunk; MAC alone {speed:.1f} GB/s, "
        f"HMAC-SHA256 would be {hmac_speed:.1f} GB/s)"
    )
    for col in ("tier", "codec", "op", "plain MB/s", "with MAC MB/s", "end-to-end", "MAC alone", "MAC / op"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["tier"],
            r["codec"],
            r["op"],
            f"{r['plain_mb_s']:.0f}",
            f"{r['mac_mb_s']:.0f}",
            f"{r['cost_pct']:+.1f}%",
            f"{r['mac_ms']:.2f} ms",
            f"{r['mac_share_pct']:.1f}%",
        )
    Console().print(table)
    save_results(
        args.json, {"mac_gb_s": speed, "hmac_sha256_gb_s": hmac_speed, "chunk_bytes": chunk.nbytes, "rows": rows}
    )


if __name__ == "__main__":
    main()
