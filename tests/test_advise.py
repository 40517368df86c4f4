"""`kvshelf advise` on synthetic traces of each scenario, with a fixed cost model (no model needed)."""

import pytest
import yaml

from kvshelf.advice.advise import SCENARIOS, analyse, synthetic_trace
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
    assert a.predicted_ttft_s["CacheBlend 15%"] < 0.5 * a.predicted_ttft_s["no cache"]


def test_multi_turn_gets_prefix_reuse():
    a = advise("multi-turn")
    assert a.prefix_hit_rate > 0.5 and "enable_blending" not in a.config
    assert a.predicted_ttft_s["prefix reuse"] < 0.5 * a.predicted_ttft_s["no cache"]


def test_cross_node_and_disaggregated_get_a_remote_compressed_tier():
    for scenario in ("cross-node", "disaggregated"):
        a = advise(scenario, shared=True)
        assert a.config["remote_url"].startswith("redis://") and a.config["remote_serde"] == "cachegen"
        assert a.predicted_storage_gb["cachegen"] < a.predicted_storage_gb["int8"] < a.predicted_storage_gb["none"]


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
        path.write_text(yaml.safe_dump(advise(scenario, shared=scenario != "short-chat").config))
        load_config(path, environ={})  # every recommendation is a valid kvshelf config


def test_bad_input():
    with pytest.raises(ValueError, match="no requests"):
        analyse([], COST)
    with pytest.raises(ValueError, match="unknown scenario"):
        synthetic_trace("nope")
