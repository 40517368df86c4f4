"""TTFT of a blended request against a plain prefill when only part of its documents is cached (issue #18).

    python bench/blend_share.py --jsonl bench/results/rag_eval_2k.jsonl --start 40 --limit 4 \\
        --shares 0.25 0.5 0.75 1.0 --ratios 0.3 0.15

A request whose documents are partly cached either blends (the missing documents computed in place with the
prompt, every layer; the cached ones placed and `ratio` of them recomputed) or, below `blend_min_cached_share`
of its document tokens cached, is prefilled exactly. Per sample and share, documents in a random order are
cached until at least that share of the prompt's document tokens is (the share reached is reported), then the
blended request is timed (min_cached_share 0: always blends) next to a plain prefill of the same tokens
(measured before and after the sample's blends; their mean is the reference). The crossover is the share below
which blending is not clearly faster than prefilling exactly.
"""

from __future__ import annotations

import argparse
import random
import statistics

from blend import SEP, prompt_text, read_samples
from common import save_results

from kvshelf.assembly import open_shelf
from kvshelf.blend.blender import Blender, BlendInfo
from kvshelf.config import KVShelfConfig
from kvshelf.generation import CachedGenerator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--start", type=int, default=40)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3])
    ap.add_argument("--json", default="bench/results/blend_share.json")
    args = ap.parse_args()
    samples = read_samples(args.jsonl, args.start, args.limit)
    shelf = open_shelf(KVShelfConfig(model="gemma3-270m", device="cpu", max_local_cpu_size=8))
    runner, engine, tok = shelf.runner, shelf.engine, shelf.model.tokenizer
    gens = {
        r: CachedGenerator(
            runner,
            engine,
            tok,
            blender=Blender(runner, engine, check_layers=[1], ratios=[r], min_cached_share=0.0),
            blend_special_str=SEP,
        )
        for r in args.ratios
    }
    probe = gens[args.ratios[0]]
    probe.generate("warm-up", max_new_tokens=1, use_cache=False)
    rng = random.Random(7)
    records = []
    for index, sample in enumerate(samples, start=args.start):
        text = prompt_text(sample["documents"], sample["question"], sample.get("cue", ""))
        seg = probe.segment(text, None)
        ids = seg.token_ids
        plain = [probe.generate(ids, max_new_tokens=1, use_cache=False).ttft_s]
        record = {"index": index, "tokens": len(ids), "documents": len(seg.documents), "blends": []}
        for share in args.shares:
            for ratio, gen in gens.items():
                salt = f"{index}-{share}-{ratio}"
                blender = gen.blender
                documents = blender.documents(seg, salt)
                total = sum(d.tokens for d in documents)
                order = rng.sample(range(len(documents)), len(documents))
                chosen, cached = [], 0
                for k in order:
                    if cached >= share * total:
                        break
                    chosen.append(documents[k])
                    cached += documents[k].tokens
                for _ in blender.compute_missing(seg, chosen, salt, BlendInfo()):
                    pass  # the chosen documents computed alone and stored, as after an earlier request
                result = gen.generate(text, max_new_tokens=1, salt=salt)
                record["blends"].append(
                    {"share": share, "reached": cached / total, "ratio": ratio, "ttft": result.ttft_s}
                )
        plain.append(probe.generate(ids, max_new_tokens=1, use_cache=False).ttft_s)
        record["plain"] = statistics.fmean(plain)
        record["plain_runs"] = plain
        records.append(record)
        cells = [
            f"{b['share']:.2f}({b['reached']:.2f})@{b['ratio']}: {b['ttft'] / record['plain']:.2f}"
            for b in record["blends"]
        ]
        print(index, len(ids), f"plain {plain[0]:.2f}/{plain[1]:.2f} s", " ".join(cells), flush=True)
    print("share  ratio  blend/plain TTFT (median over samples)  per sample")
    for share in args.shares:
        for ratio in args.ratios:
            vals = [
                b["ttft"] / r["plain"]
                for r in records
                for b in r["blends"]
                if (b["share"], b["ratio"]) == (share, ratio)
            ]
            print(f"{share:5.2f}  {ratio:5.2f}  {statistics.median(vals):.2f}  {', '.join(f'{v:.2f}' for v in vals)}")
    save_results(args.json, records)


if __name__ == "__main__":
    main()
