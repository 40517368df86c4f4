"""CacheBlend's token selection (kvshelf.blend.selection, issue #18): signals, head tokens, per-document budget."""

import math

import pytest
import torch

from kvshelf.blend.selection import SelectionPolicy, budget_for, deviation, question_score, select


def kv_pair(n=12, heads=1, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cached = torch.randn(2, heads, n, dim, generator=g)
    return cached.clone(), cached


def test_the_tokens_deviating_most_are_chosen_and_the_signal_decides_which():
    fresh, cached = kv_pair()
    fresh[0, :, 3] += 5.0  # K of token 3 moved
    fresh[1, :, 7] += 5.0  # V of token 7 moved
    fresh[0, :, 9] += 1.0  # K of token 9 a little
    assert select(fresh, cached, 2).nonzero().view(-1).tolist() == [3, 7]
    assert select(fresh, cached, 2, policy=SelectionPolicy(signal="k")).nonzero().view(-1).tolist() == [3, 9]
    assert select(fresh, cached, 1, policy=SelectionPolicy(signal="v")).nonzero().view(-1).tolist() == [7]
    assert not select(fresh, cached, 0).any() and select(fresh, cached, 99).all()
    # K and V each normalised by their energy: scaling V up does not change the V-only ranking.
    assert torch.allclose(deviation(fresh * 10, cached * 10, "v"), deviation(fresh, cached, "v"))


def test_head_tokens_are_recomputed_inside_the_budget():
    fresh, cached = kv_pair(n=10)
    fresh[:, :, 8] += 5.0
    offset = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])  # two documents of five tokens
    policy = SelectionPolicy(head_tokens=1)
    chosen = select(fresh, cached, 3, offset=offset, policy=policy).nonzero().view(-1).tolist()
    assert chosen == [0, 5, 8]  # both documents' first token, then the largest deviation
    # A budget smaller than the head tokens keeps the earliest offsets.
    two = select(fresh, cached, 2, offset=offset, policy=SelectionPolicy(head_tokens=3)).nonzero().view(-1).tolist()
    assert two == [0, 5]
    with pytest.raises(ValueError, match="offset"):
        select(fresh, cached, 3, policy=policy)


def test_a_budget_per_document_shares_the_tokens_by_size():
    fresh, cached = kv_pair(n=12)
    fresh[:, :, :4] += torch.arange(1, 5).view(1, 1, 4, 1) * 3.0  # document 0 (tokens 0-3) deviates most
    document = torch.tensor([0] * 4 + [1] * 8)
    glob = select(fresh, cached, 3)
    assert glob[:4].sum() == 3  # one global top-k: all from document 0
    per = select(fresh, cached, 3, document=document, policy=SelectionPolicy(per_document=True))
    assert int(per.sum()) == 3 and per[:4].sum() == 1 and per[4:].sum() == 2  # 4:8 tokens -> 1:2
    assert per[3]  # inside document 0, still its largest deviation
    with pytest.raises(ValueError, match="document"):
        select(fresh, cached, 3, policy=SelectionPolicy(per_document=True))


def test_bad_policies_and_shapes_are_errors():
    with pytest.raises(ValueError, match="signal"):
        SelectionPolicy(signal="q")
    with pytest.raises(ValueError, match="head tokens"):
        SelectionPolicy(head_tokens=-1)
    fresh, cached = kv_pair()
    with pytest.raises(ValueError, match="shape"):
        select(fresh[:, :, :3], cached, 1)
    assert budget_for(0.15, 100) == 15 and budget_for(0.15, 101) == 16 and budget_for(0.0, 50) == 0


