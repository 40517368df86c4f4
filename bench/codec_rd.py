"""Rate against distortion of calibrated cachegen's quantiser, offline (issue #17, deliverable 3): no model
forward, only the coder on real KV.

    python bench/codec_rd.py --kv KV.safetensors --calibration FILE.kvcal [--json OUT]
    python bench/codec_rd.py --genres 1024 --calibration FILE.kvcal      # the model's KV of the six held-out genres

KV: a file of the real model's KV [layers, 2, heads, tokens, dim] (bench/codec_speed.py --save-kv), or the model's
KV of the first tokens of each of bench/codec_quality.py's held-out genre texts (one prefill each), coded in
256-token chunks as the codec does (K rotated back before RoPE, the calibration's transforms, one step per
(layer, K|V)). Rate: the bytes the rANS coder really writes (classes, counts, states, words, escapes, the
segment header). Distortion: the squared error of the coefficients in units of each (layer, K|V)'s step at
level 5, summed over every coefficient. The calibration weights each coefficient by what its error costs and
sets each layer's step so that every layer adds the same KL for the same error in step units, so this sum is
the KL the calibration predicts (up to a constant), whatever the layer.

Variants, each swept over a global step factor so that they compare at equal size:
- `mid`: symbols = round(coefficient / step), reconstructed at the bin centre (the codec);
- `centroid`: the same symbols, reconstructed at the centroid of the bin under a Laplace density of the row
  class's spread (CENTROID here); the class is known to the decoder, so this costs no byte;
- `rdoq L`: rate-distortion optimised rounding (rdoq here: round(u) or one step toward zero, whichever has
  the lower (u - r(s))**2 + L * bits, with centroid reconstruction), then the classes recomputed from the symbols
  (or, "classes kept", those of plain rounding);
- `emp`: the same symbols, reconstructed at the measured mean of each (class, |s|) bin of this very KV: the
  most a table per (class, |s|) can give (fitted on what it is scored on: a bound, not a codec).
Prints, per variant, bits/value and distortion at the calibration's own step, the size saved at the baseline's
distortion and the distortion saved at its size (interpolated in log-log); --json keeps every point.

Caution (BENCHMARKS.md, "Issue #17: centroid reconstruction and RDOQ"): on the model these variants rank the other
way; the KL rose where this distortion fell. Score a quantiser by the KL (bench/codec_quantisers.py).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from safetensors.torch import load_file

from kvshelf.codecs import cachegen_cpu as cc
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import rans
from kvshelf.codecs.rans_lanes import _encode_lanes

CHUNK = 256


# -- the quantiser variants (built into the codec for a while, measured on the model, taken out: see BENCHMARKS.md,
# "Issue #17: centroid reconstruction and RDOQ (fifth session)") ------------------------------------------------
def _laplace_offset(spread: float) -> float:
    """How far toward zero the centroid of any bin [m - 1/2, m + 1/2] (m >= 1) lies from m under a Laplace
    density of RMS `spread` (scale spread / sqrt(2)): the same for every m."""
    rate = math.sqrt(2) / spread
    return 0.5 - 1 / rate + (1 / math.expm1(rate) if rate < 700 else 0.0)


CENTROID = np.array([_laplace_offset(rans.spread_of(c)) for c in range(rans.SPREAD_CLASSES)], np.float32)
with np.errstate(divide="ignore"):
    BITS = rans.PROB_BITS - np.log2(rans.FREQ.astype(np.float64))  # bits of each high symbol of each class


def reconstruct(q: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Symbols q of rows of classes `cls` (broadcastable) -> values: nonzero symbols moved toward zero by CENTROID."""
    return q.astype(np.float32) - np.sign(q).astype(np.float32) * CENTROID[cls.astype(np.int64)]


