"""How fast each codec decodes on this host, measured once and kept (the guard and `kvshelf advise` use it).

A codec's decode speed decides where it pays: over a link of B bytes/s a codec of ratio r loads a byte of
KV in 1 / (r B) + 1 / D seconds (fetch, then decode at D bytes of KV per second), so the same codec wins on
a slow link and loses on a fast one, and D differs 100x between one CPU core and a GPU. D is measured here
on a chunk of the model's layout (random KV, 256 tokens; calibrated cachegen on the GPU through its batched
decoder when the KV lives there, on the CPU through the codec's own threads otherwise), kept per codec
(name and parameters), layout, device and core count in the kvshelf cache folder, and measured again after
MAX_AGE_S. Speeds are bytes of decoded KV (in the model's dtype) per second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time

import torch

from kvshelf.codecs.base import Codec
from kvshelf.paths import cache_root

log = logging.getLogger(__name__)

MAX_AGE_S = 7 * 24 * 3600.0
TOKENS = 256  # one chunk of the default chunk size
RUNS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decode(codec: Codec, layout: tuple[int, int, int], dtype: torch.dtype, device, runs: int = RUNS) -> float:
    """Bytes/s of KV that `codec` decodes here: the median of `runs` timed decodes of one chunk of `layout`
    (layers, kv_heads, head_dim) after a warm-up (numba compiling, Triton compiling, transforms uploaded)."""
    device = torch.device(device)
    layers, heads, dim = layout
    kv = torch.randn(layers, 2, heads, TOKENS, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    segments = codec.encode_layers(kv, 0)
    shape = (2, heads, TOKENS, dim)
    on_device = device.type != "cpu" and codec.decodes_on(device)

    def decode():
        if on_device:
            out, flag = codec.decode_run_on([[s] for s in segments], shape, dtype, range(layers), layers, device, 0)
            if flag is not None and bool(flag):
                raise RuntimeError(f"{codec.name} did not decode its own chunk")
        else:
            out = codec.decode_layers(segments, shape, dtype, list(range(layers)), layers, 0)
            if device.type != "cpu":
                out = [t.to(device) for t in out]
        _sync(device)
        return out

    decode()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        decode()
        times.append(time.perf_counter() - t)
    return kv.numel() * kv.element_size() / max(statistics.median(times), 1e-9)


def _path(codec: Codec, layout, dtype, device) -> os.PathLike:
    what = json.dumps([codec.name, codec.params(), list(layout), str(dtype)], sort_keys=True, default=str)
    tag = hashlib.blake2b(what.encode(), digest_size=8).hexdigest()
    return cache_root() / "cost" / f"decode-{codec.name}-{tag}-{torch.device(device)}-{os.cpu_count()}c.json"


def decode_speed(codec: Codec, layout: tuple[int, int, int], dtype: torch.dtype, device, *, use_saved: bool = True):
    """The codec's decode speed here (bytes/s of KV): from the kvshelf cache folder when measured there
    within MAX_AGE_S, else measured now (well under a second for a chunk) and saved."""
    path = _path(codec, layout, dtype, device)
    if use_saved and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if time.time() - float(saved["measured_at"]) <= MAX_AGE_S:
                return float(saved["bytes_per_s"])
        except (ValueError, KeyError, OSError, TypeError) as err:
            log.warning("ignoring unreadable decode speed file %s: %s", path, err)
    rate = measure_decode(codec, layout, dtype, device)
    log.info("%s decodes %.0f MB/s of KV here (%s)", codec.name, rate / 1e6, device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bytes_per_s": rate, "measured_at": time.time(), "codec": codec.name}))
        tmp.replace(path)
    except OSError as err:
        log.warning("could not save the decode speed to %s: %s", path, err)
    return rate


def link_load_s(nbytes: float, ratio: float, link_bytes_per_s: float, decode_bytes_per_s: float) -> float:
    """Seconds to load `nbytes` of KV stored `ratio` times smaller over a link: fetch, then decode."""
    return nbytes / ratio / link_bytes_per_s + nbytes / decode_bytes_per_s


def learn_tier_codecs(cost, tiers, layout: tuple[int, int, int], dtype: torch.dtype, device) -> None:
    """Tell `cost` (a CostModel) which codec each tier stores with and how fast each such codec decodes
    here. `tiers`: (tier name, its codec or None) pairs; tiers holding decoded tensors or raw bytes need
    no decode speed."""
    for name, codec in tiers:
        if codec is None or codec.raw_layout:
            continue
        cost.tier_codecs[name] = codec.name
        if codec.name not in cost.codec_bytes_per_s:
            cost.codec_bytes_per_s[codec.name] = decode_speed(codec, layout, dtype, device)