def test_the_blender_recomputes_each_documents_head_tokens(tiny_models, monkeypatch):
    from test_blend import DOCS, blended, make

    import kvshelf.blend.blender as blender_module

    gen = make(tiny_models("llama"), ratios=(0.3,))
    gen.blender.selection = SelectionPolicy(head_tokens=2, per_document=True)
    calls = []

    def spy(fresh, cached, budget, **kw):
        kept = select(fresh, cached, budget, **kw)
        calls.append((kw["document"], kw["offset"], kept))
        return kept

    monkeypatch.setattr(blender_module, "select", spy)
    gen.generate(blended(DOCS), max_new_tokens=1)  # cold: exact, the documents computed after
    warm = gen.generate(blended([DOCS[2], DOCS[0], DOCS[1]]), max_new_tokens=1)
    assert warm.blend.document_hits == 3 and len(calls) == 1
    document, offset, kept = calls[0]
    assert sorted(set(document.tolist())) == [0, 1, 2]
    assert bool(kept[offset < 2].all()) and int((offset < 2).sum()) == 6  # every document's first two tokens
    assert int(kept.sum()) == warm.blend.recomputed_tokens == -(-3 * warm.blend.placed_tokens // 10)
    for doc in range(3):  # the rest of the budget shared by size: every document gets more than its heads
        assert int(kept[document == doc].sum()) > 2


def test_blend_keys_in_the_config_reach_the_blender(tiny_models, tmp_path, monkeypatch):
    from conftest import tiny_tokenizer

    from kvshelf.assembly import open_shelf
    from kvshelf.config import KVShelfConfig
    from kvshelf.model.loader import LoadedModel
    from kvshelf.model.runner import ModelRunner

    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    loaded = LoadedModel(ModelRunner(tiny_models("llama")), tiny_tokenizer(), tmp_path)
    config = KVShelfConfig(
        enable_blending=True,
        blend_min_cached_share=0.25,
        blend_head_tokens=4,
        blend_per_document=True,
        blend_selection_signal="v",
        blend_question_weight=2.0,
        blend_question_span=3,
        blend_question_pass=True,
        blend_question_budget=0.5,
        guard=False,
    )
    blender = open_shelf(config, loaded=loaded, show_progress=False).generator.blender
    assert blender.min_cached_share == 0.25
    assert blender.selection == SelectionPolicy(
        signal="v",
        per_document=True,
        head_tokens=4,
        question_weight=2.0,
        question_span=3,
        question_pass=True,
        question_budget=0.5,
    )
    with pytest.raises(ValueError, match="blend_selection_signal"):
        KVShelfConfig(blend_selection_signal="q")


def test_defaults_follow_the_rag_evaluation():
    """Issue #18 (BENCHMARKS.md): 15% recompute lost answers full prefill got on unseen RAG data with documents
    cached alone, not with documents cached from the prompt that first held them (fifth session: 65 vs 66 of 100);
    head tokens, a per-document budget and V- or K-only selection did not lower the KL at 15%."""
    from kvshelf.config import KVShelfConfig

    config = KVShelfConfig()
    assert config.blend_recompute_ratios == [0.15] and config.blend_check_layers == [1]
    assert config.blend_document_context == "prompt"
    assert config.blend_min_cached_share == 0.25  # fourth session: blending saves ~30% from a quarter cached
    assert (config.blend_head_tokens, config.blend_per_document, config.blend_selection_signal) == (0, False, "kv")
    # tenth session: past 2,048 placed tokens the question pass picks the tokens (4-8K: KL -60 to -67%, >= 7x)
    assert (config.blend_long_question_pass, config.blend_long_question_budget) == (True, 1.0)


def test_question_signals_rank_by_the_questions_attention():
    fresh, cached = kv_pair(n=8)
    fresh[:, :, 2] += 5.0  # token 2 deviates most, token 6 a little
    fresh[:, :, 6] += 2.0
    attention = torch.tensor([0.0, 0.0, 0.01, 0.0, 0.5, 0.0, 0.4, 0.0])
    by_question = select(fresh, cached, 1, attention=attention, policy=SelectionPolicy(signal="question"))
    assert by_question.nonzero().view(-1).tolist() == [4]
    # Weighted: token 6 (deviates and is read) overtakes token 2 (deviates more, ignored); weight 0 is plain kv.
    weighted = SelectionPolicy(signal="kv+question", question_weight=4.0)
    assert select(fresh, cached, 1, attention=attention, policy=weighted).nonzero().view(-1).tolist() == [6]
    plain = SelectionPolicy(signal="kv+question", question_weight=0.0)
    assert select(fresh, cached, 1, attention=attention, policy=plain).nonzero().view(-1).tolist() == [2]
    # By document (tokens 0-3, 4-7): the second holds the attention, so its slightly deviating token 5 (read by
    # nobody itself) overtakes token 2, which a token-level weight keeps.
    fresh[:, :, 5] += 1.0
    document = torch.tensor([0] * 4 + [1] * 4)
    by_doc = SelectionPolicy(signal="kv+question", question_weight=40.0, question_by_document=True)
    chosen = select(fresh, cached, 2, attention=attention, document=document, policy=by_doc)
    assert chosen.nonzero().view(-1).tolist() == [5, 6]
    by_token = SelectionPolicy(signal="kv+question", question_weight=40.0)
    assert select(fresh, cached, 2, attention=attention, policy=by_token).nonzero().view(-1).tolist() == [2, 6]
    # Half the budget by attention (token 4), the other half by deviation among the rest (token 2, then 6).
    split = SelectionPolicy(signal="question", question_budget=0.5)
    assert select(fresh, cached, 2, attention=attention, policy=split).nonzero().view(-1).tolist() == [2, 4]
    assert select(fresh, cached, 3, attention=attention, policy=split).nonzero().view(-1).tolist() == [2, 4, 6]
    with pytest.raises(ValueError, match="question budget"):
        SelectionPolicy(question_budget=1.5)
    # A span credits the tokens after an attended one (the value after the name the question shares).
    spread = question_score(torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]), span=2)
    assert spread.tolist() == pytest.approx([0.0, 5 / 3, 5 / 3, 5 / 3, 0.0])
    with pytest.raises(ValueError, match="attention"):
        select(fresh, cached, 1, policy=SelectionPolicy(signal="question"))
    with pytest.raises(ValueError, match="question weight"):
        SelectionPolicy(question_weight=-1.0)


