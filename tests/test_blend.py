"""CacheBlend on tiny models of every family: re-rotation, selective recompute, segmentation."""

import logging

import pytest
import torch
from conftest import FAMILIES, tiny_tokenizer

from kvshelf.blend.blender import Blender
from kvshelf.blend.segment import split_text, split_tokens
from kvshelf.cache.engine import CacheEngine
from kvshelf.generation import CachedGenerator
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.memory import MemoryBackend

SEP = "<|CHUNK_SEP|>"
DOCS = ["Alpha facts: the key is 4821. " * 3, "Beta notes about rivers and seas. " * 3, "Gamma: ünïcödé text ✓. " * 2]
QUESTION = "Question: what is the key?"


def make(model, ratios=(0.15,), check_layers=(1,), document_context="alone"):
    runner = ModelRunner(model)
    engine = CacheEngine(runner.fingerprint(), MemoryBackend(1 << 28), chunk_size=16)
    blender = Blender(
        runner, engine, check_layers=list(check_layers), ratios=list(ratios), document_context=document_context
    )
    return CachedGenerator(runner, engine, tiny_tokenizer(), blender=blender, blend_special_str=SEP)


def blended(docs) -> str:
    return SEP.join(docs) + SEP + QUESTION


def kl(p_logits, q_logits) -> float:
    p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((p.exp() * (p - q)).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_rerotation_equals_direct_computation(family, tiny_models):
    runner = ModelRunner(tiny_models(family))
    torch.manual_seed(0)
    chunk = torch.randint(4, 300, (12,)).tolist()
    alone = runner.new_kv(13)
    runner.forward([1] + chunk, 0, alone)
    for shift in (5, 37):
        direct = runner.new_kv(1 + shift + 12)
        runner.forward([1] + [7] * shift + chunk, 0, direct)
        for layer in range(runner.num_layers):
            moved = runner.rerotate(alone.data[layer, 0, :, 1:], shift, layer)
            if layer == 0:  # layer-0 keys depend on the token and its position only: must match exactly
                assert torch.allclose(moved, direct.data[0, 0, :, 1 + shift :], atol=1e-5)
        # Re-rotating back and forth is the identity.
        k = alone.data[2, 0, :, 1:]
        assert torch.allclose(runner.rerotate(runner.rerotate(k, shift, 2), -shift, 2), k, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_recompute_equals_full_prefill(family, tiny_models):
    gen = make(tiny_models(family), ratios=(1.0,))
    prompt = blended(DOCS)
    full = gen.generate(gen.segment(prompt, None).token_ids, max_new_tokens=6, use_cache=False, stop_at_eos=False)
    gen.generate(prompt, max_new_tokens=1)  # cold: prefilled exactly, the documents computed after it
    blend = gen.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    assert (
        blend.blend is not None
        and blend.blend.documents == 3
        and blend.blend.recomputed_tokens == blend.blend.document_tokens
    )
    assert torch.allclose(blend.first_logits, full.first_logits, atol=1e-4)
    assert blend.token_ids == full.token_ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_reordered_documents_hit_every_chunk_and_recompute_helps(family, tiny_models):
    gen = make(tiny_models(family), ratios=(0.3,))
    gen.generate(blended(DOCS), max_new_tokens=1)
    reordered = blended([DOCS[2], DOCS[0], DOCS[1]])
    full = gen.generate(gen.segment(reordered, None).token_ids, max_new_tokens=1, use_cache=False)
    warm = gen.generate(reordered, max_new_tokens=1)
    info = warm.blend
    assert info.document_hits == 3 and info.computed_alone == 0
    assert info.recomputed_tokens == pytest.approx(0.3 * info.document_tokens, abs=1)
    no_recompute = make(tiny_models(family), ratios=(0.0,))
    no_recompute.engine = gen.engine
    no_recompute.blender.engine = gen.engine
    zero = no_recompute.generate(reordered, max_new_tokens=1)
    assert zero.blend.recomputed_tokens == 0
    recomputed, reused = kl(full.first_logits, warm.first_logits), kl(full.first_logits, zero.first_logits)
    if family == "qwen2":
        # Its tiny config slides a 24-token window over the top layers: the last token sees only the
        # question there, so which chunk tokens were recomputed can leave its logits unchanged.
        assert recomputed <= reused
    else:
        assert recomputed < reused


def test_gradual_filtering_over_several_check_layers(tiny_models):
    gen = make(tiny_models("qwen3"), check_layers=(1, 2), ratios=(0.5, 0.2))
    gen.generate(blended(DOCS), max_new_tokens=1)  # cold: caches the documents
    out = gen.generate(blended(DOCS), max_new_tokens=1)
    n = out.blend.document_tokens
    assert out.blend.selected_per_check == [-(-n // 2), -(-n * 2 // 10)]
    with pytest.raises(ValueError, match="ratio"):
        Blender(gen.runner, None, check_layers=[1, 2], ratios=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="check_layers"):
        Blender(gen.runner, None, check_layers=[99], ratios=[0.1])


def test_blended_kv_is_never_stored_as_prefix_kv(tiny_models):
    gen = make(tiny_models("llama"))
    out = gen.generate(blended(DOCS), max_new_tokens=4)
    ids = gen.segment(blended(DOCS), None).token_ids
    assert out.stored_tokens == 0 and gen.engine.lookup(ids) == 0


def test_explicit_chunk_list_and_plain_prompts(tiny_models, caplog):
    gen = make(tiny_models("gemma3"))
    gen.generate(QUESTION, documents=DOCS, max_new_tokens=1)  # cold: caches the documents for the two below
    listed = gen.generate(QUESTION, documents=DOCS, max_new_tokens=3, stop_at_eos=False)
    joined = gen.generate(blended(DOCS), max_new_tokens=3, stop_at_eos=False)
    assert listed.token_ids == joined.token_ids and listed.blend.document_hits == joined.blend.document_hits == 3
    plain = gen.generate("no separator here", max_new_tokens=2)
    assert plain.blend is None  # an ordinary prompt: prefix reuse
    with caplog.at_level(logging.WARNING):
        gen.generate(QUESTION, documents=[f"a {SEP} b", "c"], max_new_tokens=1)
    assert "separator" in caplog.text


def test_segmentation_edge_cases():
    tok = tiny_tokenizer()
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    seg = split_text(tok, f"{SEP}a{SEP}{SEP}b{SEP}q", SEP)  # separator first, adjacent separators
    assert seg.documents == [enc("a"), enc("b")] and seg.suffix == enc("q") and seg.prefix == tok("x")["input_ids"][:1]
    assert split_text(tok, "no separator", SEP).documents == []
    assert split_text(tok, f"a{SEP}", SEP).suffix == []  # separator at the end: no question
    assert split_text(tok, f"  {SEP}ü✓{SEP}q", SEP).documents == [enc("ü✓")]  # blank chunks dropped, unicode kept
    # Token prompts: the separator is found however whitespace sits around it.
    ids = tok(f"doc one {SEP} doc two\n{SEP}\nthe question")["input_ids"]
    seg = split_tokens(tok, ids, SEP)
    assert [tok.decode(c) for c in seg.documents] == [
        "doc one",
        "doc two",
    ]  # whitespace around it goes too and tok.decode(seg.suffix) == "the question"
    assert split_tokens(tok, tok("plain")["input_ids"], SEP).documents == []


def test_missing_question_is_an_error(tiny_models):
    from kvshelf.errors import PromptError

    gen = make(tiny_models("llama"))
    with pytest.raises(PromptError, match="question"):
        gen.generate(SEP.join(DOCS) + SEP, max_new_tokens=1)


def test_without_cache_a_blend_prompt_is_prefilled_exactly(tiny_models):
    gen = make(tiny_models("qwen3"), ratios=(0.0,))
    ids = gen.segment(blended(DOCS), None).token_ids
    plain = gen.generate(ids, max_new_tokens=3, use_cache=False, stop_at_eos=False)
    listed = gen.generate(QUESTION, documents=DOCS, max_new_tokens=3, use_cache=False, stop_at_eos=False)
    assert listed.blend is None and listed.token_ids == plain.token_ids
    assert torch.equal(listed.first_logits, plain.first_logits)


def test_a_chunk_cached_behind_a_bos_is_placed_exactly_at_other_offsets(tiny_models):
    from kvshelf.blend.blender import BlendInfo
    from kvshelf.blend.segment import Segmented

    gen = make(tiny_models("llama"))
    runner, blender = gen.runner, gen.blender
    first = gen.segment(blended(DOCS[:2]), None)
    assert first.prefix  # the tokenizer adds a BOS: chunks are computed (and stored) at position 1
    list(blender.compute_missing(first, blender.documents(first, None), None, BlendInfo()))  # stores them
    reordered = Segmented(first.prefix, [first.documents[1], first.documents[0]], first.suffix, first.separator)
    no_bos = Segmented([], reordered.documents, reordered.suffix, reordered.separator)
    for seg, hits in ((reordered, 2), (no_bos, 0)):  # without the BOS: other keys, computed at position 0
        info = BlendInfo()
        kv = runner.new_kv(len(seg.token_ids))
        mask = blender.place_documents(seg, kv, None, info)
        assert info.document_hits == hits
        direct = runner.new_kv(len(seg.token_ids))
        runner.forward(seg.token_ids, 0, direct)
        # Layer 0's K and V depend only on each token and its position: placed KV must equal direct KV.
        assert torch.allclose(kv.data[0, :, :, mask], direct.data[0, :, :, mask], atol=1e-5)


def test_a_blend_chunk_stored_at_another_position_is_rejected(tiny_models):
    gen = make(tiny_models("llama"))
    engine = gen.engine
    chunk = list(range(10, 22))
    assert engine.blend_key(chunk, prefix=[1]) != engine.blend_key(chunk)  # the context is part of the key
    key = engine.blend_key(chunk, prefix=[1])
    kv = torch.randn(engine._expected_shape(len(chunk)))
    engine.put_blend_chunk(key, kv, position=5)
    assert engine.get_blend_chunk(key, len(chunk), position=1) is None
    assert engine.stats.rejected_chunks == 1


# -- a cold request is never slower than a plain prefill (issue #18) ------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_cold_request_is_prefilled_exactly_and_the_next_one_blends(family, tiny_models):
    gen = make(tiny_models(family))
    prompt = blended(DOCS)
    ids = gen.segment(prompt, None).token_ids
    full = gen.generate(ids, max_new_tokens=5, use_cache=False, stop_at_eos=False)
    cold = gen.generate(prompt, max_new_tokens=5, stop_at_eos=False)
    assert cold.blend.exact and cold.token_ids == full.token_ids
    assert torch.equal(cold.first_logits, full.first_logits)
    # Computed, not hits; the documents were computed alone (after the first token) and nothing else stored.
    assert cold.hit_tokens == 0 and cold.blend.document_hits == 0 and cold.loaded_bytes == 0
    assert cold.blend.computed_alone == 3 and cold.blend.deferred == 0
    assert cold.stored_tokens == 0 and gen.engine.lookup(ids) == 0
    warm = gen.generate(blended([DOCS[1], DOCS[2], DOCS[0]]), max_new_tokens=1)
    assert not warm.blend.exact and warm.blend.document_hits == 3 and warm.blend.computed_alone == 0
    assert warm.hit_tokens == warm.blend.reused_tokens > 0


def test_the_first_token_comes_before_the_documents_are_computed(tiny_models):
    gen = make(tiny_models("llama"))
    seg = gen.segment(blended(DOCS), None)
    keys = [gen.engine.blend_key(seg.token_ids[s:e], prefix=seg.prefix) for s, e in gen.blender._cached_spans(seg)]
    forwards = []
    forward = gen.runner.forward
    gen.runner.forward = lambda ids, *a, **k: forwards.append(len(ids)) or forward(ids, *a, **k)
    stream = gen.stream(blended(DOCS), max_new_tokens=3, stop_at_eos=False)
    next(stream)
    # One forward so far, the whole prompt; no document's KV computed or stored yet.
    assert forwards == [len(seg.token_ids)] and not any(gen.engine.backend.contains_many(keys))
    while True:
        try:
            next(stream)
        except StopIteration as done:
            result = done.value
            break
    assert all(gen.engine.backend.contains_many(keys)) and result.blend.computed_alone == 3
    # Then one document alone after each token streamed (the decode steps between them), never two in a row.
    alone = [len(seg.prefix) + e - s for s, e in gen.blender._cached_spans(seg)]
    assert forwards[1:] == [alone[0], 1, alone[1], 1, alone[2]]


def test_a_partly_cached_request_blends_only_above_the_cached_share(tiny_models):
    model = tiny_models("qwen3")
    gen = make(model)
    gen.generate(blended(DOCS[:1]), max_new_tokens=1)  # caches DOCS[0] alone
    seg = gen.segment(blended(DOCS), None)
    documents = gen.blender.documents(seg, None)
    share = sum(d.tokens for d in documents if d.cached) / sum(d.tokens for d in documents)
    assert [d.cached for d in documents] == [True, False, False] and 0 < share < 1
    gen.blender.min_cached_share = share + 0.01
    below = gen.generate(blended(DOCS), max_new_tokens=1)
    assert below.blend.exact and below.hit_tokens == 0 and below.blend.computed_alone == 2
    gen.engine.clear()
    gen.generate(blended(DOCS[:1]), max_new_tokens=1)
    gen.blender.min_cached_share = share
    above = gen.generate(blended(DOCS), max_new_tokens=1)
    assert not above.blend.exact and above.blend.document_hits == 1 and above.blend.computed_alone == 2
    # Only the cached document is placed and blended; the two new ones were computed in place (hits: none).
    info = above.blend
    assert info.placed_tokens == documents[0].tokens and above.hit_tokens == info.reused_tokens
    assert info.recomputed_tokens == -(-15 * info.placed_tokens // 100)
    # Nothing cached and blending forced: every token is computed in place, which is a plain prefill.
    gen.engine.clear()
    gen.blender.min_cached_share = 0.0
    ids = gen.segment(blended(DOCS), None).token_ids
    forced = gen.generate(blended(DOCS), max_new_tokens=1)
    full = gen.generate(ids, max_new_tokens=1, use_cache=False)
    assert not forced.blend.exact and forced.blend.placed_tokens == 0 and forced.hit_tokens == 0
    assert torch.allclose(forced.first_logits, full.first_logits, atol=1e-4)
    with pytest.raises(ValueError, match="min_cached_share"):
        Blender(gen.runner, None, check_layers=[1], ratios=[0.1], min_cached_share=1.5)


# -- documents cached with the KV of the prompt that first held them (issue #18, fifth session) ----------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_in_prompt_documents_are_stored_from_the_cold_prefill_without_compute(family, tiny_models):
    gen = make(tiny_models(family), document_context="prompt")
    seg = gen.segment(blended(DOCS), None)
    ids = seg.token_ids
    exact = gen.runner.new_kv(len(ids))
    gen.runner.forward(ids, 0, exact)
    forwards = []
    forward = gen.runner.forward
    gen.runner.forward = lambda tokens, *a, **k: forwards.append(len(tokens)) or forward(tokens, *a, **k)
    cold = gen.generate(blended(DOCS), max_new_tokens=3, stop_at_eos=False)
    # The prompt and the decode steps only: no document computed again.
    assert forwards == [len(ids), 1, 1]
    assert cold.blend.exact and cold.blend.stored_from_prompt == 3 and cold.blend.computed_alone == 0
    for s, e in gen.blender._cached_spans(seg):
        key = gen.engine.blend_key(ids[s:e], prefix=seg.prefix, in_prompt=True)
        assert key != gen.engine.blend_key(ids[s:e], prefix=seg.prefix)  # another cache than alone KV
        chunk = gen.engine.get_blend_chunk(key, e - s, position=None)
        assert chunk is not None and chunk.meta.position == s
        assert torch.equal(chunk.kv, exact.data[:, :, :, s:e])
    # A reader that wants the KV at one position (an alone key's promise) does not take KV computed elsewhere.
    assert s != len(seg.prefix) and gen.engine.get_blend_chunk(key, e - s, position=len(seg.prefix)) is None


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_in_prompt_documents_blend_in_another_order(family, tiny_models):
    gen = make(tiny_models(family), ratios=(1.0,), document_context="prompt")
    gen.generate(blended(DOCS), max_new_tokens=1)
    reordered = blended([DOCS[2], DOCS[0], DOCS[1]])
    full = gen.generate(gen.segment(reordered, None).token_ids, max_new_tokens=4, use_cache=False, stop_at_eos=False)
    warm = gen.generate(reordered, max_new_tokens=4, stop_at_eos=False)
    # Every document placed from the first prompt's KV (keys moved from where they were there); at ratio 1.0
    # every token recomputed from the check layer on: the answer of a full prefill.
    assert not warm.blend.exact and warm.blend.document_hits == 3 and warm.blend.stored_from_prompt == 0
    assert torch.allclose(warm.first_logits, full.first_logits, atol=1e-4) and warm.token_ids == full.token_ids


def test_in_prompt_documents_missing_from_a_blend_are_stored_from_its_fused_kv(tiny_models):
    gen = make(tiny_models("llama"), document_context="prompt")
    gen.blender.min_cached_share = 0.0
    gen.generate(blended(DOCS[:1]), max_new_tokens=1)
    warm = gen.generate(blended(DOCS), max_new_tokens=2, stop_at_eos=False)
    assert not warm.blend.exact and warm.blend.document_hits == 1 and warm.blend.stored_from_prompt == 2
    seg = gen.segment(blended(DOCS), None)
    held = gen.blender.documents(seg, None)
    assert all(d.cached for d in held)
