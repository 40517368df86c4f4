"""What context to cache a document behind (issue #18, fifth session): research, not a benchmark.

    python bench/blend_context.py --jsonl bench/results/rag_eval_2k.jsonl --start 100 --limit 20 --ratio 0.15 \\
        --contexts bos inst other:512 pydoc:512 --out bench/results/context.jsonl

A blended prompt's documents were each computed alone behind BOS: in the prompt they follow the instruction and
other documents, so their deep layers (Gemma 3's global ones above all) saw nothing like what they see there.
Here every document's KV is computed behind another context before it is placed, and the same CacheBlend
prefill (kvshelf's Blender, check layer 1, `--ratio`) runs on it:

- `bos`: BOS alone (what kvshelf caches today);
- `inst`: BOS + the instruction + separator;
- `other:N`: BOS + the instruction + separator + the last N tokens of another sample's documents (joined by the
  separator, ending with one): text of the same kind, none of this prompt's facts;
- `pydoc:N`: the same with N tokens of the Python reference (pydoc_data) instead: a fixed text kvshelf could ship;
- `earlier`: each document's KV as an earlier request's full prefill computed it, the same documents in another
  order (what a cold request served by a plain prefill could store at no extra cost);
- `mixed`: the same from a prompt that also held another sample's documents (one shuffled list of both): what
  a document library gives when documents are retrieved with other partners than before.

Per sample and context: answer-token KL against full prefill (the first non-blank answer token, teacher-forced)
and whether the greedy answer is right; the report pairs every context against `bos`.
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import random
import statistics
from pathlib import Path

import torch
from blend import SEP, another_order, kl, prompt_text, read_samples
from rag_eval import correct, paired

from kvshelf.assembly import open_shelf
from kvshelf.blend.blender import Blender, Document
from kvshelf.blend.selection import SelectionPolicy
from kvshelf.config import KVShelfConfig
from kvshelf.generation import CachedGenerator


class ContextBlender(Blender):
    """A Blender whose documents' KV comes from `stored` (token tuple -> (KV, the position it was computed at))."""

    stored: dict

    def place_documents(self, seg, kv, salt, info, documents=None):
        mask = torch.zeros(len(seg.token_ids), dtype=torch.bool)
        for doc in documents:
            info.documents += 1
            info.document_hits += 1
            data, at = self.stored[tuple(seg.token_ids[doc.start : doc.end])]
            for layer in range(self.runner.num_layers):
                kv.data[layer, 0, :, doc.start : doc.end] = self.runner.rerotate(data[layer, 0], doc.start - at, layer)
                kv.data[layer, 1, :, doc.start : doc.end] = data[layer, 1]
            mask[doc.start : doc.end] = True
        info.placed_tokens = int(mask.sum())
        return mask


_TOKENS: dict = {}


def context_tokens(name: str, seg, tok, other: list[str]) -> list[int]:
    """The tokens a document is computed behind (BOS first)."""
    bos = list(seg.prefix)
    kind, _, size = name.partition(":")
    if kind == "bos":
        return bos
    inst = list(seg.token_ids[len(bos) :][: len(seg.documents[0])]) + list(seg.separator)
    if kind == "inst":
        return bos + inst
    if kind == "other":
        text = SEP.join(other) + SEP
    elif kind == "pydoc":
        topics = pydoc_data.topics.topics
        text = " ".join(topics[t] for t in sorted(topics))[:200_000]
    else:
        raise ValueError(f"unknown context {name!r}")
    ids = _TOKENS.get(text) or _TOKENS.setdefault(text, tok(text, add_special_tokens=False)["input_ids"])
    body = ids[-int(size) :] if kind == "other" else ids[: int(size)] + list(seg.separator)
    return bos + inst + list(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--contexts", nargs="+", default=["bos", "inst", "other:512"])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--question-pass", action="store_true", help="select by the question pass (signal question)")
    ap.add_argument("--out", default="bench/results/context.jsonl")
    args = ap.parse_args()
    everything = read_samples(args.jsonl)
    samples = everything[args.start : args.start + args.limit]
    shelf = open_shelf(KVShelfConfig(model="gemma3-270m", device="cpu", max_local_cpu_size=8))
    runner, tok = shelf.runner, shelf.model.tokenizer
    selection = SelectionPolicy(signal="question", question_pass=True) if args.question_pass else None
    blender = ContextBlender(runner, None, check_layers=[1], ratios=[args.ratio], selection=selection)
    gen = CachedGenerator(runner, None, tok, blender=blender, blend_special_str=SEP)
    out = Path(args.out)
    out.write_text("")
    rows = []
    for index, sample in enumerate(samples, start=args.start):
        docs, question, cue = list(sample["documents"]), sample["question"], sample.get("cue", "")
        seg = gen.segment(prompt_text(docs, question, cue), None)
        ids, n = seg.token_ids, len(seg.token_ids)
        full = runner.new_kv(n + args.max_new_tokens + 4)
        ref_tokens, ref_logits = greedy(runner, ids, full, args.max_new_tokens, None)
        at = next((j for j, t in enumerate(ref_tokens) if tok.decode([t]).strip()), 0)
        record = {"index": index, "type": sample["type"], "tokens": n, "kl": {}, "right": {}}
        record["right"]["full"] = correct(sample["answer"], tok.decode(ref_tokens))
        other = everything[(index + 37) % len(everything)]["documents"]
        spans = blender._cached_spans(seg)
        for name in args.contexts:
            if name in ("earlier", "mixed"):
                rng = random.Random(index)
                extra = other if name == "mixed" else []
                blender.stored = earlier_kv(runner, gen, docs, extra, question, cue, rng)
                place_and_score(args, runner, blender, seg, ids, n, spans, ref_tokens, ref_logits, at, record, name,
                                sample, tok)  # fmt: skip
                continue
            before = context_tokens(name, seg, tok, other)
            base = runner.new_kv(len(before) + max(e - s for s, e in spans))
            runner.forward(before, 0, base)
            blender.stored = {}
            for s, e in spans:
                kv = runner.new_kv(base.capacity)
                kv.data[:, :, :, : len(before)] = base.data[:, :, :, : len(before)]
                runner.forward(ids[s:e], len(before), kv)
                blender.stored[tuple(ids[s:e])] = (
                    kv.data[:, :, :, len(before) : len(before) + e - s].clone(),
                    len(before),
                )
            place_and_score(args, runner, blender, seg, ids, n, spans, ref_tokens, ref_logits, at, record, name,
                            sample, tok)  # fmt: skip
        rows.append(record)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(index, sample["type"], n, {k: round(v, 3) for k, v in record["kl"].items()}, record["right"], flush=True)
    report(rows, args.contexts)