def reference_attention(model, ids: list[int], question: int, layers, reduce: str = "mean") -> torch.Tensor:
    """transformers' eager attention of the last `question` tokens, mean over heads and those tokens, then
    mean (or max) over `layers`."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    per_layer = torch.stack([out.attentions[i][0, :, -question:, :].mean(dim=(0, 1)) for i in layers])
    return per_layer.amax(0) if reduce == "max" else per_layer.mean(0)


@pytest.mark.parametrize(
    "family, layers, reduce", [("llama", "all", "mean"), ("gemma3", "all", "mean"), ("gemma3", "global", "max")]
)
def test_the_question_pass_reads_the_models_own_attention(family, layers, reduce, tiny_models):
    """One document cached at its own position: the placed KV is exact, so the question pass over it must
    see what the model's attention sees in every layer (sliding windows included)."""
    from test_blend import DOCS, blended, make

    from kvshelf.blend.blender import BlendInfo

    model = tiny_models(family)
    gen = make(model, ratios=(0.3,))
    text = blended([DOCS[0] * 3])  # longer than gemma3's tiny window (24)
    gen.generate(text, max_new_tokens=1)  # cold: exact, the document computed alone after
    blender, seg = gen.blender, gen.segment(text, None)
    documents = blender.documents(seg, None)
    assert all(d.cached for d in documents)
    kv = blender.runner.new_kv(len(seg.token_ids))
    blender.place_documents(seg, kv, None, BlendInfo(), documents)
    blender.selection = SelectionPolicy(
        signal="question", question_pass=True, question_layers=layers, question_reduce=reduce
    )
    share = blender._question_pass(seg, kv)
    read = [1, 3] if layers == "global" else range(model.config.num_hidden_layers)  # tiny gemma3: 1, 3 global
    expected = reference_attention(model, seg.token_ids, len(seg.suffix), read, reduce)
    assert torch.allclose(share, expected, atol=1e-5)


