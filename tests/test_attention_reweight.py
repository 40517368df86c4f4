"""APE-style reweighting of the question's attention over placed documents (kvshelf.model.reweight, issue #18)."""

import math

import pytest
import torch

from kvshelf.model.reweight import AttentionReweight, reweighted_attention
from kvshelf.model.runner import ModelRunner


def plain(q, keys, values, positions, key_start, window, scaling):
    k, v = (
        keys.repeat_interleave(q.shape[0] // keys.shape[0], 0),
        values.repeat_interleave(q.shape[0] // keys.shape[0], 0),
    )
    logits = (q @ k.transpose(1, 2)) * scaling
    key_pos = torch.arange(key_start, key_start + keys.shape[1]).view(1, -1)
    hidden = key_pos > positions.view(-1, 1)
    if window is not None:
        hidden |= positions.view(-1, 1) - key_pos >= window
    return logits.masked_fill(hidden, float("-inf")).softmax(-1) @ v


def tensors(seed=0, heads=4, kv_heads=2, keys=10, m=3, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, m, dim, generator=g)
    return q, torch.randn(kv_heads, keys, dim, generator=g), torch.randn(kv_heads, keys, dim, generator=g)


@pytest.mark.parametrize("window", [None, 4])
def test_temperature_one_and_mass_one_is_plain_attention(window):
    q, k, v = tensors()
    context = torch.zeros(20, dtype=torch.bool)
    context[3:8] = True
    positions = torch.tensor([9, 10, 11])
    rw = AttentionReweight(context, from_position=9)
    got = reweighted_attention(q, k, v, positions, 2, window, 0.5, rw)
    assert torch.allclose(got, plain(q, k, v, positions, 2, window, 0.5), atol=1e-5)


def test_mass_and_temperature_move_the_context_block_as_the_formula_says():
    q, k, v = tensors(seed=1, heads=1, kv_heads=1, keys=6, m=1)
    context = torch.tensor([False, True, True, True, False, False])
    position = torch.tensor([5])
    temperature, mass = 0.5, 3.0
    got = reweighted_attention(q, k, v, position, 0, None, 1.0, AttentionReweight(context, 5, temperature, mass))
    logits = (q[0, 0] @ k[0].T).double()
    c, o = logits[context], logits[~context]
    weight_c = temperature * torch.logsumexp(c / temperature, 0) + math.log(mass)
    share = torch.sigmoid(weight_c - torch.logsumexp(o, 0))
    want = (1 - share) * (o.softmax(0) @ v[0][~context].double()) + share * (
        (c / temperature).softmax(0) @ v[0][context].double()
    )
    assert torch.allclose(got[0, 0].double(), want, atol=1e-5)
    # More mass on the context: its block's share grows; no context key in view: plain attention.
    far = AttentionReweight(torch.zeros(6, dtype=torch.bool), 5, temperature, mass)
    assert torch.allclose(
        reweighted_attention(q, k, v, position, 0, None, 1.0, far), plain(q, k, v, position, 0, None, 1.0), atol=1e-5
    )


def test_a_bias_per_context_key_is_added_to_its_tempered_logit():
    q, k, v = tensors(seed=2, heads=1, kv_heads=1, keys=6, m=1)
    context = torch.tensor([False, True, True, True, False, False])
    bias = torch.tensor([9.0, 1.0, 0.5, 0.0, 9.0, 9.0])  # only the context keys' entries count
    position = torch.tensor([5])
    got = reweighted_attention(q, k, v, position, 0, None, 1.0, AttentionReweight(context, 5, 0.8, 1.0, bias=bias))
    logits = (q[0, 0] @ k[0].T).double()
    c, o = logits[context] / 0.8 + bias[context].double(), logits[~context]
    share = torch.sigmoid(0.8 * torch.logsumexp(c, 0) - torch.logsumexp(o, 0))
    want = (1 - share) * (o.softmax(0) @ v[0][~context].double()) + share * (c.softmax(0) @ v[0][context].double())
    assert torch.allclose(got[0, 0].double(), want, atol=1e-5)


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="temperature and mass"):
        AttentionReweight(torch.zeros(3, dtype=torch.bool), 0, temperature=0.0)
    with pytest.raises(ValueError, match="bool mask"):
        AttentionReweight(torch.zeros(3), 0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_runner_reweights_only_the_question_and_what_follows(family, tiny_models):
    runner = ModelRunner(tiny_models(family))
    torch.manual_seed(0)
    ids = torch.randint(4, 300, (30,)).tolist()
    context = torch.zeros(40, dtype=torch.bool)
    context[1:20] = True
    ref = runner.new_kv(40)
    ref_logits = runner.forward(ids, 0, ref)
    same = runner.new_kv(40)
    same.reweight = AttentionReweight(context, from_position=24)  # T = 1, mass = 1: the identity
    assert torch.allclose(runner.forward(ids, 0, same), ref_logits, atol=1e-4)
    moved = runner.new_kv(40)
    moved.reweight = AttentionReweight(context, from_position=24, temperature=0.7, mass=3.0)
    got = runner.forward(ids, 0, moved)
    assert not torch.allclose(got, ref_logits, atol=1e-3)
    # Tokens before the question attend as usual: their KV is full prefill's in every layer.
    assert torch.allclose(moved.data[:, :, :, :24], ref.data[:, :, :, :24], atol=1e-5)
    # Decoding over the buffer keeps reweighting; restricted to no layer it is plain again.
    step = runner.forward([5], 30, moved)
    assert not torch.allclose(step, runner.forward([5], 30, ref), atol=1e-3)
    none = runner.new_kv(40)
    none.reweight = AttentionReweight(context, 24, 0.7, 3.0, layers=frozenset())
    assert torch.allclose(runner.forward(ids, 0, none), ref_logits, atol=1e-4)


def test_a_blend_reweights_the_question_over_its_placed_documents(tiny_models):
    from conftest import tiny_tokenizer

    from kvshelf.blend.blender import Blender
    from kvshelf.cache.engine import CacheEngine
    from kvshelf.generation import CachedGenerator
    from kvshelf.storage.memory import MemoryBackend

    sep = "<|CHUNK_SEP|>"
    docs = ["Alpha facts: the key is 4821. " * 3, "Beta notes about rivers and seas. " * 3]
    runner = ModelRunner(tiny_models("gemma3"))
    engine = CacheEngine(runner.fingerprint(), MemoryBackend(1 << 28), chunk_size=16)

    def gen(context_attention):
        blender = Blender(runner, engine, check_layers=[1], ratios=[0.3], context_attention=context_attention)
        return CachedGenerator(runner, engine, tiny_tokenizer(), blender=blender, blend_special_str=sep)

    plain_gen, ape = gen((1.0, 1.0, "all")), gen((0.8, 2.0, "global"))
    earlier = Blender(runner, engine, check_layers=[1], ratios=[0.3], context_distance_bias=0.5)
    earlier_gen = CachedGenerator(runner, engine, tiny_tokenizer(), blender=earlier, blend_special_str=sep)
    plain_gen.generate(sep.join(docs[::-1]) + sep + "Q: key?", max_new_tokens=1)  # caches both documents
    prompt = sep.join(docs) + sep + "Q: key?"
    base = plain_gen.generate(prompt, max_new_tokens=3, stop_at_eos=False)
    same = gen((1.0, 1.0, "global")).generate(prompt, max_new_tokens=3, stop_at_eos=False)
    moved = ape.generate(prompt, max_new_tokens=3, stop_at_eos=False)
    assert base.blend.document_hits == 2 and moved.blend.document_hits == 2
    assert torch.equal(same.first_logits, base.first_logits)
    assert not torch.allclose(moved.first_logits, base.first_logits, atol=1e-4)
    biased = earlier_gen.generate(prompt, max_new_tokens=3, stop_at_eos=False)
    assert biased.blend.document_hits == 2
    assert not torch.allclose(biased.first_logits, base.first_logits, atol=1e-4)
    with pytest.raises(ValueError, match="all or global"):
        gen((1.0, 1.0, "sliding"))
    with pytest.raises(ValueError, match="temperature and mass"):
        gen((1.0, 0.0, "all"))


def test_the_config_keys_and_their_runtime():
    from kvshelf.assembly.runtimes import RUNTIMES
    from kvshelf.config import KVShelfConfig

    config = KVShelfConfig(
        blend_context_temperature=0.9,
        blend_context_mass=2.0,
        blend_context_layers="global",
        blend_context_distance_bias=0.5,
    )
    assert (config.blend_context_temperature, config.blend_context_mass) == (0.9, 2.0)
    assert config.blend_context_distance_bias == 0.5 and KVShelfConfig().blend_context_distance_bias == 0.0
    with pytest.raises(ValueError):
        KVShelfConfig(blend_context_mass=0.0)
    with pytest.raises(ValueError):
        KVShelfConfig(blend_context_layers="sliding")
    # vLLM computes the question's attention itself: the keys are not honoured there.
    for key in ("blend_context_mass", "blend_context_distance_bias"):
        assert key not in RUNTIMES["vllm"] and key in RUNTIMES["generate"]
