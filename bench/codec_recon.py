"""bench/codec_quality.py with other reconstruction offsets for calibrated cachegen (issue #17, an experiment):
which part of "centroid reconstruction + RDOQ" moves the model's KL, and whether an unbiased reconstruction
does better.

    python bench/codec_recon.py --texts genres --cont 256 --greedy 128 \
        --codecs 'cachegen:calibration=FILE.kvcal,recon="zero",rdoq=0' 'cachegen:calibration=FILE.kvcal,recon="gain"' ...

Every argument is codec_quality.py's; a cachegen spec takes one more parameter, `recon` (a JSON string), the offsets (toward
zero, per spread class) that encoder and decoder use while that codec runs (kvshelf.codecs.rans.CENTROID is
replaced in place for it):
- `laplace`: the codec's own, the centroid of each bin under a Laplace density of the class's spread;
- `zero`: none, every symbol at its bin's centre (with rdoq=0: the codec before this issue, bit for bit);
- `gain`: per class, the offset that makes the reconstruction's gain E[x x^] / E[x^2] one (no shrinkage toward
  zero), measured with plain rounding on the KV of --gain-kv (bench/codec_speed.py --save-kv) coded with the
  spec's calibration, clipped to [-0.5, 0] (away from zero, at most half a step).
"""

from __future__ import annotations

import sys

import codec_quality
import numpy as np
from safetensors.torch import load_file

from kvshelf.codecs import calibration as calib
from kvshelf.codecs import rans

LAPLACE = rans.CENTROID.copy()


def gain_offsets(cal_path: str, kv_path: str) -> np.ndarray:
    """Per class: the offset toward zero (<= 0 here) that gives plain rounding's reconstruction a gain of one."""
    from codec_rd import coefficients, rows_of

    cal = calib.load(cal_path)
    kv = next(iter(load_file(kv_path).values()))
    xq, xx, ax = (np.zeros(rans.SPREAD_CLASSES) for _ in range(3))
    for c in coefficients(cal, kv):
        u = rows_of(c).astype(np.float64)
        q = np.rint(u)
        cls = np.stack([rans.classes_of(p) for p in q])
        idx = np.broadcast_to(cls[..., None], q.shape).ravel().astype(np.int64)
        xq += np.bincount(idx, (u * q).ravel(), rans.SPREAD_CLASSES)
        xx += np.bincount(idx, (u * u).ravel(), rans.SPREAD_CLASSES)
        ax += np.bincount(idx, (np.abs(u) * (q != 0)).ravel(), rans.SPREAD_CLASSES)
    off = np.where(ax > 0, (xq - xx) / np.maximum(ax, 1e-30), 0.0)
    return (np.round(np.clip(off, -0.5, 0.0) * 65536) / 65536).astype(np.float32)


def main() -> None:
    gain_kv = None
    if "--gain-kv" in sys.argv:
        at = sys.argv.index("--gain-kv")
        gain_kv = sys.argv[at + 1]
        del sys.argv[at : at + 2]
    plain = codec_quality.codec_from_spec

    def with_recon(spec: str, calibration=None, processes=None):
        name, _, rest = spec.partition(":")
        recon = codec_quality.parse_spec(spec)[1].get("recon", "laplace")
        kept = [kv for kv in rest.split(",") if kv and not kv.startswith("recon=")]
        spec = f"{name}:{','.join(kept)}" if kept else name
        name, params = codec_quality.parse_spec(spec)
        if recon == "laplace":
            rans.CENTROID[:] = LAPLACE
        elif recon == "zero":
            rans.CENTROID[:] = 0
        elif recon == "gain":
            rans.CENTROID[:] = gain_offsets(params["calibration"], gain_kv)
        else:
            raise SystemExit(f"recon must be laplace, zero or gain, not {recon!r}")
        rans.TABLES_DIGEST = rans.tables_digest()  # the pinned digest covers the offsets: this run's own
        return plain(spec, calibration, processes)

    codec_quality.codec_from_spec = with_recon
    codec_quality.main()


if __name__ == "__main__":
    main()
