"""The blend's confidence fallback (issue #18, twelfth session): a near tie of the blend's first answer token
is served by an exact prefill (kvshelf.generation.fallback; config blend_fallback_margin)."""

import logging

import pytest
import torch
from conftest import tiny_tokenizer

from kvshelf.assembly.runtimes import check_runtime
from kvshelf.blend.blender import Blender
from kvshelf.cache.engine import CacheEngine
from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError
from kvshelf.generation import CachedGenerator
from kvshelf.generation.fallback import top_margin
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.memory import MemoryBackend

SEP = "<|CHUNK_SEP|>"
DOCS = ["Alpha facts: the key is 4821. " * 3, "Beta notes about rivers and seas. " * 3, "Gamma: more text here. " * 2]
FIRST = SEP.join(DOCS) + SEP + "Question: what is the key?"
REORDERED = SEP.join([DOCS[2], DOCS[0], DOCS[1]]) + SEP + "Question: what is the key?"


def make(model, margin: float) -> CachedGenerator:
    """Full reuse (0% recompute) of documents reordered: a blend whose logits differ from full prefill's."""
    runner = ModelRunner(model)
    engine = CacheEngine(runner.fingerprint(), MemoryBackend(1 << 28), chunk_size=16)
    blender = Blender(runner, engine, check_layers=[1], ratios=[0.0], fallback_margin=margin)
    gen = CachedGenerator(runner, engine, tiny_tokenizer(), blender=blender, blend_special_str=SEP)
    gen.generate(FIRST, max_new_tokens=1)  # cold: exact, the documents stored after the first token
    return gen


def steps(gen: CachedGenerator, prompt, **kw):
    """The result and the logits each new token was chosen from."""
    seen: list[torch.Tensor] = []
    result = gen.generate(prompt, max_new_tokens=5, stop_at_eos=False, on_logits=lambda lg, _t: seen.append(lg), **kw)
    return result, seen


def fallbacks(gen: CachedGenerator) -> float:
    return gen.blender.metrics.registry.get_sample_value("kvshelf_blend_fallbacks_total")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_margin_above_any_serves_the_exact_prefill(family, tiny_models, caplog):
    gen = make(tiny_models(family), margin=1e9)
    ids = gen.segment(REORDERED, None).token_ids
    full, full_steps = steps(gen, ids, use_cache=False)
    with caplog.at_level(logging.INFO, logger="kvshelf.generation.fallback"):
        served, served_steps = steps(gen, REORDERED)
    info = served.blend
    assert info.document_hits == 3 and not info.exact  # it was blended first ...
    assert info.fallback and info.answer_margin is not None and info.answer_margin < 1e9  # ... then fell back
    assert served.hit_tokens == 0 and served.stored_tokens == 0  # nothing from the cache served the answer
    # The first token's logits and every later step's equal full prefill's: the KV decoded from is exact.
    assert served.token_ids == full.token_ids
    for mine, ref in zip(served_steps, full_steps, strict=True):
        assert torch.allclose(mine, ref, atol=1e-4)
    assert fallbacks(gen) == 1
    assert "blend fallback" in caplog.text and "exact prefill" in caplog.text


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_margin_zero_never_falls_back(family, tiny_models):
    gen = make(tiny_models(family), margin=0.0)
    ids = gen.segment(REORDERED, None).token_ids
    full = gen.generate(ids, max_new_tokens=1, use_cache=False)
    blend = gen.generate(REORDERED, max_new_tokens=1)
    assert not blend.blend.fallback and blend.blend.answer_margin is None  # not even measured
    assert not torch.allclose(blend.first_logits, full.first_logits, atol=1e-4)  # really the blend's answer
    assert blend.hit_tokens > 0 and fallbacks(gen) == 0


def test_the_threshold_is_the_answer_tokens_margin(tiny_models):
    gen = make(tiny_models("llama"), margin=1e-9)
    blend = gen.generate(REORDERED, max_new_tokens=1)
    margin = blend.blend.answer_margin
    assert margin == pytest.approx(top_margin(blend.first_logits)) and not blend.blend.fallback
    below, above = make(tiny_models("llama"), margin * 0.99), make(tiny_models("llama"), margin * 1.01)
    assert not below.generate(REORDERED, max_new_tokens=1).blend.fallback
    assert above.generate(REORDERED, max_new_tokens=1).blend.fallback


def test_white_space_first_token_is_looked_past(tiny_models):
    """A first token of white space alone is held back; the check reads the next token's margin. Without a
    fallback the stream is the one a plain blend gives."""
    plain = make(tiny_models("gemma3"), margin=0.0)
    ref, ref_steps = steps(plain, REORDERED)
    watched = make(tiny_models("gemma3"), margin=1e-9)
    watched._blank = lambda token: token == ref.token_ids[0]  # as if the blend's first token were a space
    mine, mine_steps = steps(watched, REORDERED)
    assert mine.token_ids == ref.token_ids and not mine.blend.fallback
    for a, b in zip(mine_steps, ref_steps, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert mine.blend.answer_margin == pytest.approx(top_margin(ref_steps[1]))  # the second token's margin


def test_config_key_and_where_it_is_refused(tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    config = KVShelfConfig(enable_blending=True, blend_fallback_margin=0.15)
    assert Blender.from_config(runner, None, config).fallback_margin == 0.15
    assert Blender.from_config(runner, None, KVShelfConfig()).fallback_margin == 0.0
    with pytest.raises(ValueError, match="blend_fallback_margin"):
        KVShelfConfig(blend_fallback_margin=-0.1)
    with pytest.raises(ValueError, match="blend_fallback_margin"):
        Blender(runner, None, check_layers=[1], ratios=[0.1], fallback_margin=float("nan"))
    check_runtime(config, "serve")
    with pytest.raises(ConfigError, match="blend_fallback_margin.*vllm"):
        check_runtime(config, "vllm")


def test_served_shelf_counts_fallbacks_in_its_metrics(tiny_models, tmp_path, monkeypatch):
    """Through open_shelf (what `kvshelf serve` builds): the key reaches the blender, and the fallback counter is
    in the registry the server's /metrics exports."""
    from kvshelf.assembly import open_shelf
    from kvshelf.model.loader import LoadedModel

    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    loaded = LoadedModel(ModelRunner(tiny_models("llama")), tiny_tokenizer(), tmp_path)
    config = KVShelfConfig(
        enable_blending=True, blend_recompute_ratios=[0.0], blend_fallback_margin=1e9, guard=False, chunk_size=16
    )
    gen = open_shelf(config, loaded=loaded, show_progress=False).generator
    gen.generate(FIRST, max_new_tokens=1)
    served = gen.generate(REORDERED, max_new_tokens=1)
    assert served.blend.document_hits == 3 and served.blend.fallback
    assert gen.metrics.registry.get_sample_value("kvshelf_blend_fallbacks_total") == 1


def test_a_fallback_after_the_white_space_look_ahead_streams_full_prefills_tokens(tiny_models):
    gen = make(tiny_models("gemma3"), margin=1e9)
    ids = gen.segment(REORDERED, None).token_ids
    full, full_steps = steps(gen, ids, use_cache=False)
    blend_first = make(tiny_models("gemma3"), margin=0.0).generate(REORDERED, max_new_tokens=1).token_ids[0]
    gen._blank = lambda token: token == blend_first  # the blend's first token counts as white space: looked past
    served, served_steps = steps(gen, REORDERED)
    assert served.blend.fallback and served.token_ids == full.token_ids
    for a, b in zip(served_steps, full_steps, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
