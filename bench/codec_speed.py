"""Encode/decode speed of each KV codec, one core and all cores, against zstd and lz4 on the raw bytes.

    python bench/codec_speed.py [--kv FILE.safetensors] [--save-kv FILE.safetensors] [--device cpu|cuda]

KV comes from the real model (a 2048-token prefill of stdlib text, stored as fp16) or from a file saved
earlier with --save-kv (how the GPU machine gets real KV without the model). Throughput is MB/s of fp16
KV, over 256-token chunks encoded with kvshelf's stored format (headers and checksums included).
"One core" runs chunks one after another with one torch thread; "all cores" runs them on a thread pool,
with cachegen's entropy coding in one worker process per core (`codec_workers`; its coder holds the GIL).
With --device cuda, decoding lands the KV on the GPU: raw and int8 bytes are copied over and the int8
dequantisation runs there; cachegen's entropy decoding runs on the CPU and its dequantisation on the GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from common import save_results
from rich.console import Console
from rich.table import Table

from kvshelf.codecs import get_codec
from kvshelf.codecs import pool as codec_pool
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.format import encode_chunk, open_chunk

CHUNK = 256


def real_kv(prefix: int) -> torch.Tensor:
    import pydoc_data.topics

    from kvshelf.model.loader import load_model

    lm = load_model(device="cpu")
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = lm.tokenizer(text)["input_ids"][:prefix]
    kv = lm.runner.new_kv(prefix)
    with torch.inference_mode():
        lm.runner.forward(ids, 0, kv)
    return kv.data.clone().to(torch.float16)


def chunks_of(kv: torch.Tensor) -> list[StoredChunk]:
    out = []
    for s in range(0, kv.shape[3], CHUNK):
        piece = kv[:, :, :, s : s + CHUNK].contiguous()
        out.append(StoredChunk(ChunkMeta(b"\0" * 32, piece.shape[3], tuple(piece.shape), piece.dtype), piece))
    return out


def rate(nbytes: int, fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e6


def measure(spec: str, chunks: list[StoredChunk], nbytes: int, threads: int, device, cores: int) -> dict:
    codec = get_codec(spec)
    keys = [i.to_bytes(16, "little") for i in range(len(chunks))]
    mode = "1 core" if threads == 1 else f"{cores} cores"
    torch.set_num_threads(1 if threads == 1 else cores)
    codec_pool.configure(0 if threads == 1 else cores)  # cachegen's coder in `cores` worker processes
    with ThreadPoolExecutor(threads) as pool:

        def encode():
            return list(pool.map(lambda kc: encode_chunk(kc[0], kc[1], codec), zip(keys, chunks, strict=True)))

        blobs = encode()

        def decode_one(kb):
            enc = open_chunk(kb[1], kb[0])
            if device.type == "cpu":
                return enc.decode_all().kv
            return [enc.layer(i, device=device) for i in range(enc.num_layers)]

        def decode():
            list(pool.map(decode_one, zip(keys, blobs, strict=True)))
            if device.type == "cuda":
                torch.cuda.synchronize()

        return {
            f"encode {mode}": rate(nbytes, encode),
            f"decode {mode}": rate(nbytes, decode),
            "ratio vs fp16": nbytes / sum(len(b) for b in blobs),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", default=None)
    ap.add_argument("--save-kv", default=None)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--codecs", nargs="+", default=["none", "int8", "cachegen"])
    ap.add_argument("--json", default="bench/results/codec_speed.json")
    args = ap.parse_args()
    if args.kv:
        from safetensors.torch import load_file

        kv = load_file(args.kv)["kv"]
    else:
        kv = real_kv(args.prefix)
    if args.save_kv:
        from safetensors.torch import save_file

        save_file({"kv": kv.contiguous()}, args.save_kv)
    chunks = chunks_of(kv)
    nbytes = sum(c.nbytes for c in chunks)
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    rows = []

    for spec in args.codecs:
        row = {"codec": spec}
        for threads in (1, cores):
            row.update(measure(spec, chunks, nbytes, threads, device, cores))
        rows.append(row)

    raw = [c.kv.numpy().tobytes() for c in chunks]
    try:
        import lz4.frame
        import zstandard

        for name, comp, decomp in (
            ("zstd-3 (raw bytes)", zstandard.ZstdCompressor(level=3).compress, zstandard.ZstdDecompressor().decompress),
            ("lz4 (raw bytes)", lz4.frame.compress, lz4.frame.decompress),
        ):
            packed = [comp(b) for b in raw]
            rows.append(
                {
                    "codec": name,
                    "encode 1 core": rate(nbytes, lambda comp=comp: [comp(b) for b in raw]),
                    "decode 1 core": rate(nbytes, lambda decomp=decomp, packed=packed: [decomp(b) for b in packed]),
                    "ratio vs fp16": nbytes / sum(len(p) for p in packed),
                }
            )
    except ImportError:
        pass
    console = Console()
    cols = [
        "codec",
        "ratio vs fp16",
        "encode 1 core",
        "decode 1 core",
        f"encode {cores} cores",
        f"decode {cores} cores",
    ]
    table = Table(
        title=f"codec speed, MB/s of fp16 KV, {kv.shape[3]} tokens x {kv.shape[0]} layers, decode to {device}"
    )
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[r["codec"]] + [f"{r[c]:.1f}" if isinstance(r.get(c), float) else "-" for c in cols[1:]])
    console.print(table)
    save_results(args.json, rows)


if __name__ == "__main__":
    main()
