"""The generation module's seams (issue #14): one outcome type for every prefill strategy, the guard learning
from each, loaded bytes counted one way, one layer-by-layer save that refuses an unwritten layer, and the
runner's one forward loop narrowing tokens for CacheBlend."""

import pytest
import torch
from conftest import tiny_tokenizer

from kvshelf.advice.cost import CostModel
from kvshelf.advice.guard import Guard
from kvshelf.blend.blender import Blender
from kvshelf.cache.engine import CacheEngine
from kvshelf.generation import CachedGenerator
from kvshelf.generation import layerwise as layerwise_mod
from kvshelf.layerwise.saver import HostChunks, IncompleteSaveError, LayerwiseSaver
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.memory import MemoryBackend
from kvshelf.storage.tiers import TierManager

SEP = "<|CHUNK_SEP|>"


def prompt(n, seed):
    return torch.randint(4, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_for(runner):
    return CacheEngine(runner.fingerprint(), TierManager([MemoryBackend(1 << 26)]), chunk_size=16)


def test_loaded_bytes_are_counted_the_same_way_on_every_path(tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    engine = engine_for(runner)
    plain = CachedGenerator(runner, engine)
    layered = CachedGenerator(runner, engine, use_layerwise=True)
    ids = prompt(60, 1)
    plain.generate(ids, max_new_tokens=1)
    a, b = plain.generate(ids, max_new_tokens=1), layered.generate(ids, max_new_tokens=1)
    assert a.hit_tokens == b.hit_tokens == 59
    assert a.loaded_bytes == b.loaded_bytes == 59 * runner.kv_bytes_per_token
    blend = CachedGenerator(
        runner, engine, tiny_tokenizer(), blender=Blender(runner, engine, check_layers=[1], ratios=[0.2])
    )
    text = SEP.join(["Alpha facts: the key is 4821. " * 2, "Beta notes. " * 3]) + SEP + "Question?"
    blend.generate(text, max_new_tokens=1)
    warm = blend.generate(text, max_new_tokens=1)
    assert warm.blend.document_hits == 2
    per_token = runner.kv_bytes_per_token
    assert warm.loaded_bytes == warm.blend.document_tokens * per_token  # each document with its separator


def test_the_guard_learns_prefill_speed_from_full_prefills_and_measures_again(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    runner = ModelRunner(tiny_models("qwen2"))
    engine = engine_for(runner)
    cost = CostModel(prefill_tokens_per_s=1e12, kv_bytes_per_token=runner.kv_bytes_per_token)
    cost.prefill_source = tmp_path / "measured.json"  # a measured figure: requests may correct it
    gen = CachedGenerator(runner, engine, guard=Guard(cost, min_tokens=32), use_layerwise=True)
    gen.generate(prompt(20, 0), max_new_tokens=1)  # too short to say anything about prefill speed
    assert cost.observed_prefill == []
    for seed in (1, 2):
        gen.generate(prompt(48, seed), max_new_tokens=1, use_cache=False)
    assert len(cost.observed_prefill) == 2 and cost.prefill_tokens_per_s == 1e12
    gen.generate(prompt(48, 3), max_new_tokens=1)  # a miss on the layerwise path: a full prefill too
    assert cost.prefill_tokens_per_s < 1e9  # three requests disagreed by far: measured again
    assert cost.observed_prefill == []
    gen.generate(prompt(48, 3), max_new_tokens=1)  # a hit: not a full prefill
    assert cost.observed_prefill == []
    cost.prefill_tokens_per_s = 1e12
    for seed in (4, 5, 6):
        gen.generate(prompt(48, seed), max_new_tokens=1, use_cache=False)
    assert cost.prefill_tokens_per_s == 1e12  # measured again at most once per remeasure_prefill_after_s


def test_a_speed_given_by_hand_is_observed_but_never_replaced(tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    cost = CostModel(prefill_tokens_per_s=1e12, kv_bytes_per_token=runner.kv_bytes_per_token)
    gen = CachedGenerator(runner, engine_for(runner), guard=Guard(cost, min_tokens=32))
    for seed in range(4):
        gen.generate(prompt(40, seed), max_new_tokens=1, use_cache=False)
    assert len(cost.observed_prefill) == 4 and cost.prefill_tokens_per_s == 1e12


def test_a_failed_layerwise_load_closes_the_loader_once(tiny_models, monkeypatch):
    runner = ModelRunner(tiny_models("gemma3"))
    engine = engine_for(runner)
    gen = CachedGenerator(runner, engine, use_layerwise=True, layerwise_store=True)
    ids = prompt(50, 7)
    gen.generate(ids, max_new_tokens=1)
    closed = []
    real_close = layerwise_mod.LayerwiseLoader.close
    monkeypatch.setattr(layerwise_mod.LayerwiseLoader, "close", lambda self: closed.append(1) or real_close(self))
    real_wait = layerwise_mod.LayerwiseLoader.wait

    def failing_wait(self, i, *args):
        if i == 2:
            raise layerwise_mod.LayerLoadError("test: layer 2 lost")
        return real_wait(self, i, *args)

    monkeypatch.setattr(layerwise_mod.LayerwiseLoader, "wait", failing_wait)
    out = gen.generate(ids, max_new_tokens=3, stop_at_eos=False)
    expected = gen.generate(ids, max_new_tokens=3, stop_at_eos=False, use_cache=False)
    assert closed == [1] and out.hit_tokens == 0 and out.loaded_bytes == 0
    assert out.token_ids == expected.token_ids


def test_host_chunks_refuse_a_layer_nobody_wrote(tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    engine = engine_for(runner)
    ids = prompt(40, 9)
    kv = runner.new_kv(40)
    runner.forward(ids, 0, kv)
    keys = engine.keys_to_store(ids, None)
    chunks = HostChunks(
        engine,
        keys,
        num_layers=runner.num_layers,
        num_kv_heads=runner.num_kv_heads,
        head_dim=runner.head_dim,
        dtype=kv.data.dtype,
        pin=False,
    )
    for i in range(runner.num_layers - 1):
        chunks.write_layer(i, kv.data[i], 0)
    with pytest.raises(IncompleteSaveError, match="1 of 4 layer"):
        chunks.store()
    assert engine.stats.stored_tokens == 0
    chunks.write_layer(runner.num_layers - 1, kv.data[runner.num_layers - 1], 0)
    assert chunks.store() == 40

    saver = LayerwiseSaver(engine, prompt(40, 10), None, 0, kv)
    saver.on_layer(0)  # the other layers never come: nothing is stored
    assert saver.finish() == 0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_selecting_every_token_changes_nothing(tiny_models, family):
    runner = ModelRunner(tiny_models(family))
    ids = prompt(30, 11)
    a, b = runner.new_kv(30), runner.new_kv(30)
    plain = runner.forward(ids, 0, a)
    seen = []

    def select(layer, hidden, positions, rope):
        seen.append((layer, len(positions)))
        return torch.arange(len(positions)) if layer == 1 else None

    narrowed = runner.forward(ids, 0, b, select_tokens=select)
    assert torch.equal(plain, narrowed) and torch.equal(a.data, b.data)
    assert seen == [(i, 30) for i in range(runner.num_layers)]
    with pytest.raises(ValueError, match="all_logits"):
        runner.forward(ids, 0, b, select_tokens=select, all_logits=True)


@pytest.mark.parametrize("use_layerwise", [False, True])
def test_a_caller_that_stops_wanting_the_answer_interrupts_the_prefill_between_layers(tiny_models, use_layerwise):
    """A client gone mid-prefill stops the forward at the next layer; nothing is stored; the next request
    is answered as if the interrupted one never ran."""
    from kvshelf.errors import Interrupted

    runner = ModelRunner(tiny_models("llama"))
    engine = engine_for(runner)
    gen = CachedGenerator(runner, engine, use_layerwise=use_layerwise)
    ids = prompt(60, 7)
    asked = []

    def gone_after_two_layers() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(Interrupted):
        gen.generate(ids, max_new_tokens=4, should_stop=gone_after_two_layers)
    assert len(asked) == 3  # asked before layers 0, 1, 2: stopped before layer 2 of 4
    assert engine.lookup(ids) == 0  # nothing of the interrupted prefill was stored
    again = gen.generate(ids, max_new_tokens=4)
    assert again.token_ids == CachedGenerator(runner, None).generate(ids, max_new_tokens=4).token_ids
