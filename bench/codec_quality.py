"""KV codecs on the real model: size against quality, measured on real text.

    python bench/codec_quality.py [--prefix 2048] [--files a.txt b.py ...] [--codecs none int8 cachegen ...]
    python bench/codec_quality.py --texts genres --cont 256 --greedy 128 [--calibration FILE.kvcal]

For each text (stdlib prose, stdlib Python source, a list; plus any files given): prefill `prefix`
tokens, round-trip the KV through each codec in 256-token chunks exactly as a tier stores it, then
continue from the decoded KV:
- perplexity of the next 128 held-out tokens (teacher-forced), change vs uncompressed KV;
- greedy agreement: the uncompressed run's 64 greedy tokens, teacher-forced, and the share of positions
  where the compressed run picks the same token;
- mean next-token KL divergence from the uncompressed run over those positions;
- bits per stored value (the whole stored object: header, scales, tables, payload) and size vs fp16.
A codec spec is a name with optional parameters: cachegen:bits=3,early_bits=5. `cachegen` alone is the
calibrated codec (the calibration is computed from the model on a different text, or loaded when one was
saved for this model, or `--calibration FILE`); `cachegen:calibration=none` is its uncalibrated mode.

`--texts genres` scores texts of other genres found on the machine instead (issue #17: license prose,
a Python package's source, Markdown docs, a table, Chinese and Russian; none is a calibration text, and
none is in CALIBRATION_GENRES, the split that candidate calibrations are made from).
"""

from __future__ import annotations

import argparse
import inspect
import keyword
import math
import pydoc_data.topics
import statistics
import time
from pathlib import Path

import torch
from common import codec_from_spec, parse_spec, save_results
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvshelf.model.calibrate import calibration_for
from kvshelf.model.loader import load_model
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.format import decode_chunk, encode_chunk

CHUNK = 256


def builtin_texts(extended: bool = False) -> dict[str, str]:
    import calendar
    import collections
    import json as json_mod

    topics = pydoc_data.topics.topics
    prose = "\n\n".join(topics[k] for k in ("for", "with", "exceptions", "class", "function", "try", "import"))
    code = inspect.getsource(json_mod.decoder) + inspect.getsource(json_mod.encoder) + inspect.getsource(argparse)
    items = sorted(
        set(dir(__builtins__) if isinstance(__builtins__, dict) else dir(__builtins__)) | set(keyword.kwlist)
    )
    listing = "\n".join(f"{i + 1}. {name}: {len(name)} letters" for i, name in enumerate(items * 6))
    texts = {"prose": prose, "code": code, "list": listing}
    if extended:  # three more, for tighter means (none overlaps the calibration text)
        texts["reference"] = "\n\n".join(topics[k] for k in ("execmodel", "customization", "formatstrings"))
        texts["source"] = inspect.getsource(collections)
        texts["calendar"] = "\n".join(calendar.TextCalendar().formatyear(y) for y in range(2020, 2032))
    return texts


