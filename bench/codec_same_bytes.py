"""Calibrated cachegen's CPU codec in two checkouts: every stored segment byte for byte and the decoded KV bit for
bit (a change to the coder must not change the format). Run once per checkout, then compare:

    PYTHONPATH=<main>:<main>/bench python bench/codec_same_bytes.py dump --kv KV --calibration CAL --out main.npz
    PYTHONPATH=<this>:<this>/bench python bench/codec_same_bytes.py dump --kv KV --calibration CAL --out this.npz
    python bench/codec_same_bytes.py compare main.npz this.npz

`dump` encodes the chunks of `--tokens` tokens of the KV file (codec_speed.chunks_of: later chunks repeat the
file's at later positions) with 0, 3 and 16 codec workers, fp16 / bf16 / fp32 input (one strided input), and
decodes the fp16 ones to float32, float16 and bfloat16 (each output dtype's own cast), and through the stored
format (encode_chunk, open_chunk, decode_all). `compare` exits non-zero on any difference.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def dump(args) -> None:
    from codec_speed import chunks_of
    from safetensors.torch import load_file

    from kvshelf.codecs import calibration as calib
    from kvshelf.codecs import pool
    from kvshelf.codecs.cachegen import CacheGenCodec
    from kvshelf.storage.format import encode_chunk, open_chunk

    torch.set_num_threads(1)
    cal = calib.load(args.calibration)
    chunks = chunks_of(load_file(args.kv)["kv"], args.tokens)
    segs, names, kvs = [], [], []
    for workers in (0, 3, 16):
        processes = pool.CodecProcesses(workers)
        codec = CacheGenCodec(calibration=cal, processes=processes)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for i, c in enumerate(chunks):
                kv = c.kv.to(dtype)
                if workers == 3 and i == 0:
                    kv = kv.transpose(3, 4).contiguous().transpose(3, 4)  # a strided input
                got = codec.encode_layers(kv, c.meta.position)
                segs += got
                names += [f"workers {workers} {dtype} chunk {i} layer {k}" for k in range(len(got))]
                if dtype == torch.float16:
                    n, two, heads, tokens, dim = kv.shape
                    shape = (two, heads, tokens, dim)
                    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):  # each output's own cast
                        out = codec.decode_layers(got, shape, out_dtype, list(range(n)), n, c.meta.position)
                        kvs.append(torch.stack(list(out)).reshape(-1).view(torch.uint8).numpy())
                    key = i.to_bytes(16, "little")  # and through the stored format (a chunk's payload)
                    back = open_chunk(encode_chunk(key, c, codec), key, codec).decode_all().kv
                    kvs.append(back.reshape(-1).view(torch.uint8).numpy())
        processes.close()
    np.savez(args.out, data=np.frombuffer(b"".join(segs), np.uint8), lens=np.array([len(s) for s in segs]),
             names=np.array(names), kv=np.concatenate(kvs))  # fmt: skip
    print(f"{args.out}: {len(segs)} segments, {sum(len(s) for s in segs)} bytes")


def compare(args) -> int:
    a, b = np.load(args.a), np.load(args.b)
    if list(a["names"]) != list(b["names"]) or not np.array_equal(a["lens"], b["lens"]):
        print("segment lists or sizes differ")
        return 1
    ends = np.cumsum(a["lens"])
    bad = [a["names"][k] for k, (s, e) in enumerate(zip([0, *ends[:-1]], ends, strict=True))
           if not np.array_equal(a["data"][s:e], b["data"][s:e])]  # fmt: skip
    same_kv = np.array_equal(a["kv"], b["kv"])
    print(f"{len(a['lens'])} segments, {a['lens'].sum()} bytes: {len(bad)} differ {bad[:5]}")
    print(f"decoded KV (float32, float16, bfloat16 outputs) bit-identical: {same_kv}")
    return 1 if bad or not same_kv else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--kv", required=True)
    d.add_argument("--calibration", required=True)
    d.add_argument("--tokens", type=int, default=1024)
    d.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
