"""`kvshelf advise` checks its recommendation by an A/B on the trace: never a config that measured slower."""

import dataclasses
import json

import pytest
from conftest import tiny_tokenizer
from typer.testing import CliRunner

from kvshelf.advice.verify import NO_CACHE, candidates, verify
from kvshelf.assembly import open_shelf
from kvshelf.cli import app
from kvshelf.config import KVShelfConfig
from kvshelf.generation import CachedGenerator
from kvshelf.model.loader import LoadedModel
from kvshelf.model.runner import ModelRunner

RECOMMENDED = {"chunk_size": 16, "guard": False, "local_cpu": True, "enable_blending": True}


def test_candidates_fall_back_step_by_step():
    labels = [label for label, _ in candidates({**RECOMMENDED, "use_layerwise": True, "buffer_size": 4})]
    assert labels == ["recommended", "without CacheBlend", "without layerwise loading"]
    assert candidates({"local_cpu": True}) == [("recommended", {"local_cpu": True})]


def scripted(ttfts):
    """A progress step that runs the request for real but reports scripted TTFTs (timing-free tests)."""
    queue = list(ttfts)

    def step(_description, fn, *args, **kwargs):
        return dataclasses.replace(fn(*args, **kwargs), ttft_s=queue.pop(0))

    return step


@pytest.fixture
def loaded(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    return LoadedModel(ModelRunner(tiny_models("llama")), tiny_tokenizer(), tmp_path)


def check(loaded, config, texts, ttfts):
    """verify() with scripted TTFTs: per request, the no-cache run then the cached one."""
    plain = CachedGenerator(loaded.runner, None, loaded.tokenizer)
    return verify(loaded, KVShelfConfig(), config, texts, plain, step=scripted(ttfts), open_shelf=open_shelf)


def test_a_recommendation_that_measures_faster_is_kept(loaded):
    texts = ["a long shared document. " * 3 + "question one"] * 3
    v = check(loaded, RECOMMENDED, texts, [1.0, 1.0, 1.0, 0.2, 1.0, 0.2])
    assert v.chosen == RECOMMENDED and v.chosen_label == "recommended" and not v.notes
    assert v.trials[0].mean_ttft_s == pytest.approx(0.4666, abs=1e-3) and v.trials[0].no_cache_ttft_s == 1.0


def test_a_slower_recommendation_falls_back_and_says_so(loaded):
    texts = ["first document. question", "second document. question"]
    v = check(loaded, RECOMMENDED, texts, [1.0, 1.5, 1.0, 1.5, 1.0, 0.5, 1.0, 0.9])
    assert v.chosen_label == "without CacheBlend" and "enable_blending" not in v.chosen
    assert "measured slower than no cache" in v.notes[0]


def test_when_every_candidate_is_slower_the_advice_is_no_cache(loaded):
    v = check(loaded, {"local_cpu": True}, ["one", "two"], [1.0, 1.0, 1.0, 1.2])
    assert v.chosen == NO_CACHE and "recommending no cache" in v.notes[0]


def test_remote_placeholder_is_not_measured_and_said(loaded):
    rec = {"local_cpu": True, "remote_url": "redis://cache-host:6379/0", "local_disk": "/var/cache/kvshelf"}
    v = check(loaded, rec, ["one"], [1.0, 0.5])
    assert v.chosen == rec and "not part of the measurement" in v.notes[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "disaggregated"], "removed"),
        (["--scenario", "nope"], "unknown scenario"),
        (["--trace", "missing.jsonl"], "does not exist"),
        (["--scenario", "long-rag", "--ab-requests", "-1"], "--ab-requests"),
        (["--scenario", "long-rag", "--set", "chunk_size=7"], "chunk_size"),
    ],
)
def test_advise_checks_arguments_before_loading_the_model(tmp_path, args, message):
    # The model folder does not exist: reaching the model load would fail with "not found" instead.
    result = CliRunner().invoke(app, ["advise", *args, "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 2 and message in result.output and "not found" not in result.output


def test_bad_trace_lines_are_named_before_loading_the_model(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"tokens": ["x"]}) + "\n")
    result = CliRunner().invoke(app, ["advise", "--trace", str(trace), "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 2 and "t.jsonl:2: 'tokens' must be" in result.output