def _site(package: str, name: str) -> Path:
    """A file of an installed package (its source: a genre the codec was not tuned on)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent / name if spec and spec.origin else Path("/nonexistent") / package / name


# Held-out texts of other genres (issue #17): scored, never calibrated on. Files that a machine lacks are
# reported and skipped.
GENRES = {
    "license": Path("/usr/share/common-licenses/GPL-3"),
    "python": _site("rich", "console.py"),
    "markdown": Path("/usr/share/doc/nodejs/api/net.md"),
    "table": Path("/etc/services"),
    "chinese": Path("/usr/share/vim/vim90/tutor/tutor.zh_cn.utf-8"),
    "russian": Path("/usr/share/vim/vim90/tutor/tutor.ru.utf-8"),
}
# The other split: what a mixed-genre candidate calibration is computed from (bench/calibrate_genres.py).
CALIBRATION_GENRES = {
    "license": Path("/usr/share/common-licenses/Apache-2.0"),
    "python": _site("pydantic", "main.py"),
    "markdown": Path("/usr/share/doc/nodejs/api/http.md"),
    "japanese": Path("/usr/share/gnupg/help.ja.txt"),
}


def genre_texts(files: dict[str, Path], console=None) -> dict[str, str]:
    out = {}
    for name, path in files.items():
        if path.is_file():
            out[name] = path.read_text(encoding="utf-8", errors="replace")
        elif console is not None:
            console.print(f"[yellow]skipping {name}: {path} is not on this machine[/]")
    return out


def round_trip(kv: torch.Tensor, codec) -> tuple[torch.Tensor, int]:
    out, total = torch.empty_like(kv), 0
    for start in range(0, kv.shape[3], CHUNK):
        piece = kv[:, :, :, start : start + CHUNK].contiguous()
        chunk = StoredChunk(ChunkMeta(b"\0" * 32, piece.shape[3], tuple(piece.shape), piece.dtype, start), piece)
        key = start.to_bytes(16, "little")
        blob = encode_chunk(key, chunk, codec)
        total += len(blob)
        out[:, :, :, start : start + CHUNK] = decode_chunk(blob, key).kv
    return out, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--cont", type=int, default=128, help="held-out tokens scored for perplexity")
    ap.add_argument("--greedy", type=int, default=64, help="greedy tokens compared for agreement")
    ap.add_argument("--files", nargs="*", default=[])
    ap.add_argument(
        "--texts", choices=("3", "6", "genres"), default="6", help="built-in texts (3 or 6), or other genres"
    )
    ap.add_argument("--calibration", help="a .kvcal file for plain `cachegen` (default: the model's own)")
    ap.add_argument(
        "--codecs",
        nargs="+",
        default=["none", "int8", "cachegen:calibration=none", "cachegen:bits=4", "cachegen", "cachegen:bits=6"],
    )
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--json", default="bench/results/codec_quality.json")
    args = ap.parse_args()
    console = Console()
    lm = load_model(args.model, device="cpu")
    runner, tok = lm.runner, lm.tokenizer
    cal = None
    if any(parse_spec(spec)[0] == "cachegen" and "calibration" not in parse_spec(spec)[1] for spec in args.codecs):
        t0 = time.perf_counter()
        with console.status("calibrating cachegen on the model (once per model, then cached)"):
            cal = calibration_for(runner, tok, path=args.calibration)
        console.print(f"calibration {cal.digest} from {cal.info['tokens']} tokens: {time.perf_counter() - t0:.1f} s")
    texts = genre_texts(GENRES, console) if args.texts == "genres" else builtin_texts(extended=args.texts == "6")
    texts.update({Path(f).name: Path(f).read_text(errors="replace") for f in args.files})
    n_cont, n_greedy = args.cont, args.greedy
    results = {spec: {"bits": [], "dppl": [], "agree": [], "kl": []} for spec in args.codecs}
    scored = []
    with Progress(console=console, transient=True) as progress, torch.inference_mode():
        task = progress.add_task("codecs", total=len(texts) * (len(args.codecs) + 1))
        for name, text in texts.items():
            ids = tok(text)["input_ids"]
            if len(ids) < args.prefix + n_cont:
                console.print(f"[yellow]skipping {name}: {len(ids)} tokens < {args.prefix + n_cont}[/]")
                continue
            scored.append(name)
            prefix, cont = ids[: args.prefix], ids[args.prefix : args.prefix + n_cont]
            base = runner.new_kv(args.prefix + n_cont + n_greedy)
            runner.forward(prefix, 0, base)
            ref_kv = base.data[:, :, :, : args.prefix].clone()
            # Reference continuation and greedy tokens from uncompressed KV.
            work = runner.new_kv(args.prefix + n_cont + n_greedy)
            work.data[:, :, :, : args.prefix] = ref_kv
            ref_cont = runner.forward(cont, args.prefix, work, all_logits=True)
            greedy, g = [], None
            work.data[:, :, :, : args.prefix] = ref_kv
            logits = runner.forward(prefix[-1:], args.prefix - 1, work)
            for _ in range(n_greedy):
                g = int(logits.argmax())
                greedy.append(g)
                logits = runner.forward([g], args.prefix + len(greedy) - 1, work)
            work.data[:, :, :, : args.prefix] = ref_kv
            ref_greedy = runner.forward(prefix[-1:] + greedy[:-1], args.prefix - 1, work, all_logits=True)
            progress.advance(task)

            def nll(logits, targets):
                return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(targets[1:])))

            ref_ppl = math.exp(nll(ref_cont, cont))
            for spec in args.codecs:
                kv, nbytes = round_trip(ref_kv, codec_from_spec(spec, cal))
                work.data[:, :, :, : args.prefix] = kv
                cont_logits = runner.forward(cont, args.prefix, work, all_logits=True)
                work.data[:, :, :, : args.prefix] = kv
                g_logits = runner.forward(prefix[-1:] + greedy[:-1], args.prefix - 1, work, all_logits=True)
                p, q = torch.log_softmax(ref_greedy, -1), torch.log_softmax(g_logits, -1)
                r = results[spec]
                r["bits"].append(8 * nbytes / ref_kv.numel())
                r["dppl"].append(100 * (math.exp(nll(cont_logits, cont)) / ref_ppl - 1))
                r["agree"].append(float((g_logits.argmax(-1) == torch.tensor(greedy)).float().mean()))
                r["kl"].append(float((p.exp() * (p - q)).sum(-1).mean()))
                progress.advance(task)
    table = Table(title=f"KV codecs on {runner.model_id}, {args.prefix}-token prefixes, {len(texts)} texts (means)")
    for col in ["codec", "bits/value", "x vs fp16", "delta ppl", "greedy agreement", "KL"]:
        table.add_column(col, justify="right")
    summary = []
    for spec, r in results.items():
        if not r["bits"]:
            continue
        row = {k: statistics.fmean(v) for k, v in r.items()}
        row["codec"] = spec
        summary.append(row)
        table.add_row(
            spec,
            f"{row['bits']:.2f}",
            f"{16 / row['bits']:.2f}x",
            f"{row['dppl']:+.2f}%",
            f"{row['agree']:.1%}",
            f"{row['kl']:.5f}",
        )
    console.print(table)
    save_results(args.json, {"summary": summary, "texts": scored, "per_text": results})


if __name__ == "__main__":
    main()
