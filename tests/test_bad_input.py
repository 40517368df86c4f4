"""Each kind of bad input gets a clear error naming what was wrong."""

import pytest

from kvshelf.cache.engine import CacheEngine
from kvshelf.config import load_config
from kvshelf.errors import ConfigError, ModelNotFoundError, PromptError
from kvshelf.generation import CachedGenerator
from kvshelf.model.provision import resolve_model
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.memory import MemoryBackend


@pytest.fixture
def gen(tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    return CachedGenerator(runner, CacheEngine(runner.fingerprint(), MemoryBackend(1 << 24), chunk_size=16))


class FakeTokenizer:
    unk_token_id = 0
    eos_token = None

    def __call__(self, text):
        return {"input_ids": [1] + [ord(c) % 300 + 4 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_empty_prompt(gen):
    with pytest.raises(PromptError, match="empty"):
        gen.generate([])
    gen.tokenizer = FakeTokenizer()
    with pytest.raises(PromptError, match="empty"):
        gen.generate("")


def test_prompt_longer_than_context(gen):
    limit = gen.runner.max_positions  # 512 in the tiny configs
    with pytest.raises(PromptError, match=f"{limit + 1} tokens.*context of {limit}"):
        gen.generate(list(range(4, 4 + limit + 1)))
    with pytest.raises(PromptError, match="max_new_tokens"):
        gen.generate(list(range(limit - 4)), max_new_tokens=10)
    with pytest.raises(PromptError, match="max_new_tokens must be >= 1"):
        gen.generate([5, 6, 7], max_new_tokens=0)


def test_text_prompt_without_tokenizer(gen):
    with pytest.raises(PromptError, match="tokenizer"):
        gen.generate("hello")


def test_text_prompt_with_tokenizer(gen):
    gen.tokenizer = FakeTokenizer()
    out = gen.generate("hello world", max_new_tokens=3, stop_at_eos=False)
    assert out.prompt_tokens == 12 and len(out.token_ids) == 3 and out.text


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        resolve_model("meta-llama/Llama-3-8B")


def test_kv_of_another_model_is_a_miss(tiny_models):
    backend = MemoryBackend(1 << 26)
    runners = [ModelRunner(tiny_models(f)) for f in ("llama", "qwen3")]
    gens = [CachedGenerator(r, CacheEngine(r.fingerprint(), backend, chunk_size=16)) for r in runners]
    ids = list(range(10, 60))
    gens[0].generate(ids, max_new_tokens=2)
    assert gens[1].generate(ids, max_new_tokens=2).hit_tokens == 0
    assert gens[0].generate(ids, max_new_tokens=2).hit_tokens == 49


def test_chunk_size_out_of_range_in_config():
    with pytest.raises(ConfigError, match="chunk_size"):
        load_config(environ={}, overrides={"chunk_size": 4})
    with pytest.raises(ConfigError, match="chunk_size"):
        load_config(environ={"KVSHELF_CHUNK_SIZE": "100000"})
