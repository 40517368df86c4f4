"""`kvshelf advise` on synthetic traces of each scenario, with a fixed cost model (no model needed)."""

import pytest
import yaml

from kvshelf.advice.advise import BLEND_LABEL, SCENARIOS, Request, analyse, synthetic_trace
from kvshelf.advice.cost import CostModel
from kvshelf.config import load_config

COST = CostModel(prefill_tokens_per_s=400.0, kv_bytes_per_token=36864)  # Gemma 3 270M on this CPU


def advise(scenario, **kw):
    return analyse(synthetic_trace(scenario), COST, **kw)


def test_short_chat_gets_no_optimisation():
    a = advise("short-chat")
    assert a.prefix_hit_rate == 0 and "under one chunk" in a.reasons[0]
    assert "enable_blending" not in a.config and "remote_url" not in a.config
    assert a.predicted_ttft_s["prefix reuse"] == pytest.approx(a.predicted_ttft_s["no cache"])


def test_long_rag_with_reordered_documents_gets_cacheblend():
    a = advise("long-rag")
    assert a.blend_hit_rate > 0.5 > a.prefix_hit_rate
    assert a.config["enable_blending"] is True
    assert a.predicted_ttft_s[BLEND_LABEL] < 0.5 * a.predicted_ttft_s["no cache"]
    assert BLEND_LABEL == "CacheBlend 15%" and any("as often as full prefill" in r for r in a.reasons)
    # The measured trade-off of the confidence fallback is stated, not switched on (it halves throughput)
    assert any("blend_fallback_margin 0.15" in r and "over all requests" in r for r in a.reasons)
    assert "blend_fallback_margin" not in a.config


def test_a_cold_blend_request_is_charged_as_a_plain_prefill():
    """Issue #18: documents seen for the first time are not computed alone and blended; the request is an
    exact prefill (its documents computed after the first token), so it costs what no cache costs."""
    docs = [[1000 * d + i for i in range(400)] for d in range(8)]
    cold = [Request(sum(docs[2 * k : 2 * k + 2], []) + [7, 8], chunks=docs[2 * k : 2 * k + 2]) for k in range(4)]
    a = analyse(cold, COST)
    assert a.blend_hit_rate == 0
    assert a.predicted_ttft_s[BLEND_LABEL] == pytest.approx(a.predicted_ttft_s["no cache"])
    # Just under a quarter of the document tokens cached: under the share that blends, still a plain prefill.
    new = [docs[k] + [1000] for k in (5, 6, 7)]  # not cached: one token more than a cached document
    mixed = [*cold, Request(docs[0] + sum(new, []) + [7], chunks=[docs[0], *new])]
    warm = [*cold, Request(docs[1] + docs[0] + [7], chunks=[docs[1], docs[0]])]
    t_mixed, t_warm = analyse(mixed, COST).predicted_ttft_s, analyse(warm, COST).predicted_ttft_s
    assert t_mixed[BLEND_LABEL] == pytest.approx(t_mixed["no cache"])
    assert t_warm[BLEND_LABEL] < t_warm["no cache"] - 0.5 * COST.recompute_s(800) / 5


def test_multi_turn_gets_prefix_reuse():
    a = advise("multi-turn")
    assert a.prefix_hit_rate > 0.5 and "enable_blending" not in a.config
    assert a.predicted_ttft_s["prefix reuse"] < 0.5 * a.predicted_ttft_s["no cache"]


def test_cross_node_gets_a_shared_remote_tier_without_being_told():
    a = advise("cross-node")
    assert a.nodes > 1 and a.local_hit_rate < a.prefix_hit_rate
    t = a.predicted_ttft_s
    assert t["prefix reuse + shared remote tier"] < t["prefix reuse, each node alone"] < t["no cache"]
    assert a.config["remote_url"].startswith("redis://") and a.config["remote_serde"] == "cachegen"
    assert a.predicted_storage_gb["cachegen"] < a.predicted_storage_gb["int8"] < a.predicted_storage_gb["none"]
    assert any("nodes: each node alone" in r for r in a.reasons)


