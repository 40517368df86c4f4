"""CacheBlend's extra recompute for documents that moved toward the front since they were cached (issue #18,
eleventh session): selection.select's `moved`, selection.moved_budget, the blender's moved share per document."""

import math

import pytest
import torch

from kvshelf.blend.selection import SelectionPolicy, moved_budget, select


def kv_pair(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    cached = torch.randn(2, 1, n, 4, generator=g)
    return cached.clone(), cached


def test_moved_documents_get_an_extra_share_picked_among_their_tokens_by_deviation():
    fresh, cached = kv_pair(n=12)
    fresh[:, :, 2] += 9.0  # document 0 (tokens 0-5, not moved): the largest deviation overall
    fresh[:, :, 9] += 3.0  # document 1 (tokens 6-11, moved forward): its largest
    fresh[:, :, 7] += 2.0
    moved = torch.tensor([0.0] * 6 + [0.5] * 6)
    policy = SelectionPolicy(moved_extra=0.5)
    base = select(fresh, cached, 1, policy=SelectionPolicy())
    assert base.nonzero().view(-1).tolist() == [2]
    # 1 by the budget, then ceil(0.5 x (6 x 0.5)) = 2 more, only among the moved document's tokens.
    chosen = select(fresh, cached, 1, policy=policy, moved=moved).nonzero().view(-1).tolist()
    assert chosen == [2, 7, 9]
    # Nothing moved forward, or no `moved` given: exactly the budget, as without the option.
    assert torch.equal(select(fresh, cached, 1, policy=policy, moved=torch.zeros(12)), base)
    assert torch.equal(select(fresh, cached, 1, policy=policy), base)
    # The extra never exceeds the moved tokens not chosen yet.
    everything = select(fresh, cached, 1, policy=SelectionPolicy(moved_extra=1.0), moved=moved * 2)
    assert everything[6:].all() and int(everything.sum()) == 7


def test_moved_documents_first_tokens_are_recomputed_beyond_the_budget():
    fresh, cached = kv_pair(n=10)
    fresh[:, :, 3] += 5.0
    offset = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    moved = torch.tensor([0.0] * 5 + [0.9] * 5)
    chosen = select(fresh, cached, 1, offset=offset, policy=SelectionPolicy(moved_head=2), moved=moved)
    assert chosen.nonzero().view(-1).tolist() == [3, 5, 6]
    with pytest.raises(ValueError, match="offset"):
        select(fresh, cached, 1, policy=SelectionPolicy(moved_head=2), moved=moved)


def test_moved_budget_counts_what_select_adds():
    policy = SelectionPolicy(moved_head=4, moved_extra=0.1)
    docs = [(100, 0.0), (50, 1.0), (3, 0.5)]  # (tokens, lost share): two moved forward
    assert moved_budget(policy, docs) == 4 + 3 + math.ceil(0.1 * (50 + 1.5))
    assert moved_budget(SelectionPolicy(), docs) == 0
    fresh, cached = kv_pair(n=153, seed=1)
    offset = torch.cat([torch.arange(t) for t, _ in docs])
    moved = torch.cat([torch.full((t,), lost) for t, lost in docs])
    added = int(select(fresh, cached, 10, offset=offset, policy=policy, moved=moved).sum()) - 10
    assert added <= moved_budget(policy, docs)


def test_bad_moved_options_are_errors():
    with pytest.raises(ValueError, match="moved extra"):
        SelectionPolicy(moved_extra=1.5)
    with pytest.raises(ValueError, match="moved head"):
        SelectionPolicy(moved_head=-1)


def test_a_document_moved_forward_carries_the_share_of_context_it_lost(tiny_models, monkeypatch):
    """Documents cached from an earlier prompt: those placed nearer the front now than there carry
    (then - now) / then, the others 0; the long policy's extra then recomputes more tokens than without it."""
    from test_blend import DOCS, blended, make

    import kvshelf.blend.blender as blender_module

    gen = make(tiny_models("gemma3"), ratios=(0.2,), document_context="prompt")
    blender = gen.blender
    gen.generate(blended(DOCS), max_new_tokens=1)  # cold: the documents stored at their places in this prompt
    text = blended([DOCS[2], DOCS[0], DOCS[1]])
    seg = gen.segment(text, None)
    placed = sum(e - s for s, e in blender._cached_spans(seg))
    first = blender._cached_spans(gen.segment(blended(DOCS), None))
    then = {DOCS[i]: first[i][0] for i in range(3)}
    now = dict(zip([DOCS[2], DOCS[0], DOCS[1]], [s for s, _ in blender._cached_spans(seg)], strict=True))
    seen = []

    def spy(fresh, cached, budget, **kw):
        seen.append(kw["moved"])
        return select(fresh, cached, budget, **kw)

    monkeypatch.setattr(blender_module, "select", spy)
    blender.ratio_tokens = placed - 1  # a "long" prompt: the long policy applies
    counts = {}
    for extra in (0.0, 1.0):
        blender.long_selection = SelectionPolicy(signal="question", question_pass=True, moved_extra=extra)
        seen.clear()
        warm = gen.generate(text, max_new_tokens=1)
        assert warm.blend.document_hits == 3
        counts[extra] = warm.blend.selected_per_check[0]
    moved = seen[0]
    spans = blender._cached_spans(seg)
    for doc, (s, e) in zip([DOCS[2], DOCS[0], DOCS[1]], spans, strict=True):
        lost = max(0.0, (then[doc] - now[doc]) / then[doc])
        assert torch.allclose(moved[s - spans[0][0] : e - spans[0][0]], torch.tensor(lost))
    assert then[DOCS[2]] > now[DOCS[2]] and now[DOCS[1]] > then[DOCS[1]]  # one moved forward, one back
    budget = math.ceil(0.2 * placed)
    lost_tokens = sum(
        (e - s) * max(0.0, (then[d] - now[d]) / then[d])
        for d, (s, e) in zip([DOCS[2], DOCS[0], DOCS[1]], spans, strict=True)
    )
    assert counts[0.0] == budget
    # The extra: ceil(lost tokens), less where the budget already took some of the moved tokens.
    assert budget < counts[1.0] <= budget + math.ceil(lost_tokens)


@pytest.mark.parametrize("tokens, order, charged", [(1200, [1, 0], True), (400, [1, 0], False), (1200, [0, 1], False)])
def test_advise_charges_the_extra_for_documents_moved_forward_in_long_prompts(monkeypatch, tokens, order, charged):
    """`kvshelf advise` charges what the long policy's moved extra recomputes: only past blend_ratio_tokens
    (2,048) placed tokens and only when a cached document now sits nearer the front than where it was cached."""
    import kvshelf.advice.advise as advise_module
    from kvshelf.advice.advise import BLEND_LABEL, Request, analyse
    from kvshelf.advice.cost import CostModel

    cost = CostModel(prefill_tokens_per_s=400.0, kv_bytes_per_token=36864)
    docs = [[10000 * d + i for i in range(tokens)] for d in range(2)]
    question = list(range(7, 37))
    again = [docs[i] for i in order]
    trace = [Request(docs[0] + docs[1] + question, chunks=docs), Request(sum(again, []) + question, chunks=again)]
    monkeypatch.setattr(advise_module, "BLEND_LONG_QUESTION_PASS", True)
    monkeypatch.setattr(advise_module, "BLEND_LONG_MOVED", SelectionPolicy())
    plain = analyse(trace, cost).predicted_ttft_s[BLEND_LABEL]
    monkeypatch.setattr(advise_module, "BLEND_LONG_MOVED", SelectionPolicy(moved_extra=0.5))
    extra = analyse(trace, cost).predicted_ttft_s[BLEND_LABEL] - plain
    # The second request: docs[1] moved from place `tokens` to 0 (its whole context gone), docs[0] back.
    expected = cost.recompute_s(17 * math.ceil(0.5 * tokens) / 18) / len(trace) if charged else 0.0
    assert extra == pytest.approx(expected)


def test_the_config_sets_the_moved_extra_of_long_prompts(tiny_models):
    from kvshelf.assembly.runtimes import RUNTIMES
    from kvshelf.blend.blender import Blender
    from kvshelf.config import KVShelfConfig
    from kvshelf.model.runner import ModelRunner

    runner = ModelRunner(tiny_models("llama"))
    config = KVShelfConfig(blend_long_moved_extra=0.2, blend_long_moved_head=16)
    long = Blender.from_config(runner, None, config).long_selection
    assert (long.moved_extra, long.moved_head, long.signal) == (0.2, 16, "question")
    assert Blender.from_config(runner, None, config).selection.moved_extra == 0.0  # short prompts: unchanged
    with pytest.raises(ValueError, match="blend_long_moved_extra"):
        KVShelfConfig(blend_long_moved_extra=1.5)
    assert {"blend_long_moved_extra", "blend_long_moved_head"} <= RUNTIMES["generate"]
    assert "blend_long_moved_extra" not in RUNTIMES["vllm"]


def test_the_moved_extra_can_follow_the_policys_own_ranking():
    fresh, cached = kv_pair(n=8)
    fresh[:, :, 5] += 9.0  # the moved document's largest deviation
    attention = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.01, 0.3, 0.01])  # the question reads token 6 there
    moved = torch.tensor([0.0] * 4 + [0.5] * 4)
    policy = SelectionPolicy(signal="question", moved_extra=0.5)
    assert select(fresh, cached, 1, attention=attention, policy=policy, moved=moved).nonzero().view(-1).tolist() == [
        0,
        5,
    ]
    by_policy = SelectionPolicy(signal="question", moved_extra=0.5, moved_signal="policy")
    chosen = select(fresh, cached, 1, attention=attention, policy=by_policy, moved=moved)
    assert chosen.nonzero().view(-1).tolist() == [0, 6]
    with pytest.raises(ValueError, match="moved signal"):
        SelectionPolicy(moved_signal="q")
