"""Candidate cachegen calibrations from mixed genres (issue #17), for bench/codec_quality.py to score
on the held-out genres (`--texts genres`).

    python bench/calibrate_genres.py [--tokens 1536] [--out bench/results/calibrations]

One model run calibrates on the first `tokens` tokens of each text of CALIBRATION_GENRES (license prose,
a Python package's source, Markdown docs, Japanese; none of them is scored by codec_quality): transforms
fitted on all of them pooled, KL slopes measured per text. From those slopes it writes, with the same
transforms:
- mixed-mean: each layer's slope averaged over the texts;
- mixed-max: each layer's largest slope over the texts (a per-layer safety margin);
and prints their files, to pass to codec_quality.py as `cachegen:calibration=FILE.kvcal`.
`--margin FILE...` writes instead, for existing calibrations, a variant with no step coarser than the
median layer's, all steps rescaled to keep the size (a per-layer safety margin at equal size);
`--scale S FILE...` a variant with every step S times coarser (S > 1: smaller, about log2(S) bits/value less).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from codec_quality import CALIBRATION_GENRES, genre_texts
from rich.console import Console

from kvshelf.codecs import calibration as calib
from kvshelf.model.calibrate import KL_PER_LAYER, allocate_steps, calibrate
from kvshelf.model.loader import load_model


def variant(cal: calib.Calibration, combine: str) -> calib.Calibration:
    """`cal` with steps allocated from its per-text slopes combined another way."""
    per_text = torch.tensor(cal.info["kl_slopes_per_text"])
    slope = per_text.max(0).values if combine == "max" else per_text.mean(0)
    info = dict(cal.info, combine=combine, kl_slopes=[[round(float(x), 9) for x in row] for row in slope])
    return dataclasses.replace(cal, step=allocate_steps(slope, KL_PER_LAYER), info=info, _cache={})


def margin(cal: calib.Calibration, coarsest: float = 1.0) -> calib.Calibration:
    """`cal` with no step coarser than `coarsest` x the median step, then every step scaled so that the
    mean log-step (about the size) stays: a per-layer safety margin at equal size."""
    old = cal.step
    median = float(old.median())
    new = old.clamp(max=median * coarsest)
    new = new * torch.exp(old.log().mean() - new.log().mean())
    info = dict(cal.info, margin_coarsest=coarsest)
    return dataclasses.replace(cal, step=new, info=info, _cache={})


def scaled(cal: calib.Calibration, factor: float) -> calib.Calibration:
    """`cal` with every step `factor` times coarser: the same allocation at another size."""
    info = dict(cal.info, step_scale=cal.info.get("step_scale", 1.0) * factor)
    return dataclasses.replace(cal, step=cal.step * factor, info=info, _cache={})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1536, help="tokens of each text (a quarter scores sensitivity)")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--out", default="bench/results/calibrations")
    ap.add_argument("--margin", nargs="*", help="only write margin() variants of these .kvcal files")
    ap.add_argument("--scale", nargs="+", metavar=("S", "FILE"), help="only write S x coarser variants of FILEs")
    args = ap.parse_args()
    console = Console()
    if args.scale:
        factor, *paths = args.scale
        for path in paths:
            console.print(f"{path} x {factor}: {calib.save(scaled(calib.load(path), float(factor)), args.out)}")
        return
    if args.margin:
        for path in args.margin:
            console.print(f"{path} with a margin: {calib.save(margin(calib.load(path)), args.out)}")
        return
    lm = load_model(args.model, device="cpu")
    texts = genre_texts(CALIBRATION_GENRES, console)
    ids = [lm.tokenizer(t)["input_ids"][: args.tokens] for t in texts.values()]
    t0 = time.perf_counter()
    cal = calibrate(lm.runner, ids, continuation=args.tokens // 4, combine="mean", show_progress=True)
    console.print(f"calibrated on {', '.join(texts)} ({sum(map(len, ids))} tokens): {time.perf_counter() - t0:.0f} s")
    for combine in ("mean", "max"):
        path = calib.save(variant(cal, combine), args.out)
        console.print(f"mixed-{combine}: {path}")


if __name__ == "__main__":
    main()
