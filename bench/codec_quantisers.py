"""Quantiser variants of calibrated cachegen scored on the model without building them into the codec (issue #17):
bench/codec_quality.py's harness, where a spec `emul:...` round-trips the KV through an emulation of the codec
(the calibration's transforms, one step per (layer, K|V), classes, the real rANS coder's byte count) with another
quantiser.

    python bench/codec_quantisers.py --texts genres --cont 256 --greedy 128 \
        --codecs 'emul:calibration=FILE.kvcal,variant="mid"' 'emul:calibration=FILE.kvcal,variant="dither",scale=1.1'

Every argument is codec_quality.py's. An `emul` spec takes the calibration (a .kvcal file), `scale` (every step
that many times coarser, default 1) and `variant`:
- `mid`: round(u), reconstructed at the bin centre: the codec as it is (same bytes, same KV);
- `centroid`: the same symbols, reconstructed at the bin's centroid under a Laplace density of the row class's
  spread (bench/codec_rd.py's CENTROID); `centroid-k`, `centroid-v`: on K's or V's coefficients only;
- `gain`, `gain-k`, `gain-v`: offsets per class (away from zero, at most half a step) that give plain rounding's
  reconstruction a gain E[x x^] / E[x^2] of one, measured with plain rounding on the KV file `gain_kv` (a path, as a
  JSON string) coded with the same calibration and scale: undoing rounding's shrinkage in the small classes;
- `dither`: subtractive dither: round(u + d), reconstructed at s - d, d uniform in [-1/2, 1/2) from a generator
  both sides would seed from the chunk's position: the error is independent of the signal.
"""

from __future__ import annotations

import codec_quality
import numpy as np
import torch
from codec_rd import CENTROID, coefficients, part_bytes, rows_of
from safetensors.torch import load_file

from kvshelf.codecs import cachegen_cpu as cc
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import rans

VARIANTS = ("mid", "centroid", "centroid-k", "centroid-v", "gain", "gain-k", "gain-v", "dither")


class Emulated:
    def __init__(self, calibration: str, variant: str = "mid", scale: float = 1.0, gain_kv: str | None = None):
        if variant not in VARIANTS:
            raise SystemExit(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        self.cal, self.variant, self.scale = calib.load(calibration), variant, float(scale)
        self.offsets = CENTROID
        if variant.startswith("gain"):
            if gain_kv is None:
                raise SystemExit('the gain variants need gain_kv="KV.safetensors"')
            self.offsets = gain_offsets(self.cal, self.scale, gain_kv)


def gain_offsets(cal: calib.Calibration, scale: float, kv_path: str) -> np.ndarray:
    """Per class: the offset toward zero (<= 0: away from it) that gives plain rounding a gain of one."""
    kv = next(iter(load_file(kv_path).values()))
    xq, xx, ax = (np.zeros(rans.SPREAD_CLASSES) for _ in range(3))
    for c in coefficients(cal, kv):
        u = rows_of(c / scale).astype(np.float64)
        q = np.rint(u)
        cls = np.stack([rans.classes_of(p) for p in q])
        idx = np.broadcast_to(cls[..., None], q.shape).ravel().astype(np.int64)
        xq += np.bincount(idx, (u * q).ravel(), rans.SPREAD_CLASSES)
        xx += np.bincount(idx, (u * u).ravel(), rans.SPREAD_CLASSES)
        ax += np.bincount(idx, (np.abs(u) * (q != 0)).ravel(), rans.SPREAD_CLASSES)
    return np.clip(np.where(ax > 0, (xq - xx) / np.maximum(ax, 1e-30), 0.0), -0.5, 0.0).astype(np.float32)


def emulate(kv: torch.Tensor, em: Emulated, position: int) -> tuple[torch.Tensor, int]:
    """One chunk's KV [layers, 2, heads, tokens, dim] -> (its KV after the variant's quantiser, its bytes)."""
    layers, two, heads, tokens, dim = kv.shape
    x = np.array(kv.float().numpy(), np.float32, order="C")  # a copy: RoPE is taken off in place
    cc.rope_(em.cal, x, list(range(layers)), position, -1.0)
    scaled, bias = cc._batch(em.cal, "encode", 5, 0, 2 * layers, heads, tokens, dim)
    u = torch.baddbmm(bias, torch.from_numpy(x.reshape(-1, tokens, dim)), scaled).numpy() / em.scale
    d = np.zeros_like(u)
    if em.variant == "dither":
        d = np.random.default_rng(position).uniform(-0.5, 0.5, size=u.shape).astype(np.float32)
    q = np.rint(u + d).astype(np.int64).reshape(2 * layers, heads, tokens, dim)
    rows = q.transpose(0, 1, 3, 2).reshape(2 * layers, heads * dim, tokens)
    cls = np.stack([rans.classes_of(p) for p in rows])
    nbytes = 4 * layers + sum(part_bytes(rows[i], cls[i], heads, dim) for i in range(2 * layers))
    rec = q.astype(np.float32)
    if em.variant != "mid" and em.variant != "dither":
        shift = np.sign(rec) * em.offsets[cls.reshape(2 * layers, heads, 1, dim).astype(np.int64)]
        kinds = {"": [0, 1], "-k": [0], "-v": [1]}[em.variant.removeprefix("centroid").removeprefix("gain")]
        which = np.isin(np.arange(2 * layers) % 2, kinds)  # part 2k: layer k's K, 2k + 1: its V
        rec[which] -= shift[which]
    rec = rec.reshape(-1, tokens, dim) - d.reshape(-1, tokens, dim)
    inv, mean = cc._batch(em.cal, "decode", 5, 0, 2 * layers, heads, tokens, dim)
    out = torch.baddbmm(mean, torch.from_numpy(rec * em.scale), inv).numpy().reshape(kv.shape).copy()
    cc.rope_(em.cal, out, list(range(layers)), position, 1.0)
    return torch.from_numpy(out).to(kv.dtype), nbytes


def main() -> None:
    plain_codec, plain_trip = codec_quality.codec_from_spec, codec_quality.round_trip

    def codec_from_spec(spec: str, calibration=None, processes=None):
        name, params = codec_quality.parse_spec(spec)
        return Emulated(**params) if name == "emul" else plain_codec(spec, calibration, processes)

    def round_trip(kv: torch.Tensor, codec):
        if not isinstance(codec, Emulated):
            return plain_trip(kv, codec)
        out, total = torch.empty_like(kv), 0
        for start in range(0, kv.shape[3], codec_quality.CHUNK):
            piece, n = emulate(kv[:, :, :, start : start + codec_quality.CHUNK].contiguous(), codec, start)
            out[:, :, :, start : start + codec_quality.CHUNK] = piece
            total += n
        return out, total

    codec_quality.codec_from_spec, codec_quality.round_trip = codec_from_spec, round_trip
    codec_quality.main()


if __name__ == "__main__":
    main()
