"""Fast KL sweeps of CacheBlend repairs on RAG samples (issue #18, fourth session): research, not a benchmark.

    python bench/blend_repair.py --jsonl bench/results/rag_eval_2k.jsonl --start 100 --limit 20 --ratio 0.15 \\
        --out bench/results/repair.jsonl

Per sample (set up as bench/blend.py does: the documents cached alone from an earlier request in another
order, the measured prompt in the sample's order): full prefill (its KV and its first answer tokens), one
blended prefill at `--ratio`, then each setting re-runs only the question (and full prefill's answer tokens up
to the first real one, teacher-forced) over a copy of the fused KV. That is the blend's own result for any
setting that changes only how the question reads the KV (the document tokens never attend to the question),
at the cost of ~30 tokens per setting. Settings:

- `T,mass[,global]`: APE-style reweighting of the question's attention over the placed documents
  (kvshelf.model.reweight), every layer or the global layers only;
- `oracle:I`: document I's KV (0 = the instruction) replaced by full prefill's exact KV (what the error in
  that document costs the answer: a diagnostic, not a method);
- `oracle:rest-I`: every document but I exact.

Prints per setting the mean answer-token KL against full prefill, paired against the plain blend, per type.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch
from blend import SEP, another_order, kl, prompt_text, read_samples, store_documents

from kvshelf.assembly import open_shelf
from kvshelf.blend.blender import Blender, BlendInfo
from kvshelf.config import KVShelfConfig
from kvshelf.generation import CachedGenerator
from kvshelf.model.reweight import AttentionReweight


def parse_setting(text: str, runner) -> dict:
    if text.startswith("oracle:"):
        return {"oracle": text.removeprefix("oracle:")}
    if text.startswith("dist:"):  # dist:beta[,global]: context keys' logits + beta x (1 - position / question start)
        parts = text.removeprefix("dist:").split(",")
        layers = None
        if len(parts) > 1 and parts[1] == "global":
            layers = frozenset(i for i, s in enumerate(runner.layer_specs) if s.window is None)
        return {"dist": float(parts[0]), "layers": layers}
    if text.startswith("shift:"):  # shift:oracle|recomputed;layers=global|all
        spec = dict(item.split("=") for item in text.removeprefix("shift:").split(";"))
        return {"shift": spec}
    if text.startswith("exact:"):  # exact:docs=rest-1;layers=global;part=k;tokens=top:0.15@mean
        spec = dict(item.split("=") for item in text.removeprefix("exact:").split(";"))
        return {"exact": spec}
    parts = text.split(",")
    layers = None
    if len(parts) > 2 and parts[2] == "global":
        layers = frozenset(i for i, s in enumerate(runner.layer_specs) if s.window is None)
    return {"temperature": float(parts[0]), "mass": float(parts[1]), "layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--settings", nargs="+", default=["1,1"])
    ap.add_argument("--out", default="bench/results/repair.jsonl")
    args = ap.parse_args()
    samples = read_samples(args.jsonl, args.start, args.limit)
    shelf = open_shelf(KVShelfConfig(model="gemma3-270m", device="cpu", max_local_cpu_size=8))
    runner, engine, tok = shelf.runner, shelf.engine, shelf.model.tokenizer
    blender = Blender(runner, engine, check_layers=[1], ratios=[args.ratio])
    gen = CachedGenerator(runner, engine, tok, blender=blender, blend_special_str=SEP)
    settings = {name: parse_setting(name, runner) for name in args.settings}
    rng = random.Random(1)
    out = Path(args.out)
    out.write_text("")
    rows = []
    for index, sample in enumerate(samples, start=args.start):
        docs, question, cue = list(sample["documents"]), sample["question"], sample.get("cue", "")
        store_documents(gen, prompt_text(another_order(docs, rng), question, cue))
        seg = gen.segment(prompt_text(docs, question, cue), None)
        ids = seg.token_ids
        n = len(ids)
        full = runner.new_kv(n + 4)
        logits = runner.forward(ids, 0, full)
        ref_steps, ref_tokens = [logits], []
        for _ in range(3):
            ref_tokens.append(int(ref_steps[-1].argmax()))
            ref_steps.append(runner.forward([ref_tokens[-1]], n + len(ref_tokens) - 1, full))
        at = next((j for j, t in enumerate(ref_tokens) if tok.decode([t]).strip()), 0)
        documents = blender.documents(seg, None)
        fused = runner.new_kv(n + 4)
        blend_logits, info = blender.prefill(seg, fused, None, documents)
        start = n - len(seg.suffix)
        context = torch.zeros(fused.capacity, dtype=torch.bool)
        for doc in documents:
            if doc.cached:
                context[doc.start : doc.end] = True
        record = {"index": index, "type": sample["type"], "tokens": n, "kl": {}}

        placed = runner.new_kv(n + 4)
        blender.place_documents(seg, placed, None, BlendInfo(), documents)
        SEP_TOKENS[0] = len(seg.separator)
        PUNCT[0] = torch.tensor([tok.decode([t]).strip() in ("", ".") for t in ids])
        tail, ref = seg.suffix + ref_tokens[:at], ref_steps[at]
        record["kl"]["blend"] = kl(ref, runner.forward(tail, start, fused))
        spans = [(d.start, d.end) for d in documents]
        for name, s in settings.items():
            kv = runner.new_kv(n + 4)
            kv.data.copy_(fused.data)
            if "oracle" in s:
                which = s["oracle"]
                keep = [int(which.removeprefix("rest-"))] if which.startswith("rest-") else None
                for j, (a, b) in enumerate(spans):
                    if (keep is None and j == int(which)) or (keep is not None and j not in keep):
                        kv.data[:, :, :, a:b] = full.data[:, :, :, a:b]
            elif "dist" in s:
                bias = s["dist"] * (1 - torch.arange(kv.capacity).float() / start)
                kv.reweight = AttentionReweight(context, start, layers=s["layers"], bias=bias)
            elif "shift" in s:
                shift_documents(kv, full, fused, placed, spans, s["shift"], runner)
            elif "exact" in s:
                exact_parts(kv, full, fused, spans, s["exact"], runner, n - len(seg.suffix))
            else:
                kv.reweight = AttentionReweight(context, start, s["temperature"], s["mass"], s["layers"])
            record["kl"][name] = kl(ref, runner.forward(tail, start, kv))
        rows.append(record)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(index, sample["type"], n, {k: round(v, 3) for k, v in record["kl"].items()}, flush=True)
    report(rows)


def _unrotate(runner, k, positions, layer, sign):
    """Keys [heads, t, dim] at `positions` rotated back to position 0 (sign -1) or from it (sign +1)."""
    from kvshelf.kvmath.rope import apply_rope

    hidden = torch.zeros(1, len(positions), 1, dtype=k.dtype)
    cos, sin = runner.rope_tables(hidden, sign * positions)[runner.layer_specs[layer].rope_key]
    return apply_rope(k.unsqueeze(0), cos.unsqueeze(1), sin.unsqueeze(1))[0]


def shift_documents(kv, full, fused, placed, spans, spec: dict, runner) -> None:
    """Each document's tokens not recomputed moved by the mean deviation of K (unrotated) and V per layer:
    the mean of exact minus fused over the document (oracle), or of fresh minus cached over the document's
    recomputed tokens (an estimate a blend could make)."""
    layers = spec.get("layers", "global")
    which = [i for i, sp in enumerate(runner.layer_specs) if layers == "all" or sp.window is None]
    last = runner.num_layers - 1
    for j, (a, b) in enumerate(spans):
        if j == 0:
            continue
        pos = torch.arange(a, b)
        recomputed = (fused.data[last, 1, 0, a:b] != placed.data[last, 1, 0, a:b]).any(-1)
        reused = pos[~recomputed]
        origin = spec.get("from", "oracle")
        if origin == "oracle":
            source, ref, base = pos, full, fused
        elif origin == "recomputed":
            source, ref, base = pos[recomputed], fused, placed
        else:  # strideN: every N-th token's exact KV against its placed KV (what recomputing it would give)
            stride = int(origin.removeprefix("stride"))
            source, ref, base = pos[(pos - a) % stride == stride // 2], full, placed
        if not len(source) or not len(reused):
            continue
        for layer in which:
            dk = _unrotate(runner, ref.data[layer, 0, :, source] - base.data[layer, 0, :, source], source, layer, -1)
            dv = ref.data[layer, 1, :, source] - base.data[layer, 1, :, source]
            mk = dk.mean(1, keepdim=True).expand(-1, len(reused), -1)
            kv.data[layer, 0, :, reused] += _unrotate(runner, mk, reused, layer, 1)
            kv.data[layer, 1, :, reused] += dv.mean(1, keepdim=True)


SEP_TOKENS = [0]  # the separator's length in tokens, set per run
PUNCT = [torch.zeros(0, dtype=torch.bool)]  # per sample: positions holding a line break or a full stop


def exact_parts(kv, full, fused, spans, spec: dict, runner, end: int) -> None:
    """Diagnostic: full prefill's exact KV written over parts of the fused KV (documents, layers, K or V,
    tokens: all, each document's first or last N, or the top share of placed tokens by their deviation from
    exact at one layer or averaged over layers)."""
    docs = spec.get("docs", "all")
    chosen = torch.zeros(kv.capacity, dtype=torch.bool)
    for j, (a, b) in enumerate(spans):
        if j == 0:
            continue  # the instruction: exact already
        if docs == "all" or (docs.startswith("rest-") and j != int(docs[5:])) or docs == str(j):
            chosen[a:b] = True
    tokens = spec.get("tokens", "all")
    if tokens in ("sep", "sep+punct"):  # each document's trailing separator (cached with it), and punctuation
        marks = torch.zeros_like(chosen)
        for _a, b in spans:
            marks[b - SEP_TOKENS[0] : b] = True
        if tokens == "sep+punct":
            marks[: len(PUNCT[0])] |= PUNCT[0]
        chosen &= marks
    elif tokens.startswith(("head:", "tail:")):
        count = int(tokens[5:])
        edge = torch.zeros_like(chosen)
        for a, b in spans:
            if tokens.startswith("head:"):
                edge[a : a + count] = True
            else:
                edge[max(a, b - count) : b] = True
        chosen &= edge
    elif tokens.startswith("top:"):
        share, _, at = tokens[4:].partition("@")
        diff = (full.data[:, :, :, :end] - fused.data[:, :, :, :end]).float().pow(2).sum(dim=(2, 4))
        energy = full.data[:, :, :, :end].float().pow(2).mean(dim=(2, 3, 4)).clamp_min(1e-12)
        dev = (diff / energy.unsqueeze(-1)).sum(1)  # [layers, tokens]
        dev = dev.mean(0) if at == "mean" else dev[int(at)]
        dev = dev.masked_fill(~chosen[:end], float("-inf"))
        budget = int(float(share) * int(chosen.sum()))
        top = torch.zeros_like(chosen)
        top[torch.topk(dev, budget).indices] = True
        chosen = top
    layers = spec.get("layers", "all")
    specs = runner.layer_specs
    which = [i for i, sp in enumerate(specs) if layers == "all" or (layers == "global") == (sp.window is None)]
    parts = {"kv": [0, 1], "k": [0], "v": [1]}[spec.get("part", "kv")]
    idx = chosen.nonzero().view(-1)
    for layer in which:
        for part in parts:
            kv.data[layer, part, :, idx] = full.data[layer, part, :, idx]


def report(rows: list[dict]) -> None:
    names = list(rows[0]["kl"])
    types = sorted({r["type"] for r in rows})
    print(f"{'setting':24s} {'mean KL':>8s} {'minus blend':>12s} {'lower':>6s} " + " ".join(f"{t:>9s}" for t in types))
    for name in names:
        vals = [r["kl"][name] for r in rows]
        diffs = [r["kl"][name] - r["kl"]["blend"] for r in rows]
        per = [statistics.fmean([r["kl"][name] for r in rows if r["type"] == t]) for t in types]
        lower = sum(d < 0 for d in diffs)
        print(
            f"{name:24s} {statistics.fmean(vals):8.4f} {statistics.fmean(diffs):+12.4f} {lower:3d}/{len(rows):<3d}"
            + " ".join(f"{p:9.3f}" for p in per)
        )


if __name__ == "__main__":
    main()
