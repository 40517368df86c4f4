"""Which placed document tokens deviate most in the global layers, and what cheap signal predicts them (issue #18).

    python bench/blend_deviation.py --jsonl bench/results/rag_eval_2k.jsonl --start 100 --limit 12

Per sample (set up as bench/blend.py does), the documents' KV placed from the cache (0% recompute) is compared
with full prefill's, token by token: K and V squared error, each normalised by the layer's mean energy. The
"deep" deviation is its sum over the layers without a sliding window (Gemma 3: 5, 11, 17). Reported: its rank
correlation with the check layer's (layer 1) deviation, and for candidate signals available at the check layer
without more compute (layer 1's deviation, cached K/V norms, line breaks and full stops, rank combinations) the
share of the deep top 15% that the signal's top 15% finds; then the tokens most over-represented in the deep
top 15%. The instruction (the first document, exact already) is left out.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics

import torch
from blend import SEP, prompt_text, read_samples, store_documents

from kvshelf.assembly import open_shelf
from kvshelf.blend.blender import Blender, BlendInfo
from kvshelf.config import KVShelfConfig
from kvshelf.generation import CachedGenerator


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().float() / len(x)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--share", type=float, default=0.15)
    args = ap.parse_args()
    samples = read_samples(args.jsonl, args.start, args.limit)
    shelf = open_shelf(KVShelfConfig(model="gemma3-270m", device="cpu", max_local_cpu_size=8))
    runner, engine, tok = shelf.runner, shelf.engine, shelf.model.tokenizer
    blender = Blender(runner, engine, check_layers=[1], ratios=[0.0])
    gen = CachedGenerator(runner, engine, tok, blender=blender, blend_special_str=SEP)
    glob = [i for i, s in enumerate(runner.layer_specs) if s.window is None]
    rng = random.Random(1)
    found, corr = collections.defaultdict(list), collections.defaultdict(list)
    in_top, in_all = collections.Counter(), collections.Counter()
    for sample in samples:
        docs, question, cue = sample["documents"], sample["question"], sample.get("cue", "")
        store_documents(gen, prompt_text(rng.sample(docs, len(docs)), question, cue))
        seg = gen.segment(prompt_text(docs, question, cue), None)
        ids = seg.token_ids
        full = runner.new_kv(len(ids))
        runner.forward(ids, 0, full)
        documents = blender.documents(seg, None)
        placed = runner.new_kv(len(ids))
        blender.place_documents(seg, placed, None, BlendInfo(), documents)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        for doc in documents[1:]:
            mask[doc.start : doc.end] = True
        energy = full.data.float().pow(2).mean(dim=(2, 3, 4)).clamp_min(1e-12)
        dev = (full.data - placed.data).float().pow(2).sum(dim=(2, 4)) / energy.view(-1, 2, 1)  # [layers, 2, n]
        deep, layer1 = dev[glob].sum((0, 1))[mask], dev[1].sum(0)[mask]
        k = int(args.share * len(deep))
        top = set(torch.topk(deep, k).indices.tolist())
        pos = mask.nonzero().view(-1).tolist()
        words = [tok.decode([ids[t]]) for t in pos]
        low_k17 = -placed.data[17, 0, 0][mask].float().norm(dim=-1)
        signals = {"layer 1 deviation": layer1}
        for layer in (1, 3, 5, 11, 17):
            for part, name in ((0, "K"), (1, "V")):
                norm = placed.data[layer, part, 0][mask].float().norm(dim=-1)
                signals[f"cached {name} norm, layer {layer}"] = norm
                signals[f"small cached {name} norm, layer {layer}"] = -norm
        signals["line break, full stop or blank"] = torch.tensor([w.strip() in ("", ".") for w in words]).float() + (
            1e-3 * layer1 / layer1.mean()
        )
        signals["layer 1 + small K17 (ranks)"] = ranks(layer1) + ranks(low_k17)
        signals["layer 1 + half small K17 (ranks)"] = ranks(layer1) + 0.5 * ranks(low_k17)
        for name, signal in signals.items():
            found[name].append(len(top & set(torch.topk(signal, k).indices.tolist())) / k)
            corr[name].append(spearman(deep, signal))
        for j, word in enumerate(words):
            in_all[word] += 1
            in_top[word] += j in top
        print(sample["type"], len(ids), f"spearman(deep, layer 1) {corr['layer 1 deviation'][-1]:.2f}", flush=True)
    print(f"{'signal':40s} {'finds of deep top':>18s} {'spearman':>9s}")
    for name in found:
        print(f"{name:40s} {statistics.fmean(found[name]):18.2f} {statistics.fmean(corr[name]):+9.2f}")
    print("tokens in the deep top share / occurrences (most frequent in the top):")
    for word, count in in_top.most_common(25):
        print(f"{word!r:12s} {count:4d} / {in_all[word]:4d}")


if __name__ == "__main__":
    main()
