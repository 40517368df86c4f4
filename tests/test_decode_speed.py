"""Measured decode speeds (issue #17): measured once and kept, used by the guard's predictions and by
`kvshelf advise`'s choice of the shared tier's codec."""

import pytest
import torch

from kvshelf.advice import decode_speed
from kvshelf.advice.advise import remote_codec
from kvshelf.advice.cost import CostModel
from kvshelf.advice.guard import Guard
from kvshelf.cache.requests import TIER_SLOW
from kvshelf.codecs.int8 import Int8Codec


def test_decode_speed_is_measured_once_then_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    rate = decode_speed.decode_speed(Int8Codec(), (2, 1, 8), torch.float32, "cpu")
    assert rate > 0 and len(list((tmp_path / "cost").glob("decode-int8-*.json"))) == 1

    def fail(*_a, **_k):
        raise AssertionError("measured again")

    monkeypatch.setattr(decode_speed, "measure_decode", fail)
    assert decode_speed.decode_speed(Int8Codec(), (2, 1, 8), torch.float32, "cpu") == rate
    # another layout is another measurement
    with pytest.raises(AssertionError, match="measured again"):
        decode_speed.decode_speed(Int8Codec(), (3, 1, 8), torch.float32, "cpu")


def test_learned_codecs_slow_the_prediction_until_loads_are_seen(tmp_path, monkeypatch):
    monkeypatch.setattr(decode_speed, "decode_speed", lambda codec, *_a, **_k: 1e8)
    cost = CostModel(prefill_tokens_per_s=1000.0, kv_bytes_per_token=1000)
    decode_speed.learn_tier_codecs(cost, [("cpu", None), ("redis", Int8Codec())], (2, 1, 8), torch.float32, "cpu")
    assert cost.tier_codecs == {"redis": "int8"} and cost.codec_bytes_per_s == {"int8": 1e8}
    fetch = cost.tier_bytes_per_s["redis"]
    assert cost.tier_rate("redis") == pytest.approx(1 / (1 / fetch + 1 / 1e8))
    assert cost.tier_rate("cpu") == cost.tier_bytes_per_s["cpu"] and cost.speed_known("redis")
    cost.observe_load("redis", 10**9, 1.0)  # loads seen: their speed (decoding included) is what counts
    assert cost.tier_rate("redis") == cost.tier_bytes_per_s["redis"]


def test_guard_bypasses_a_tier_whose_codec_decodes_slower_than_recompute():
    cost = CostModel(prefill_tokens_per_s=100_000.0, kv_bytes_per_token=36864)  # 3.7 GB/s of KV recomputed
    cost.tier_codecs["redis"] = "cachegen"
    guard = Guard(cost, min_tokens=1)
    assert guard.load_decision({"redis": 1000}) is not None  # the default fetch speed alone loses already
    cost.tier_bytes_per_s["redis"] = 1e12  # a fast link: only the codec's decoding can be slow now
    assert guard.load_decision({"redis": 1000}) is None  # its decode speed is not known: loads are tried
    cost.codec_bytes_per_s["cachegen"] = 3e8  # measured here: 12x slower than recomputing
    assert guard.load_decision({"redis": 1000}) == TIER_SLOW
    cost.codec_bytes_per_s["cachegen"] = 3e10  # a GPU's decoder
    assert guard.load_decision({"redis": 1000}) is None


def test_remote_codec_follows_the_link_and_the_measured_decode_speeds():
    cost = CostModel(prefill_tokens_per_s=400.0, kv_bytes_per_token=36864, kv_value_bytes=2)
    codec, why = remote_codec(cost, 1.25e9)
    assert codec == "cachegen" and "not measured" in why
    cost.codec_bytes_per_s.update({"none": 2e10, "int8": 2e9, "cachegen": 3e8})  # a 2-core CPU's decoders
    assert remote_codec(cost, 0.1e9 / 8)[0] == "cachegen"  # 0.1 Gbit/s: the link dominates
    assert remote_codec(cost, 10e9 / 8)[0] in ("none", "int8")  # 10 Gbit/s: decoding cachegen would dominate
    cost.codec_bytes_per_s["cachegen"] = 2e10  # decoded on a GPU
    codec, why = remote_codec(cost, 10e9 / 8)
    assert codec == "cachegen" and "measured here" in why
