"""The real default model (Gemma 3 270M, converted from its PyPI GGUF). Slow tier: CI runs it too."""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import subprocess
import sys

import pytest
import torch

from kvshelf.app import open_shelf
from kvshelf.config import KVShelfConfig

pytestmark = pytest.mark.slow

# Stated tolerance on the real model in fp32; measured max differences are ~3e-5.
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def shelf():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return open_shelf(KVShelfConfig(device="cpu"))


def long_text() -> str:
    t = pydoc_data.topics.topics
    return t["for"] + t["with"] + t["exceptions"]


def test_default_model_shape(shelf):
    runner = shelf.runner
    assert runner.config.model_type == "gemma3_text"
    assert runner.num_layers == 18 and runner.num_kv_heads == 1 and runner.head_dim == 256
    assert sum(s.window == 512 for s in runner.layer_specs) == 15
    assert [i for i, s in enumerate(runner.layer_specs) if s.window is None] == [5, 11, 17]
    # BOS must be added, or the model's quality collapses.
    assert shelf.model.tokenizer("hi")["input_ids"][0] == runner.config.bos_token_id


def test_runner_matches_hf_forward(shelf):
    ids = shelf.model.tokenizer(long_text())["input_ids"][:700]  # past the 512-token sliding window
    with torch.no_grad():
        ref = shelf.runner.model(torch.tensor([ids])).logits[0, -1]
    kv = shelf.runner.new_kv(len(ids))
    assert torch.allclose(shelf.runner.forward(ids, 0, kv), ref, atol=LOGIT_ATOL)


def test_reuse_is_exact_on_real_model(shelf):
    gen = shelf.generator
    shelf.engine.clear()
    ids = shelf.model.tokenizer(long_text())["input_ids"][:1100]
    plain = gen.generate(ids, max_new_tokens=24, use_cache=False, stop_at_eos=False)
    gen.generate(ids, max_new_tokens=4)
    warm = gen.generate(ids, max_new_tokens=24, stop_at_eos=False)
    assert warm.hit_tokens == 1099
    assert warm.token_ids == plain.token_ids
    diff = (warm.first_logits - plain.first_logits).abs().max().item()
    assert diff < LOGIT_ATOL, diff
    # A new question after the same documents reuses every full chunk of them.
    q = shelf.model.tokenizer("\nQuestion: what does break do?\nAnswer:", add_special_tokens=False)["input_ids"]
    other = gen.generate(ids + q, max_new_tokens=8, stop_at_eos=False)
    assert other.hit_tokens == 1024
    assert other.token_ids == gen.generate(ids + q, max_new_tokens=8, use_cache=False, stop_at_eos=False).token_ids


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvshelf.cli",
            "demo",
            "--quick",
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TTFT kvshelf" in proc.stdout
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(r["same_answer"] for r in rows)
    assert rows[0]["hit_tokens"] == 0 and rows[1]["hit_tokens"] >= 256


def test_cli_reports_missing_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kvshelf.cli", "demo", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "never downloads" in proc.stderr
