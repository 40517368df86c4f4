"""Generation with prefix reuse equals generation without it, on tiny models of every family."""

import pytest
import torch
from conftest import FAMILIES

from kvshelf.cache.engine import CacheEngine
from kvshelf.generation import CachedGenerator
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.base import StoredChunk
from kvshelf.storage.memory import MemoryBackend

# Stated tolerance for logits with vs without reuse (fp32): reused KV is bit-identical, only the
# matmul shapes of the recomputed part differ.
LOGIT_ATOL = 1e-4


def make_generator(model, chunk_size=16) -> CachedGenerator:
    runner = ModelRunner(model)
    engine = CacheEngine(runner.fingerprint(), MemoryBackend(1 << 28), chunk_size=chunk_size)
    return CachedGenerator(runner, engine)


def prompt(n: int, seed: int, vocab: int = 320) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_reuse_gives_identical_greedy_output(family, tiny_models):
    gen = make_generator(tiny_models(family))
    ids = prompt(70, seed=3)
    plain = gen.generate(ids, max_new_tokens=12, use_cache=False, stop_at_eos=False)
    cold = gen.generate(ids, max_new_tokens=12, stop_at_eos=False)
    warm = gen.generate(ids, max_new_tokens=12, stop_at_eos=False)
    assert cold.hit_tokens == 0 and cold.stored_tokens >= 70
    assert warm.hit_tokens == 69  # every prompt token but the last, whose logits pick the first token
    assert warm.loaded_bytes > 0
    assert plain.token_ids == cold.token_ids == warm.token_ids
    assert torch.allclose(warm.first_logits, plain.first_logits, atol=LOGIT_ATOL)
    # The output is not trivially constant: the test would catch a model that ignores its KV.
    assert len(set(plain.token_ids)) > 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_shared_prefix_different_suffix(family, tiny_models):
    gen = make_generator(tiny_models(family))
    docs = prompt(64, seed=5)
    gen.generate(docs + prompt(9, seed=6), max_new_tokens=4)
    second = docs + prompt(11, seed=7)
    warm = gen.generate(second, max_new_tokens=8, stop_at_eos=False)
    plain = gen.generate(second, max_new_tokens=8, use_cache=False, stop_at_eos=False)
    assert warm.hit_tokens == 64
    assert warm.token_ids == plain.token_ids
    assert torch.allclose(warm.first_logits, plain.first_logits, atol=LOGIT_ATOL)


def test_generated_tokens_are_reused_in_the_next_turn(tiny_models):
    gen = make_generator(tiny_models("qwen3"))
    turn1 = prompt(40, seed=8)
    out = gen.generate(turn1, max_new_tokens=30, stop_at_eos=False)
    turn2 = turn1 + out.token_ids + prompt(5, seed=9)
    warm = gen.generate(turn2, max_new_tokens=6, stop_at_eos=False)
    assert warm.hit_tokens == 64  # 40 prompt + 29 generated tokens had KV: 4 full chunks of 16
    assert warm.token_ids == gen.generate(turn2, max_new_tokens=6, use_cache=False, stop_at_eos=False).token_ids


def test_tenant_salt_isolates(tiny_models):
    gen = make_generator(tiny_models("llama"))
    ids = prompt(40, seed=10)
    gen.generate(ids, max_new_tokens=2, salt="alice")
    assert gen.generate(ids, max_new_tokens=2, salt="bob").hit_tokens == 0
    assert gen.generate(ids, max_new_tokens=2, salt="alice").hit_tokens == 39


def test_stops_at_eos(tiny_models):
    gen = make_generator(tiny_models("llama"))
    ids = prompt(20, seed=11)
    first = gen.generate(ids, max_new_tokens=5, use_cache=False, stop_at_eos=False).token_ids[0]
    gen.eos_ids = {first}
    assert gen.generate(ids, max_new_tokens=5, use_cache=False).token_ids == [first]


def test_equality_checks_are_sensitive_to_wrong_kv(tiny_models):
    """Guard for the tests above: KV that is slightly off must visibly change the logits."""
    gen = make_generator(tiny_models("gemma3"))
    ids = prompt(48, seed=12)
    plain = gen.generate(ids, max_new_tokens=1, use_cache=False)
    gen.generate(ids, max_new_tokens=1)
    backend = gen.engine.backend
    for key in gen.engine.keys(ids):
        stored = backend.get(key.digest)
        if stored is not None:
            noisy = stored.kv + 0.05 * torch.randn_like(stored.kv)
            backend.put(key.digest, StoredChunk(stored.meta, noisy))
    warm = gen.generate(ids, max_new_tokens=1)
    assert warm.hit_tokens == 47
    assert not torch.allclose(warm.first_logits, plain.first_logits, atol=LOGIT_ATOL)


def test_sampling_is_seeded_and_cache_neutral(tiny_models):
    gen = make_generator(tiny_models("qwen2"))
    ids = prompt(50, seed=13)
    kw = dict(max_new_tokens=10, stop_at_eos=False, temperature=1.5, seed=7)
    plain = gen.generate(ids, use_cache=False, **kw)
    gen.generate(ids, max_new_tokens=1)
    warm = gen.generate(ids, **kw)
    assert warm.hit_tokens == 49 and warm.token_ids == plain.token_ids
    assert gen.generate(ids, use_cache=False, **{**kw, "seed": 8}).token_ids != plain.token_ids
    # top_p so small that only the most likely token survives: greedy.
    greedy = gen.generate(ids, max_new_tokens=10, stop_at_eos=False, use_cache=False)
    assert gen.generate(ids, use_cache=False, **{**kw, "top_p": 1e-9}).token_ids == greedy.token_ids


def test_stream_yields_tokens_then_result(tiny_models):
    gen = make_generator(tiny_models("llama"))
    stream = gen.stream(prompt(20, seed=14), max_new_tokens=5, stop_at_eos=False)
    seen = []
    while True:
        try:
            seen.append(next(stream))
        except StopIteration as done:
            result = done.value
            break
    assert seen == result.token_ids and len(seen) == 5 and result.finish_reason == "length"