def test_the_check_layer_reads_the_questions_attention(tiny_models, monkeypatch):
    """Without the pass, the share comes from the check layer's queries over its fresh keys: below the first
    check layer every token is computed, so it equals the model's attention at that layer (no window here)."""
    from test_blend import DOCS, blended, make

    import kvshelf.blend.blender as blender_module

    model = tiny_models("llama")
    gen = make(model, ratios=(0.3,))
    gen.blender.selection = SelectionPolicy(signal="question")
    gen.generate(blended(DOCS), max_new_tokens=1)
    seen = []

    def spy(fresh, cached, budget, **kw):
        seen.append(kw["attention"])
        return select(fresh, cached, budget, **kw)

    monkeypatch.setattr(blender_module, "select", spy)
    text = blended([DOCS[2], DOCS[0], DOCS[1]])
    warm = gen.generate(text, max_new_tokens=1)
    assert warm.blend.document_hits == 3 and len(seen) == 1
    seg = gen.segment(text, None)
    placed = torch.zeros(len(seg.token_ids), dtype=torch.bool)
    for start, end in gen.blender._cached_spans(seg):
        placed[start:end] = True
    expected = reference_attention(model, seg.token_ids, len(seg.suffix), [1])[placed]
    assert torch.allclose(seen[0], expected, atol=1e-5)


def test_documents_cached_behind_a_fixed_instruction(tiny_models):
    """blend_prefix_documents=1: the first document joins the always-computed prefix and the others are cached
    behind it. One document after it, cached where it stands: the placed KV is exact, so a blend recomputing
    nothing gives full prefill's logits; reordered documents still hit."""
    from test_blend import DOCS, blended, make

    model = tiny_models("gemma3")
    gen = make(model, ratios=(0.0,))
    gen.blender.prefix_documents = 1
    text = blended([DOCS[0], DOCS[1]])
    seg = gen.segment(text, None)
    gen.blender.prefix_documents = 0
    plain = gen.segment(text, None)
    gen.blender.prefix_documents = 1
    assert len(seg.documents) == 1 and seg.token_ids == plain.token_ids
    assert seg.prefix == plain.prefix + plain.documents[0] + plain.separator
    cold = gen.generate(text, max_new_tokens=1)
    assert cold.blend.exact
    warm = gen.generate(text, max_new_tokens=1)
    full = gen.generate(seg.token_ids, max_new_tokens=1, use_cache=False)
    assert warm.blend.document_hits == 1 and warm.blend.recomputed_tokens == 0
    assert torch.allclose(warm.first_logits, full.first_logits, atol=1e-4)
    gen.generate(blended([DOCS[0], DOCS[2], DOCS[1]]), max_new_tokens=1)  # caches DOCS[2] behind DOCS[0]
    moved = gen.generate(blended([DOCS[0], DOCS[1], DOCS[2]]), max_new_tokens=1)
    assert moved.blend.document_hits == 2 and moved.blend.documents == 2
    # Only the instruction: nothing left to blend, an ordinary prompt.
    assert gen.segment(blended([DOCS[0]]), None) is None


def test_long_prompts_count_tokens_past_the_full_share_less():
    assert budget_for(0.15, 1000) == 150
    assert budget_for(0.15, 1000, 2048, 0.25) == 150  # within the full share: the ratio as given
    assert budget_for(0.15, 6144, 2048, 0.25) == math.ceil(0.15 * (2048 + 1024))
    assert budget_for(0.15, 6144, 2048, 1.0) == budget_for(0.15, 6144)  # share 1: the ratio everywhere
    budgets = [budget_for(0.15, n, 2048, 0.25) for n in range(0, 9000, 7)]
    assert budgets == sorted(budgets)  # more placed tokens never recompute fewer


