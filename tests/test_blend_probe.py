"""The sampled probe of deep KV deviation (kvshelf.blend.probe) and the deep selection signals (issue #18)."""

import pytest
import torch

from kvshelf.blend.probe import probe_deviation
from kvshelf.blend.selection import SelectionPolicy, deviation, select
from kvshelf.model.runner import ModelRunner


def placed_prompt(runner, seed=0):
    """A prompt of BOS + two 'documents' (12 and 9 tokens) + a 5-token question, its exact KV, and a KV buffer
    with each document's KV computed alone (behind BOS) placed at its position, as a blend places them."""
    torch.manual_seed(seed)
    docs = [torch.randint(4, 300, (12,)).tolist(), torch.randint(4, 300, (9,)).tolist()]
    question = torch.randint(4, 300, (5,)).tolist()
    ids = [1] + docs[0] + docs[1] + question
    exact = runner.new_kv(len(ids))
    runner.forward(ids, 0, exact)
    placed = runner.new_kv(len(ids))
    document_of = torch.full((len(ids),), -1, dtype=torch.long)
    offset_of = torch.zeros(len(ids), dtype=torch.long)
    start = 1
    for index, doc in enumerate(docs):
        alone = runner.new_kv(1 + len(doc))
        runner.forward([1] + doc, 0, alone)
        for layer in range(runner.num_layers):
            placed.data[layer, 0, :, start : start + len(doc)] = runner.rerotate(
                alone.data[layer, 0, :, 1:], start - 1, layer
            )
            placed.data[layer, 1, :, start : start + len(doc)] = alone.data[layer, 1, :, 1:]
        document_of[start : start + len(doc)] = index
        offset_of[start : start + len(doc)] = torch.arange(len(doc))
        start += len(doc)
    return ids, exact, placed, document_of, offset_of


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_at_stride_one_the_probe_measures_the_exact_deviation_and_puts_the_kv_back(family, tiny_models):
    runner = ModelRunner(tiny_models(family))
    ids, exact, placed, document_of, offset_of = placed_prompt(runner)
    before = placed.data.clone()
    layer = runner.num_layers - 2
    got = probe_deviation(runner, ids, placed, document_of, offset_of, layer=layer, stride=1)
    assert torch.equal(placed.data, before)  # the probe's own KV is not left behind
    at = (document_of >= 0).nonzero().view(-1)
    want = deviation(exact.data[layer, :, :, at], placed.data[layer, :, :, at])
    assert torch.allclose(got[at], want, rtol=1e-3, atol=1e-5)
    assert got[1 + 12] > 0 and float(got[document_of < 0].abs().sum()) == 0.0  # the second document deviates


def test_a_stride_spreads_each_sample_over_its_block(tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    ids, _exact, placed, document_of, offset_of = placed_prompt(runner, seed=1)
    got = probe_deviation(runner, ids, placed, document_of, offset_of, layer=1, stride=4)
    first, second = got[1:13], got[13:22]
    assert torch.equal(first[0:4], first[2].expand(4)) and torch.equal(first[8:12], first[10].expand(4))
    # The second document's last block (offset 8) has no sample of its own: it takes the one before it.
    assert torch.equal(second[4:9], second[6].expand(5))
    with pytest.raises(ValueError, match="probe layer"):
        probe_deviation(runner, ids, placed, document_of, offset_of, layer=99, stride=4)
    with pytest.raises(ValueError, match="stride"):
        probe_deviation(runner, ids, placed, document_of, offset_of, layer=1, stride=0)


def test_deep_signals_rank_by_the_probe_and_need_it():
    g = torch.Generator().manual_seed(0)
    cached = torch.randn(2, 1, 8, 4, generator=g)
    fresh = cached.clone()
    fresh[:, :, 1] += 3.0  # the check layer sees token 1 move
    deep = torch.zeros(8)
    deep[5], deep[6] = 4.0, 2.0  # the probe sees tokens 5 and 6 move
    assert select(fresh, cached, 2, policy=SelectionPolicy(signal="deep"), deep=deep).nonzero().view(-1).tolist() == [
        5,
        6,
    ]
    both = select(fresh, cached, 2, policy=SelectionPolicy(signal="kv+deep"), deep=deep).nonzero().view(-1).tolist()
    assert both == [1, 5]
    with pytest.raises(ValueError, match="probed deviation"):
        select(fresh, cached, 2, policy=SelectionPolicy(signal="deep"))
    with pytest.raises(ValueError, match="probe"):
        SelectionPolicy(signal="deep", probe_stride=0)


def test_a_blend_with_the_probe_recomputes_its_budget(tiny_models):
    from conftest import tiny_tokenizer

    from kvshelf.blend.blender import Blender
    from kvshelf.cache.engine import CacheEngine
    from kvshelf.generation import CachedGenerator
    from kvshelf.storage.memory import MemoryBackend

    sep = "<|CHUNK_SEP|>"
    docs = ["Alpha facts: the key is 4821. " * 3, "Beta notes about rivers and seas. " * 3]
    runner = ModelRunner(tiny_models("gemma3"))
    engine = CacheEngine(runner.fingerprint(), MemoryBackend(1 << 28), chunk_size=16)
    policy = SelectionPolicy(signal="kv+deep", probe_layer=2, probe_stride=3)
    blender = Blender(runner, engine, check_layers=[1], ratios=[0.3], selection=policy)
    gen = CachedGenerator(runner, engine, tiny_tokenizer(), blender=blender, blend_special_str=sep)
    gen.generate(sep.join(docs[::-1]) + sep + "Q: key?", max_new_tokens=1)
    result = gen.generate(sep.join(docs) + sep + "Q: key?", max_new_tokens=2, stop_at_eos=False)
    info = result.blend
    assert info.document_hits == 2 and info.recomputed_tokens == info.selected_per_check[0] > 0
    assert torch.isfinite(result.first_logits).all()
