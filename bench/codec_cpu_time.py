"""Calibrated cachegen through the stored format on one thread, by CPU time (robust to a loaded machine).

    python bench/codec_cpu_time.py --kv kv.safetensors --calibration FILE.kvcal [--tokens 2048] [--label NAME]

Encodes every 256-token chunk with kvshelf's stored format (headers and checksums included) and decodes it
back (open_chunk + decode_all), torch at one thread, no codec workers; prints MB/s of fp16 KV by
`time.process_time` (best of 5) and by wall time (median of 5). Run it with PYTHONPATH pointing at two
checkouts to compare them in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from codec_speed import chunks_of
from safetensors.torch import load_file

from kvshelf.codecs import calibration as calib
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.storage.format import encode_chunk, open_chunk


def rates(nbytes: int, fn, repeats: int = 5) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return nbytes / min(cpu) / 1e6, nbytes / statistics.median(wall) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    codec = CacheGenCodec(calibration=calib.load(args.calibration))
    chunks = chunks_of(load_file(args.kv)["kv"], args.tokens)
    nbytes = sum(c.nbytes for c in chunks)
    keys = [i.to_bytes(16, "little") for i in range(len(chunks))]
    blobs = [encode_chunk(k, c, codec) for k, c in zip(keys, chunks, strict=True)]
    [open_chunk(b, k, codec).decode_all() for k, b in zip(keys, blobs, strict=True)]  # compiled, warm
    enc = rates(nbytes, lambda: [encode_chunk(k, c, codec) for k, c in zip(keys, chunks, strict=True)])
    dec = rates(nbytes, lambda: [open_chunk(b, k, codec).decode_all() for k, b in zip(keys, blobs, strict=True)])
    print(
        f"{args.label:8s} encode {enc[0]:6.1f} MB/s cpu ({enc[1]:6.1f} wall)  decode {dec[0]:6.1f} MB/s cpu"
        f" ({dec[1]:6.1f} wall)  x{nbytes / sum(map(len, blobs)):.2f} vs fp16"
    )


if __name__ == "__main__":
    main()
