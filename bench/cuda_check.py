"""Check the model runner and prefix reuse on a CUDA GPU (run on the lent H200; CI has no GPU).

    python bench/cuda_check.py [--json out.json]

1. Tiny random Llama/Mistral/Qwen2/Qwen3/Gemma 3 on CUDA, fp32 (TF32 off): runner logits vs the HF model's
   own forward, and greedy output with vs without prefix reuse. bf16: greedy output with vs without reuse.
2. The vLLM connector's worker half on CUDA tensors (a probed block layout, a save, a layerwise load).
3. A 1B-class random Llama-shaped model in bf16: TTFT of full prefill vs a fully cached prompt at 1K-8K.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import FAMILIES, build_tiny_model, tiny_tokenizer  # noqa: E402

from kvshelf.blend.blender import Blender  # noqa: E402
from kvshelf.cache.engine import CacheEngine  # noqa: E402
from kvshelf.cache.fingerprint import ModelFingerprint  # noqa: E402
from kvshelf.generation import CachedGenerator  # noqa: E402
from kvshelf.model.runner import ModelRunner  # noqa: E402
from kvshelf.storage.memory import MemoryBackend  # noqa: E402


def generator(model) -> CachedGenerator:
    runner = ModelRunner(model)
    return CachedGenerator(runner, CacheEngine(runner.fingerprint(), MemoryBackend(8 << 30), chunk_size=64))


def tiny_checks(device: str) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for family in FAMILIES:
        for dtype in (torch.float32, torch.bfloat16):
            model = build_tiny_model(family).to(device=device, dtype=dtype)
            gen = generator(model)
            ids = torch.randint(4, 320, (200,), generator=torch.Generator().manual_seed(0)).tolist()
            with torch.no_grad():
                ref = model(torch.tensor([ids], device=device)).logits[0, -1].float()
            kv = gen.runner.new_kv(len(ids))
            ours = gen.runner.forward(ids, 0, kv)
            plain = gen.generate(ids, max_new_tokens=16, use_cache=False, stop_at_eos=False)
            gen.generate(ids, max_new_tokens=1)
            warm = gen.generate(ids, max_new_tokens=16, stop_at_eos=False)
            layered = CachedGenerator(gen.runner, gen.engine, use_layerwise=True, buffer_size=2)
            lw = layered.generate(ids, max_new_tokens=16, stop_at_eos=False)
            sep = "<|SEP|>"
            tok = tiny_tokenizer()
            blender = Blender(gen.runner, gen.engine, check_layers=[1], ratios=[1.0])
            bgen = CachedGenerator(gen.runner, gen.engine, tok, blender=blender, blend_special_str=sep)
            text = sep.join(["alpha " * 20, "beta " * 25]) + sep + "question"
            full_b = bgen.generate(bgen.segment(text, None).token_ids, max_new_tokens=4, use_cache=False)
            blended = bgen.generate(text, max_new_tokens=4)
            rows.append(
                {
                    "layerwise_same_output": lw.token_ids == plain.token_ids and lw.hit_tokens == warm.hit_tokens,
                    "blend_full_recompute_same_output": blended.token_ids == full_b.token_ids,
                    "blend_max_logit_diff": (blended.first_logits - full_b.first_logits).abs().max().item(),
                    "pinned_cpu_tier": all(c.kv.is_pinned() for c in gen.engine.backend._items.values()),
                    "family": family,
                    "dtype": str(dtype).removeprefix("torch."),
                    "max_logit_diff_vs_hf": (ours - ref).abs().max().item(),
                    "logit_scale": ref.abs().max().item(),
                    "hit_tokens": warm.hit_tokens,
                    "same_greedy_output": warm.token_ids == plain.token_ids,
                    "max_logit_diff_reuse": (warm.first_logits - plain.first_logits).abs().max().item(),
                }
            )
            print(rows[-1], flush=True)
    return rows


def speed_check(device: str, lengths=(1024, 2048, 4096, 8192), repeats=5) -> list[dict]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=16384,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = generator(model)
    gen.generate(list(range(100)), max_new_tokens=2, use_cache=False)
    rows = []
    for n in lengths:
        ids = torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        gen.generate(ids, max_new_tokens=1)
        plain, cached = [], []
        for _ in range(repeats):
            torch.cuda.synchronize()
            plain.append(gen.generate(ids, max_new_tokens=1, use_cache=False).ttft_s)
            torch.cuda.synchronize()
            r = gen.generate(ids, max_new_tokens=1)
            cached.append(r.ttft_s)
        p, c = statistics.median(plain), statistics.median(cached)
        rows.append(
            {
                "tokens": n,
                "hit": r.hit_tokens,
                "full_prefill_s": p,
                "cached_s": c,
                "speedup": p / c,
                "kv_mb": r.loaded_bytes / 1e6,
            }
        )
        print(rows[-1], flush=True)
    return rows


def vllm_worker_check(device: str) -> dict:
    """The vLLM connector's worker half on CUDA tensors (no vLLM here): a block layout unlike the CPU
    backend's ([blocks, block_size, K|V, heads, dim], written by a plain-torch cache writer), probed, then
    a save out of paged blocks and a layerwise load (loader thread, CUDA load stream) into other blocks."""
    from kvshelf.integrations.vllm.scheduler import LoadSpec, SaveSpec, StepPlan
    from kvshelf.integrations.vllm.worker import WorkerSide

    layers, heads, dim, bs, nb = 4, 2, 64, 16, 32
    fp = ModelFingerprint("tiny", "w", "bfloat16", layers, heads, dim, extra={"engine": "vllm"})

    def write(key, value, cache, slots):
        flat = cache.view(-1, 2, heads, dim)
        flat[slots, 0], flat[slots, 1] = key, value

    def caches():
        return {
            f"model.layers.{i}.self_attn.attn": torch.zeros(nb, bs, 2, heads, dim, dtype=torch.bfloat16, device=device)
            for i in range(layers)
        }

    results = {}
    for layerwise in (False, True):
        engine = CacheEngine(fp, MemoryBackend(1 << 30), chunk_size=32)
        tokens = list(range(100, 200))
        kv = [
            (
                torch.randn(100, heads, dim, device=device).bfloat16(),
                torch.randn(100, heads, dim, device=device).bfloat16(),
            )
            for _ in range(layers)
        ]
        src = caches()
        blocks_a = [7, 3, 9, 12, 5, 6, 8]
        slots = torch.tensor([blocks_a[t // bs] * bs + t % bs for t in range(100)], device=device)
        for cache, (k, v) in zip(src.values(), kv, strict=True):
            write(k, v, cache, slots)
        side = WorkerSide(engine, block_size=bs, use_layerwise=layerwise, use_async_load=True, buffer_size=1)
        side.register(src, write)
        plan = StepPlan(saves=[SaveSpec("a", tokens, blocks_a, None)])
        side.start_saves(plan)
        for name, cache in src.items():
            side.save_layer(name, cache)
        side.finish_saves()
        stored = engine.retrieve(tokens).kv
        saved_ok = all(
            torch.equal(stored[i, 0], k.transpose(0, 1).cpu()) and torch.equal(stored[i, 1], v.transpose(0, 1).cpu())
            for i, (k, v) in enumerate(kv)
        )
        dst = caches()
        loader_side = WorkerSide(engine, block_size=bs, use_layerwise=layerwise, use_async_load=True, buffer_size=1)
        loader_side.register(dst, write)
        blocks_b = [1, 2, 4, 10, 11, 13, 14]
        loader_side.start_load(StepPlan(loads=[LoadSpec("b", tokens[:96], blocks_b, 16, 96, None)]))
        for name in dst:
            loader_side.wait_layer(name)
        loader_side.finish_loads()
        if device != "cpu":
            torch.cuda.synchronize()
        loaded_ok = not loader_side.take_failed_blocks()
        for i, name in enumerate(loader_side.names):
            got = loader_side.layout.view(blocks_b, 0, 96, device=device).gather(dst[name])
            k, v = kv[i]
            loaded_ok &= torch.equal(got[0, :, 16:], k[16:96].transpose(0, 1))
            loaded_ok &= torch.equal(got[1, :, 16:], v[16:96].transpose(0, 1))
            loaded_ok &= bool(torch.all(got[:, :, :16] == 0))
        results["layerwise" if layerwise else "whole"] = {"saved_exact": saved_ok, "loaded_exact": bool(loaded_ok)}
    print(results, flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible")
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    out = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "tiny": tiny_checks("cuda"),
        "vllm_worker": vllm_worker_check("cuda"),
        "speed": speed_check("cuda"),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