def place_and_score(args, runner, blender, seg, ids, n, spans, ref_tokens, ref_logits, at, record, name, sample, tok):
    fused = runner.new_kv(n + args.max_new_tokens + 4)
    documents = [Document(s, e, None, True) for s, e in spans]
    tokens, logits = greedy(runner, ids, fused, args.max_new_tokens, (blender, seg, documents), ref_tokens[:at])
    record["kl"][name] = kl(ref_logits[at], logits)
    record["right"][name] = correct(sample["answer"], tok.decode(tokens))


def earlier_kv(runner, gen, docs, extra, question, cue, rng) -> dict:
    """Each document's KV (with its separator) from a full prefill of the documents in another order, mixed
    with `extra` documents."""
    seg = gen.segment(prompt_text(another_order(docs + extra, rng), question, cue), None)
    kv = runner.new_kv(len(seg.token_ids))
    runner.forward(seg.token_ids, 0, kv)
    return {tuple(seg.token_ids[s:e]): (kv.data[:, :, :, s:e].clone(), s) for s, e in gen.blender._cached_spans(seg)}


def greedy(runner, ids, kv, steps, blend, forced=()):
    """Greedy tokens after `ids` (prefill plain, or blended when `blend` = (blender, seg, documents)), and the
    logits at every step; with `forced`, those tokens are fed first and the logits after them are returned."""
    if blend is None:
        logits = runner.forward(ids, 0, kv)
    else:
        blender, seg, documents = blend
        logits, _ = blender.prefill(seg, kv, None, documents)
    steps_logits, tokens, pos = [logits], [], len(ids)
    if blend is not None:
        for t in forced:
            logits = runner.forward([t], pos, kv)
            pos += 1
        answer_logits = logits
        # the greedy answer itself, from a fresh copy of the blended KV (the forced tokens are the reference's)
        kv2 = runner.new_kv(kv.capacity)
        kv2.data.copy_(kv.data)
        logits, pos = steps_logits[0], len(ids)
        for _ in range(steps):
            tokens.append(int(logits.argmax()))
            logits = runner.forward([tokens[-1]], pos, kv2)
            pos += 1
        return tokens, answer_logits
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = runner.forward([tokens[-1]], pos, kv)
        pos += 1
        steps_logits.append(logits)
    return tokens, steps_logits


def report(rows: list[dict], names: list[str]) -> None:
    base = names[0]
    print(f"{'context':14s} {'right':>7s} {'vs full':>22s} {'mean KL':>8s} {'minus ' + base:>14s} {'lower':>6s}")
    full = [r["right"]["full"] for r in rows]
    print(f"{'full prefill':14s} {sum(full):3d}/{len(rows):<3d}")
    for name in names:
        right = [r["right"][name] for r in rows]
        p = paired(full, right)
        diffs = [r["kl"][name] - r["kl"][base] for r in rows]
        print(
            f"{name:14s} {sum(right):3d}/{len(rows):<3d} {100 * p['diff']:+5.0f} [{100 * p['low']:+.0f}, {100 * p['high']:+.0f}]"
            f" p={p['p_mcnemar']:.2f} {statistics.fmean(r['kl'][name] for r in rows):8.4f} "
            f"{statistics.fmean(diffs):+14.4f} {sum(d < 0 for d in diffs):3d}/{len(rows)}"
        )
    types = sorted({r["type"] for r in rows})
    for name in names:
        per = []
        for t in types:
            sel = [r for r in rows if r["type"] == t]
            per.append(
                f"{t} {sum(r['right'][name] for r in sel)}/{len(sel)} {statistics.fmean(r['kl'][name] for r in sel):.2f}"
            )
        print(f"{name:14s} " + " | ".join(per))


if __name__ == "__main__":
    main()