def symbol_bits(cls: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Bits the coder spends on symbols q (within the radius) of rows of classes `cls` (broadcastable to q)."""
    c = np.broadcast_to(cls.astype(np.int64), q.shape)
    r, k = rans.RADIUS[c].astype(np.int64), rans.LOW_BITS[c].astype(np.int64)
    return BITS[c, (np.clip(q, -r, r) + r) >> k] + k


def rdoq(u: np.ndarray, q: np.ndarray, cls: np.ndarray, lam: float) -> np.ndarray:
    """round(u) or one step toward zero, whichever has the lower (u - reconstruct)**2 + lam * bits; escapes stay."""
    toward = q - np.sign(q)
    c = np.broadcast_to(cls.astype(np.int64), q.shape)
    u = u.astype(np.float64)
    cost_q = (u - reconstruct(q, c).astype(np.float64)) ** 2 + lam * symbol_bits(c, q)
    cost_t = (u - reconstruct(toward, c).astype(np.float64)) ** 2 + lam * symbol_bits(c, toward)
    return np.where((q != 0) & (np.abs(q) < rans.RADIUS[c]) & (cost_t < cost_q), toward, q)


def coefficients(cal: calib.Calibration, kv: torch.Tensor) -> list[np.ndarray]:
    """Per 256-token chunk: the coefficients [layers, 2, heads, tokens, dim] (float32) in level-5 steps."""
    layers, two, heads, tokens, dim = kv.shape
    out = []
    for start in range(0, tokens - CHUNK + 1, CHUNK):
        x = np.ascontiguousarray(kv[:, :, :, start : start + CHUNK].float().numpy())
        cc.rope_(cal, x, list(range(layers)), start, -1.0)
        scaled, bias = cc._batch(cal, "encode", 5, 0, 2 * layers, heads, CHUNK, dim)
        c = torch.baddbmm(bias, torch.from_numpy(x.reshape(-1, CHUNK, dim)), scaled)
        out.append(c.reshape(layers, two, heads, CHUNK, dim).numpy().copy())
    return out


def genre_kv(tokens: int) -> list[torch.Tensor]:
    """The default model's KV [layers, 2, heads, tokens, dim] of the first `tokens` of each held-out genre text."""
    from codec_quality import GENRES, genre_texts

    from kvshelf.model.loader import load_model

    lm = load_model("gemma3-270m", device="cpu")
    out = []
    with torch.inference_mode():
        for text in genre_texts(GENRES).values():
            ids = lm.tokenizer(text)["input_ids"][:tokens]
            buf = lm.runner.new_kv(len(ids))
            lm.runner.forward(ids, 0, buf)
            out.append(buf.data[:, :, :, : len(ids)].clone())
    return out


def rows_of(q: np.ndarray) -> np.ndarray:
    """[layers, 2, heads, tokens, dim] -> [parts, rows, tokens] (a part: one layer's K or V)."""
    layers, two, heads, tokens, dim = q.shape
    return q.reshape(layers * two, heads, tokens, dim).transpose(0, 1, 3, 2).reshape(layers * two, heads * dim, tokens)


def part_bytes(rows: np.ndarray, classes: np.ndarray, heads: int, dim: int) -> int:
    """What rans.encode_part writes for symbol rows [rows, tokens] with these classes (not recomputed)."""
    n_rows, tokens = rows.shape
    r = rans.RADIUS[classes].astype(np.int64)[:, None]
    n_esc = int((np.abs(rows) >= r).sum())
    q = rows.reshape(heads, dim, tokens).transpose(0, 2, 1)
    r3 = rans.RADIUS[classes].reshape(heads, 1, dim)
    u = (np.clip(q, -r3, r3) + r3).astype(np.int32).reshape(-1)
    width, per_lane, blocks = rans.layout(n_rows, tokens)
    _, counts, _, _ = _encode_lanes(u, classes, width, per_lane, tokens, dim, rans.FREQ, rans.CUM, rans.LOW_BITS)
    return n_rows + 4 + 4 * blocks + 4 * blocks * width + 2 * int(counts.sum()) + 8 * n_esc


def measure(chunks: list[np.ndarray], factor: float, variant: str, lam: float, keep_classes: bool, emp=None):
    """(bytes, distortion, values) of every chunk coded at `factor` x the calibration's steps."""
    total_bytes = dist = values = 0
    for c in chunks:
        layers, two, heads, tokens, dim = c.shape
        u = rows_of(c / factor).astype(np.float64)
        q = np.rint(u).astype(np.int64)
        cls = np.stack([rans.classes_of(p) for p in q])
        if variant == "rdoq":
            q = rdoq(u.astype(np.float32), q, cls[..., None], lam)
            if not keep_classes:
                cls = np.stack([rans.classes_of(p) for p in q])
        if variant == "mid":
            rec = q.astype(np.float64)
        elif variant == "emp":
            rec = q - np.sign(q) * emp[cls[..., None], np.minimum(np.abs(q), emp.shape[1] - 1)]
        else:
            rec = reconstruct(q, cls[..., None]).astype(np.float64)
        dist += float(((u - rec) ** 2).sum()) * factor**2
        total_bytes += 4 * layers + sum(part_bytes(q[i], cls[i].astype(np.uint8), heads, dim) for i in range(len(q)))
        values += c.size
    return total_bytes, dist, values


def empirical_table(chunks: list[np.ndarray], factors, width: int) -> np.ndarray:
    """The measured offset toward zero of each (class, |s|) bin's mean (|s| - mean |u|), over `factors`."""
    num = np.zeros((rans.SPREAD_CLASSES, width))
    den = np.zeros((rans.SPREAD_CLASSES, width))
    for f in factors:
        for c in chunks:
            u = rows_of(c / f).astype(np.float64)
            q = np.rint(u).astype(np.int64)
            cls = np.stack([rans.classes_of(p) for p in q])
            m = np.minimum(np.abs(q), width - 1)
            idx = (np.broadcast_to(cls[..., None], q.shape).astype(np.int64) * width + m).ravel()
            off = (np.abs(q) - u * np.sign(q)).ravel()
            num += np.bincount(idx, off, num.size).reshape(num.shape)
            den += np.bincount(idx, None, den.size).reshape(den.shape)
    table = np.where(den > 20, num / np.maximum(den, 1), 0.0)
    table[:, 0] = 0
    return table


def saved_at_equal_distortion(base: list[tuple], other: list[tuple]) -> tuple[float, float]:
    """(% fewer bytes at the baseline's distortion at factor 1, % less distortion at its bytes), log-log."""
    ref_bytes, ref_dist = base[len(base) // 2]
    o = sorted(other)  # bytes ascending, distortion descending
    lb, ld = np.log([x[0] for x in o]), np.log([x[1] for x in o])
    at_dist = math.exp(np.interp(math.log(ref_dist), ld[::-1], lb[::-1]))
    at_bytes = math.exp(np.interp(math.log(ref_bytes), lb, ld))
    return 100 * (1 - at_dist / ref_bytes), 100 * (1 - at_bytes / ref_dist)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", help="a KV file (bench/codec_speed.py --save-kv)")
    ap.add_argument("--genres", type=int, metavar="TOKENS", help="instead: the model's KV of the genre texts")
    ap.add_argument("--calibration", required=True, help="a .kvcal file")
    ap.add_argument("--lambdas", type=float, nargs="*", default=[0.05, 0.1, 0.15, 0.2])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cal = calib.load(args.calibration)
    kvs = genre_kv(args.genres) if args.genres else [next(iter(load_file(args.kv).values()))]
    chunks = [c for kv in kvs for c in coefficients(cal, kv)]
    factors = [2 ** (e / 16) for e in range(-4, 5)]  # the middle one is the calibration's own step
    emp = empirical_table(chunks, factors, 64)
    variants = [("mid", 0.0, False), ("centroid", 0.0, False), ("emp", 0.0, False)]
    variants += [("rdoq", lam, False) for lam in args.lambdas] + [("rdoq", lam, True) for lam in args.lambdas]
    curves = {}
    for variant, lam, keep in variants:
        name = variant + (f" {lam:g}" if variant == "rdoq" else "") + (" (classes kept)" if keep else "")
        curves[name] = [measure(chunks, f, variant, lam, keep, emp)[:2] for f in factors]
        values = sum(c.size for c in chunks)
        mid = curves[name][len(factors) // 2]
        line = f"{name:28s} at factor 1: {8 * mid[0] / values:.4f} bits/value, distortion {mid[1] / values:.5f}"
        if name != "mid":
            fewer_bytes, less_dist = saved_at_equal_distortion(curves["mid"], curves[name])
            line += (
                f"; vs mid: {fewer_bytes:+.2f}% bytes at equal distortion, {less_dist:+.2f}% distortion at equal bytes"
            )
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"factors": factors, "values": sum(c.size for c in chunks), "curves": curves}, f, indent=1)


if __name__ == "__main__":
    main()