def test_the_config_sets_the_long_prompt_budget(tiny_models):
    from kvshelf.blend.blender import Blender
    from kvshelf.config import KVShelfConfig
    from kvshelf.model.runner import ModelRunner

    runner = ModelRunner(tiny_models("llama"))
    blender = Blender.from_config(runner, None, KVShelfConfig(blend_ratio_tokens=512, blend_ratio_beyond_share=0.5))
    assert (blender.ratio_tokens, blender.beyond_share) == (512, 0.5)
    assert Blender.from_config(runner, None, KVShelfConfig(blend_ratio_tokens=None)).ratio_tokens is None
    with pytest.raises(ValueError, match="blend_ratio_beyond_share"):
        Blender(runner, None, check_layers=[1], ratios=[0.15], beyond_share=1.5)


def test_long_prompts_select_by_the_question_pass(tiny_models, monkeypatch):
    """Issue #18, tenth session: past blend_ratio_tokens placed tokens the blend picks its tokens with the long
    policy (the question pass); at or below them, or without the question in the blend (inside vLLM), with the
    usual one. The pass's share reaches the selection for long prompts only."""
    from test_blend import DOCS, blended, make

    import kvshelf.blend.blender as blender_module
    from kvshelf.blend.segment import Segmented

    gen = make(tiny_models("gemma3"), ratios=(0.3,), document_context="prompt")
    long_policy = SelectionPolicy(signal="question", question_pass=True, question_budget=0.5)
    blender = gen.blender
    blender.long_selection = long_policy
    seen, passes = [], []

    def spy(fresh, cached, budget, **kw):
        seen.append((kw["policy"], kw["attention"]))
        return select(fresh, cached, budget, **kw)

    real_pass = blender._question_pass

    def pass_spy(seg, kv, policy=None, question=None):
        passes.append(policy)
        return real_pass(seg, kv, policy, question)

    monkeypatch.setattr(blender_module, "select", spy)
    monkeypatch.setattr(blender, "_question_pass", pass_spy)
    gen.generate(blended(DOCS), max_new_tokens=1)  # cold: exact, the documents stored from this prompt
    text = blended([DOCS[2], DOCS[0], DOCS[1]])
    placed = sum(e - s for s, e in blender._cached_spans(gen.segment(text, None)))
    for ratio_tokens, expected in [(None, blender.selection), (placed, blender.selection), (placed - 1, long_policy)]:
        seen.clear(), passes.clear()
        blender.ratio_tokens = ratio_tokens
        warm = gen.generate(text, max_new_tokens=1)
        assert warm.blend.placed_tokens == placed and len(seen) == 1
        policy, attention = seen[0]
        assert policy == expected
        assert (attention is not None) == (expected is long_policy) and passes == (
            [long_policy] if attention is not None else []
        )
    # Without a question in the blend (vLLM computes it after the blended region) the usual policy applies.
    seg = gen.segment(text, None)
    assert blender.selection_for(seg, placed) is long_policy
    assert blender.selection_for(Segmented(seg.prefix, seg.documents, [], seg.separator), placed) is blender.selection
    with pytest.raises(ValueError, match="long-prompt selection must read the question"):
        blender_module.Blender(blender.runner, None, check_layers=[1], ratios=[0.15], long_selection=SelectionPolicy())


def test_the_config_sets_the_long_prompt_selection(tiny_models):
    from kvshelf.assembly.runtimes import RUNTIMES
    from kvshelf.blend.blender import Blender
    from kvshelf.config import KVShelfConfig
    from kvshelf.model.runner import ModelRunner

    runner = ModelRunner(tiny_models("llama"))
    config = KVShelfConfig(blend_long_question_pass=True, blend_long_question_budget=0.7)
    assert Blender.from_config(runner, None, config).long_selection == SelectionPolicy(
        signal="question", question_pass=True, question_budget=0.7
    )
    assert Blender.from_config(runner, None, KVShelfConfig(blend_long_question_pass=False)).long_selection is None
    with pytest.raises(ValueError, match="blend_long_question_budget"):
        KVShelfConfig(blend_long_question_budget=1.5)
    assert {"blend_long_question_pass", "blend_long_question_budget"} <= RUNTIMES["generate"]
    assert "blend_long_question_pass" not in RUNTIMES["vllm"]  # vLLM computes the question after the blend