def test_one_node_traces_get_no_remote_tier_unless_shared():
    assert "remote_url" not in advise("long-rag").config
    assert advise("long-rag", shared=True).config["remote_url"].startswith("redis://")


def test_disaggregated_was_removed_with_a_reason():
    with pytest.raises(ValueError, match="removed.*no prefill/decode disaggregation.*cross-node"):
        synthetic_trace("disaggregated")


def test_every_scenario_is_distinct():
    seen = {}
    for scenario in SCENARIOS:
        a = advise(scenario)
        shown = (tuple(sorted(a.predicted_ttft_s.items())), tuple(sorted(a.config.items(), key=str)))
        assert shown not in seen.values(), f"{scenario} prints the same as {seen}"
        seen[scenario] = shown


def test_big_working_sets_get_a_disk_tier_and_layerwise_only_on_gpu():
    a = advise("long-rag", cpu_capacity_gb=0.1)
    assert a.config["local_disk_codec"] == "int8"
    assert "use_layerwise" not in a.config
    long = [r for r in synthetic_trace("long-rag")]
    for r in long:
        r.tokens = r.tokens * 4  # ~10K-token prompts
    assert analyse(long, COST, gpu=True).config["use_layerwise"] is True


def test_recommended_configs_load(tmp_path):
    for scenario in SCENARIOS:
        path = tmp_path / f"{scenario}.yaml"
        path.write_text(yaml.safe_dump(advise(scenario).config))
        load_config(path, environ={})  # every recommendation is a valid kvshelf config


def test_bad_input():
    with pytest.raises(ValueError, match="no requests"):
        analyse([], COST)
    with pytest.raises(ValueError, match="unknown scenario"):
        synthetic_trace("nope")


def test_a_configured_question_pass_costs_the_question_once_more(monkeypatch):
    """Issue #18 (third session): with the question pass as default, a blended request also computes its question
    (the tokens after the documents) a second time; advise charges exactly those tokens."""
    import kvshelf.advice.advise as advise_module

    docs = [[1000 * d + i for i in range(400)] for d in range(2)]
    question = list(range(7, 37))
    trace = [Request(docs[0] + docs[1] + question, chunks=docs), Request(docs[1] + docs[0] + question, chunks=docs)]
    plain = analyse(trace, COST).predicted_ttft_s[BLEND_LABEL]
    monkeypatch.setattr(advise_module, "BLEND_QUESTION_PASS", True)
    with_pass = analyse(trace, COST).predicted_ttft_s[BLEND_LABEL]
    assert with_pass - plain == pytest.approx(COST.recompute_s(len(question)) / len(trace))


@pytest.mark.parametrize("tokens, charged", [(400, False), (1200, True)])
def test_a_long_prompt_question_pass_is_charged_past_the_full_share(monkeypatch, tokens, charged):
    """Issue #18 (tenth session): with blend_long_question_pass as default the question runs once more only in
    blends of more than blend_ratio_tokens (2,048) placed tokens."""
    import kvshelf.advice.advise as advise_module

    docs = [[10000 * d + i for i in range(tokens)] for d in range(2)]
    question = list(range(7, 37))
    trace = [Request(docs[0] + docs[1] + question, chunks=docs), Request(docs[1] + docs[0] + question, chunks=docs)]
    monkeypatch.setattr(advise_module, "BLEND_QUESTION_PASS", False)
    monkeypatch.setattr(advise_module, "BLEND_LONG_QUESTION_PASS", False)
    plain = analyse(trace, COST).predicted_ttft_s[BLEND_LABEL]
    monkeypatch.setattr(advise_module, "BLEND_LONG_QUESTION_PASS", True)
    with_pass = analyse(trace, COST).predicted_ttft_s[BLEND_LABEL]
    expected = COST.recompute_s(len(question)) / len(trace) if charged else 0.0
    assert with_pass - plain == pytest.approx(expected)
