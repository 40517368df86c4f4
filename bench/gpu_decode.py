"""Calibrated cachegen's rANS coder: GPU decoding (Triton) against the CPU decoder (numba), per layer.

    python bench/gpu_decode.py --kv kv.safetensors --calibration FILE.kvcal [--tokens 12288] [--json OUT]

KV: a file saved by `bench/codec_speed.py --save-kv` (the real model's fp16 KV) and the model's calibration.
Chunks of 256 tokens are coded at their positions; for --tokens beyond the file the chunks repeat (at
later positions), as a longer prompt's would. Reports, in MB/s (GB/s) of fp16 KV:
- CPU: encode and decode of whole chunks, 1 thread and one thread per core (numba and torch release the
  GIL), and numba's first-call cost (compiling, or loading its on-disk cache);
- GPU, per layer of all chunks: "end to end" = pinned host segment bytes -> the layer's KV [2, heads,
  tokens, dim] on the GPU (parse + copy + entropy kernel + escapes + inverse transform + RoPE); "kernel" =
  the entropy kernel alone on bytes already there;
- bit-exact symbols GPU vs CPU, max |KV GPU - KV CPU|;
- the same for a Llama-3-8B-shaped layer (8 KV heads x 128) with synthetic symbols of the real spreads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvshelf.codecs import calibration as calib
from kvshelf.codecs import rans, rans_gpu
from kvshelf.codecs.cachegen import CacheGenCodec, _code_calibrated, _symbols_calibrated

CHUNK = 256


def timed(fn, repeats: int = 5, sync: bool = False) -> float:
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_side(codec, kv, chunks, results, timing=True):
    layers = kv.shape[0]
    nbytes = kv[:, :, :, : len(chunks) * CHUNK].numel() * 2
    t = time.perf_counter()
    codec.encode_layer(kv[0, :, :, :CHUNK].contiguous(), 0, layers, 0)
    first_encode = time.perf_counter() - t
    segs = [[codec.encode_layer(c[i], i, layers, p) for i in range(layers)] for p, c in chunks]
    shape = tuple(chunks[0][1].shape[1:])
    t = time.perf_counter()
    codec.decode_layer(segs[0][0], shape, torch.float16, 0, layers, 0)
    first_decode = time.perf_counter() - t
    jobs = [(ci, i) for ci in range(len(chunks)) for i in range(layers)]

    def enc(job):
        ci, i = job
        p, c = chunks[ci]
        return codec.encode_layer(c[i], i, layers, p)

    def dec(job):
        ci, i = job
        return codec.decode_layer(segs[ci][i], shape, torch.float16, i, layers, chunks[ci][0])

    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    for threads in sorted({1, 2, cores}) if timing else ():
        with ThreadPoolExecutor(threads) as pool:
            results[f"cpu encode {threads} threads MB/s"] = nbytes / timed(lambda: list(pool.map(enc, jobs)), 3) / 1e6
            results[f"cpu decode {threads} threads MB/s"] = nbytes / timed(lambda: list(pool.map(dec, jobs)), 3) / 1e6
    results["numba first encode s"] = first_encode
    results["numba first decode s"] = first_decode
    results["ratio vs fp16"] = nbytes / sum(len(s) for c in segs for s in c)
    return segs, shape


def gpu_layer(codec, segs_of_layer, shape, layer, position, device):
    q = rans_gpu.decode_segments(segs_of_layer, shape, codec.bits, device)  # [n, 2, h, T, d]
    n, two, heads, tokens, dim = q.shape
    q = q.permute(1, 2, 0, 3, 4).reshape(two, heads, n * tokens, dim)  # consecutive chunks: the layer's tokens
    return codec._finish_calibrated(q, layer, position, device).to(torch.float16)


def gpu_side(codec, segs, shape, chunks, layers, device, results, label):
    n = len(segs)
    nbytes_layer = n * 2 * shape[1] * shape[2] * shape[3] * 2
    seg_list = [s[0] for s in segs]
    for i in range(min(2, layers)):  # compile, tables, transforms on the device
        gpu_layer(codec, [s[i] for s in segs], shape, i, chunks[0][0], device)
    per_layer = [
        timed(lambda i=i: gpu_layer(codec, [s[i] for s in segs], shape, i, 0, device), 5, True) for i in range(layers)
    ]
    results[f"{label} GPU end to end GB/s per layer"] = nbytes_layer / statistics.median(per_layer) / 1e9
    # the codec's batched entry point (what a layerwise loader calls per layer), and one chunk at a time
    positions = [p for p, _ in chunks]
    batched = [
        timed(
            lambda i=i: codec.decode_chunks_on(
                [s[i] for s in segs], shape, torch.float16, i, layers, device, positions
            ),
            3,
            True,
        )
        for i in range(layers)
    ]
    results[f"{label} decode_chunks_on GB/s per layer"] = nbytes_layer / statistics.median(batched) / 1e9
    single = timed(
        lambda: [
            codec.decode_layer_on(s[0], shape, torch.float16, 0, layers, device, p)
            for s, p in zip(segs, positions, strict=True)
        ],
        3,
        True,
    )
    results[f"{label} decode_layer_on chunk by chunk GB/s"] = nbytes_layer / single / 1e9

    # layers one after another without waiting for the GPU in between (as a layerwise loader can: the CPU
    # checks and stages layer i + 1 while the GPU decodes layer i); every layer's error flags checked at the end
    def pipelined():
        errs = []
        for i in range(layers):
            staged = rans_gpu.stage([s[i] for s in segs], shape, codec.bits, device)
            q, err = rans_gpu.run_staged(staged, check=False)
            n, two, heads, tokens, dim = q.shape
            q = q.permute(1, 2, 0, 3, 4).reshape(two, heads, n * tokens, dim)
            codec._finish_calibrated(q, i, 0, device).to(torch.float16)
            errs.append(err)
        assert not bool(torch.stack([e.any() for e in errs]).any())

    results[f"{label} GPU pipelined over layers GB/s"] = layers * nbytes_layer / timed(pipelined, 5, True) / 1e9
    stage_t = timed(lambda: rans_gpu.stage(seg_list, shape, codec.bits, device), 5, True)
    results[f"{label} CPU-side check+stage ms per layer"] = stage_t * 1e3
    # the kernel alone: bytes and descriptors already on the device
    staged = rans_gpu.stage(seg_list, shape, codec.bits, device)
    kernel = timed(lambda: rans_gpu.run_staged(staged), 10, True)
    results[f"{label} GPU entropy kernel GB/s"] = nbytes_layer / kernel / 1e9
    q = rans_gpu.run_staged(staged)
    fin = timed(lambda: codec._finish_calibrated(q[0], 0, 0, device).to(torch.float16), 10, True)
    results[f"{label} GPU transform+RoPE GB/s (one chunk)"] = 2 * shape[1] * shape[2] * shape[3] * 2 / fin / 1e9
    # exactness: symbols of every segment of layer 0 and 1, and the KV of one chunk
    for i in range(min(2, layers)):
        got = rans_gpu.decode_segments([s[i] for s in segs], shape, codec.bits, device).cpu().numpy()
        want = np.stack([_symbols_calibrated(s[i], shape, codec.bits) for s in segs])
        results.setdefault(f"{label} symbols bit-exact GPU vs CPU", True)
        results[f"{label} symbols bit-exact GPU vs CPU"] &= bool(np.array_equal(got, want))
    c, i = min(1, n - 1), min(3, layers - 1)
    on_gpu = codec.decode_layer_on(segs[c][i], shape, torch.float16, i, layers, device, chunks[c][0]).cpu()
    on_cpu = codec.decode_layer(segs[c][i], shape, torch.float16, i, layers, chunks[c][0])
    results[f"{label} max |KV GPU - KV CPU|"] = float((on_gpu.float() - on_cpu.float()).abs().max())
    results[f"{label} max |KV CPU|"] = float(on_cpu.float().abs().max())


def llama_like(real_classes: np.ndarray, chunks: int, device, results):
    """A Llama-3-8B layer (8 KV heads x 128 dims) of synthetic symbols whose row spreads follow the real KV's
    class histogram; calibration: identity transforms (the cost of the matmul is the same)."""
    heads, dim, layers = 8, 128, 1
    eye = torch.eye(dim).expand(layers, 2, heads, dim, dim).clone()
    cal = calib.Calibration(
        inv_freq=1e4 ** -(torch.arange(0, dim, 2).float() / dim)[None],
        mean=torch.zeros(layers, 2, heads, dim),
        forward=eye,
        inverse=eye.clone(),
        step=torch.full((layers, 2), 0.05),
        info={"bench": "llama-like"},
    )
    calib.register(cal)
    codec = CacheGenCodec(calibration=cal.digest)
    rng = np.random.default_rng(0)
    probs = np.bincount(real_classes, minlength=64) / len(real_classes)
    segs = []
    for _ in range(chunks):
        cls = rng.choice(64, size=(2, heads, 1, dim), p=probs)
        spread = 2.0 ** (cls / 4 - 3)
        q = np.round(rng.standard_normal((2, heads, CHUNK, dim)) * spread).astype(np.int32)
        segs.append([_code_calibrated(q, codec.bits)])
    shape = (2, heads, CHUNK, dim)
    gpu_side(codec, segs, shape, [(c * CHUNK, None) for c in range(chunks)], 1, device, results, "llama-3-8b shape")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--cpu-tokens", type=int, default=1024)
    ap.add_argument("--json", default=None)
    ap.add_argument("--symbols-per-lane", type=int, default=None, help="experiment: another rANS layout")
    ap.add_argument("--warps", type=int, default=None, help="experiment: warps per Triton program")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU speed runs (symbols still coded)")
    args = ap.parse_args()
    from safetensors.torch import load_file

    kv = load_file(args.kv)["kv"]
    if args.symbols_per_lane:
        rans.SYMBOLS_PER_LANE = args.symbols_per_lane
    if args.warps:
        rans_gpu._WARPS = args.warps
    cal = calib.load(args.calibration)
    codec = CacheGenCodec(calibration=cal.digest)
    layers, avail = kv.shape[0], kv.shape[3]
    chunks = [(s, kv[:, :, :, s : s + CHUNK].contiguous()) for s in range(0, min(args.cpu_tokens, avail), CHUNK)]
    results: dict = {"tables": rans.tables_digest(), "cores": os.cpu_count(), "layout": rans.layout(256, 256)}
    results["warps"] = rans_gpu._WARPS
    segs, shape = cpu_side(codec, kv, chunks, results, not args.no_cpu)
    print(json.dumps(results, indent=1), flush=True)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        results["gpu"] = torch.cuda.get_device_name()
        reps = max(1, args.tokens // (len(chunks) * CHUNK))
        all_segs = segs * reps
        all_chunks = [(i * CHUNK, None) for i in range(len(all_segs))]
        gpu_side(
            codec, all_segs, shape, all_chunks, layers, device, results, f"gemma3-270m {len(all_segs) * CHUNK} tok"
        )
        real_classes = np.concatenate(
            [
                rans.classes_of(q[k].transpose(0, 2, 1).reshape(-1, CHUNK))
                for s in segs
                for q in [_symbols_calibrated(s[i], shape, codec.bits) for i in range(layers)]
                for k in range(2)
            ]
        )
        print(json.dumps(results, indent=1), flush=True)
        llama_like(real_classes, args.tokens // CHUNK, device, results)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
