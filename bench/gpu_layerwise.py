"""Layerwise loading of a cachegen tier decoded on the GPU: per-layer end-to-end throughput.

    python bench/gpu_layerwise.py --kv kv.safetensors --calibration FILE.kvcal [--tokens 12288] [--json OUT]

KV: a file saved by `bench/codec_speed.py --save-kv` (Gemma 3 270M's real fp16 KV) and its calibration;
for --tokens beyond the file the KV repeats at later positions, as a longer prompt's would. The prompt's
256-token chunks are encoded as stored objects (kvshelf's format, calibrated cachegen) and opened as a tier
would (verified, not decoded). Then, from those bytes in host memory to the fp16 KV buffer on the GPU:
- group: LayerwiseRetrieval.device_decoding's decode of layers i..i+g-1 of every chunk (checks, pinned
  staging, one copy, one rANS kernel, one inverse transform + RoPE) written into the KV buffer, the error
  flag read back (synchronised): GB/s of fp16 KV per layer, for groups of g layers;
- streamed: the path of chunks streamed from a tier (heads known, then each group of layers' byte range of
  every chunk staged, its segments checked and decoded as that group is asked for);
- loader: the LayerwiseLoader (its thread, its stream, groups of half its buffer, error flags checked one
  group behind; plan: chunks opened already, streamed: ranges cut group by group as a tier would read them)
  with a model that needs no time: from the host bytes to all layers in, GB/s of fp16 KV per layer;
- exactness: the loaded KV against the CPU decoder's (max |difference|), symbols GPU vs CPU (bit-exact).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import numpy as np
import torch

from kvshelf.cache.device_decode import DeviceDecoding
from kvshelf.cache.engine import EngineStats, LayerwiseRetrieval
from kvshelf.cache.keys import ChunkKey
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import pool as codec_pool
from kvshelf.codecs import rans_gpu
from kvshelf.codecs.base import SegmentRows
from kvshelf.codecs.cachegen import CacheGenCodec, _symbols_calibrated
from kvshelf.kvmath.rope import shift_keys
from kvshelf.layerwise.loader import LayerwiseLoader
from kvshelf.layerwise.stats import LayerwiseStats
from kvshelf.model.kv_buffer import KVBuffer
from kvshelf.storage.base import ChunkMeta, OpenedRanges, StoredChunk
from kvshelf.storage.format import encode_chunk, open_chunk

CHUNK = 256


def opened_chunks(kv: torch.Tensor, tokens: int, codec, inv_freq: torch.Tensor) -> tuple[list, int]:
    """(ChunkKey, EncodedChunk) pairs of a `tokens`-token prompt, and the stored bytes. Beyond the file the KV
    repeats with its keys moved to their new positions (RoPE), as the same text later in a prompt would be."""
    layers, _, heads, avail, dim = kv.shape
    out, stored = [], 0
    for c, s in enumerate(range(0, tokens, CHUNK)):
        src = (s % avail) // CHUNK * CHUNK
        piece = kv[:, :, :, src : src + CHUNK].clone()
        if s != src:
            for i in range(layers):
                piece[i, 0] = shift_keys(piece[i, 0].float(), inv_freq[i], s - src).to(piece.dtype)
        key = c.to_bytes(16, "little")
        blob = encode_chunk(
            key, StoredChunk(ChunkMeta(b"\0" * 32, CHUNK, tuple(piece.shape), piece.dtype, s), piece), codec
        )
        stored += len(blob)
        out.append((ChunkKey(key, s, s + CHUNK), open_chunk(blob, key, codec)))
    return out, stored


def sync():
    torch.cuda.synchronize()


def measure(kv, cal, tokens, device, results, label, repeats=5):
    codec = CacheGenCodec(calibration=cal.digest, processes=codec_pool.CodecProcesses(os.cpu_count() or 1))
    t = time.perf_counter()
    chunks, stored = opened_chunks(kv, tokens, codec, cal.inv_freq)
    results[f"{label} encode s (CPU, {os.cpu_count()} threads)"] = time.perf_counter() - t
    layers, _, heads, _, dim = kv.shape
    layer_bytes = 2 * heads * tokens * dim * 2  # fp16 KV of one layer
    results[f"{label} x vs fp16"] = layers * layer_bytes / stored
    retrieval = LayerwiseRetrieval(chunks, layers, threading.Lock(), EngineStats())
    plan = retrieval.device_decoding(device)
    assert plan is not None and len(plan.runs) == 1, "not decodable on the GPU in one run"
    buf = KVBuffer(layers, heads, dim, tokens, dtype=torch.float16, device=device)

    def group(i, j):
        parts, flag = plan.decode(i, j)
        for start, _end, part in parts:
            buf.write_layers(i, j, start, part, non_blocking=True)
        return flag

    for g in (1, 2, 4, 8):
        group(0, g)  # compile, upload transforms
        times = []
        for _ in range(repeats):
            # end to end: every layer decoded g at a time from the host bytes (checks, pinned staging, copy,
            # kernel, transform, RoPE), each group's flag read back (a wait for the GPU) before the next group
            sync()
            t = time.perf_counter()
            for i in range(0, layers, g):
                flag = group(i, min(i + g, layers))
                assert flag is None or not bool(flag)
            sync()
            times.append((time.perf_counter() - t) / layers)
        results[f"{label} group of {g} layers: GB/s per layer"] = layer_bytes / statistics.median(times) / 1e9

    # The streamed path (chunks as a tier streams them: heads first, then each group's ranges,
    # segments checked group by group as they decode): staging every chunk, then decoding every layer.
    def streamed():
        """A streamed plan over the chunks' bytes in memory: heads known, each layer group's ranges cut as read."""
        heads = [OpenedRanges(r.meta, *r.encoded_payload()) for _, r in chunks]
        return DeviceDecoding(
            plan.runs, device, None, lambda: (h for h in heads), lambda calls: (f(*a) for f, a in calls)
        )

    t_stage, t_dec = [], []
    for _ in range(repeats + 1):
        sp = streamed()
        sync()
        t = time.perf_counter()
        sp.open([(i, min(i + 8, layers)) for i in range(0, layers, 8)])
        sync()
        t_stage.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, layers, 8):
            parts, flag = sp.decode(i, min(i + 8, layers))
            for start, _end, part in parts:
                buf.write_layers(i, min(i + 8, layers), start, part, non_blocking=True)
            assert not bool(flag)
        sync()
        t_dec.append(time.perf_counter() - t)
        sp.release()  # its staging buffers back to the pool
    t_stage, t_dec = t_stage[1:], t_dec[1:]  # the first: compilation
    results[f"{label} streamed: heads (open): ms"] = 1e3 * statistics.median(t_stage)
    results[f"{label} streamed: ranges staged, checked and decoded, groups of 8: GB/s per layer"] = (
        layers * layer_bytes / statistics.median(t_dec) / 1e9
    )
    # the two sides of a group of 8 layers apart: the CPU's (checks, copy into pinned memory, the copy to the
    # GPU queued) and the GPU's from staged bytes (rANS kernel, escapes, transform, RoPE, write, flag read)
    segs = [[r.encoded_layer(k)[1] for _, r in chunks] for k in range(8)]
    shape = (2, heads, CHUNK, dim)

    fuses = rans_gpu.fuses(dim, torch.float16)

    def finish(q, n, fused=fuses):
        """Symbols [n * chunks, 2, heads, CHUNK, dim] (chunk-major) of layers 0..n-1 -> fp16 KV, as the codec's
        GPU path does (fused: one kernel; else the torch reference through float32)."""
        if fused:
            scaled, mean = cal.decode_transform(codec.bits, device)
            return rans_gpu.finish(q, n, scaled, mean, cal.tensors_on(device)["inv_freq"], list(range(n)), 0,
                                   torch.float16)  # fmt: skip
        q = q.view(n, len(chunks), 2, heads, CHUNK, dim).permute(0, 2, 3, 1, 4, 5).reshape(n, 2, heads, tokens, dim)
        return codec._finish_layers(q, list(range(n)), 0, device).half()

    # the fused kernel against the torch reference on the same symbols (float tolerance: fp16 rounding)
    q, _ = rans_gpu.run_staged(rans_gpu.stage([s for row in segs for s in row], shape, codec.bits, device), False)
    ref = finish(q, 8, fused=False).float()
    diff = float((finish(q, 8).float() - ref).abs().max()) if fuses else 0.0
    results[f"{label} fused finish vs torch reference: max |difference|"] = diff
    results[f"{label} fused finish vs torch reference: max |KV|"] = float(ref.abs().max())
    t_stage, t_gpu = [], []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        staged = rans_gpu.stage([s for row in segs for s in row], shape, codec.bits, device)
        t_stage.append(time.perf_counter() - t)
        sync()
        t = time.perf_counter()
        q, err = rans_gpu.run_staged(staged, check=False)
        buf.data[0:8].copy_(finish(q, 8))
        assert not bool(err.any())
        t_gpu.append(time.perf_counter() - t)
    results[f"{label} 8 layers: CPU side (check + pinned copy) GB/s per layer"] = (
        8 * layer_bytes / statistics.median(t_stage) / 1e9
    )
    t_spans = []  # the same, each chunk's 8 layers copied as one span (what the loader's plan stages)
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        rows = SegmentRows.of([r.encoded_payload()[1:] for _, r in chunks], 0, 8)
        rans_gpu.stage_spans(rows.spans, rows.offsets, shape, codec.bits, device)
        t_spans.append(time.perf_counter() - t)
    results[f"{label} 8 layers: CPU side, one span per chunk GB/s per layer"] = (
        8 * layer_bytes / statistics.median(t_spans) / 1e9
    )
    results[f"{label} 8 layers: GPU side from staged bytes GB/s per layer"] = (
        8 * layer_bytes / statistics.median(t_gpu) / 1e9
    )
    for size, how in ((1, "plan"), (4, "plan"), (8, "plan"), (16, "plan"), (4, "streamed"), (8, "streamed")):
        times = []
        for _ in range(repeats):
            buf.data.zero_()
            sync()
            t = time.perf_counter()
            loader = LayerwiseLoader(
                retrieval,
                buf,
                buffer_size=size,
                stats=LayerwiseStats(layers),
                decoding=plan if how == "plan" else streamed(),
            )
            for i in range(layers):
                loader.wait(i)
            sync()
            times.append(time.perf_counter() - t)
            loader.close()
            assert loader.error is None, loader.error
        name = f"{label} loader ({how}), buffer_size {size}"
        results[f"{name}: GB/s per layer"] = layers * layer_bytes / statistics.median(times) / 1e9
        results[f"{name}: ms all layers"] = 1e3 * statistics.median(times)
    # exactness: the loaded KV against the CPU decoder, chunks 0, 1 and the last; symbols of layer 0 and 5
    worst, top = 0.0, 0.0
    for c in (0, 1, len(chunks) - 1):
        key, reader = chunks[c]
        cpu = torch.stack([reader.layer(i) for i in range(layers)]).float()
        gpu = buf.data[:, :, :, key.start : key.end].float().cpu()
        worst, top = max(worst, float((gpu - cpu).abs().max())), max(top, float(cpu.abs().max()))
    results[f"{label} max |KV GPU - KV CPU|"] = worst
    results[f"{label} max |KV|"] = top
    shape = (2, heads, CHUNK, dim)
    exact = True
    for i in (0, min(5, layers - 1)):
        segs = [r.encoded_layer(i)[1] for _, r in chunks]
        got = rans_gpu.decode_segments(segs, shape, codec.bits, device).cpu().numpy()
        exact &= bool(np.array_equal(got, np.stack([_symbols_calibrated(s, shape, codec.bits) for s in segs])))
    results[f"{label} symbols bit-exact GPU vs CPU"] = exact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[12288])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from safetensors.torch import load_file

    kv = load_file(args.kv)["kv"]
    cal = calib.load(args.calibration)
    calib.register(cal)
    device = torch.device("cuda")
    results: dict = {"gpu": torch.cuda.get_device_name(), "cores": os.cpu_count()}
    for tokens in args.tokens:
        measure(kv, cal, tokens, device, results, f"gemma3-270m {tokens} tok")
        print(json.dumps(results, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
