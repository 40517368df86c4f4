"""Encode/decode speed of each KV codec, one core and all cores, against zstd and lz4 on the raw bytes.

    python bench/codec_speed.py [--kv FILE.safetensors] [--save-kv FILE.safetensors] [--device cpu|cuda]
                                [--calibration FILE.kvcal] [--tokens N] [--threads 1 2 16]

KV comes from the real model (a 2048-token prefill of stdlib text, stored as fp16) or from a file saved
earlier with --save-kv (how the GPU machine gets real KV without the model). Throughput is MB/s of fp16
KV, over 256-token chunks encoded with kvshelf's stored format (headers and checksums included).
"One core" runs chunks one after another; "N cores" runs them on a thread pool of N threads (torch at one
thread each) and `codec_workers` = N: calibrated cachegen's runs of layers on that many threads (its
compiled coder and torch release the GIL), the uncalibrated mode's entropy decoding in worker processes.
--threads picks the N (default: 1 and one per core); --tokens repeats the file's chunks at later
positions, as a longer prompt's would (enough chunks to keep many threads busy).
With --device cuda, decoding lands the KV on the GPU: raw and int8 bytes are copied over and the int8
dequantisation runs there; calibrated cachegen decodes entirely there (Triton rANS kernel, inverse
transform, RoPE), the uncalibrated mode entropy-decodes on the CPU and dequantises there. `cachegen` is the
calibrated codec (the model's calibration, or --calibration FILE where there is no model),
`cachegen:calibration=none` the uncalibrated one. --coders adds calibrated cachegen's entropy coders alone
on the same symbols: the rANS coder against the constriction coder it replaced.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from common import codec_from_spec, save_results
from rich.console import Console
from rich.table import Table

from kvshelf.codecs import calibration as calib
from kvshelf.codecs import pool as codec_pool
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.format import encode_chunk, open_chunk

CHUNK = 256


def real_kv(prefix: int) -> tuple[torch.Tensor, calib.Calibration]:
    import pydoc_data.topics

    from kvshelf.model.calibrate import calibration_for
    from kvshelf.model.loader import load_model

    lm = load_model(device="cpu")
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = lm.tokenizer(text)["input_ids"][:prefix]
    kv = lm.runner.new_kv(prefix)
    with torch.inference_mode():
        lm.runner.forward(ids, 0, kv)
    return kv.data.clone().to(torch.float16), calibration_for(lm.runner, lm.tokenizer)


def chunks_of(kv: torch.Tensor, tokens: int | None = None) -> list[StoredChunk]:
    out = []
    for s in range(0, tokens or kv.shape[3], CHUNK):
        at = s % kv.shape[3]  # beyond the file: its chunks again, at later positions
        piece = kv[:, :, :, at : at + CHUNK].contiguous()
        out.append(StoredChunk(ChunkMeta(b"\0" * 32, piece.shape[3], tuple(piece.shape), piece.dtype, s), piece))
    return out


def rate(nbytes: int, fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e6


def measure(spec: str, chunks: list[StoredChunk], nbytes: int, threads: int, device, cal) -> dict:
    processes = codec_pool.CodecProcesses(0 if threads == 1 else threads)  # codec_workers = threads
    codec = codec_from_spec(spec, cal, processes)
    keys = [i.to_bytes(16, "little") for i in range(len(chunks))]
    mode = "1 core" if threads == 1 else f"{threads} cores"
    torch.set_num_threads(1)  # parallelism comes from the thread pool (and codec workers), not from torch
    with ThreadPoolExecutor(threads) as pool:

        def encode():
            return list(pool.map(lambda kc: encode_chunk(kc[0], kc[1], codec), zip(keys, chunks, strict=True)))

        blobs = encode()

        def decode_one(kb):
            enc = open_chunk(kb[1], kb[0], codec)
            if device.type == "cpu":
                return enc.decode_all().kv
            return [enc.layer(i, device=device) for i in range(enc.num_layers)]

        def decode():
            list(pool.map(decode_one, zip(keys, blobs, strict=True)))
            if device.type == "cuda":
                torch.cuda.synchronize()

        out = {
            f"encode {mode}": rate(nbytes, encode),
            f"decode {mode}": rate(nbytes, decode),
            "ratio vs fp16": nbytes / sum(len(b) for b in blobs),
        }
        if device.type != "cpu":  # the device path must decode what the CPU path decodes
            on_device = torch.stack([layer.cpu() for layer in decode_one((keys[1], blobs[1]))])
            on_cpu = open_chunk(blobs[1], keys[1]).decode_all().kv
            out["max |device - cpu|"] = float((on_device.float() - on_cpu.float()).abs().max())
        processes.close()
        return out


def coders(kv: torch.Tensor, cal, cores: int) -> list[dict]:
    """Calibrated cachegen's entropy coders alone, on the same integer symbols of every chunk-layer: the
    rANS coder (numba; threads) against the constriction ANS coder it replaced (holds the GIL: one thread).
    MB/s of the fp16 KV the symbols stand for (numba's first-call cost: bench/gpu_decode.py)."""
    from kvshelf.codecs.cachegen import CacheGenCodec, _code_calibrated, _symbols_calibrated
    from kvshelf.codecs.entropy import decode_by_class, encode_by_class

    codec = CacheGenCodec(calibration=cal.digest)
    layers = kv.shape[0]
    symbols = []
    for s in range(0, kv.shape[3], CHUNK):
        piece = kv[:, :, :, s : s + CHUNK]
        symbols += [codec._calibrated_symbols(piece[i], i, s) for i in range(layers)]
    nbytes = sum(q.size for q in symbols) * 2
    shapes = [(2, *q.shape[1:]) for q in symbols]
    new = [_code_calibrated(q, codec.bits) for q in symbols]

    def old_encode(q):
        return b"".join(encode_by_class(q[0]) + encode_by_class(q[1]))

    def old_decode(blob, shape):
        buf = memoryview(blob)
        _, off = decode_by_class(buf, 0, *shape[1:])
        decode_by_class(buf, off, *shape[1:])

    old = [old_encode(q) for q in symbols]
    rows = [
        {
            "coder": "constriction ANS (coder 1)",
            "bytes": sum(map(len, old)),
            "encode 1 thread": rate(nbytes, lambda: [old_encode(q) for q in symbols]),
            "decode 1 thread": rate(nbytes, lambda: [old_decode(b, sh) for b, sh in zip(old, shapes, strict=True)]),
        }
    ]
    row = {"coder": "interleaved rANS (coder 2)", "bytes": sum(map(len, new))}
    for threads in sorted({1, cores}):
        with ThreadPoolExecutor(threads) as pool:
            row[f"encode {threads} thread{'s' * (threads > 1)}"] = rate(
                nbytes, lambda pool=pool: list(pool.map(lambda q: _code_calibrated(q, codec.bits), symbols))
            )
            row[f"decode {threads} thread{'s' * (threads > 1)}"] = rate(
                nbytes,
                lambda pool=pool: list(
                    pool.map(lambda bs: _symbols_calibrated(bs[0], bs[1], codec.bits), zip(new, shapes, strict=True))
                ),
            )
    rows.append(row)
    rows[1]["size vs coder 1"] = rows[1]["bytes"] / rows[0]["bytes"]
    for k in ("encode 1 thread", "decode 1 thread"):
        rows[1][f"{k} vs coder 1"] = rows[1][k] / rows[0][k]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", default=None)
    ap.add_argument("--save-kv", default=None)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--codecs", nargs="+", default=["none", "int8", "cachegen:calibration=none", "cachegen"])
    ap.add_argument("--calibration", default=None, help="a .kvcal file (default: the model's, made if needed)")
    ap.add_argument("--json", default="bench/results/codec_speed.json")
    ap.add_argument("--coders", action="store_true", help="also the entropy coders alone: rANS vs constriction")
    ap.add_argument("--tokens", type=int, default=None, help="tokens to code (the file's chunks repeated)")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1, cores)")
    args = ap.parse_args()
    cal = None
    if args.kv:
        from safetensors.torch import load_file

        kv = load_file(args.kv)["kv"]
    else:
        kv, cal = real_kv(args.prefix)
    if args.calibration:
        cal = calib.load(args.calibration)
    if args.save_kv:
        from safetensors.torch import save_file

        save_file({"kv": kv.contiguous()}, args.save_kv)
    chunks = chunks_of(kv, args.tokens)
    nbytes = sum(c.nbytes for c in chunks)
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    thread_counts = args.threads or sorted({1, cores})
    rows = []

    for spec in args.codecs:
        row = {"codec": spec}
        for threads in thread_counts:
            row.update(measure(spec, chunks, nbytes, threads, device, cal))
        rows.append(row)

    if args.coders and cal is not None:
        coder_rows = coders(kv, cal, cores)
        for r in coder_rows:
            console_line = ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in r.items())
            print(console_line)
        rows.extend(coder_rows)
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
    modes = ["1 core" if n == 1 else f"{n} cores" for n in thread_counts]
    cols = ["codec", "ratio vs fp16", *(f"{verb} {m}" for m in modes for verb in ("encode", "decode"))]
    tokens = len(chunks) * CHUNK
    table = Table(title=f"codec speed, MB/s of fp16 KV, {tokens} tokens x {kv.shape[0]} layers, decode to {device}")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        if "codec" not in r:
            continue
        table.add_row(*[r["codec"]] + [f"{r[c]:.1f}" if isinstance(r.get(c), float) else "-" for c in cols[1:]])
    console.print(table)
    for r in rows:
        if "max |device - cpu|" in r:
            console.print(f"{r['codec']}: max |{device} decode - cpu decode| = {r['max |device - cpu|']:.2e}")
    save_results(args.json, rows)


if __name__ == "__main__":
    main()
